"""Raw documents -> clean training text (``lorakit data clean``).

Normalisation: Unicode NFC; control characters removed (tab and newline kept); for PDF text,
words hyphenated across a line break are joined and single line breaks inside a paragraph
become spaces; runs of spaces collapse and more than one blank line becomes one. Source code is
kept verbatim apart from NFC and control characters.

Filters, each counted (the thresholds are module constants):
- ``empty``: nothing left after normalisation;
- ``too_short``: fewer than ``min_chars`` characters (characters, not bytes or words, so Chinese
  is measured fairly);
- ``garbled``: more than ``MAX_REPLACEMENT`` of the characters are U+FFFD, or mojibake pairs
  (UTF-8 read as Latin-1, e.g. 'Ã©', 'â€™') make up more than ``MAX_MOJIBAKE`` of the text, or
  fewer than ``MIN_LINGUISTIC`` of the non-space characters are letters, digits or common
  punctuation (any script);
- ``duplicate``: the same text (case and whitespace folded) as an earlier document;
- ``near_duplicate``: MinHash (datasketch) Jaccard estimate ≥ ``NEAR_DUP_THRESHOLD`` over
  character 5-grams with an earlier kept document.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import unicodedata
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Iterable, Iterator

from ..atomic import atomic_file
from ..errors import LorakitError
from .readers import Document, Skipped, document_type, read_document

__all__ = ["normalize", "garbled_reason", "CleanReport", "clean_corpus", "expand_inputs",
           "MAX_REPLACEMENT", "MAX_MOJIBAKE", "MIN_LINGUISTIC", "NEAR_DUP_THRESHOLD"]

MAX_REPLACEMENT = 0.001  # share of U+FFFD characters
MAX_MOJIBAKE = 0.01  # share of characters inside mojibake pairs
MIN_LINGUISTIC = 0.70  # share of non-space characters that are letters, digits or common punctuation
NEAR_DUP_THRESHOLD = 0.8
_SHINGLE = 5
_NUM_PERM = 128

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
_MOJIBAKE = re.compile(r"[ÃÂ][\x80-\xbf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u203a\u20ac\u2122]"
                       r"|â€[\x80-\xbf\u2018-\u201e\u2022\u2026\u2122\u0153\u02dc]?")
_PUNCT = set(".,;:!?'\"()[]-–—…/%“”‘’«»、，。；：！？（）《》【】「」『』·")  # sentence punctuation, not symbols


def normalize(text: str, kind: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if kind.startswith("code"):
        return text.strip("\n")
    if kind == "pdf":
        text = re.sub(r"(\w)-\n(\w)", r"\1\2", text)  # de-hyphenate across line breaks
        text = re.sub(r"(?<=\S)[ \t]*\n(?=[ \t]*\S)", " ", text)  # a line break inside a paragraph
    text = re.sub(r"[ \t\u00a0\u3000]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def garbled_reason(text: str) -> str | None:
    """Why ``text`` looks garbled, or None (see the module doc for the thresholds)."""
    n = len(text)
    if not n:
        return None
    if text.count("\ufffd") / n > MAX_REPLACEMENT:
        return "replacement characters"
    if sum(len(m) for m in _MOJIBAKE.findall(text)) / n > MAX_MOJIBAKE:
        return "mojibake"
    visible = [c for c in text if not c.isspace()]
    if visible:
        ok = sum(1 for c in visible if c.isalnum() or c in _PUNCT or unicodedata.category(c).startswith("L"))
        if ok / len(visible) < MIN_LINGUISTIC:
            return "symbols"
    return None


def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip()


@dataclass
class CleanReport:
    inputs: int = 0
    documents: int = 0
    kept: int = 0
    chars_kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    kept_by_type: Counter = field(default_factory=Counter)
    rejected_by_type: Counter = field(default_factory=Counter)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def reject(self, reason: str, doc_type: str, sample: str) -> None:
        self.rejected[reason] += 1
        self.rejected_by_type[doc_type] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(sample[:160])

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "documents": self.documents, "kept": self.kept, "chars_kept": self.chars_kept,
                "rejected": dict(self.rejected), "kept_by_type": dict(self.kept_by_type),
                "rejected_by_type": dict(self.rejected_by_type),
                "skipped_files": [{"source": s, "reason": r} for s, r in self.skipped_files],
                "examples": self.examples, "seconds": round(self.seconds, 3),
                "documents_per_s": round(self.documents / self.seconds, 1) if self.seconds else None}

    def format(self) -> str:
        lines = [f"{self.documents} documents from {self.inputs} files: kept {self.kept} ({self.chars_kept:,d} characters)"]
        for reason, n in self.rejected.most_common():
            lines.append(f"  rejected {reason}: {n}   e.g. {self.examples.get(reason, [''])[0]!r}")
        if self.skipped_files:
            lines.append(f"  skipped files: {len(self.skipped_files)}")
            lines += [f"    {s}: {r}" for s, r in self.skipped_files[:10]]
        lines.append("  kept by type: " + ", ".join(f"{t} {n}" for t, n in sorted(self.kept_by_type.items())))
        if self.seconds:
            lines.append(f"  {self.documents / self.seconds:.0f} documents/s")
        return "\n".join(lines)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (recursive) and globs -> the supported files, sorted and unique."""
    out: list[Path] = []
    for item in inputs:
        matches = [Path(m) for m in glob(item, recursive=True)] if any(c in item for c in "*?[") else [Path(item)]
        if not matches:
            raise LorakitError(f"{item}: no file matches")
        for p in matches:
            if p.is_dir():
                out += sorted(f for f in p.rglob("*") if f.is_file() and document_type(f) is not None)
            elif p.exists():
                out.append(p)
            else:
                raise LorakitError(f"input {p} does not exist")
    return list(dict.fromkeys(out))


def _read_and_normalize(path: Path) -> tuple[list[Document], Skipped | None]:
    got = read_document(path)
    if isinstance(got, Skipped):
        return [], got
    return [Document(normalize(d.text, d.type), d.source, d.type) for d in got], None


def _documents(files: list[Path], workers: int) -> Iterator[tuple[list[Document], Skipped | None]]:
    if workers <= 1:
        yield from map(_read_and_normalize, files)
        return
    with ProcessPoolExecutor(workers) as pool:  # reading and normalising in parallel, results in input order
        yield from pool.map(_read_and_normalize, files, chunksize=16)


def _minhash(text: str):
    from datasketch import MinHash

    m = MinHash(num_perm=_NUM_PERM)
    folded = _fold(text)
    grams = {folded[i:i + _SHINGLE] for i in range(max(1, len(folded) - _SHINGLE + 1))}
    m.update_batch([g.encode("utf-8") for g in grams])
    return m


def clean_corpus(inputs: Iterable[str], out: str | os.PathLike, min_chars: int = 100, dedup: str = "near",
                 workers: int = 1) -> CleanReport:
    """Read, normalise, filter and deduplicate ``inputs`` into JSONL ``out`` (written atomically)."""
    if dedup not in ("exact", "near", "none"):
        raise LorakitError(f"--dedup must be exact, near or none, got {dedup!r}")
    if min_chars < 0:
        raise LorakitError(f"--min-chars must be >= 0, got {min_chars}")
    files = expand_inputs(inputs)
    if not files:
        raise LorakitError("no input files of a supported type")
    lsh = None
    if dedup == "near":
        try:
            from datasketch import MinHashLSH
        except ImportError:
            raise LorakitError("--dedup near needs datasketch: pip install 'lorakit[docs]' (or use --dedup exact)") from None
        lsh = MinHashLSH(threshold=NEAR_DUP_THRESHOLD, num_perm=_NUM_PERM)
    report = CleanReport(inputs=len(files))
    seen: set[str] = set()
    kept_hashes: dict = {}
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with atomic_file(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for docs, skipped in _documents(files, workers):
            if skipped is not None:
                report.skipped_files.append((skipped.source, skipped.reason))
                continue
            for doc in docs:
                report.documents += 1
                text = doc.text
                if not text.strip():
                    report.reject("empty", doc.type, doc.source)
                    continue
                if len(text) < min_chars:
                    report.reject("too_short", doc.type, text)
                    continue
                why = None if doc.type.startswith("code") else garbled_reason(text)
                if why:
                    report.reject("garbled", doc.type, f"[{why}] {text}")
                    continue
                if dedup != "none":
                    key = hashlib.sha1(_fold(text).encode("utf-8")).hexdigest()
                    if key in seen:
                        report.reject("duplicate", doc.type, text)
                        continue
                    seen.add(key)
                    if lsh is not None:
                        mh = _minhash(text)
                        # LSH proposes candidates; the MinHash estimate confirms (fewer false positives).
                        if any(mh.jaccard(kept_hashes[c]) >= NEAR_DUP_THRESHOLD for c in lsh.query(mh)):
                            report.reject("near_duplicate", doc.type, text)
                            continue
                        lsh.insert(key, mh)
                        kept_hashes[key] = mh
                f.write(json.dumps({"text": text, "source": doc.source, "type": doc.type, "chars": len(text)},
                                   ensure_ascii=False) + "\n")
                report.kept += 1
                report.chars_kept += len(text)
                report.kept_by_type[doc.type] += 1
    report.seconds = time.perf_counter() - t0
    return report
