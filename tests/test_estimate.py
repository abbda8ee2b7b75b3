"""Memory-estimate arithmetic on hand-computed values (the activation model awaits validation)."""

import pytest
import torch
from transformers import LlamaConfig

from lorakit import LorakitError
from lorakit.planning.estimate import BITS_NF4, BITS_NF4_DOUBLE_QUANT, estimate_memory, parse_size, shape_from_config

SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def test_shape_and_parameter_count_match_smollm2():
    s = shape_from_config(SMOL)
    assert s.kv_dim == 192 and s.total_params == 134_515_008  # SmolLM2-135M's real count


def test_seeds_worked_example_and_adapter_counts():
    e = estimate_memory(shape_from_config(SMOL), "lora", r=8, targets=["q_proj"], batch=1, seq=16)
    q = e.adapter_by_type["q_proj"]
    assert q["params_per_layer"] == 9_216 and q["saved_pct"] == pytest.approx(100 * (1 - 9216 / 576 ** 2))
    full = estimate_memory(shape_from_config(SMOL), "lora", r=16, batch=1, seq=16)
    assert full.trainable_params == 4_884_480  # = get_lora_model(..., r=16, all-linear) on SmolLM2
    assert full.components["adapter parameters (fp32)"] == 4_884_480 * 4
    assert full.components["optimizer state (adamw)"] == 4_884_480 * 8


def test_nf4_bits_and_quantized_weight_bytes():
    assert BITS_NF4 == 4.5 and BITS_NF4_DOUBLE_QUANT == pytest.approx(4.127, abs=1e-3)
    s = shape_from_config(SMOL)
    e = estimate_memory(s, "qlora", r=16, batch=1, seq=16)
    linear = s.layers * s.layer_linear_params
    assert e.components[f"frozen linear weights (NF4, {BITS_NF4_DOUBLE_QUANT:.3f} bits)"] == pytest.approx(linear * BITS_NF4_DOUBLE_QUANT / 8)


def test_sizes_and_bad_numbers():
    assert parse_size("24GB") == 24 * 2**30 and parse_size("512 MiB") == 512 * 2**20
    with pytest.raises(LorakitError, match="memory size"):
        parse_size("lots")
    with pytest.raises(LorakitError, match="at least 1"):
        estimate_memory(shape_from_config(SMOL), batch=0)
    with pytest.raises(LorakitError, match="match none"):
        estimate_memory(shape_from_config(SMOL), targets=["wq"])


def _cli(capsys, *argv):
    from lorakit.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_estimate_reads_the_config_only_and_matches_the_real_adapter(tiny_model_dir, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_lora_model

    code, out, _ = _cli(capsys, "estimate", "--model", str(tiny_model_dir), "--r", "4", "--batch", "2", "--seq", "64",
                        "--device", "cpu", "--json")
    assert code == 0
    est = json.loads(out)
    lm = get_lora_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    real = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    assert est["trainable_params"] == real
    assert est["total"] == pytest.approx(sum(est["components"].values()))
    code, out, _ = _cli(capsys, "estimate", "--model", str(tiny_model_dir), "--method", "qlora", "--device", "cpu")
    assert code == 0 and "frozen linear weights (NF4, 4.127 bits)" in out and "total" in out


def test_largest_batch_reported_is_the_largest_that_fits():
    s = shape_from_config(SMOL)
    e = estimate_memory(s, "lora", r=16, batch=2, seq=512, device_memory=4 * 2**30)
    assert e.max_batch and e.max_batch > 1
    assert estimate_memory(s, "lora", r=16, batch=e.max_batch, seq=512).total <= 4 * 2**30
    assert estimate_memory(s, "lora", r=16, batch=e.max_batch + 1, seq=512).total > 4 * 2**30


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/model"], "no/such/model"),
    (["--device-memory", "lots"], "memory size"),
    (["--targets", "wq,wk"], "match none"),
])
def test_cli_estimate_bad_input(tiny_model_dir, capsys, argv, message):
    argv = argv if "--model" in argv else ["--model", str(tiny_model_dir), *argv]
    code, _, err = _cli(capsys, "estimate", *argv)
    assert code == 2 and message in err


@pytest.mark.parametrize("flag", ["--batch", "--seq", "--r"])
def test_cli_estimate_impossible_numbers(capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        _cli(capsys, "estimate", flag, "0")
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_config_without_the_needed_fields_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 100}')
    code, _, err = _cli(capsys, "estimate", "--model", str(tmp_path))
    assert code == 2 and "hidden_size" in err


def test_activation_and_loss_terms_by_hand():
    tiny = shape_from_config(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    e = estimate_memory(tiny, "lora", r=4, batch=1, seq=16)
    # per token and layer: block input and residual (2h; the Llama norms' outputs are recomputed),
    # q_rot + k + v + attention out (= o_proj's input) (2h + 2kv), gate/up (2I: silu and the
    # product are recomputed), A·x for 7 adapters (7r); fp32
    per_token = (4 * 64 + 2 * 32 + 2 * 128 + 7 * 4) * 4 * 2
    assert e.components["activations"] == 16 * per_token
    masks = estimate_memory(tiny, "lora", r=4, batch=1, seq=16, dropout=True)  # recomputed from a seed: nothing kept
    assert masks.components["activations"] == e.components["activations"]
    dora = estimate_memory(tiny, "lora", r=4, batch=1, seq=16, dropout=True, dora=True)  # nn.Dropout: mask + copy
    dora0 = estimate_memory(tiny, "lora", r=4, batch=1, seq=16, dora=True)
    assert dora.components["activations"] - dora0.components["activations"] == 16 * 2 * 5 * (6 * 64 + 128)
    bf16 = estimate_memory(tiny, "lora", r=4, batch=1, seq=16, dtype="bf16")  # Llama norms: no fp32 copies
    assert bf16.components["activations"] == 16 * per_token // 2
    # one chunk of fp32 logits (softmax in place) + the label positions' hidden and its gradient
    assert e.components["loss (chunked logits)"] == 16 * 96 * 4 + 2 * 16 * 64 * 4
    ck = estimate_memory(tiny, "lora", r=4, batch=1, seq=16, grad_ckpt=True)
    # block inputs + one block recomputed, which keeps its norms' outputs (no recipes under checkpointing)
    assert ck.components["activations"] == 16 * 4 * (2 * 64 + 6 * 64 + 2 * 32 + 2 * 128 + 7 * 4)


def test_cli_estimate_auto_dtype_follows_what_train_picks(tiny_model_dir, capsys, monkeypatch):
    import json

    def dtype(*extra):
        code, out, _ = _cli(capsys, "estimate", "--model", str(tiny_model_dir), "--device", "cpu", "--json", *extra)
        assert code == 0
        return json.loads(out)["settings"]["dtype"]

    assert dtype() == "fp32"  # conftest: no native bf16
    monkeypatch.setenv("LORAKIT_CPU_BF16", "1")
    assert dtype() == "bf16"
    assert dtype("--method", "qlora") == "fp32"  # a 4-bit base on CPU computes in fp32
    assert dtype("--dtype", "fp32") == "fp32"
    assert dtype("--device", "cuda") == "bf16"


def test_half_precision_activations_count_fp32_norms_unless_llama_style():
    import dataclasses

    s = shape_from_config(SMOL)
    e32 = estimate_memory(s, "lora", r=16, batch=1, seq=1000, dtype="fp32")
    e16 = estimate_memory(s, "lora", r=16, batch=1, seq=1000, dtype="bf16")
    assert s.llama_norms and e16.components["activations"] == pytest.approx(e32.components["activations"] / 2)
    other = dataclasses.replace(s, llama_norms=False)  # e.g. Gemma's 1 + weight norm, run by transformers
    o16 = estimate_memory(other, "lora", r=16, batch=1, seq=1000, dtype="bf16")
    norms = 1000 * s.layers * 2 * 2 * s.hidden * 4  # two RMSNorms per layer keep 2h fp32 values per token each
    outputs = 1000 * s.layers * 2 * s.hidden * 2  # and their bf16 outputs stay kept (not recomputed)
    assert o16.components["activations"] == pytest.approx(e32.components["activations"] / 2 + norms + outputs)


def test_dora_adds_one_magnitude_per_output_and_one_saved_output_per_projection():
    s = shape_from_config(SMOL)
    lora = estimate_memory(s, "lora", r=16, batch=2, seq=64, dtype="bf16")
    dora = estimate_memory(s, "lora", r=16, batch=2, seq=64, dtype="bf16", dora=True)
    outs = sum(o for _, o in s.linears.values())  # q, k, v, o, gate, up, down output widths
    assert dora.trainable_params - lora.trainable_params == 155_520 == 30 * outs  # = get_lora_model(use_dora) count
    extra = dora.components["activations"] - lora.components["activations"]
    assert extra == 2 * 64 * 30 * outs * 2  # tokens × layers × widths × bf16 bytes


def test_the_estimate_counts_the_loss_chunk_the_loss_uses():
    from lorakit.ops.loss import default_chunk
    from lorakit.planning.estimate import LOSS_CHUNKS

    h, w = torch.zeros(2, 8), torch.zeros(16, 8)
    assert default_chunk(h, w) == LOSS_CHUNKS[4] == 512
    assert default_chunk(h.bfloat16(), w.bfloat16()) == LOSS_CHUNKS[2] == 128
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert default_chunk(h, w) == 128  # the head's matmul runs in bf16 there
