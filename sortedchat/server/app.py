"""The HTTP side: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (streamed as server-sent events or
whole), the API key, the body's size limit, and every refusal in the OpenAI error format.

Nothing here runs the model: a request becomes a `Job` for the `Scheduler`'s engine thread, and its events come
back through an asyncio queue. A client that disconnects, streamed or not, has its job cancelled at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sortedchat.server.errors import ApiError
from sortedchat.server.replies import Reply
from sortedchat.server.requests import Defaults, parse_chat
from sortedchat.server.scheduler import Busy, Done, Job, Scheduler

MAX_BODY = 4 << 20  # bytes; a request body above it is refused (413) before it is read whole
RETRY_AFTER_S = 2  # what a 503 suggests


def create_app(scheduler: Scheduler, sm, defaults: Defaults, api_key: str | None = None,
               max_body: int = MAX_BODY) -> Starlette:
    """The ASGI app. Its lifespan starts and stops `scheduler`'s engine thread; `app.state.scheduler` is it."""

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not token:
            raise ApiError(401, "no API key: send it as 'Authorization: Bearer KEY'", code="missing_api_key")
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "the API key is wrong", code="invalid_api_key")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": defaults.model_id, **scheduler.counts()})

    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [{
            "id": defaults.model_id, "object": "model", "created": 0, "owned_by": "sortedchat",
            "num_layers": sm.num_layers, "exits": list(sm.exits), "context_length": sm.max_positions or None}]})

    async def chat_completions(request: Request):
        authorize(request)
        body = await read_body(request, max_body)
        # Parsing and tokenizing a long conversation takes a while: off the event loop, which serves the streams.
        chat = await asyncio.to_thread(lambda: parse_chat(parse_json(body), sm, defaults))
        outbox: asyncio.Queue = asyncio.Queue()
        job = Job.to_loop(asyncio.get_running_loop(), outbox, prompt=chat.prompt, mode=chat.mode,
                          sampling=chat.sampling)
        try:
            scheduler.submit(job)
        except Busy:
            raise ApiError(503, f"the server is busy: {scheduler.slots} answers running and {scheduler.queue_size} "
                           "waiting; try again shortly", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        reply = Reply(defaults.model_id, chat)
        if chat.stream:
            return StreamingResponse(stream(job, outbox, reply, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for items in until_done(outbox, request):
                reply.events += [item for item in items if not isinstance(item, Done)]
                if isinstance(items[-1], Done):
                    if items[-1].error:
                        raise ApiError(500, f"the answer failed: {items[-1].error}", code="engine_error")
                    return JSONResponse(reply.completion(items[-1].stats))
            return Response(status_code=499)  # the client left before the answer was whole: nobody reads this
        finally:
            scheduler.cancel(job)  # the client left (nothing if the answer is complete)

    async def stream(job: Job, outbox: asyncio.Queue, reply: Reply, request: Request):
        try:
            yield sse(reply.opening())
            async for items in until_done(outbox, request):
                yield "".join(sse_lines(reply, items))
        finally:
            scheduler.cancel(job)

    async def refused(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error").response()

    async def openai_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else None).response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = Starlette(
        routes=[Route("/health", health), Route("/v1/models", models),
                Route("/v1/chat/completions", chat_completions, methods=["POST"])],
        exception_handlers={ApiError: refused, HTTPException: openai_http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 past `limit` bytes (by its Content-Length, or as it arrives)."""
    too_big = ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_big
    return bytes(body)


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not UTF-8 JSON: {exc.reason} at byte {exc.start}",
                       code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                       code="invalid_json") from None


GONE = object()  # put in a job's outbox when its client disconnects


async def until_done(outbox: asyncio.Queue, request: Request):
    """A job's events up to its `Done`, as lists of all that came since the last one (one write each when the
    client reads slower than the engine writes); ends early, without a `Done`, when the client disconnects."""
    watcher = asyncio.ensure_future(watch_disconnect(request, outbox))
    try:
        while True:
            items = [await outbox.get()]
            while not outbox.empty():
                items.append(outbox.get_nowait())
            if any(item is GONE for item in items):
                return
            yield items
            if isinstance(items[-1], Done):
                return
    finally:
        watcher.cancel()


async def watch_disconnect(request: Request, outbox: asyncio.Queue) -> None:
    """Tell the outbox when the client has gone (the body is read by then: `receive` has nothing else to say)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    outbox.put_nowait(GONE)


def sse_lines(reply: Reply, items: list):
    """The server-sent events of a list of a job's items: a chunk per token; after the `Done`, the closing chunks
    and `[DONE]`, or the error that ended the answer."""
    for item in items:
        if not isinstance(item, Done):
            yield sse(reply.chunk(item))
        elif item.error:
            yield sse(ApiError(500, f"the answer failed: {item.error}", code="engine_error").body())
        else:
            yield from map(sse, reply.closing(item.stats))
            yield "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
