"""lorakit export: llama.cpp GGUF (run in a real llama.cpp), Ollama folders, vLLM folders (loaded in
PEFT), and the refusals for what a runtime cannot represent."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import build_tokenizer, randomize_adapters
from llama_cpp_runtime import available, run_llama_cpp
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, LorakitError, get_lora_model
from lorakit.export import check, export, gguf_lora

needs_llama_cpp = pytest.mark.skipif(not available() and not os.environ.get("CI"),
                                     reason="node-llama-cpp not installed (scripts/setup test installs it)")


def _adapter(model_dir, folder, seed=3, **cfg):
    lm = get_lora_model(AutoModelForCausalLM.from_pretrained(model_dir),
                        LoraConfig(**{"r": 4, "alpha": 8, "target_modules": "all-linear", **cfg}))
    randomize_adapters(lm, seed=seed, std=0.5)
    lm.save_pretrained(folder)
    return lm


def _greedy(model, prompts, n):
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
            out.append(seq[0, len(ids):].tolist())
    return out


@needs_llama_cpp
def test_lora_gguf_and_merged_gguf_answer_in_llama_cpp_as_in_lorakit(tiny_model_dir, tmp_path, monkeypatch):
    lm = _adapter(tiny_model_dir, tmp_path / "ad", base_model_name_or_path=str(tiny_model_dir))
    base_gguf = export(None, "gguf", tmp_path / "base.gguf", model=str(tiny_model_dir), dtype="f32").path
    lora_gguf = export(tmp_path / "ad", "gguf-lora", tmp_path / "ad.gguf").path
    merged_gguf = export(tmp_path / "ad", "gguf", tmp_path / "merged.gguf", dtype="f32").path
    assert check(lora_gguf, "gguf-lora") == []
    tok = build_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("who are you", "convert the date March 3", "hello world")]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    want = _greedy(lm.model.eval(), prompts, 12)
    base_want = _greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), prompts, 12)
    assert want != base_want  # the adapter changes the answers, so matching them means it was applied
    got_base = run_llama_cpp(base_gguf, prompts, 12, texts=texts)
    got_lora = run_llama_cpp(base_gguf, prompts, 12, lora=lora_gguf)
    got_merged = run_llama_cpp(merged_gguf, prompts, 12)
    assert got_base["tokenized"] == prompts  # the GGUF's vocabulary tokenizes as transformers does
    assert got_base["answers"] == base_want
    assert got_lora["answers"] == want
    assert got_merged["answers"] == want
    with torch.no_grad():  # probabilities after the prompt, llama.cpp vs lorakit (top 5 of llama.cpp)
        probs = torch.softmax(lm.model(torch.tensor([prompts[0]])).logits[0, -1], -1)
    top = got_lora["first_probs"][0]
    assert max(abs(p - float(probs[int(i)])) for i, p in top.items()) < 1e-4
    # The q/k row permutation is what makes it right: without it llama.cpp answers otherwise.
    monkeypatch.setattr(gguf_lora, "to_gguf_layout", lambda arch, name, w: w)
    unpermuted = export(tmp_path / "ad", "gguf-lora", tmp_path / "bad.gguf").path
    assert run_llama_cpp(base_gguf, prompts, 12, lora=unpermuted)["answers"] != want


def test_vllm_export_folds_alpha_pattern_and_rslora_and_pads_rank_12_with_equal_peft_logits(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    _adapter(tiny_model_dir, tmp_path / "ad", r=12, alpha=16, use_rslora=True,
             alpha_pattern={"down_proj": 40}, rank_pattern={"q_proj": 6})
    assert any("alpha_pattern" in p for p in check(tmp_path / "ad", "vllm"))
    result = export(tmp_path / "ad", "vllm", tmp_path / "vllm", model=str(tiny_model_dir))
    cfg = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["rank_pattern"], cfg["alpha_pattern"], cfg["use_rslora"]) == (16, {}, {}, False)
    assert "--max-lora-rank 16" in result.lines[0] and "--enable-lora --lora-modules" in result.lines[0]
    assert check(tmp_path / "vllm", "vllm") == []
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in ("ad", "vllm"):
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / folder)
        with torch.no_grad():
            logits.append(model.eval()(ids).logits)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert (logits[0] - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("to", ["vllm", "gguf-lora"])
def test_modules_to_save_and_biases_are_refused_with_the_way_out(tiny_model_dir, tmp_path, to):
    _adapter(tiny_model_dir, tmp_path / "mts", target_modules=["q_proj"], modules_to_save=["down_proj"])
    with pytest.raises(LorakitError, match=r"modules_to_save=\['down_proj'\].*(merge|--to gguf).*train without"):
        export(tmp_path / "mts", to, tmp_path / "out1", model=str(tiny_model_dir))
    from lorakit.export.adapter import read_export_adapter, refuse

    adapter = read_export_adapter(tmp_path / "mts")
    adapter.config.modules_to_save = None
    adapter.extras = {"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    with pytest.raises(LorakitError, match=r"trains biases \(model.layers.0.self_attn.q_proj.bias\).*lora.bias none"):
        refuse(adapter, to)
    assert not (tmp_path / "out1").exists()


def test_gguf_lora_refuses_embeddings_and_a_tied_head(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    folder = tmp_path / "tied"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    _adapter(folder, tmp_path / "emb", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(LorakitError, match=r"'model.embed_tokens' is an embedding LoRA.*--to gguf"):
        export(tmp_path / "emb", "gguf-lora", tmp_path / "a.gguf", model=str(folder))
    _adapter(folder, tmp_path / "head", target_modules=["lm_head", "q_proj"])
    with pytest.raises(LorakitError, match=r"'lm_head' is adapted, but this model ties its output head.*--to gguf"):
        export(tmp_path / "head", "gguf-lora", tmp_path / "b.gguf", model=str(folder))
    problems = check(tmp_path / "head", "gguf-lora")
    assert len(problems) == 1 and "ties its output head" in problems[0]
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


def test_cli_ollama_folder_and_check(tiny_model_dir, tmp_path):
    _adapter(tiny_model_dir, tmp_path / "ad", base_model_name_or_path=str(tiny_model_dir))
    run = [sys.executable, "-m", "lorakit", "export"]
    proc = subprocess.run([*run, str(tmp_path / "ad"), "--to", "ollama", "--out", str(tmp_path / "ol")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ollama create ol -f Modelfile" in proc.stdout
    modelfile = (tmp_path / "ol" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./base.gguf\nADAPTER ./adapter.gguf\nTEMPLATE \"\"\"")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    ok = subprocess.run([*run, str(tmp_path / "ol" / "adapter.gguf"), "--to", "gguf-lora", "--check"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok for gguf-lora" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([*run, str(tmp_path / "ol" / "base.gguf"), "--to", "gguf-lora", "--check"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "general.type is 'model'" in bad.stdout, bad.stdout
    missing = subprocess.run([*run, str(tmp_path / "nope"), "--to", "vllm"], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_transformers_export_is_the_merged_model_in_a_folder_transformers_loads(tiny_model_dir, tmp_path):
    lm = _adapter(tiny_model_dir, tmp_path / "ad").eval()
    result = export(tmp_path / "ad", "transformers", tmp_path / "merged", model=str(tiny_model_dir))
    assert result.path == tmp_path / "merged" and "lorakit chat --model" in result.lines[0]
    merged = AutoModelForCausalLM.from_pretrained(result.path).eval()
    assert merged.dtype == torch.float32 and (result.path / "tokenizer.json").is_file()
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = lm(input_ids=ids).logits, merged(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapter does something, and the merge keeps it
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(LorakitError, match="exists and is not empty"):
        export(tmp_path / "ad", "transformers", tmp_path / "merged", model=str(tiny_model_dir))
    with pytest.raises(LorakitError, match="--outtype for --to transformers must be one of f32, f16, bf16"):
        export(tmp_path / "ad", "transformers", tmp_path / "m2", model=str(tiny_model_dir), dtype="q8_0")
    half = export(tmp_path / "ad", "transformers", tmp_path / "m3", model=str(tiny_model_dir), dtype="bf16")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(half.path / "model.safetensors").values()} == {torch.bfloat16}
