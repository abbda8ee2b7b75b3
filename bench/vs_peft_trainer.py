"""lorakit against PEFT + transformers Trainer: the same model, data, LoRA and optimizer steps.

    .venv/bin/python bench/vs_peft_trainer.py [--steps 12] [--sets demo,varlen] [--out /tmp/vs-peft]

Ways to train SmolLM2-135M-Instruct with r=16, α=32, all-linear, lr 2e-4 (cosine, 10% warm-up),
batch 4, on CPU, for --steps optimizer steps:

- lorakit: `lorakit train` (loss at the answer tokens only, chunked), without packing (4
  examples per step, run padding-free in one row) and with packing (per-document attention); at its default
  precision (bf16 autocast and a bf16 base where the CPU multiplies bf16 natively, fp32
  elsewhere) and, packed, forced to fp32;
- seed recipe: PEFT `get_peft_model` + `Trainer` with `DataCollatorForLanguageModeling(mlm=False)`
  on the chat-formatted text (padding to the longest row, loss on every token), fp32 — what the
  seeds run;
- PEFT padding-free: the same with `DataCollatorWithFlattening` (rows concatenated, position ids
  restart per example; transformers builds the per-document mask from them), in fp32 and with
  its best precision settings (`bf16=True` with the base loaded in bf16).

Each runs in its own process (peak RSS from wait4, loading included), one after another. The
reported tokens/s counts non-padding tokens of the training loop only. Every final adapter is
then scored the same way: lorakit's eval loss on the held-out answers.

Data: "demo" is the built-in demo task; "varlen" is generated here — reversing lists of words,
lengths spread like chat data (log-normal, ~20 to ~1,000 tokens).

Work per step: the Trainer runs and "lorakit, 4 examples/step" (packing off) take the same 4
examples per step; "lorakit, packed" takes one packed row of max_len tokens per step (more
tokens per step than 4 examples on varlen, fewer on demo), so compare its tokens/s, not its
memory or eval loss, with the others.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"
WORDS = ("apple river stone cloud paper light green tower night field glass music table water north "
         "silver window garden bridge winter summer forest yellow orange planet rocket little quiet").split()


def varlen_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = max(3, min(420, int(rng.lognormvariate(math.log(60), 0.9))))
        items = [rng.choice(WORDS) for _ in range(k)]
        rows.append({"messages": [{"role": "user", "content": "Reverse this list: " + " ".join(items)},
                                  {"role": "assistant", "content": " ".join(reversed(items))}]})
    return rows


def demo_rows() -> tuple[list[dict], list[dict]]:
    from lorakit.data.demo import demo_examples

    train, val = demo_examples(n_val=48)
    return [{"messages": ex["messages"]} for ex in train], [{"messages": ex["messages"]} for ex in val]


def write_sets(out: Path) -> dict[str, tuple[Path, Path]]:
    out.mkdir(parents=True, exist_ok=True)
    sets = {"demo": demo_rows(), "varlen": (varlen_rows(400, 1), varlen_rows(40, 2))}
    paths = {}
    for name, (train, val) in sets.items():
        paths[name] = (out / f"{name}-train.jsonl", out / f"{name}-val.jsonl")
        for rows, path in zip((train, val), paths[name]):
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


# ---- workers (one process each) ----------------------------------------------------------

def _held_out_loss(model, tok, val_path: Path, max_len: int) -> float:
    import torch

    from lorakit.config import DataConfig
    from lorakit.data.dataset import prepare_data
    from lorakit.training.evaluate import eval_loss

    prepared = prepare_data(DataConfig(path=str(val_path), val_size=0, max_len=max_len, cache=False), tok, 0)
    return eval_loss(model, prepared.train, max_len, 4, tok.pad_token_id, torch.device("cpu"))


EVAL_LEN = 1024  # held-out examples are scored whole, whatever row length a run trained with


def worker_lorakit(train_path: Path, val_path: Path, steps: int, max_len: int, out: Path, packing: bool,
                   precision: str = "auto", dora: bool = False, dropout: float = 0.0, batch_tokens: int = 0) -> dict:
    # Without packing: 4 examples per step, like the Trainer runs. With packing: one row of max_len
    # tokens per step (several examples; ~1,000 tokens against the Trainer's ~600 on varlen).
    batch = ["--train.batch_size", "1", "--data.packing", "true"] if packing else \
        ["--train.batch_size", "4", "--data.packing", "false"]
    if batch_tokens:  # unpacked micro-batches of a token budget (train.batch_tokens)
        batch = ["--train.batch_tokens", str(batch_tokens), "--data.packing", "false"]
    batch += ["--train.precision", precision, "--train.method", "dora" if dora else "lora", "--lora.dropout", str(dropout)]
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", MODEL, "--data", str(train_path), "--out", str(out),
           "--overwrite", "--lora.r", "16", "--lora.alpha", "32", "--train.lr", "2e-4", *batch,
           "--train.max_steps", str(steps), "--train.warmup", "0.1", "--data.max_len", str(max_len),
           "--data.val_size", "0", "--train.eval_samples", "0", "--train.plot", "false", "--train.save_every", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in x]
    from lorakit.core.lora_model import LoraModel
    from lorakit.base import load_model

    base, tok = load_model(MODEL, "cpu")
    lm = LoraModel.from_pretrained(base, out / "adapter")
    return {"tokens_per_s": rows[-1]["tokens_per_s"], "eval_loss": _held_out_loss(lm.model, tok, val_path, EVAL_LEN),
            "tokens": rows[-1]["tokens"]}


def worker_peft(train_path: Path, val_path: Path | None, steps: int, max_len: int, out: Path, padding_free: bool,
                bf16: bool = False, dora: bool = False, model_name: str = MODEL, device: str = "cpu", batch: int = 4,
                grad_ckpt: bool = False, dropout: float = 0.0) -> dict:
    """PEFT + Trainer on ``model_name``; ``val_path`` None skips the held-out loss (bench/gpu.py)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening, Trainer, TrainingArguments

    from lorakit.base import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load_model(model_name, device, "bfloat16" if bf16 else "float32")
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, PeftLoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM", use_dora=dora))
    texts = [tok.apply_chat_template(json.loads(x)["messages"], tokenize=False) for x in train_path.read_text().splitlines()]
    rows = [{"input_ids": tok(t, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]} for t in texts]
    counted = {"tokens": 0}
    inner = DataCollatorWithFlattening() if padding_free else DataCollatorForLanguageModeling(tok, mlm=False)

    def collate(features):
        counted["tokens"] += sum(len(f["input_ids"]) for f in features)  # non-padding tokens
        return inner(features)

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, learning_rate=2e-4, max_steps=steps,
                             lr_scheduler_type="cosine", warmup_steps=int(0.1 * steps),  # = lorakit warmup 0.1 logging_steps=max(1, steps), save_strategy="no",
                             report_to=[], use_cpu=device == "cpu", dataloader_num_workers=0, seed=42, remove_unused_columns=False,
                             max_grad_norm=1.0, optim="adamw_torch", bf16=bf16)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    if val_path is None:
        return {"tokens_per_s": counted["tokens"] / train_s, "tokens": counted["tokens"], "train_s": train_s}
    return {"tokens_per_s": counted["tokens"] / train_s, "tokens": counted["tokens"],
            "eval_loss": _held_out_loss(model.get_base_model(), tok, val_path, EVAL_LEN)}


KINDS = {
    "seed": "PEFT + Trainer (seed recipe), fp32",
    "peft-padfree": "PEFT + Trainer, padding-free, fp32",
    "peft-padfree-bf16": "PEFT + Trainer, padding-free, bf16 (`bf16=True`, bf16 base)",
    "lorakit-packed-fp32": "lorakit, packed (1 row/step), fp32",
    "lorakit": "lorakit, 4 examples/step, default precision",
    "lorakit-packed": "lorakit, packed (1 row/step), default precision",
}


PEER_MALLOC = ""  # --peer-malloc: the peer's processes under this malloc library too


def run_worker(kind: str, data: tuple[Path, Path], steps: int, max_len: int, out: Path, batch_tokens: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--train-file", str(data[0]), "--val-file", str(data[1]),
           "--steps", str(steps), "--max-len", str(max_len), "--out", str(out), "--batch-tokens", str(batch_tokens)]
    env = None
    if PEER_MALLOC and not kind.startswith("lorakit"):  # lorakit train picks its own (lorakit.cli.allocator)
        env = {**os.environ, "LD_PRELOAD": PEER_MALLOC, "MIMALLOC_PURGE_DELAY": "-1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--sets", default="demo,varlen")
    ap.add_argument("--out", default="/tmp/vs-peft")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--train-file", default=None)
    ap.add_argument("--val-file", default=None)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--batch-tokens", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--equal-tokens", action="store_true",
                    help="instead: lorakit packed into rows of the peer's tokens per step, against PEFT + Trainer "
                         "padding-free bf16, at dropout 0 and 0.05")
    ap.add_argument("--peer-malloc", default="", metavar="LIB",
                    help="run the PEFT + Trainer processes with this malloc library in LD_PRELOAD (e.g. the "
                         "libmimalloc.so lorakit train uses: python -c 'from lorakit.cli.allocator import "
                         "allocator_library as a; print(a())')")
    args = ap.parse_args()
    global PEER_MALLOC
    PEER_MALLOC = args.peer_malloc
    if args.worker:
        import resource

        train, val, out = Path(args.train_file), Path(args.val_file), Path(args.out)
        dropout = 0.05 if args.worker.endswith("-d05") else 0.0
        if args.worker.startswith("lorakit"):
            res = worker_lorakit(train, val, args.steps, args.max_len, out, packing="packed" in args.worker,
                                 precision="fp32" if "fp32" in args.worker else "auto", dora="dora" in args.worker,
                                 dropout=dropout, batch_tokens=args.batch_tokens)
            child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the `lorakit train` process
            res["peak_rss_mib"] = child / 1024
        else:
            res = worker_peft(train, val, args.steps, args.max_len, out, padding_free=args.worker.startswith("peft-padfree"),
                              bf16="bf16" in args.worker, dora="dora" in args.worker, dropout=dropout)
            res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    out = Path(args.out)
    paths = write_sets(out)
    if args.equal_tokens:
        equal_tokens(paths, args.sets, args.steps, out)
        return
    from lorakit.base import native_bf16

    import torch

    print(f"# {platform.machine()}, {os.cpu_count()} cpus, {args.steps} steps, batch 4, CPU "
          f"(native bf16 matmuls: {'yes' if native_bf16(torch.device('cpu')) else 'no'})", flush=True)
    lines = ["| data | trainer | tokens/s | vs seed recipe | peak RSS MiB | vs seed recipe | held-out eval loss |",
             "|---|---|---|---|---|---|---|"]
    for name in args.sets.split(","):
        max_len = 256 if name == "demo" else 1024
        results = {}
        for kind in KINDS:
            results[kind] = run_worker(kind, paths[name], args.steps, max_len, out / f"{name}-{kind}")
            print(f"{name} {kind}: {results[kind]}", flush=True)
        seed = results["seed"]
        for kind, label in KINDS.items():
            r = results[kind]
            lines.append(f"| {name} | {label} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / seed['tokens_per_s']:.2f}× | "
                         f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / seed['peak_rss_mib']:.2f}× | {r['eval_loss']:.4f} |")
    print("\n".join(lines))


def equal_tokens(paths: dict, sets: str, steps: int, out: Path) -> None:
    """The same tokens per step on both sides: the peer (PEFT + Trainer padding-free at its best
    precision on this CPU: bf16 where it multiplies bf16 natively, else fp32; 4 examples per step) runs first; lorakit then trains with the peer's mean tokens per step, at its
    default precision, two ways: one packed row of that many tokens per step (examples longer than
    the row are truncated), and unpacked micro-batches of that token budget (train.batch_tokens;
    nothing truncated, run padding-free). At dropout 0 and 0.05, each run in its own process."""
    import torch

    from lorakit.base import native_bf16

    peer_kind = "peft-padfree-bf16" if native_bf16(torch.device("cpu")) else "peft-padfree"
    print(f"# peer: {KINDS[peer_kind]}", flush=True)
    lines = ["| data | dropout | lorakit: tokens/step | PEFT tokens/s | lorakit tokens/s | ratio | PEFT peak RSS MiB | lorakit | "
             "ratio | PEFT held-out loss | lorakit | difference |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in sets.split(","):
        max_len = 256 if name == "demo" else 1024
        for suffix, dropout in (("", 0.0), ("-d05", 0.05)):
            peer = run_worker(f"{peer_kind}{suffix}", paths[name], steps, max_len, out / f"{name}-eq-peft{suffix}")
            per_step = max(64, round(peer["tokens"] / steps))
            runs = {f"packed rows of {per_step}": run_worker(f"lorakit-packed{suffix}", paths[name], steps, per_step,
                                                            out / f"{name}-eq-lorakit{suffix}"),
                    f"unpacked, batch_tokens {per_step}": run_worker(f"lorakit{suffix}", paths[name], steps, max_len,
                                                                     out / f"{name}-eq-tokens{suffix}", per_step)}
            for how, ours in runs.items():
                print(f"{name} dropout {dropout}: peer {peer}, lorakit {how} {ours}", flush=True)
                lines.append(f"| {name} | {dropout:g} | {how}: {ours['tokens'] / steps:.0f} (peer {per_step}) | "
                             f"{peer['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f} | "
                             f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}× | {peer['peak_rss_mib']:.0f} | "
                             f"{ours['peak_rss_mib']:.0f} | {ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f}× | "
                             f"{peer['eval_loss']:.4f} | {ours['eval_loss']:.4f} | "
                             f"{100 * (ours['eval_loss'] / peer['eval_loss'] - 1):+.1f}% |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
