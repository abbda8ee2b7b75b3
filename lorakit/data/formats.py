"""Read data files and normalise every record to one of two shapes:

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` (chat), or
- ``{"text": str}`` (continued pre-training).

Input formats: alpaca (instruction/input/output/system/history), sharegpt (conversations with
from/value, system), OpenAI messages (role/content), plain text, and preference pairs
(``chosen``/``rejected``, with a ``prompt``, an alpaca ``instruction`` or sharegpt ``conversations``,
or an implicit prompt: the turns chosen and rejected conversations share; TRL's and LLaMA-Factory's
layouts). A pair becomes ``{"messages": [... the prompt, the chosen answer], "rejected": str}``: a
chat that SFT trains on as it is (its chosen answer), and the preference objectives read whole.
Auto-detected from the first record, or forced; ``columns`` maps our field names to the file's.
Files: .json (array), .jsonl, .csv, .parquet; a directory (all such files in it) or several files;
a hub dataset id or a folder saved by ``datasets`` (``lorakit.data.hub``).
Every problem names the file and line (or record) and what to do.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import LorakitError
from .hub import HubSource, hub_records, hub_source

__all__ = ["FORMATS", "read_records", "detect_format", "to_examples", "iter_examples", "load_examples",
           "data_files"]

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text", "preference")
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def data_files(paths: Iterable[str | Path]) -> list[Path | HubSource]:
    """Expand folders (every data file inside, sorted) and check that each file exists; a hub
    dataset id or a folder saved by ``datasets`` stays one source (``lorakit.data.hub``)."""
    out: list[Path | HubSource] = []
    for p in paths:
        hub = p if isinstance(p, HubSource) else hub_source(str(p), SUFFIXES)
        if hub is not None:
            out.append(hub)
            continue
        path = Path(p).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file())
            if not found:
                raise LorakitError(f"{path}: no data files ({', '.join(SUFFIXES)}) in this folder")
            out.extend(found)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise LorakitError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUFFIXES)}")
            out.append(path)
        else:
            raise LorakitError(f"data file {path} does not exist")
    return out


def _undecodable(path: Path) -> LorakitError:
    """Where the first bytes that are not UTF-8 sit (line and byte offset), and what to do."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8-sig")
        offset, bad = 0, b""
    except UnicodeDecodeError as err:  # decoded whole, so the offset is the file's (a stream's is its chunk's)
        offset, bad = err.start, raw[err.start:err.start + 4]
    line = raw.count(b"\n", 0, offset) + 1
    what = "looks like a binary file, not text" if b"\x00" in raw[:4096] else f"is not UTF-8 text (bytes {bad!r})"
    return LorakitError(f"{path}:{line}: the file {what} at byte offset {offset}; save it as UTF-8 (e.g. "
                        f"iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}) or remove it from the data")


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LorakitError(f"{path}: reading parquet needs pyarrow: pip install 'lorakit[parquet]'") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's ArrowInvalid / ArrowIOError: truncated or not parquet at all
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LorakitError(f"{path}: not a readable parquet file ({first}); the file may be truncated — "
                           "write it again, or use .jsonl") from None


def read_records(path: Path | HubSource, streaming: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) pairs; where is 'file:line' or 'file: record N' (a dataset: 'name: row N').
    A file that cannot be read (not UTF-8, truncated, a folder, no permission) is a LorakitError
    naming it and the place. .jsonl and .csv are read a line at a time; ``streaming`` also streams
    a hub dataset."""
    if isinstance(path, HubSource):
        yield from hub_records(path, streaming)
        return
    try:
        yield from _records(path)
    except UnicodeDecodeError:
        raise _undecodable(path) from None
    except IsADirectoryError:
        raise LorakitError(f"{path} is a folder, not a data file; give the folder itself to read every data file in it") from None
    except PermissionError:
        raise LorakitError(f"{path}: permission denied; make the file readable or copy it elsewhere") from None
    except csv.Error as err:
        raise LorakitError(f"{path}: not valid CSV ({err}); check the quoting") from None
    except OSError as err:
        raise LorakitError(f"{path}: cannot be read ({err.strerror or err})") from None


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    if "\x00" in line:
                        raise LorakitError(f"{path}:{n}: this looks like a binary file, not JSON lines text") from None
                    raise LorakitError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno}); fix or remove the line") from None
                if not isinstance(rec, dict):
                    raise LorakitError(f"{path}:{n}: each line must be a JSON object, got {type(rec).__name__}")
                yield f"{path}:{n}", rec
    elif path.suffix == ".json":
        text = path.read_text(encoding="utf-8-sig")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            ended = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
            cut = " (the file ends in the middle of a record: truncated?)" if ended else ""
            raise LorakitError(f"{path}:{err.lineno}: not valid JSON ({err.msg} column {err.colno}){cut}; "
                               "fix the file") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]} style
        if not isinstance(data, list):
            raise LorakitError(f"{path}: expected a JSON array of records (or use .jsonl with one object per line)")
        for n, rec in enumerate(data, 1):
            if not isinstance(rec, dict):
                raise LorakitError(f"{path}: record {n} must be a JSON object, got {type(rec).__name__}")
            yield f"{path}: record {n}", rec
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            for n, rec in enumerate(csv.DictReader(f), 2):
                if None in rec:  # more cells than the header has names
                    raise LorakitError(f"{path}:{n}: {len(rec) - 1 + len(rec[None])} cells but the header names "
                                       f"{len(rec) - 1} columns; quote cells that contain commas")
                yield f"{path}:{n}", dict(rec)
    elif path.suffix == ".parquet":
        for n, rec in enumerate(_parquet_rows(path), 1):
            yield f"{path}: row {n}", rec
    else:  # pragma: no cover - data_files filters suffixes
        raise LorakitError(f"{path}: unsupported file type")


def detect_format(record: dict[str, Any], where: str) -> str:
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise LorakitError(f"{where}: cannot tell the data format from the keys {sorted(record)}; expected 'messages', "
                       "'conversations', 'instruction'+'output', 'text' or 'chosen'+'rejected'. Set data.format (and data.columns to map names)")


def _text(value: Any, where: str, key: str, allow_empty: bool = False) -> str:
    if isinstance(value, list):  # OpenAI content parts
        value = "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type", "text") == "text")
    if value is None:
        value = ""
    if not isinstance(value, str):
        value = str(value)
    if not allow_empty and not value.strip():
        raise LorakitError(f"{where}: field {key!r} is empty; fill it or remove the record")
    return value


def _get(record: dict, key: str, columns: dict[str, str], where: str, required: bool = True):
    col = columns.get(key, key)
    if col not in record:
        if required:
            raise LorakitError(f"{where}: missing field {col!r}" + (f" (mapped from {key!r})" if col != key else "")
                               + f"; record has {sorted(record)}")
        return None
    return record[col]


def _alpaca(rec: dict, where: str, columns: dict[str, str]) -> dict:
    messages = []
    system = _get(rec, "system", columns, where, required=False)
    if system:
        messages.append({"role": "system", "content": _text(system, where, "system")})
    for n, turn in enumerate(_get(rec, "history", columns, where, required=False) or []):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise LorakitError(f"{where}: history[{n}] must be a [question, answer] pair")
        messages += [{"role": "user", "content": _text(turn[0], where, f"history[{n}][0]")},
                     {"role": "assistant", "content": _text(turn[1], where, f"history[{n}][1]")}]
    prompt = _text(_get(rec, "instruction", columns, where), where, columns.get("instruction", "instruction"))
    extra = _get(rec, "input", columns, where, required=False)
    if extra and str(extra).strip():
        prompt = f"{prompt}\n\n{_text(extra, where, 'input')}"
    messages += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": _text(_get(rec, "output", columns, where), where, columns.get("output", "output"))}]
    return {"messages": messages}


def _sharegpt(rec: dict, where: str, columns: dict[str, str]) -> dict:
    turns = _get(rec, "conversations", columns, where)
    if not isinstance(turns, list) or not turns:
        raise LorakitError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
    messages = []
    system = _get(rec, "system", columns, where, required=False)
    if system:
        messages.append({"role": "system", "content": _text(system, where, "system")})
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise LorakitError(f"{where}: conversations[{n}] must be an object with 'from' and 'value'")
        speaker = turn.get(columns.get("from", "from"), turn.get("role"))
        role = _SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise LorakitError(f"{where}: conversations[{n}] has from={speaker!r}; expected human/user, gpt/assistant or system")
        messages.append({"role": role, "content": _text(turn.get(columns.get("value", "value"), turn.get("content")), where, f"conversations[{n}].value")})
    return {"messages": messages}


def _messages(rec: dict, where: str, columns: dict[str, str]) -> dict:
    turns = _get(rec, "messages", columns, where)
    if not isinstance(turns, list) or not turns:
        raise LorakitError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for n, m in enumerate(turns):
        if not isinstance(m, dict) or "role" not in m:
            raise LorakitError(f"{where}: messages[{n}] must be an object with 'role' and 'content'")
        role = m["role"]
        if role not in ("system", "user", "assistant"):
            raise LorakitError(f"{where}: messages[{n}] has role {role!r}; lorakit trains on system/user/assistant turns")
        out.append({"role": role, "content": _text(m.get("content"), where, f"messages[{n}].content")})
    return {"messages": out}


def _plain(rec: dict, where: str, columns: dict[str, str]) -> dict:
    return {"text": _text(_get(rec, "text", columns, where), where, columns.get("text", "text"))}


def _turns(value: Any, where: str, key: str, default_role: str) -> list[dict]:
    """A string (one turn of ``default_role``), one {role|from, content|value} object, or a list of them."""
    if isinstance(value, str):
        return [{"role": default_role, "content": _text(value, where, key)}]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        raise LorakitError(f"{where}: {key!r} must be a string, a {{role, content}} object or a list of them")
    out = []
    for n, m in enumerate(items):
        speaker = m.get("role", m.get("from")) if isinstance(m, dict) else None
        role = _SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise LorakitError(f"{where}: {key}[{n}] needs a role (user, assistant or system), got {speaker!r}")
        out.append({"role": role, "content": _text(m.get("content", m.get("value")), where, f"{key}[{n}].content")})
    return out


def _preference_prompt(rec: dict, where: str, columns: dict[str, str]) -> list[dict] | None:
    """The prompt turns of a pair, or None when the prompt is implicit (inside chosen/rejected)."""
    col = lambda k: columns.get(k, k)  # noqa: E731
    if col("prompt") in rec:
        turns = _turns(rec[col("prompt")], where, col("prompt"), "user")
    elif col("instruction") in rec:
        turns = _alpaca({**rec, col("output"): "-"}, where, columns)["messages"][:-1]
    elif col("conversations") in rec:
        turns = _turns(rec[col("conversations")], where, col("conversations"), "user")
    else:
        return None
    system = _get(rec, "system", columns, where, required=False)
    if system and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": _text(system, where, "system")})
    return turns


def _preference(rec: dict, where: str, columns: dict[str, str]) -> dict:
    chosen = _turns(_get(rec, "chosen", columns, where), where, columns.get("chosen", "chosen"), "assistant")
    rejected = _turns(_get(rec, "rejected", columns, where), where, columns.get("rejected", "rejected"), "assistant")
    prompt = _preference_prompt(rec, where, columns)
    if prompt is None:  # implicit prompt: the turns both conversations share
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not prompt:
            raise LorakitError(f"{where}: no prompt: give a 'prompt' (or 'instruction' / 'conversations'), or chosen and "
                               "rejected conversations that start with the same user turn")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise LorakitError(f"{where}: {key!r} must be one assistant answer to the prompt, got "
                               f"{len(turns)} turn(s) ({', '.join(t['role'] for t in turns)})")
    if prompt[-1]["role"] != "user":
        raise LorakitError(f"{where}: the prompt must end with a user turn, it ends with a {prompt[-1]['role']} turn")
    return {"messages": prompt + chosen, "rejected": rejected[0]["content"]}


_CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages, "text": _plain,
               "preference": _preference}


def _check_chat(example: dict, where: str) -> None:
    roles = [m["role"] for m in example["messages"]]
    if "assistant" not in roles:
        raise LorakitError(f"{where}: the conversation has no assistant turn, so there is nothing to train on")
    body = [r for r in roles if r != "system"]
    if roles.count("system") > 1 or (roles.count("system") == 1 and roles[0] != "system"):
        raise LorakitError(f"{where}: a system message may only come first")
    for a, b in zip(body, body[1:]):
        if a == b:
            raise LorakitError(f"{where}: two {a} turns in a row; user and assistant turns must alternate")


def to_examples(records: Iterable[tuple[str, dict]], fmt: str = "auto", columns: dict[str, str] | None = None) -> Iterator[tuple[str, dict]]:
    """Normalise records (see module doc); the format is detected from the first record when 'auto'."""
    if fmt not in FORMATS:
        raise LorakitError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r} (--format on the command line)")
    columns = columns or {}
    for where, rec in records:
        if fmt == "auto":
            mapped = {k: rec[v] for k, v in columns.items() if v in rec}
            fmt = detect_format({**rec, **mapped}, where)
        example = _CONVERTERS[fmt](rec, where, columns)
        if "messages" in example:
            _check_chat(example, where)
        yield where, example


def iter_examples(files: Iterable[Path | HubSource], fmt: str = "auto", columns: dict[str, str] | None = None,
                  streaming: bool = True) -> Iterator[tuple[str, dict]]:
    """The examples of ``files`` (from ``data_files``) read lazily, .jsonl/.csv a line at a time and
    (``streaming``) hub datasets streamed; the format is detected per file."""
    for f in files:
        yield from to_examples(read_records(f, streaming=streaming), fmt, columns)


def load_examples(paths: Iterable[str | Path], fmt: str = "auto", columns: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """All examples of all files, with where each came from. An empty result is an error."""
    files = data_files(paths)
    out = list(iter_examples(files, fmt, columns, streaming=False))
    if not out:
        raise LorakitError(f"no records in {', '.join(map(str, files))}")
    return out

