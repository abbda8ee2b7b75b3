"""`lorakit recommend`: the rule-based choices on generated small / medium / large datasets, the
reasons printed, a YAML that trains as written, and QLoRA when float weights do not fit."""

import json
import subprocess
import sys

import pytest
from transformers import LlamaConfig

from lorakit import LorakitError
from lorakit.cli import main
from lorakit.config import DataConfig, load_yaml
from lorakit.planning.estimate import shape_from_config
from lorakit.planning.recommend import DataProfile, format_recommendation, recommend

SMOL = shape_from_config(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True))
WORDS = "alpha beta gamma delta river stone cloud paper light green tower".split()


def _short(n):  # single-turn, answers of a few tokens
    return [{"instruction": f"add {i} and {i + 1}", "output": str(2 * i + 1)} for i in range(n)]


def _long(n):  # single-turn, answers of ~60 words
    return [{"instruction": f"describe item {i}", "output": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(60))}
            for i in range(n)]


def _chats(n):  # multi-turn messages
    return [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "and then?"}, {"role": "assistant", "content": f"then {i}"}]}
            for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recommend(capsys, data, model, *extra):
    code = main(["recommend", "--data", str(data), "--model", str(model), "--device-memory", "8GB",
                 "--out", str(data.with_suffix(".yaml")), *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return load_yaml(data.with_suffix(".yaml")), out.out


def test_small_short_dataset_gets_rank_8_qv_and_a_yaml_that_trains(tiny_model_dir, tmp_path, capsys):
    data = _write(tmp_path / "small.jsonl", _short(120))
    cfg, out = _recommend(capsys, data, tiny_model_dir, "--run-dir", str(tmp_path / "run"))
    lora, train = cfg["lora"], cfg["train"]
    assert (lora["r"], lora["alpha"], lora["dropout"], lora["use_rslora"]) == (8, 16, 0.1, False)
    assert lora["target_modules"] == ["q_proj", "v_proj"] and train["epochs"] == 3
    assert cfg["model"]["name"] == str(tiny_model_dir) and cfg["model"]["quantize"] == "none"
    assert train["batch_size"] * train["grad_accum"] == 16
    assert "120 examples (< 5k)" in out and "short single-turn answers" in out
    # p95 of the tokenized lengths, rounded up to 64
    assert cfg["data"]["max_len"] % 64 == 0 and "95% of examples" in out
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--config", str(data.with_suffix(".yaml")),
                           "--train.threads", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_medium_long_answers_get_rank_16_all_linear(tiny_model_dir, tmp_path, capsys):
    data = _write(tmp_path / "medium.jsonl", _long(6_000))
    cfg, out = _recommend(capsys, data, tiny_model_dir)
    lora = cfg["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"]) == (16, 32, 0.05, "all-linear")
    assert cfg["train"]["epochs"] == 2 and "complex generation" in out
    assert cfg["data"]["max_len"] >= 64 and cfg["data"]["max_len"] % 64 == 0


def test_large_multi_turn_gets_rank_32_rslora(tiny_model_dir, tmp_path, capsys):
    data = _write(tmp_path / "large.jsonl", _chats(51_000))
    cfg, out = _recommend(capsys, data, tiny_model_dir)
    lora = cfg["lora"]
    assert (lora["r"], lora["alpha"], lora["use_rslora"], lora["target_modules"]) == (32, 64, True, "all-linear")
    assert cfg["train"]["epochs"] == 1 and "100% multi-turn" in out
    assert "51,000 examples (lengths from a random 20,000)" in out  # counted in full, tokenized in part


def test_sampled_lengths_match_the_full_measure(tiny_model_dir, tmp_path):
    from lorakit.base import load_tokenizer
    from lorakit.planning.recommend import profile_data

    # answers of 1..120 words, so the percentiles move with the sample
    rows = [{"instruction": f"item {i}", "output": " ".join(WORDS[:1 + (i * 37) % 120 % len(WORDS)] * (1 + i % 11))}
            for i in range(3_000)]
    path = _write(tmp_path / "varied.jsonl", rows)
    tok = load_tokenizer(str(tiny_model_dir))
    full = profile_data(DataConfig(path=str(path)), tok, sample=0)
    part = profile_data(DataConfig(path=str(path)), tok, sample=1500)
    assert full.measured == 0 and part.measured == 1500 and part.examples == full.examples == 3_000
    assert full.length_p95 - full.length_p50 > 50  # a spread worth sampling
    # over 200 seeds a 1,500-example sample's p50 and p95 fall within 3.5% and 4.5% (one s.d.) of these
    # data's: 10% is about 3 s.d. for p50 (the sampler's uniformity is tested in test_streaming.py)
    assert abs(part.length_p50 - full.length_p50) <= 0.10 * full.length_p50
    assert abs(part.length_p95 - full.length_p95) <= 0.10 * full.length_p95
    assert abs(part.label_fraction - full.label_fraction) < 0.02
    assert profile_data(DataConfig(path=str(path)), tok, sample=1500) == part  # seeded: the same sample each time


def _profile(n=2_000, p95=900):
    return DataProfile(examples=n, multi_turn=0.0, length_p50=p95 // 2, length_p95=p95, length_max=p95 + 50,
                       answer_p50=200, label_fraction=0.5)


def test_qlora_and_checkpointing_are_chosen_only_when_needed():
    data = DataConfig(path="train.jsonl")
    roomy = recommend(_profile(), SMOL, "smollm2-135m", data, 64 * 2**30)
    assert roomy.config["model"].get("quantize") is None and roomy.config["train"]["grad_checkpointing"] is False
    assert roomy.config["train"]["batch_size"] == 16 and roomy.config["train"]["grad_accum"] == 1
    tight = recommend(_profile(), SMOL, "smollm2-135m", data, 0.55 * 2**30)  # 0.50 GiB of fp32 weights alone
    assert tight.config["model"]["quantize"] == "nf4"
    assert tight.estimate.total <= 0.75 * 2**30
    reasons = {k: why for k, _, why in tight.reasons}
    assert "4-bit NF4" in reasons["model.quantize"]
    with pytest.raises(LorakitError, match="even QLoRA"):
        recommend(_profile(), SMOL, "smollm2-135m", data, 50 * 2**20)


def test_on_cpu_the_batch_is_planned_at_the_resident_peak_as_train_plans_it():
    from lorakit.planning.fit import rss_ratio

    data, ratio, memory = DataConfig(path="train.jsonl"), rss_ratio("cpu", "bf16"), 3 * 2**30
    plain = recommend(_profile(), SMOL, "smollm2-135m", data, memory, dtype="bf16")
    cpu = recommend(_profile(), SMOL, "smollm2-135m", data, memory, dtype="bf16", rss_ratio=ratio)
    # batch 8 fits 3 GiB by its live tensors, not with the allocator's share on top: 4 × 4
    assert (plain.config["train"]["batch_size"], cpu.config["train"]["batch_size"]) == (8, 4)
    assert cpu.config["train"]["grad_accum"] == 4 and cpu.estimate.total * ratio <= memory < plain.estimate.total * ratio
    assert "resident" in format_recommendation(cpu, _profile()) and "resident" not in format_recommendation(plain, _profile())


def test_full_fine_tuning_is_proposed_for_large_data_when_it_fits():
    data = DataConfig(path="train.jsonl")
    big = recommend(_profile(n=150_000, p95=256), SMOL, "smollm2-135m", data, 64 * 2**30)
    assert big.config["train"]["method"] == "full" and big.config["train"]["lr"] == 5e-5 and "lora" not in big.config
    assert big.estimate.settings["method"] == "full" and big.estimate.trainable_params == SMOL.total_params
    reasons = {k: why for k, _, why in big.reasons}
    assert "150,000 examples (≥ 100,000)" in reasons["train.method"] and not any(k.startswith("lora.") for k in reasons)
    assert big.run_config().train.method == "full"
    # 135M weights × (4 + 4 + 8 + 4) bytes do not fit 2 GiB: LoRA, and the reason says why
    tight = recommend(_profile(n=150_000, p95=256), SMOL, "smollm2-135m", data, 2 * 2**30)
    assert tight.config["train"].get("method") is None and tight.config["lora"]["r"] == 32
    assert "full fine-tuning does not fit 2.00 GiB" in {k: why for k, _, why in tight.reasons}["train.method"]
    small = recommend(_profile(), SMOL, "smollm2-135m", data, 64 * 2**30)
    assert "2,000 examples (< 100,000)" in {k: why for k, _, why in small.reasons}["train.method"]


def test_recommend_bad_input(tmp_path, capsys, tiny_model_dir):
    code = main(["recommend", "--data", str(tmp_path / "missing.jsonl"), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "r.yaml")])
    assert code == 2 and "missing.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "r.yaml").exists()
    data = _write(tmp_path / "ok.jsonl", _short(3))
    code = main(["recommend", "--data", str(data), "--model", str(tiny_model_dir), "--sample", "-1",
                 "--out", str(tmp_path / "r.yaml")])
    assert code == 2 and "--sample must be ≥ 0" in capsys.readouterr().err
    assert not (tmp_path / "r.yaml").exists()
