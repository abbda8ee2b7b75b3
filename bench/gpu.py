"""A GPU training benchmark, ready for a machine with CUDA (a benchmark, not a test).

    .venv/bin/python bench/gpu.py [--steps 20] [--out /tmp/lorakit-gpu]       # on a CUDA machine
    .venv/bin/python bench/gpu.py --tiny --steps 3                             # the same path on CPU, in seconds

A 1.1B-parameter Llama (TinyLlama's shape: hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632;
random weights, bf16) with SmolLM2's tokenizer, LoRA r=16 α=32 on every linear layer, trained on
packed rows of 4,096 tokens (variable-length chat examples, lengths log-normal as in
bench/vs_peft_trainer.py) for --steps optimizer steps of one row. Side by side, each in its own
process:

- lorakit: `lorakit train` (bf16, packed, per-document attention; its own MFU line);
- PEFT + Trainer padding-free (`DataCollatorWithFlattening`, `bf16=True`, a bf16 base), with as
  many examples per step as make about 4,096 tokens;
- the same with gradient checkpointing.

Printed: tokens/s, MFU (the decoder's matmul FLOPs per token — lorakit.training.mfu — × tokens/s over
the GPU's bf16 matmul peak measured by the same function; the head is left out on both sides here,
as the peer runs it at every position and lorakit at label positions only, so `lorakit train`'s own
MFU line, which counts the head per label position, reads a little higher), peak memory (CUDA max allocated; peak RSS
on CPU) and the ratios against lorakit. ``--tiny`` swaps in a 2-layer model of hidden 64 and rows
of 256 tokens, to check the path on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_peft_trainer import varlen_rows, worker_peft  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
}


def make_model(folder: Path, shape: str) -> None:
    """A random Llama of ``shape`` with the embedded SmolLM2's tokenizer, saved in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.base import load_tokenizer

    if (folder / "config.json").is_file():
        return
    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[shape])
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)


def lorakit_run(model: Path, data: Path, steps: int, max_len: int, device: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", str(model), "--data", str(data), "--out", str(out),
           "--overwrite", "--model.device", device, "--train.precision", "bf16", "--lora.r", "16", "--lora.alpha", "32",
           "--data.max_len", str(max_len), "--train.batch_size", "1", "--train.max_steps", str(steps),
           "--train.warmup", "0.1", "--data.val_size", "0", "--train.eval_samples", "0", "--train.plot", "false"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lorakit train failed:\n{done.stderr[-3000:]}")
    lines = {line.split(":", 1)[0].strip(): line for line in done.stdout.splitlines() if ":" in line}
    throughput = lines["throughput"]
    return {"tokens_per_s": float(throughput.split()[1]), "peak_mib": float(throughput.split("peak memory:")[1].split()[0])}


def peft_run(model: Path, data: Path, steps: int, max_len: int, device: str, out: Path, grad_ckpt: bool) -> dict:
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    mean_chars = sum(len(r["messages"][0]["content"]) + len(r["messages"][1]["content"]) for r in rows) / len(rows)
    batch = max(1, round(max_len / (mean_chars / 4.5 + 20)))  # examples making about max_len tokens
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    res = worker_peft(data, None, steps, max_len, out, padding_free=True, bf16=True, model_name=str(model), device=device,
                      batch=batch, grad_ckpt=grad_ckpt)
    if device == "cuda":
        import torch

        res["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        res["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["examples_per_step"] = batch
    return res


def flops_and_peak(model: Path, device: str) -> tuple[float, float]:
    """Model matmul FLOPs per token of a LoRA step (r=16, all-linear) and the device's bf16 peak."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit import LoraConfig, get_lora_model
    from lorakit.training.mfu import matmul_peak_flops, train_flops_per_token

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    lm = get_lora_model(meta, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    n = 8192 if device == "cuda" else 1024
    return train_flops_per_token(lm.model), matmul_peak_flops(torch.bfloat16, device, n=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU (checks the path)")
    ap.add_argument("--out", default="/tmp/lorakit-gpu")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    shape, max_len = ("tiny", 256) if args.tiny else ("1b", 4096)
    device = "cpu" if args.tiny else "cuda"
    model, data = out / f"model-{shape}", out / "varlen.jsonl"
    if args.worker:  # one PEFT run in this process
        print(json.dumps(peft_run(model, data, args.steps, max_len, device, out / args.worker, args.worker == "peft-ckpt")))
        return
    out.mkdir(parents=True, exist_ok=True)
    make_model(model, shape)
    data.write_text("".join(json.dumps(r) + "\n" for r in varlen_rows(3000 if not args.tiny else 200, 1)))
    fpt, peak = flops_and_peak(model, device)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    results["lorakit (packed, bf16)"] = lorakit_run(model, data, args.steps, max_len, device, out / "lorakit")
    for kind, label in (("peft", "PEFT + Trainer padding-free bf16"), ("peft-ckpt", "PEFT + Trainer padding-free bf16, grad ckpt")):
        done = subprocess.run([sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--out", str(out),
                               *(["--tiny"] if args.tiny else [])], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    ours = results["lorakit (packed, bf16)"]
    print(f"# bench/gpu.py{' --tiny' if args.tiny else ''} --steps {args.steps}: {shape} Llama, LoRA r=16 all-linear, "
          f"rows of {max_len} tokens, {device} ({platform.node()}); {fpt / 1e6:,.1f} MFLOP per token; "
          f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; {time.perf_counter() - t0:.0f} s")
    print("| run | tokens/s | MFU | peak memory MiB | lorakit's tokens/s ÷ this | this memory ÷ lorakit's |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['tokens_per_s']:.0f} | {100 * r['tokens_per_s'] * fpt / peak:.1f}% | {r['peak_mib']:.0f} | "
              f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f} | {r['peak_mib'] / ours['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
