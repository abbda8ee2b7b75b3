"""Estimated vs measured peak memory of real training steps on this CPU (not a test).

    .venv/bin/python bench/estimate_validation.py [--only SUBSTRING]

Each configuration runs in its own process: baseline RSS after imports, then the model is built
(loaded for SmolLM2; quantized for QLoRA), wrapped, and the peak-RSS mark is reset
(/proc/self/clear_refs), so loading's transient copies do not count; then two optimizer steps run
on batch × seq tokens (all labels), inside the contexts lorakit's training loop runs a step in
(its lean SwiGLU MLPs and RMSNorms); measured = peak RSS of the steps − baseline. The estimate
comes from lorakit.planning.estimate with the same settings (framework overhead excluded: the baseline
already holds it).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

CONFIGS = [
    # (label, model, method, r, batch, seq, grad_ckpt[, dtype]); bf16 = autocast over a bf16 base,
    # what `lorakit train` does on CPUs with native bf16 matmuls
    ("mid-llama lora b4 s256", "mid", "lora", 16, 4, 256, False),
    ("mid-llama full b2 s256", "mid", "full", 0, 2, 256, False),
    ("smollm2 lora b1 s256", "smollm2-135m", "lora", 16, 1, 256, False),
    ("smollm2 lora b2 s512", "smollm2-135m", "lora", 16, 2, 512, False),
    ("smollm2 lora b1 s1024", "smollm2-135m", "lora", 16, 1, 1024, False),
    ("smollm2 lora b2 s1024 ckpt", "smollm2-135m", "lora", 16, 2, 1024, True),
    ("smollm2 full b1 s256", "smollm2-135m", "full", 0, 1, 256, False),
    ("smollm2 full b1 s512 bf16", "smollm2-135m", "full", 0, 1, 512, False, "bf16"),
    ("smollm2 freeze2 b2 s512 bf16", "smollm2-135m", "freeze", 0, 2, 512, False, "bf16"),
    ("smollm2 qlora b2 s512", "smollm2-135m", "qlora", 16, 2, 512, False),
    ("smollm2 lora b2 s512 bf16", "smollm2-135m", "lora", 16, 2, 512, False, "bf16"),
    ("smollm2 lora b1 s1024 bf16", "smollm2-135m", "lora", 16, 1, 1024, False, "bf16"),
    ("smollm2 dora b1 s1024", "smollm2-135m", "dora", 16, 1, 1024, False),
    ("smollm2 dora b1 s1024 bf16", "smollm2-135m", "dora", 16, 1, 1024, False, "bf16"),
]

WORKER = r"""
import ctypes, json, sys
if sys.argv[2] == "live":
    # glibc otherwise keeps freed activation memory in its heap, so RSS would measure the allocator's
    # retention too; a fixed 64 KiB mmap threshold returns every freed tensor at once and RSS then
    # follows the live tensors (the CPU analogue of torch.cuda.max_memory_allocated).
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
import torch, transformers
from lorakit import LoraConfig, get_lora_model
from lorakit.ops.loss import causal_lm_loss_sum
from lorakit.base.source import load_model_config
from lorakit.planning.estimate import shape_from_config, estimate_memory
torch.manual_seed(0)
torch.set_num_threads(2)
label, name, method, r, batch, seq, ckpt, *rest = json.loads(sys.argv[1])
dtype = rest[0] if rest else "fp32"
if name == "mid":
    cfg = transformers.LlamaConfig(vocab_size=16384, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
else:
    cfg = load_model_config(name)
shape = shape_from_config(cfg)
dora = method == "dora"
method = "lora" if dora else method
est = estimate_memory(shape, method, max(r, 1), "all-linear", batch, seq, ckpt, dtype, "adamw", dora=dora)
# Warm the compute runtime (thread pool, oneDNN/BLAS buffers, autograd engine) before the baseline:
# that is framework overhead, which the estimate reports separately, not model memory.
_w = torch.nn.Linear(256, 256)
_o = torch.optim.AdamW(_w.parameters())
for _ in range(2):
    torch.nn.functional.scaled_dot_product_attention(*(torch.randn(1, 2, 64, 32, requires_grad=True) for _ in range(3)),
                                                     is_causal=True).sum().backward()
    _w(torch.randn(64, 256)).sum().backward()
    _o.step()
del _w, _o
base = status("VmRSS")
if name == "mid":
    model = transformers.LlamaForCausalLM(cfg)
else:
    from lorakit.base import load_model
    model, _ = load_model(name, device="cpu", dtype="bfloat16" if dtype == "bf16" else "float32",
                          quantize="nf4" if method == "qlora" else "none")
model.train()
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
if method in ("lora", "qlora"):
    model = get_lora_model(model, LoraConfig(r=r, alpha=2 * r, target_modules="all-linear", use_dora=dora)).model
else:  # full/freeze as lorakit trains them: fp32 master weights, frozen blocks in the load dtype
    from lorakit.core.full_tuning import FullTuning, select_trainable
    FullTuning(model, select_trainable(model, method, 2), method)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5)
ids = torch.randint(0, cfg.vocab_size, (batch, seq))
import gc, ctypes
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS: the peak of loading is not the peak of training
from lorakit.ops.gated_mlp import lean_gated_mlps
from lorakit.ops.rms_norm import lean_rms_norms
for _ in range(2):
    with lean_gated_mlps(model), lean_rms_norms(model):  # as lorakit.training.loop runs a step
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            s, n = causal_lm_loss_sum(model, ids, ids)
        (s / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
peak = status("VmHWM")
print(json.dumps({"measured": peak - base, "estimated": est.total, "parts": est.components}))
"""


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="run the configurations whose label contains this")
    args = ap.parse_args()
    rows = []
    for c in (c for c in CONFIGS if args.only in c[0]):
        r = {}
        for alloc in ("live", "default"):
            out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(c), alloc], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(1)
            r[alloc] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((c[0], r))
        print(f"{c[0]}: measured {r['live']['measured'] / 2**20:.0f} MiB (live), {r['default']['measured'] / 2**20:.0f} "
              f"(glibc default), estimated {r['live']['estimated'] / 2**20:.0f} MiB", file=sys.stderr)
    print(f"# CPU, {platform.machine()}, two AdamW steps, all labels")
    print("| configuration | estimated MiB | measured MiB (live tensors) | error | RSS with glibc's default allocator | error |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        est, live, default = r["live"]["estimated"], r["live"]["measured"], r["default"]["measured"]
        print(f"| {label} | {est / 2**20:.0f} | {live / 2**20:.0f} | {est / live - 1:+.1%} | {default / 2**20:.0f} | "
              f"{est / default - 1:+.1%} |")


if __name__ == "__main__":
    main()
