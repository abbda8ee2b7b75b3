"""An OpenAI-compatible HTTP server over one base model and many adapters.

The request's ``model`` field picks the adapter (the base's name: no adapter), as in vLLM and
LoRAX. One worker thread owns the model: it gathers the requests waiting at that moment (a short
window, up to ``max_batch``) into one batch whose rows may use different adapters — one base
matmul per layer per step, each adapter on its own rows — and streams tokens back to each
request. Adapter loads and deletes run on the same worker, between batches, so they never race
with generation.
"""

# No "from __future__ import annotations": FastAPI reads the request models from real annotations.

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .errors import LorakitError
from .generation import Output, Request, Sampling
from .infer import Engine
from .serve_settings import ServeSettings

__all__ = ["ServeSettings", "Scheduler", "create_app"]


@dataclass
class _Job:
    request: Request | None  # None: an admin task (``task``)
    done: Callable[[Any, BaseException | None], None]
    task: Callable[[], Any] | None = None


class Scheduler:
    """Owns the engine; runs generation batches and admin tasks one at a time on its thread."""

    def __init__(self, engine: Engine, max_batch: int, window_s: float) -> None:
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.q: "queue.Queue[_Job]" = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, name="lorakit-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        self.q.put(job)

    def _loop(self) -> None:
        while True:
            first = self.q.get()
            if first.request is None:
                self._run_task(first)
                continue
            jobs = [first]
            deadline = time.monotonic() + self.window_s
            while len(jobs) < self.max_batch:  # gather what arrives within the window
                try:
                    job = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job.request is None:  # an admin task waits for this batch, then runs
                    self._run_batch(jobs)
                    jobs = []
                    self._run_task(job)
                    break
                jobs.append(job)
            if jobs:
                self._run_batch(jobs)

    def _run_task(self, job: _Job) -> None:
        try:
            job.done(job.task(), None)
        except BaseException as err:  # reported to the caller; the worker lives on
            job.done(None, err)

    def _run_batch(self, jobs: list[_Job]) -> None:
        self.batches += 1
        try:
            outputs = self.engine.run([j.request for j in jobs])
        except BaseException as err:
            for j in jobs:
                j.done(None, err)
            return
        for j, out in zip(jobs, outputs):
            j.done(out, None)


# ---- OpenAI-shaped errors -------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def create_app(engine: Engine, settings: ServeSettings | None = None):
    """The FastAPI application (run it with uvicorn)."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    settings = settings or ServeSettings()
    scheduler = Scheduler(engine, settings.max_batch, settings.batch_window_s)
    context_len = getattr(engine.model.config, "max_position_embeddings", None) or 1 << 30

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: str
        content: Union[str, list[dict], None] = None

    class Common(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str
        max_tokens: Optional[int] = Field(default=None, ge=1)
        max_completion_tokens: Optional[int] = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0, le=2)
        top_p: float = Field(default=1.0, gt=0, le=1)
        seed: Optional[int] = None
        stop: Union[str, list[str], None] = None
        stream: bool = False
        n: int = 1

    class ChatBody(Common):
        messages: list[Message] = Field(min_length=1)

    class CompletionBody(Common):
        prompt: str

    class AdapterBody(BaseModel):
        name: str

    app = FastAPI(title="lorakit", version=_version())
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def _api_error(_req, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(ApiError(400, msg, param=where or None).body(), status_code=400)

    @app.middleware("http")
    async def _guard(request: HttpRequest, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse(ApiError(413, f"request body over {settings.max_body_bytes} bytes").body(), status_code=413)
        if settings.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {settings.api_key}":
                return JSONResponse(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                             "authentication_error", code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    def adapter_for(model: str) -> str | None:
        if model == engine.base_name:
            return None
        if model in engine.adapters:
            return model
        raise ApiError(404, f"the model {model!r} does not exist; available: {', '.join(_model_ids())}",
                       code="model_not_found", param="model")

    def _model_ids() -> list[str]:
        return [engine.base_name] + engine.adapters

    def sampling_of(body: Common, prompt_len: int) -> Sampling:
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        wanted = body.max_completion_tokens or body.max_tokens
        if wanted is not None and wanted > settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens={wanted} is over this server's limit of {settings.max_tokens_limit}",
                           param="max_tokens")
        max_new = wanted or settings.default_max_tokens
        if prompt_len + (wanted or 1) > context_len:
            raise ApiError(400, f"the prompt is {prompt_len} tokens; with max_tokens={wanted or 1} that exceeds the "
                                f"model's context of {context_len} tokens", param="messages", code="context_length_exceeded")
        max_new = min(max_new, context_len - prompt_len)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Sampling(max_new, body.temperature, body.top_p, body.seed, stop)

    async def run(request: Request, stream_to: Callable[[str], None] | None = None) -> Output:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(out, err):
            loop.call_soon_threadsafe(lambda: fut.done() or (fut.set_exception(err) if err else fut.set_result(out)))

        if stream_to is not None:
            request.on_text = lambda piece: loop.call_soon_threadsafe(stream_to, piece)
        scheduler.submit(_Job(request, done))
        try:
            return await fut
        except LorakitError as err:  # e.g. its adapter was deleted while the request waited
            raise ApiError(404, str(err), code="model_not_found") from None

    async def admin(task: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        scheduler.submit(_Job(None, lambda out, err: loop.call_soon_threadsafe(
            lambda: fut.done() or (fut.set_exception(err) if err else fut.set_result(out))), task))
        return await fut

    def usage(out: Output) -> dict:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    def sse(chunks_queue: asyncio.Queue, final: Callable[[Output], list[dict]], task: asyncio.Task, make_chunk):
        async def gen():
            while True:
                getter = asyncio.ensure_future(chunks_queue.get())
                finished, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in finished:
                    yield f"data: {json.dumps(make_chunk(getter.result()))}\n\n"
                    continue
                getter.cancel()
                while not chunks_queue.empty():
                    yield f"data: {json.dumps(make_chunk(chunks_queue.get_nowait()))}\n\n"
                if task.exception() is not None:
                    err = task.exception()
                    yield f"data: {json.dumps(ApiError(500, str(err), 'server_error').body())}\n\n"
                else:
                    for chunk in final(task.result()):
                        yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
                return
        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.base_name, "adapters": engine.adapters, "batches": scheduler.batches}

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": engine.base_name, "object": "model", "created": created, "owned_by": "lorakit"}]
        data += [{"id": a, "object": "model", "created": created, "owned_by": "lorakit", "parent": engine.base_name}
                 for a in engine.adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        adapter = adapter_for(body.model)
        messages = []
        for m in body.messages:
            if m.role not in ("system", "user", "assistant"):
                raise ApiError(400, f"message role {m.role!r} is not supported (system, user, assistant)", param="messages")
            content = m.content if isinstance(m.content, str) else "".join(
                p.get("text", "") for p in (m.content or []) if isinstance(p, dict))
            messages.append({"role": m.role, "content": content})
        ids = engine.prompt_ids(messages)
        request = Request(ids, adapter, sampling_of(body, len(ids)))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not body.stream:
            out = await run(request)
            return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                 "finish_reason": out.finish_reason}], "usage": usage(out)}
        pieces: asyncio.Queue = asyncio.Queue()
        pieces.put_nowait(None)  # the first chunk announces the role

        def chunk(piece):
            delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

        def final(out: Output):
            return [{"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                     "choices": [{"index": 0, "delta": {}, "finish_reason": out.finish_reason}], "usage": usage(out)}]

        task = asyncio.ensure_future(run(request, pieces.put_nowait))
        return sse(pieces, final, task, chunk)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        adapter = adapter_for(body.model)
        ids = engine.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        request = Request(ids, adapter, sampling_of(body, len(ids)))
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not body.stream:
            out = await run(request)
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}],
                    "usage": usage(out)}
        pieces: asyncio.Queue = asyncio.Queue()

        def chunk(piece):
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}]}

        def final(out: Output):
            return [{"id": rid, "object": "text_completion", "created": created, "model": body.model,
                     "choices": [{"index": 0, "text": "", "finish_reason": out.finish_reason, "logprobs": None}],
                     "usage": usage(out)}]

        task = asyncio.ensure_future(run(request, pieces.put_nowait))
        return sse(pieces, final, task, chunk)

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterBody):
        if not settings.adapters_dir:
            raise ApiError(400, "this server was started without --adapters-dir; adapters cannot be loaded at run time")
        root = Path(settings.adapters_dir).resolve()
        folder = (root / body.name).resolve()
        if folder.parent != root or not body.name or body.name.startswith("."):
            raise ApiError(400, f"adapter name {body.name!r} must be a folder name inside the adapters directory", param="name")
        if body.name in engine.adapters or body.name == engine.base_name:
            raise ApiError(400, f"a model named {body.name!r} is already loaded", param="name")
        try:
            await admin(lambda: engine.add_adapter(body.name, str(folder)))
        except LorakitError as err:
            raise ApiError(400, f"adapter {body.name!r} refused: {err}", param="name") from None
        return {"id": body.name, "object": "model", "owned_by": "lorakit", "parent": engine.base_name}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        if name not in engine.adapters:
            raise ApiError(404, f"no adapter named {name!r}", code="model_not_found")
        await admin(lambda: engine.remove_adapter(name))
        return {"id": name, "object": "model", "deleted": True}

    return app


def _version() -> str:
    from ._version import __version__

    return __version__
