"""`lorakit data clean | inspect | convert | split | demo`."""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from ..atomic import atomic_file
from ..config import DEFAULT_MODEL
from ..errors import LorakitError

__all__ = ["DATA_COMMAND"]


def _write_jsonl_atomic(path: Path, records) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


# ---- clean ---------------------------------------------------------------------------------

def _clean(args: argparse.Namespace) -> int:
    from ..data.clean import clean_corpus

    report = clean_corpus(args.inputs, args.out, args.min_chars, args.dedup, args.workers)
    report_path = Path(args.report or f"{args.out}.report.json")
    report_path.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    print(report.format())
    print(f"wrote {args.out} and {report_path}")
    return 0


# ---- inspect -------------------------------------------------------------------------------

def _inspect(args: argparse.Namespace) -> int:
    from ..data.inspect import inspect_data, percentile
    from ..data.templates import resolve_template
    from ..base import load_tokenizer

    tok = load_tokenizer(args.model)
    template = resolve_template(args.template, tok)
    if args.sample < 0:
        raise LorakitError(f"--sample must be ≥ 0 (0 reads and encodes every example), got {args.sample}")
    report = inspect_data(args.file, tok, template, args.format, args.sample, head=max(8, args.examples))
    lengths = report.lengths
    sampled = f" (token lengths from a uniform sample of {len(lengths):,}: --sample 0 for all)" if report.sampled else ""
    print(f"file: {args.file}\nformat: {report.format} (fields: {', '.join(report.fields)})\n"
          f"records: {report.records:,}{sampled}\ntemplate: {template}   tokenizer: {args.model}")
    mark = (lambda s: f"\x1b[1;32m{s}\x1b[0m") if os.isatty(1) else (lambda s: f"[[{s}]]")
    for i in range(min(args.examples, len(lengths))):
        enc = report.encoded[i]
        print(f"\n--- {report.wheres[i]} ({len(enc.input_ids)} tokens, {enc.n_labels} trained: shown {mark('like this')}) ---")
        print("".join(mark(text) if trained else text for text, trained in report.segments(i, tok)))
    print("\ntokens per example: " + "  ".join(f"p{q}={percentile(lengths, q)}" for q in (50, 90, 95, 99)) + f"  max={max(lengths)}")
    over = report.over(args.max_len)
    print(f"longer than max_len={args.max_len}: {over} of {len(lengths)}{' sampled' if report.sampled else ''} "
          f"({100 * over / len(lengths):.1f}%)")
    if args.histogram:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="tab:blue")
        ax.axvline(args.max_len, color="tab:red", linestyle="--", label=f"max_len={args.max_len}")
        ax.set_xlabel("tokens per example (with the template)")
        ax.set_ylabel("examples")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.histogram)
        plt.close(fig)
        print(f"histogram: {args.histogram}")
    return 0


# ---- convert -------------------------------------------------------------------------------

def _to_format(messages: list[dict], fmt: str, where: str) -> dict:
    if fmt == "messages":
        return {"messages": messages}
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    if fmt == "sharegpt":
        rec = {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in turns]}
        if system is not None:
            rec["system"] = system
        return rec
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise LorakitError(f"{where}: alpaca needs the conversation to end with a user turn and its answer")
    rec = {"instruction": turns[-2]["content"], "input": "", "output": turns[-1]["content"]}
    pairs = turns[:-2]
    if pairs:
        rec["history"] = [[pairs[i]["content"], pairs[i + 1]["content"]] for i in range(0, len(pairs) - 1, 2)]
    if system is not None:
        rec["system"] = system
    return rec


def _convert(args: argparse.Namespace) -> int:
    from ..data.formats import load_examples

    examples = load_examples([args.input], args.format)
    out = []
    for where, ex in examples:
        if "messages" not in ex:
            raise LorakitError(f"{where}: plain-text records have no conversation to convert")
        out.append(_to_format(ex["messages"], args.to, where))
    n = _write_jsonl_atomic(Path(args.out), out)
    print(f"wrote {n} records in {args.to} format to {args.out}")
    return 0


# ---- split ---------------------------------------------------------------------------------

def _split(args: argparse.Namespace) -> int:
    from ..data.formats import data_files, read_records

    if not 0 < args.val < 1 and not (args.val >= 1 and float(args.val).is_integer()):
        raise LorakitError(f"--val must be a fraction in (0, 1) or a whole number of records, got {args.val}")
    records = [rec for f in data_files([args.input]) for _, rec in read_records(f)]
    if len(records) < 2:
        raise LorakitError(f"{args.input}: need at least 2 records to split, found {len(records)}")
    order = list(range(len(records)))
    random.Random(args.seed).shuffle(order)
    k = int(round(args.val * len(records))) if args.val < 1 else int(args.val)
    k = max(1, min(k, len(records) - 1))
    stem = Path(args.input)
    base = Path(args.out_dir) / stem.stem if args.out_dir else stem.with_suffix("")
    train_path, val_path = Path(f"{base}.train.jsonl"), Path(f"{base}.val.jsonl")
    val_idx = set(order[:k])
    _write_jsonl_atomic(val_path, (records[i] for i in sorted(val_idx)))
    _write_jsonl_atomic(train_path, (records[i] for i in range(len(records)) if i not in val_idx))
    print(f"{len(records) - k} train records -> {train_path}\n{k} validation records -> {val_path}")
    return 0


# ---- demo ----------------------------------------------------------------------------------

def _demo(args: argparse.Namespace) -> int:
    from ..data import demo

    out = Path(args.out)
    make = demo.preference_examples if args.preference else demo.demo_examples
    for split, examples in zip(("train", "val"), make()):
        records = [{"prompt": ex["messages"][0]["content"], "chosen": ex["messages"][-1]["content"],
                    "rejected": ex["rejected"]} if args.preference else {"messages": ex["messages"]} for ex in examples]
        n = _write_jsonl_atomic(out / f"{split}.jsonl", records)
        print(f"{n} {split} {'preference pairs' if args.preference else 'examples'} -> {out / f'{split}.jsonl'}")
    what = "--train.objective dpo " if args.preference else ""
    print(f"train on them: lorakit train {what}--data {out / 'train.jsonl'} --data.eval_path {out / 'val.jsonl'}")
    return 0


def _add_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="action", required=True)
    c = sub.add_parser("clean", help="PDF/DOCX/HTML/Markdown/text/code/JSON -> clean JSONL training text")
    c.add_argument("inputs", nargs="+", help="files, folders (recursive) or globs")
    c.add_argument("--out", required=True, help="output JSONL ({text, source, type, chars} per line)")
    c.add_argument("--min-chars", type=int, default=100, help="drop documents shorter than this many characters")
    c.add_argument("--dedup", default="near", choices=["exact", "near", "none"])
    c.add_argument("--workers", type=int, default=1, help="processes reading and normalising files")
    c.add_argument("--report", default=None, help="JSON report path (default: OUT.report.json)")
    i = sub.add_parser("inspect", help="format, rendered examples with trained tokens marked, token-length percentiles")
    i.add_argument("file")
    i.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer and chat template to use")
    i.add_argument("--template", default="auto")
    i.add_argument("--format", default="auto")
    i.add_argument("--max-len", type=int, default=1024)
    i.add_argument("--examples", type=int, default=2, help="examples to render")
    i.add_argument("--histogram", default=None, metavar="PNG", help="write a token-length histogram")
    i.add_argument("--sample", type=int, default=20_000,
                   help="examples encoded for the lengths: the first ones, then a uniform sample (0: all; the file "
                        "is read once, holding no more than this many)")
    v = sub.add_parser("convert", help="rewrite chat data as alpaca, sharegpt or messages JSONL")
    v.add_argument("input")
    v.add_argument("--to", required=True, choices=["alpaca", "sharegpt", "messages"])
    v.add_argument("--format", default="auto", help="the input's format (default: detected)")
    v.add_argument("--out", required=True)
    s = sub.add_parser("split", help="hold out a validation split (IN.train.jsonl, IN.val.jsonl)")
    s.add_argument("input")
    s.add_argument("--val", type=float, default=0.05, help="fraction (< 1) or number of records")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out-dir", default=None)
    d = sub.add_parser("demo", help="write the built-in demo task as files (OUT/train.jsonl, OUT/val.jsonl)")
    d.add_argument("--out", required=True, help="folder to write")
    d.add_argument("--preference", action="store_true", help="the preference demo: prompt/chosen/rejected pairs")


def _cmd_data(args: argparse.Namespace) -> int:
    return {"clean": _clean, "inspect": _inspect, "convert": _convert, "split": _split, "demo": _demo}[args.data_command](args)


DATA_COMMAND = {"data": ("Prepare data: clean documents, inspect, convert, split, write the demo.", _add_data, _cmd_data)}
