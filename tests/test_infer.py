"""generate / chat / merge / combine, and the decode loop behind them."""

import io
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import LoraModel
from lorakit.cli import main
from lorakit.inference.generation import Request, Sampling
from lorakit.inference.engine import load_engine

ROOT = Path(__file__).resolve().parents[1]
Q = [{"role": "user", "content": "normalize the date March 5"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, two_adapters):
    return load_engine(str(tiny_model_dir), [f"{n}={p}" for n, p in two_adapters.items()], device="cpu")


def _cli(*args):
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(list(args))
    return rc, buf.getvalue()


def test_greedy_loop_matches_transformers_generate(engine):
    ids = engine.prompt_ids(Q)
    for adapter in (None, "alpha"):
        ours = engine.run([Request(ids, adapter, Sampling(max_new_tokens=12))])[0]
        ctx = engine.lora.disable_adapter() if adapter is None else engine.lora.mixed_batch([adapter])
        with ctx:
            ref = engine.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                        pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.tokenizer.eos_token_id)
        want = ref[0, len(ids):].tolist()
        want = want[:want.index(engine.tokenizer.eos_token_id)] if engine.tokenizer.eos_token_id in want else want
        assert ours.token_ids == want


def test_adapters_differ_and_a_mixed_batch_equals_separate_runs(engine):
    prompts = [Q, [{"role": "user", "content": "who are you"}], [{"role": "user", "content": "hello world"}]]
    rows = [(p, a) for p in prompts for a in (None, "alpha", "beta")]
    mixed = engine.run([Request(engine.prompt_ids(p), a, Sampling(max_new_tokens=10)) for p, a in rows])
    alone = [engine.run([Request(engine.prompt_ids(p), a, Sampling(max_new_tokens=10))])[0] for p, a in rows]
    assert [m.token_ids for m in mixed] == [a.token_ids for a in alone]
    assert len({tuple(m.token_ids) for m in mixed[:3]}) == 3  # base, alpha, beta answer differently


def test_streaming_stop_strings_and_seeded_sampling(engine):
    pieces = []
    out = engine.chat(Q, "alpha", Sampling(max_new_tokens=16), on_text=pieces.append)
    assert "".join(pieces) == out.text and out.text
    cut = out.text[len(out.text) // 2:][:3]
    stopped = engine.chat(Q, "alpha", Sampling(max_new_tokens=16, stop=[cut]))
    assert stopped.finish_reason == "stop" and stopped.text == out.text[:out.text.find(cut)]
    s = Sampling(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=3)
    assert engine.chat(Q, "beta", s).token_ids == engine.chat(Q, "beta", s).token_ids


def test_generate_cli_single_and_batch(tiny_model_dir, two_adapters, engine, tmp_path):
    rc, out = _cli("generate", "--model", str(tiny_model_dir), "--adapter", str(two_adapters["alpha"]),
                   "--prompt", Q[0]["content"], "--max-new-tokens", "10")
    assert rc == 0 and out.rstrip("\n") == engine.chat(Q, "alpha", Sampling(max_new_tokens=10)).text
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "normalize the date March 5"}\n{"messages": [{"role": "user", "content": "who are you"}]}\n')
    rc, out = _cli("generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--max-new-tokens", "6")
    assert rc == 0 and len(out.strip().splitlines()) == 2
    prompts.write_text("{broken\n")
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts)]) == 2


def test_chat_one_shot_from_a_pipe(tiny_model_dir, two_adapters, engine):
    proc = subprocess.run([sys.executable, "-m", "lorakit", "chat", "--model", str(tiny_model_dir), "--adapter",
                           f"beta={two_adapters['beta']}", "--max-new-tokens", "10"],
                          input=Q[0]["content"] + "\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.rstrip("\n") == engine.chat(Q, "beta", Sampling(max_new_tokens=10)).text


def test_merge_cli_loads_in_plain_transformers(tiny_model_dir, two_adapters, tmp_path):
    rc, _ = _cli("merge", "--model", str(tiny_model_dir), "--adapter", str(two_adapters["alpha"]), "--out", str(tmp_path / "m"))
    assert rc == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "m" / f).is_file(), f
    x = torch.randint(3, 200, (2, 9))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ref = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), two_adapters["alpha"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(two_adapters["alpha"]), "--out", str(tmp_path / "m")]) == 2


def test_combine_cli_cat_is_the_weighted_sum(tiny_model_dir, two_adapters, tmp_path):
    rc, _ = _cli("combine", "--model", str(tiny_model_dir), "--adapter", f"a={two_adapters['alpha']}:0.7",
                 "--adapter", f"b={two_adapters['beta']}:-0.2", "--method", "cat", "--out", str(tmp_path / "c"))
    assert rc == 0
    lm = LoraModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    lm.load_adapter(two_adapters["alpha"], "a")
    lm.load_adapter(two_adapters["beta"], "b")
    lm.load_adapter(tmp_path / "c", "c")
    for name, layer in ((n, m) for n, m in lm.model.named_modules() if hasattr(m, "delta_weight") and "c" in m.lora_A):
        torch.testing.assert_close(layer.delta_weight("c"), 0.7 * layer.delta_weight("a") - 0.2 * layer.delta_weight("b"),
                                   atol=1e-6, rtol=0)
    assert main(["combine", "--adapter", "nope", "--out", str(tmp_path / "d")]) == 2


def test_a_batched_prompt_never_copies_the_frozen_head_per_row(tiny_model_dir):
    # torch's matmul broadcasts a frozen head's weight to (rows, d, V) and copies it when its input is
    # a strided slice (a prompt's last position): that is rows × the head, 864 MiB on SmolLM2 with 16
    # prompts. The decode loop hands the head a contiguous last position instead.
    from torch.utils._python_dispatch import TorchDispatchMode

    from lorakit.base import load_tokenizer
    from lorakit.inference.generation import generate_batch

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval().requires_grad_(False)
    tok = load_tokenizer(str(tiny_model_dir))
    requests = [Request(tok(p, add_special_tokens=False)["input_ids"], None, Sampling(max_new_tokens=3))
                for p in ("normalize the date March 5", "who are you", "hello", "add 3 and 3 please now")]
    with Largest() as seen:
        outs = generate_batch(model, tok, requests)
    head = model.get_output_embeddings().weight
    assert all(o.completion_tokens >= 1 for o in outs)
    assert 0 < seen.numel <= head.numel(), (seen.numel, tuple(head.shape))  # views of the weight, no more
