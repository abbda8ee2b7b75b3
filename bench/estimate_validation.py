"""Estimated vs measured peak memory of real training steps on this CPU (not a test).

    .venv/bin/python bench/estimate_validation.py

Each configuration runs in its own process: baseline RSS after imports, then the model is built
(loaded for SmolLM2), wrapped, and two optimizer steps run on batch × seq tokens (all labels);
measured = peak RSS − baseline. The estimate comes from lorakit.estimate with the same settings
(framework overhead excluded: the baseline already holds it).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

CONFIGS = [
    # (label, model, method, r, batch, seq, grad_ckpt)
    ("mid-llama lora b4 s256", "mid", "lora", 16, 4, 256, False),
    ("mid-llama full b2 s256", "mid", "full", 0, 2, 256, False),
    ("smollm2 lora b1 s256", "smollm2-135m", "lora", 16, 1, 256, False),
    ("smollm2 lora b2 s512", "smollm2-135m", "lora", 16, 2, 512, False),
    ("smollm2 lora b1 s1024", "smollm2-135m", "lora", 16, 1, 1024, False),
    ("smollm2 lora b2 s1024 ckpt", "smollm2-135m", "lora", 16, 2, 1024, True),
    ("smollm2 full b1 s256", "smollm2-135m", "full", 0, 1, 256, False),
]

WORKER = r"""
import json, resource, sys
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
import torch, transformers
from lorakit import LoraConfig, get_lora_model
from lorakit.loss import causal_lm_loss_sum
from lorakit.estimate import shape_from_config, estimate_memory, load_model_config
torch.manual_seed(0)
torch.set_num_threads(2)
label, name, method, r, batch, seq, ckpt = json.loads(sys.argv[1])
if name == "mid":
    cfg = transformers.LlamaConfig(vocab_size=16384, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
else:
    cfg = load_model_config(name)
shape = shape_from_config(cfg)
est = estimate_memory(shape, method, max(r, 1), "all-linear", batch, seq, ckpt, "fp32", "adamw")
base = rss()
if name == "mid":
    model = transformers.LlamaForCausalLM(cfg)
else:
    from lorakit.models import load_model
    model, _ = load_model(name, device="cpu")
model.train()
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
if method == "lora":
    model = get_lora_model(model, LoraConfig(r=r, alpha=2 * r, target_modules="all-linear")).model
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5)
ids = torch.randint(0, cfg.vocab_size, (batch, seq))
for _ in range(2):
    s, n = causal_lm_loss_sum(model, ids, ids)
    (s / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": peak - base, "estimated": est.total, "parts": est.components}))
"""


def main() -> None:
    rows = []
    for c in CONFIGS:
        out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(c)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(1)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((c[0], r))
        print(f"{c[0]}: measured {r['measured'] / 2**20:.0f} MiB, estimated {r['estimated'] / 2**20:.0f} MiB", file=sys.stderr)
    print(f"# fp32 on CPU, {platform.machine()}, two AdamW steps, all labels")
    print("| configuration | estimated MiB | measured MiB | error |")
    print("|---|---|---|---|")
    for label, r in rows:
        err = r["estimated"] / r["measured"] - 1
        print(f"| {label} | {r['estimated'] / 2**20:.0f} | {r['measured'] / 2**20:.0f} | {err:+.1%} |")


if __name__ == "__main__":
    main()
