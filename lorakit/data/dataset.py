"""From a DataConfig to tokenized train/validation examples: read, normalise, template, tokenize,
truncate or drop, split — cached on disk so a second run does not tokenize again.

For a preference objective (``pairs``) each record is a pair: examples 2j and 2j+1 are its prompt
with the chosen and with the rejected answer, labels on that answer only; pairs are split, kept
or dropped whole."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_file
from ..config import DataConfig
from ..errors import LorakitError
from . import demo
from .formats import data_files, iter_examples, load_examples
from .hub import HubSource, hub_fingerprint
from .templates import Encoded, encode_example, resolve_template

__all__ = ["Prepared", "prepare_data", "tokenizer_fingerprint", "STREAM_VAL_RECORDS"]

_CACHE_VERSION = 1


@dataclass
class Prepared:
    """Tokenized examples ready for batching, plus what evaluation needs."""

    train: list[Encoded]
    val: list[Encoded]
    template: str
    # Held-out conversations (without the final answer) and references, for generation-based scoring.
    val_chats: list[tuple[list[dict], str]] = field(default_factory=list)
    scorer: Callable[[str, str], bool] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False
    pairs: bool = False  # train/val hold preference pairs: (chosen, rejected) at 2j, 2j+1
    # data.streaming: train is empty and this gives a fresh pass over the training examples, encoded lazily
    stream: Callable[[], Iterator[Encoded]] | None = None

    def first(self, n: int) -> list[Encoded]:
        """The first ``n`` training examples (read from the stream when streaming)."""
        return self.train[:n] if self.stream is None else list(itertools.islice(self.stream(), n))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(str(len(tokenizer)).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(str(tokenizer.eos_token).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else str(tokenizer.get_vocab()).encode())
    return h.hexdigest()[:16]


def _cache_key(cfg: DataConfig, template: str, tokenizer: Any, seed: int, sources: list | None,
               pairs: bool = False) -> str:
    h = hashlib.sha256()
    parts = {k: getattr(cfg, k) for k in ("format", "columns", "max_len", "truncation", "train_on_prompt", "val_size")}
    parts.update(pairs=pairs) if pairs else None  # (SFT keys stay as they were: existing caches stay valid)
    h.update(json.dumps({**parts, "template": template, "seed": seed, "v": _CACHE_VERSION}, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for f in sources or []:
        h.update(str(f).encode())
        h.update(hub_fingerprint(f).encode() if isinstance(f, HubSource) else hashlib.sha256(f.read_bytes()).digest())
    if sources is None:
        h.update(b"demo" + json.dumps(demo.DEMO_OVERRIDES, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _truncate(enc: Encoded, max_len: int, policy: str) -> Encoded | None:
    if len(enc.input_ids) <= max_len:
        return enc
    if policy == "drop":
        return None
    return Encoded(enc.input_ids[:max_len], enc.labels[:max_len])


def _split(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = int(round(val_size * n)) if val_size < 1 else int(val_size)
    k = min(k, n - 1)
    return sorted(order[k:]), sorted(order[:k])


def _encode_one(where: str, ex: dict, template: str, tokenizer: Any, cfg: DataConfig,
                stats: dict[str, int]) -> tuple[Encoded | None, int | None]:
    """One example encoded and truncated, or (None, None) when too long to keep, or (None, its
    prompt's length) when no answer token is left."""
    enc = encode_example(ex, template, tokenizer, cfg.train_on_prompt, where)
    if len(enc.input_ids) > cfg.max_len:
        stats["too_long"] += 1
    kept = _truncate(enc, cfg.max_len, cfg.truncation)
    if kept is None:
        stats["dropped_too_long"] += 1
        return None, None
    if kept.n_labels == 0 or all(x == -100 for x in kept.labels[1:]):
        # Only the prompt fits (or nothing is trained): nothing to learn from this example.
        stats["dropped_no_labels"] += 1
        return None, next((j for j, x in enumerate(enc.labels) if x != -100), len(enc.labels))
    return kept, None


def _encode_all(examples: list[tuple[str, dict]], template: str, tokenizer: Any, cfg: DataConfig,
                stats: dict[str, int]) -> list[tuple[int, Encoded]]:
    out = []
    shortest_prompt = None
    for i, (where, ex) in enumerate(examples):
        kept, prompt = _encode_one(where, ex, template, tokenizer, cfg, stats)
        if prompt is not None:
            shortest_prompt = prompt if shortest_prompt is None else min(shortest_prompt, prompt)
        if kept is not None:
            out.append((i, kept))
    if not out:
        if shortest_prompt is not None and shortest_prompt >= cfg.max_len:
            raise LorakitError(f"data.max_len={cfg.max_len} is shorter than every prompt (the shortest is "
                               f"{shortest_prompt} tokens with its template); raise data.max_len")
        raise LorakitError("no example has a token to train on after templating and truncation "
                           f"({stats['dropped_too_long']} too long, {stats['dropped_no_labels']} with every label masked); "
                           "check data.format / data.columns, or set data.train_on_prompt")
    return out


def _encode_pair(where: str, ex: dict, template: str, tokenizer: Any, cfg: DataConfig,
                 stats: dict[str, int]) -> list[Encoded] | None:
    """A pair as [chosen, rejected], or None when either side has no answer token left."""
    if "rejected" not in ex:
        raise LorakitError(f"{where}: not a preference pair: a preference objective (train.objective) needs "
                           "records with a prompt, a 'chosen' and a 'rejected' answer (data.columns maps other names)")
    rejected = {"messages": ex["messages"][:-1] + [{"role": "assistant", "content": ex["rejected"]}]}
    pair = []
    for side in (ex, rejected):
        enc = encode_example(side, template, tokenizer, False, where, final_only=True)
        stats["too_long"] += len(enc.input_ids) > cfg.max_len
        pair.append(_truncate(enc, cfg.max_len, cfg.truncation))
    if any(e is None for e in pair):
        stats["dropped_too_long"] += 1
    elif any(e.n_labels == 0 or all(x == -100 for x in e.labels[1:]) for e in pair):
        stats["dropped_no_labels"] += 1
    else:
        return pair  # type: ignore[return-value]
    return None


def _encode_pairs(examples: list[tuple[str, dict]], template: str, tokenizer: Any, cfg: DataConfig,
                  stats: dict[str, int]) -> list[tuple[int, Encoded]]:
    """Pairs as consecutive (chosen, rejected) examples; a pair goes whole when either side has
    no answer token left after truncation."""
    out: list[tuple[int, Encoded]] = []
    for i, (where, ex) in enumerate(examples):
        pair = _encode_pair(where, ex, template, tokenizer, cfg, stats)
        if pair is not None:
            out.append((i, pair))  # type: ignore[arg-type]
    if not out:
        raise LorakitError(f"no preference pair has an answer token left within data.max_len={cfg.max_len} "
                           f"({stats['dropped_too_long']} too long, {stats['dropped_no_labels']} cut before the answer); "
                           "raise data.max_len")
    return out


def _flat(pairs: list[list[Encoded]]) -> list[Encoded]:
    return [e for pair in pairs for e in pair]


def _save_cache(path: Path, prepared: Prepared, val_records: list[int]) -> None:
    tensors, meta = {}, {"template": prepared.template, "stats": prepared.stats, "pairs": prepared.pairs,
                         "val_records": val_records}
    for split in ("train", "val"):
        exs = getattr(prepared, split)
        lengths = [len(e.input_ids) for e in exs]
        tensors[f"{split}_lengths"] = torch.tensor(lengths, dtype=torch.int64)
        tensors[f"{split}_ids"] = torch.tensor([t for e in exs for t in e.input_ids], dtype=torch.int64)
        tensors[f"{split}_labels"] = torch.tensor([t for e in exs for t in e.labels], dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"meta": json.dumps(meta)})


def _load_cache(path: Path) -> tuple[dict[str, list[Encoded]], dict] | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    tensors = load_file(path)
    out = {}
    for split in ("train", "val"):
        lengths = tensors[f"{split}_lengths"].tolist()
        ids, labels = tensors[f"{split}_ids"].tolist(), tensors[f"{split}_labels"].tolist()
        exs, pos = [], 0
        for n in lengths:
            exs.append(Encoded(ids[pos:pos + n], labels[pos:pos + n]))
            pos += n
        out[split] = exs
    return out, meta


def _raw_examples(cfg: DataConfig, pairs: bool) -> tuple[list, list | None, list, Any, list[Path] | None]:
    """(train records, separate validation records or None, held-out chats, scorer, source files)."""
    sources = None if cfg.path is None else data_files(cfg.path)
    if sources is None:
        make = demo.preference_examples if pairs else demo.demo_examples
        train_raw, val_raw = make(n_val=int(cfg.val_size) if cfg.val_size >= 1 else 48)
        val_chats = [(ex["messages"][:-1], ex["messages"][-1]["content"]) for ex in val_raw]
        return ([(f"demo train {i}", ex) for i, ex in enumerate(train_raw)],
                [(f"demo val {i}", ex) for i, ex in enumerate(val_raw)], val_chats, demo.score, None)
    eval_sources = None if cfg.eval_path is None else data_files(cfg.eval_path)
    train_ex = load_examples(sources, cfg.format, cfg.columns)
    val_ex = load_examples(eval_sources, cfg.format, cfg.columns) if eval_sources else None
    return train_ex, val_ex, [], None, sources + (eval_sources or [])


def _chats(records: list[tuple[str, dict]], indices: list[int]) -> list[tuple[list[dict], str]]:
    """(conversation up to the last answer, that answer) of the records that end in an assistant turn."""
    out = []
    for i in indices:
        messages = records[i][1].get("messages") or []
        if messages and messages[-1].get("role") == "assistant":
            out.append((messages[:-1], messages[-1]["content"]))
    return out


# data.streaming with val_size given as a fraction (the data's size is not known): this many records
STREAM_VAL_RECORDS = 200


def _stream_examples(cfg: DataConfig, sources: list) -> Iterator[tuple[str, dict]]:
    """Every record of ``sources`` normalised, read lazily (.jsonl/.csv a line at a time, hub datasets streamed)."""
    return iter_examples(sources, cfg.format, cfg.columns)


def _streamed(cfg: DataConfig, tokenizer: Any, template: str, pairs: bool) -> Prepared:
    """data.streaming: validation read up front (eval_path, or the stream's first records), training
    examples encoded as they are read; nothing is cached."""
    if cfg.path is None:
        raise LorakitError("data.streaming reads data files or hub datasets: give --data (the demo task is small)")
    sources = data_files(cfg.path)
    if cfg.eval_path is not None:
        head, val_raw = 0, load_examples(cfg.eval_path, cfg.format, cfg.columns)
    else:
        head = int(cfg.val_size) if cfg.val_size >= 1 else STREAM_VAL_RECORDS if cfg.val_size > 0 else 0
        val_raw = list(itertools.islice(_stream_examples(cfg, sources), head))
    stats = {"records": 0, "too_long": 0, "dropped_too_long": 0, "dropped_no_labels": 0, "streaming": 1}
    val_pairs = (_encode_pairs if pairs else _encode_all)(val_raw, template, tokenizer, cfg, stats) if val_raw else []
    val = _flat([e for _, e in val_pairs]) if pairs else [e for _, e in val_pairs]  # type: ignore[misc]
    stats.update(val_examples=len(val), val_records=head)

    def stream() -> Iterator[Encoded]:
        counts = dict(stats)  # (per pass; the run reports none of them)
        for where, ex in itertools.islice(_stream_examples(cfg, sources), head, None):
            if pairs:
                yield from _encode_pair(where, ex, template, tokenizer, cfg, counts) or []
            else:
                kept, _ = _encode_one(where, ex, template, tokenizer, cfg, counts)
                if kept is not None:
                    yield kept

    return Prepared([], val, template, _chats(val_raw, [i for i, _ in val_pairs]), None, stats, pairs=pairs,
                    stream=stream)


def prepare_data(cfg: DataConfig, tokenizer: Any, seed: int, cache_dir: Path | None = None,
                 pairs: bool = False, held_out: bool = False) -> Prepared:
    """Tokenized train/val examples for ``cfg`` (the demo task when cfg.path is None); ``pairs``:
    preference pairs (see the module doc); ``held_out``: every record goes to val (``lorakit eval``)."""
    template = resolve_template(cfg.template, tokenizer)
    if cfg.streaming and not held_out:
        return _streamed(cfg, tokenizer, template, pairs)
    train_ex, val_ex, val_chats, scorer, sources = _raw_examples(cfg, pairs)
    if held_out and val_ex is None and sources is not None:
        train_ex, val_ex = [], train_ex
    key = _cache_key(cfg, template, tokenizer, seed, sources, pairs)
    cache_path = (cache_dir / f"{key}.safetensors") if (cache_dir is not None and cfg.cache and not held_out) else None
    cached = _load_cache(cache_path) if cache_path is not None else None
    raw_val = val_ex if val_ex is not None else train_ex
    if cached is not None:
        splits, meta = cached
        chats = val_chats or _chats(raw_val, meta.get("val_records", []))
        return Prepared(splits["train"], splits["val"], meta["template"], chats, scorer, meta["stats"], True,
                        bool(meta.get("pairs")))

    stats = {"records": len(train_ex or val_ex or []), "too_long": 0, "dropped_too_long": 0, "dropped_no_labels": 0}
    encode = _encode_pairs if pairs else _encode_all
    unit = _flat if pairs else (lambda es: es)  # a unit: one example, or one pair
    encoded = encode(train_ex, template, tokenizer, cfg, stats) if train_ex else []
    if val_ex is not None:
        val_pairs = encode(val_ex, template, tokenizer, cfg, stats if not train_ex else dict(stats))
        train = unit([e for _, e in encoded])
    elif cfg.val_size > 0 and len(encoded) > 1:
        tr, va = _split(len(encoded), cfg.val_size, seed)
        train, val_pairs = unit([encoded[i][1] for i in tr]), [encoded[i] for i in va]
    else:
        train, val_pairs = unit([e for _, e in encoded]), []
    val_encoded, val_records = unit([e for _, e in val_pairs]), [i for i, _ in val_pairs]
    stats.update(train_examples=len(train), val_examples=len(val_encoded),
                 train_tokens=sum(len(e.input_ids) for e in train), train_labels=sum(e.n_labels for e in train))
    prepared = Prepared(train, val_encoded, template, val_chats or _chats(raw_val, val_records), scorer, stats,
                        pairs=pairs)
    if cache_path is not None:
        _save_cache(cache_path, prepared, val_records)
    return prepared
