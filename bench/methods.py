"""The seeds' method table, measured (a benchmark, not a test).

    .venv/bin/python bench/methods.py [--seeds 3] [--steps 24] [--tasks demo,addition] [--only NAME]

Methods: full and freeze fine-tuning, LoRA r=8 and r=16, DoRA r=16 and QLoRA r=16 (NF4, double
quantization), all through lorakit's training loop, plus two PEFT methods as reference rows —
prefix tuning and adaption prompt (LLaMA-Adapter, PEFT's adapter method for Llama models) — trained
by a plain PEFT loop on the same tokenized examples. Tasks: lorakit's demo (dates → YYYY-MM-DD and
an identity answer; scored by the demo's own scorer) and 3-digit addition ("What is 347 + 589?" →
"936"; exact string match), which a 135M model cannot do and every method must learn.

Every (task, method, seed) runs in its own process (peak RSS is per process); each reports the
trainable share, peak RSS, tokens/s of the training loop, its wall time, and the held-out exact
match and eval loss after training (before training: the base's, shown once per task). Learning
rates are each method's usual one (lorakit's defaults; PEFT's prompt methods 1e-2).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORAKIT_METHODS = {
    "full": {"train": {"method": "full"}},
    "freeze (last 2 blocks)": {"train": {"method": "freeze", "freeze_layers": 2}},
    "LoRA r=8": {"lora": {"r": 8, "alpha": 16}},
    "LoRA r=16": {"lora": {"r": 16, "alpha": 32}},
    "DoRA r=16": {"lora": {"r": 16, "alpha": 32}, "train": {"method": "dora"}},
    "QLoRA r=16 (NF4)": {"lora": {"r": 16, "alpha": 32}, "model": {"quantize": "nf4"}},
}
PEFT_METHODS = ("PEFT prefix tuning (20 tokens)", "PEFT adaption prompt (LLaMA-Adapter)")
EXTRA_METHODS = ("PEFT prefix tuning (20 tokens, reparametrised)",)  # run only when --only names them
ADAPTER_LR = 1e-3  # the demo's LoRA rate (lorakit's demo preset); full/freeze take lorakit's 5e-5
PEFT_LR = 1e-2
EVAL_SAMPLES = 24


def addition_files(folder: Path, n_train: int = 600, n_val: int = 48) -> tuple[Path, Path]:
    rng = random.Random(1234)
    rows = []
    seen = set()
    while len(rows) < n_train + n_val:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"instruction": f"What is {a} + {b}? Answer with the number only.", "output": str(a + b)})
    train, val = folder / "addition_train.jsonl", folder / "addition_val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return train, val


def _val_chats(val: Path) -> list:
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    return [([{"role": "user", "content": r["instruction"]}], r["output"]) for r in rows]


def _task_data(job: dict) -> dict:
    if job["task"] == "demo":
        return {"max_len": 256, "val_size": 48}
    return {"path": job["train"], "eval_path": job["val"], "max_len": 256}


def _exact(answer: str, ref: str) -> bool:
    return answer.strip() == ref.strip()


def lorakit_worker(job: dict) -> dict:
    import lorakit.training.loop as loop
    from lorakit.config import WEIGHT_LR, merge_nested, run_config_from_dict

    if job["task"] != "demo":  # lorakit scores the demo itself; here held-out answers are matched exactly
        chats, prepare = _val_chats(Path(job["val"])), loop.prepare_data

        def with_scorer(*a, **k):
            p = prepare(*a, **k)
            p.val_chats, p.scorer = chats, _exact
            return p
        loop.prepare_data = with_scorer
    layers = {"data": _task_data(job),
              "train": {"out_dir": job["out"], "max_steps": job["steps"], "batch_size": 2, "warmup": 5,
                        "seed": job["seed"], "eval_samples": EVAL_SAMPLES, "plot": False, "log_every": 10}}
    layers = merge_nested(layers, LORAKIT_METHODS[job["method"]])
    if layers["train"].get("method") not in ("full", "freeze"):
        layers["train"]["lr"] = ADAPTER_LR
    lines: list[str] = []
    res = loop.train(run_config_from_dict(layers), show_progress=False, echo=lines.append)
    pct = next(float(x.split("trainable%: ")[1].split()[0]) for x in lines if "trainable%: " in x)
    return {"trainable_pct": pct, "peak_mb": res.peak_memory_mb, "tok_s": res.tokens_per_s, "train_s": res.train_s,
            "em": res.after.get("exact_match"), "loss": res.after["eval_loss"], "base_em": res.before.get("exact_match"),
            "base_loss": res.before["eval_loss"], "lr": layers["train"].get("lr", WEIGHT_LR)}


def _peft_model(method: str, model):
    from peft import AdaptionPromptConfig, PrefixTuningConfig, TaskType, get_peft_model

    if method.startswith("PEFT prefix"):  # reparametrised: the prefix comes from an MLP (the paper's stabiliser)
        return get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20,
                                                        prefix_projection="reparametrised" in method))
    return get_peft_model(model, AdaptionPromptConfig(task_type=TaskType.CAUSAL_LM, adapter_len=10,
                                                      adapter_layers=model.config.num_hidden_layers))


def peft_worker(job: dict) -> dict:
    """PEFT's prompt methods in a plain loop: lorakit's tokenized examples (padded rows of one
    example each, 8 per step: about the examples of two packed rows), AdamW, the same warm-up and
    cosine schedule, fp32."""
    import resource

    import torch

    from lorakit.base import load_model
    from lorakit.config import DataConfig
    from lorakit.data import demo
    from lorakit.data.dataset import prepare_data
    from lorakit.data.packing import make_batches
    from lorakit.data.templates import generation_prompt
    from lorakit.training.optim import lr_lambda

    torch.manual_seed(job["seed"])
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m", "cpu", "float32")
    data_cfg = DataConfig(**{k: v for k, v in _task_data(job).items()})
    prepared = prepare_data(data_cfg, tok, job["seed"], Path(job["out"]) / "cache")
    chats = prepared.val_chats if job["task"] == "demo" else _val_chats(Path(job["val"]))
    score = demo.score if job["task"] == "demo" else _exact
    pm = _peft_model(job["method"], model)
    params = [p for p in pm.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in pm.parameters())
    opt = torch.optim.AdamW(params, lr=PEFT_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 5, job["steps"]))
    pad = tok.pad_token_id

    def batches(seed):
        while True:
            yield from make_batches(prepared.train, data_cfg.max_len, 8, False, pad, seed=seed)
            seed += 1

    def loss_sum(batch):
        logits = pm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        labels = batch.labels[:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum"), int((labels != -100).sum())

    pm.train()
    stream, tokens, t0 = batches(job["seed"]), 0, time.perf_counter()
    for _ in range(job["steps"]):
        b = next(stream)
        s, n = loss_sum(b)
        (s / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b.attention_mask.sum())
    train_s = time.perf_counter() - t0
    pm.eval()
    with torch.no_grad():
        total_loss, count = 0.0, 0
        for b in make_batches(prepared.val, data_cfg.max_len, 8, False, pad, seed=0):
            s, n = loss_sum(b)
            total_loss, count = total_loss + float(s), count + n
        hits = 0
        for chat, ref in chats[:EVAL_SAMPLES]:
            ids = tok(generation_prompt(chat, prepared.template, tok), return_tensors="pt", add_special_tokens=False)
            out = pm.generate(**ids, max_new_tokens=len(tok(ref)["input_ids"]) + 8, do_sample=False,
                              pad_token_id=pad)
            hits += score(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), ref)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"trainable_pct": 100 * trainable / total, "peak_mb": peak, "tok_s": tokens / train_s, "train_s": train_s,
            "em": 100 * hits / min(len(chats), EVAL_SAMPLES), "loss": total_loss / max(count, 1), "lr": PEFT_LR}


def _run(job: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{job['task']} / {job['method']} / seed {job['seed']} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t
    return out


def _spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return (fmt.format(mean) + f" ({fmt.format(min(values))}–{fmt.format(max(values))})") if len(values) > 1 else fmt.format(mean)


def _table(task: str, rows: dict[str, list[dict]]) -> list[str]:
    first = next(iter(rows.values()))[0]
    lines = [f"### {task}", "",
             f"base model before training: exact match {_spread([first.get('base_em')], '{:.1f}')}%, "
             f"eval loss {_spread([first.get('base_loss')], '{:.3f}')}", "",
             "| method | lr | trainable % | peak RSS MiB | tokens/s | train s | whole run s | exact match % | eval loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, runs in rows.items():
        lines.append(f"| {method} | {runs[0]['lr']:g} | {runs[0]['trainable_pct']:.3g} | "
                     f"{_spread([r['peak_mb'] for r in runs], '{:.0f}')} | {_spread([r['tok_s'] for r in runs], '{:.0f}')} | "
                     f"{_spread([r['train_s'] for r in runs], '{:.0f}')} | {statistics.fmean(r['wall_s'] for r in runs):.0f} | "
                     f"{_spread([r['em'] for r in runs], '{:.1f}')} | {_spread([r['loss'] for r in runs], '{:.3f}')} |")
    return lines


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--tasks", default="demo,addition")
    ap.add_argument("--only", default="", help="run the methods whose name contains this")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(peft_worker(job) if job["method"] in (*PEFT_METHODS, *EXTRA_METHODS) else lorakit_worker(job)))
        return
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-methods-"))
    train_file, val_file = addition_files(tmp)
    out = [f"# bench/methods.py --seeds {args.seeds} --steps {args.steps}: SmolLM2-135M-Instruct on this CPU, "
           f"batch 2 packed rows × 256 tokens (PEFT rows: 8 padded examples), mean (min–max) over seeds"]
    for task in args.tasks.split(","):
        rows: dict[str, list[dict]] = {}
        extra = [m for m in EXTRA_METHODS if args.only and args.only in m]
        for method in [*LORAKIT_METHODS, *PEFT_METHODS, *extra]:
            if args.only not in method:
                continue
            for seed in range(args.seeds):
                job = {"task": task, "method": method, "seed": seed, "steps": args.steps,
                       "out": str(tmp / f"{task}-{len(rows)}-{seed}"), "train": str(train_file), "val": str(val_file)}
                r = _run(job)
                rows.setdefault(method, []).append(r)
                print(f"{task} | {method} | seed {seed}: exact match {r['em']}, eval loss {r['loss']:.3f}, "
                      f"{r['tok_s']:.0f} tok/s, peak {r['peak_mb']:.0f} MiB, {r['wall_s']:.0f} s", file=sys.stderr)
        out += ["", *_table(task, rows)]
    out.append(f"\nwhole benchmark: {(time.perf_counter() - t0) / 60:.1f} min")
    print("\n".join(out))


if __name__ == "__main__":
    main()
