"""What ``lorakit data inspect`` (and the web UI's data tab) shows of a data file: its detected
format, each example rendered through the chat template and split into runs of text that are or
are not trained on, and the token lengths that ``max_len`` would cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LorakitError
from .formats import data_files, detect_format, load_examples, read_records
from .templates import Encoded, encode_example

__all__ = ["Inspection", "inspect_data", "percentile"]


def percentile(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


@dataclass
class Inspection:
    path: str
    format: str
    fields: list[str]
    wheres: list[str]  # file:line of each example
    encoded: list[Encoded]

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.encoded]

    def over(self, max_len: int) -> int:
        """How many examples are longer than ``max_len`` tokens (what truncation would cut)."""
        return sum(1 for n in self.lengths if n > max_len)

    def segments(self, i: int, tokenizer: Any) -> list[tuple[str, bool]]:
        """Example ``i`` as (text, trained) runs, in order."""
        enc, out, run, trained = self.encoded[i], [], [], None
        for t, lab in zip(enc.input_ids, enc.labels):
            is_t = lab != -100
            if trained is not None and is_t != trained:
                out.append((tokenizer.decode(run), trained))
                run = []
            run.append(t)
            trained = is_t
        if run:
            out.append((tokenizer.decode(run), bool(trained)))
        return out


def inspect_data(path: str, tokenizer: Any, template: str, fmt: str = "auto") -> Inspection:
    """Read ``path`` (a file or folder) the way ``train`` does and encode every example."""
    files = data_files([path])
    first_where, first = next(iter(read_records(files[0])), (None, None))
    if first is None:
        raise LorakitError(f"{path}: no records")
    fmt = fmt if fmt != "auto" else detect_format(first, first_where)
    examples = load_examples(files, fmt)
    encoded = [encode_example(ex, template, tokenizer, where=w) for w, ex in examples]
    return Inspection(path, fmt, sorted(first), [w for w, _ in examples], encoded)
