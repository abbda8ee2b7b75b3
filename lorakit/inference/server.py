"""An OpenAI-compatible HTTP server over one base model and many adapters.

The request's ``model`` field picks the adapter (the base's name: no adapter), as in vLLM and
LoRAX. One worker thread owns the model (``scheduler``): requests waiting at the same moment run
as one batch whose rows may use different adapters — one base matmul per layer per step, each
adapter on its own rows — and tokens stream back to each request. Adapter loads and deletes run
on the same worker, between batches, so they never race with generation.

The routes live at module level on ``router``; ``create_app`` binds them to one ``Server`` (the
engine, the settings and the scheduler) kept on ``app.state``.
"""

# No "from __future__ import annotations": FastAPI reads the request models from real annotations.

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import APIRouter, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import LorakitError
from .api import AdapterBody, ApiError, ChatBody, Common, CompletionBody, Reply
from .engine import Engine
from .generation import Output, Request, Sampling
from .scheduler import Job, Scheduler
from .settings import ServeSettings

__all__ = ["ServeSettings", "Scheduler", "Server", "create_app", "router"]

DISCONNECT_POLL_S = 0.1  # how often a non-streamed request checks that its client is still there


class Server:
    """What the routes share: the engine, the settings and the worker that runs the model."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self.engine, self.settings = engine, settings
        self.scheduler = Scheduler(engine, settings.max_batch, settings.batch_window_s)
        self.context_len = getattr(engine.model.config, "max_position_embeddings", None) or 1 << 30

    def model_ids(self) -> list[str]:
        base = [] if self.engine.merged is not None else [self.engine.base_name]  # merged away by --int8
        return base + self.engine.adapters

    def adapter_for(self, model: str) -> Optional[str]:
        if model == self.engine.base_name and self.engine.merged is None:
            return None
        if model in self.engine.adapters:
            return model
        raise ApiError(404, f"the model {model!r} does not exist; available: {', '.join(self.model_ids())}",
                       code="model_not_found", param="model")

    def sampling_of(self, body: Common, prompt_len: int) -> Sampling:
        limit = self.settings.max_tokens_limit
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        wanted = body.max_completion_tokens or body.max_tokens
        if wanted is not None and wanted > limit:
            raise ApiError(400, f"max_tokens={wanted} is over this server's limit of {limit}", param="max_tokens")
        if prompt_len + (wanted or 1) > self.context_len:
            raise ApiError(400, f"the prompt is {prompt_len} tokens; with max_tokens={wanted or 1} that exceeds the "
                                f"model's context of {self.context_len} tokens", param="messages",
                           code="context_length_exceeded")
        max_new = min(wanted or self.settings.default_max_tokens, self.context_len - prompt_len)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Sampling(max_new, body.temperature, body.top_p, body.seed, stop)

    async def _on_worker(self, request: Optional[Request], task: Optional[Callable[[], Any]] = None) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(out, err):
            loop.call_soon_threadsafe(lambda: fut.done() or (fut.set_exception(err) if err else fut.set_result(out)))

        self.scheduler.submit(Job(request, done, task))
        return await fut

    async def generate(self, request: Request, stream_to: Optional[Callable[[str], None]] = None) -> Output:
        if stream_to is not None:
            loop = asyncio.get_running_loop()
            request.on_text = lambda piece: loop.call_soon_threadsafe(stream_to, piece)
        try:
            return await self._on_worker(request)
        except LorakitError as err:  # e.g. its adapter was deleted while the request waited
            raise ApiError(404, str(err), code="model_not_found") from None

    async def _whole(self, request: Request, http: HttpRequest) -> Output:
        """The answer, unless the client disconnects first: then its row stops generating."""
        task = asyncio.ensure_future(self.generate(request))
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await http.is_disconnected():
                request.cancel.set()
        return task.result()

    async def admin(self, task: Callable[[], Any]) -> Any:
        return await self._on_worker(None, task)

    async def answer(self, request: Request, reply: Reply, stream: bool, http: HttpRequest):
        """The whole reply, or a server-sent-event stream of its chunks. Either way, a client that
        goes away stops its generation within a token or so (its batch slot frees up)."""
        request.cancel = threading.Event()
        if not stream:
            return reply.whole(await self._whole(request, http))
        pieces: asyncio.Queue = asyncio.Queue()
        if reply.chat:
            pieces.put_nowait(None)  # the first chunk announces the role
        task = asyncio.ensure_future(self.generate(request, pieces.put_nowait))
        return StreamingResponse(_events(pieces, task, reply, request.cancel), media_type="text/event-stream")


async def _events(pieces: asyncio.Queue, task: asyncio.Task, reply: Reply, cancel: threading.Event):
    """Chunks as they are generated, then the closing chunk (or the error) and [DONE]. When the
    client disconnects, the response closes this generator: the finally stops the generation."""
    try:
        async for event in _chunks(pieces, task, reply):
            yield event
    finally:
        if not task.done():
            cancel.set()


async def _chunks(pieces: asyncio.Queue, task: asyncio.Task, reply: Reply):
    while True:
        getter = asyncio.ensure_future(pieces.get())
        finished, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in finished:
            yield f"data: {json.dumps(reply.chunk(getter.result()))}\n\n"
            continue
        getter.cancel()
        while not pieces.empty():
            yield f"data: {json.dumps(reply.chunk(pieces.get_nowait()))}\n\n"
        if task.exception() is not None:
            yield f"data: {json.dumps(ApiError(500, str(task.exception()), 'server_error').body())}\n\n"
        else:
            yield f"data: {json.dumps(reply.last(task.result()))}\n\n"
        yield "data: [DONE]\n\n"
        return


router = APIRouter()


def _server(http: HttpRequest) -> Server:
    return http.app.state.server


@router.get("/health")
async def health(http: HttpRequest):
    s = _server(http)
    return {"status": "ok", "model": s.engine.base_name, "adapters": s.engine.adapters, "batches": s.scheduler.batches}


@router.get("/v1/models")
async def models(http: HttpRequest):
    engine, created = _server(http).engine, int(time.time())
    data = [{"id": m, "object": "model", "created": created, "owned_by": "lorakit"} for m in _server(http).model_ids()]
    for d in data:
        if d["id"] in engine.adapters and engine.merged is None:
            d["parent"] = engine.base_name
    return {"object": "list", "data": data}


def _chat_messages(body: ChatBody) -> list[dict]:
    messages = []
    for m in body.messages:
        if m.role not in ("system", "user", "assistant"):
            raise ApiError(400, f"message role {m.role!r} is not supported (system, user, assistant)", param="messages")
        content = m.content if isinstance(m.content, str) else "".join(
            p.get("text", "") for p in (m.content or []) if isinstance(p, dict))
        messages.append({"role": m.role, "content": content})
    return messages


@router.post("/v1/chat/completions")
async def chat(body: ChatBody, http: HttpRequest):
    s = _server(http)
    adapter = s.adapter_for(body.model)
    ids = s.engine.prompt_ids(_chat_messages(body))
    return await s.answer(Request(ids, adapter, s.sampling_of(body, len(ids))), Reply(body.model, chat=True), body.stream, http)


@router.post("/v1/completions")
async def completions(body: CompletionBody, http: HttpRequest):
    s = _server(http)
    adapter = s.adapter_for(body.model)
    ids = s.engine.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return await s.answer(Request(ids, adapter, s.sampling_of(body, len(ids))), Reply(body.model, chat=False), body.stream, http)


@router.post("/v1/adapters")
async def load_adapter(body: AdapterBody, http: HttpRequest):
    s = _server(http)
    if not s.settings.adapters_dir:
        raise ApiError(400, "this server was started without --adapters-dir; adapters cannot be loaded at run time")
    root = Path(s.settings.adapters_dir).resolve()
    folder = (root / body.name).resolve()
    if folder.parent != root or not body.name or body.name.startswith("."):
        raise ApiError(400, f"adapter name {body.name!r} must be a folder name inside the adapters directory", param="name")
    if body.name in s.engine.adapters or body.name == s.engine.base_name:
        raise ApiError(400, f"a model named {body.name!r} is already loaded", param="name")
    try:
        await s.admin(lambda: s.engine.add_adapter(body.name, str(folder)))
    except LorakitError as err:
        raise ApiError(400, f"adapter {body.name!r} refused: {err}", param="name") from None
    return {"id": body.name, "object": "model", "owned_by": "lorakit", "parent": s.engine.base_name}


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, http: HttpRequest):
    s = _server(http)
    if name not in s.engine.adapters:
        raise ApiError(404, f"no adapter named {name!r}", code="model_not_found")
    await s.admin(lambda: s.engine.remove_adapter(name))
    return {"id": name, "object": "model", "deleted": True}


async def _api_error(_req, err: ApiError):
    return JSONResponse(err.body(), status_code=err.status)


async def _invalid(_req, err: RequestValidationError):
    first = err.errors()[0] if err.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
    return JSONResponse(ApiError(400, msg, param=where or None).body(), status_code=400)


class _Guard:
    """Refuse oversized bodies and, with an API key set, requests to /v1/ without it. A plain ASGI
    middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect from the routes."""

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> Optional[JSONResponse]:
        settings = self.server.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse(ApiError(413, f"request body over {settings.max_body_bytes} bytes").body(), status_code=413)
        if settings.api_key and scope.get("path", "").startswith("/v1/"):
            if headers.get("authorization") != f"Bearer {settings.api_key}":
                return JSONResponse(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                             "authentication_error", code="invalid_api_key").body(), status_code=401)
        return None


def create_app(engine: Engine, settings: Optional[ServeSettings] = None) -> FastAPI:
    """The FastAPI application (run it with uvicorn)."""
    from .._version import __version__

    app = FastAPI(title="lorakit", version=__version__)
    app.state.server = Server(engine, settings or ServeSettings())
    app.state.scheduler = app.state.server.scheduler
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_middleware(_Guard, server=app.state.server)
    app.include_router(router)
    return app
