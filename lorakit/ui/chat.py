"""Side-by-side answers for the UI's chat: the base and each chosen adapter (and, on request, a
weighted mix of two) answer one question in one mixed batch, streamed as they are generated. The
generation stops when the caller stops reading (the browser went away or a new question came)."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

from ..errors import LorakitError
from ..inference.engine import Engine, load_engine
from ..inference.generation import Request, Sampling

__all__ = ["ChatHub", "MIX"]

MIX = "mix"  # the name of the in-memory weighted adapter


class ChatHub:
    """One engine (base + adapters) at a time, reloaded when the model or the adapters change."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.key: tuple | None = None
        self.mix: tuple | None = None
        self.lock = threading.Lock()  # one generation at a time over the engine

    def _engine_for(self, model: str, adapters: dict[str, str]) -> Engine:
        key = (model, tuple(sorted(adapters.items())))
        if self.key != key:
            self.engine, self.key, self.mix = None, None, None
            self.engine = load_engine(model, [f"{n}={p}" for n, p in adapters.items()], device="cpu")
            self.key = key
        return self.engine

    def _set_mix(self, engine: Engine, a: str, b: str, weight: float) -> None:
        """A weighted combination ``weight·a + (1-weight)·b`` (cat: exact), in memory only."""
        if self.mix == (a, b, weight):
            return
        if MIX in engine.adapters:
            engine.remove_adapter(MIX)
        engine.lora.add_weighted_adapter([a, b], [weight, 1 - weight], MIX, "cat")
        engine.lora.eval()
        self.mix = (a, b, weight)

    def answers(self, model: str, adapters: dict[str, str], question: str, max_new_tokens: int = 64,
                mix: tuple[str, str, float] | None = None, system: str | None = None) -> Iterator[dict[str, str]]:
        """{column: text so far} after every streamed piece: 'base', each adapter, and MIX."""
        if not question.strip():
            raise LorakitError("ask something first")
        with self.lock:
            engine = self._engine_for(model, adapters)
            columns: list[str | None] = [None, *adapters]
            if mix is not None:
                self._set_mix(engine, *mix)
                columns.append(MIX)
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
            ids = engine.prompt_ids(messages)
            yield from _stream(engine, ids, columns, max_new_tokens)


def _stream(engine: Engine, ids: list[int], columns: list[str | None], max_new_tokens: int) -> Iterator[dict[str, str]]:
    pieces: queue.Queue = queue.Queue()
    cancel = threading.Event()
    names = ["base" if c is None else c for c in columns]
    requests = [Request(list(ids), c, Sampling(max_new_tokens=max_new_tokens),
                        on_text=lambda s, n=n: pieces.put((n, s)), cancel=cancel) for c, n in zip(columns, names)]
    done = object()

    def work() -> None:
        try:
            engine.run(requests)
        except BaseException as err:  # shown to the caller
            pieces.put((done, err))
            return
        pieces.put((done, None))

    worker = threading.Thread(target=work, name="lorakit-ui-chat", daemon=True)
    worker.start()
    texts = {n: "" for n in names}
    try:
        while True:
            name, piece = pieces.get()
            if name is done:
                if piece is not None:
                    raise piece
                yield dict(texts)
                return
            texts[name] += piece
            yield dict(texts)
    finally:  # the reader is gone (or finished): the rows stop before their next step
        cancel.set()
        worker.join()
