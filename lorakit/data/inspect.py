"""What ``lorakit data inspect`` (and the web UI's data tab) shows of a data file: its detected
format, each example rendered through the chat template and split into runs of text that are or
are not trained on, and the token lengths that ``max_len`` would cut — from one pass that holds a
sample of the data at most (``lorakit.data.sample``), so a file larger than memory can be inspected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LorakitError
from .formats import data_files, detect_format, iter_examples, read_records
from .sample import sample_items
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
    wheres: list[str]  # file:line of each example encoded
    encoded: list[Encoded]  # the first examples, then a uniform sample of the others (all, up to the sample size)
    records: int = 0  # examples in the data, all of them

    @property
    def sampled(self) -> bool:
        """The lengths come from a sample (the data has more examples than were encoded)."""
        return self.records > len(self.encoded)

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


def inspect_data(path: str, tokenizer: Any, template: str, fmt: str = "auto", sample: int = 20_000,
                 head: int = 8) -> Inspection:
    """Read ``path`` (a file or folder) the way ``train`` does, in one pass, and encode the first
    ``head`` examples and a seeded uniform sample of the rest, ``sample`` in all (0: every example)."""
    files = data_files([path])
    first_where, first = next(iter(read_records(files[0], streaming=True)), (None, None))
    if first is None:
        raise LorakitError(f"{path}: no records")
    fmt = fmt if fmt != "auto" else detect_format(first, first_where)
    n, chosen = sample_items(iter_examples(files, fmt), sample, head=head)
    encoded = [encode_example(ex, template, tokenizer, where=w) for _, (w, ex) in chosen]
    return Inspection(path, fmt, sorted(first), [w for _, (w, _) in chosen], encoded, n)
