"""The HTTP side of `classify serve`: a FastAPI application over an `Engine`, and the server that runs it.

Endpoints (OpenAPI at /docs and /openapi.json):
- `POST /predict` (multipart, one or more files under `file`; `top_k` query): `{"predictions": [{"filename",
  "label", "confidence", "topk": [{"label", "score"}]}]}`. A file that cannot be classified is an entry with an
  `error` instead; when no file of the request can be, the response is that 4xx (413 too large, 415 not an image,
  422 an undecodable image; 400 for an empty form, a wrong field name or a malformed body) with a JSON `error`.
- `POST /similar` (same form; `k` query): `{"results": [{"filename", "similar": [{"id", "path", "label", "score",
  "thumbnail"}]}]}`; 404 with a JSON `error` when the run has no training images to search (see `similar.py`).
- `GET /train-image/{id}`: a thumbnail of an indexed training image (only those).
- `GET /health`: `{"status": "ok"}` (the model is loaded before the server listens). `GET /model`: the model card,
  with the batcher's counters under `batching`.
- `GET /`: the page (static/index.html, app.js, app.css), served from this package: no CDN, works offline.

Uploads are read into memory under `--max-bytes` (`uploads.py`), decoded in a thread pool off the event loop, and
predicted in micro-batches (`batcher.py`) by one model thread. No input reaches a 500: errors of the form or of a file
are 4xx JSON, and a failed forward pass is a 503 for that batch's requests only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from classify.serve.batcher import BatchFailed, MicroBatcher
from classify.serve.engine import MAX_SIMILAR_K, SIMILAR_K, Engine, Upload
from classify.serve.uploads import FIELD, MAX_FILES, UploadError, default_budget, read_files
from curator.core.errors import UsageError

STATIC = Path(__file__).resolve().parent / "static"
#: Query bound for top_k (the model's class count bounds it further).
MAX_TOP_K = 100


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()), **extra}, status_code=status)


def _docs_routes(app: FastAPI) -> None:
    """/docs from a locally installed Swagger UI (the swagger-ui-bundle package) when there is one, so the API docs
    work offline too; else FastAPI's default page (its assets come from a CDN)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="atelier classify serve: API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def create_app(engine: Engine, decode_workers: int | None = None) -> FastAPI:
    """The application serving `engine` (see the module docstring)."""
    decode_pool = ThreadPoolExecutor(max_workers=decode_workers or max(2, os.cpu_count() or 2),
                                     thread_name_prefix="decode")
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    settings = engine.settings
    budget = default_budget(settings.max_bytes)
    predict_batcher = MicroBatcher(engine.predict, model_thread, settings.max_batch, settings.max_wait_ms)
    similar_batcher = MicroBatcher(engine.neighbours, model_thread, settings.max_batch, settings.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        predict_batcher.start()
        similar_batcher.start()
        try:
            yield
        finally:
            await predict_batcher.stop()
            await similar_batcher.stop()
            decode_pool.shutdown(wait=False, cancel_futures=True)
            model_thread.shutdown(wait=False, cancel_futures=True)

    has_local_docs = _has_swagger_bundle()
    app = FastAPI(title="atelier classify serve", version="1", lifespan=lifespan,
                  docs_url=None if has_local_docs else "/docs", redoc_url=None,
                  description="Classify paintings with a `classify train` run; see GET /model for the model card.")
    app.state.engine = engine
    app.state.budget = budget
    app.state.batchers = {"predict": predict_batcher, "similar": similar_batcher}
    if has_local_docs:
        _docs_routes(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), **({"allow": exc.headers.get("Allow")}
                                                           if exc.headers and "Allow" in exc.headers else {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug, never an input's fault
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}")

    async def decoded(request: Request) -> list[Upload] | JSONResponse:
        """The request's files, decoded off the event loop; or the 4xx response for a form that cannot be read.
        The upload bytes are held (and counted against the budget) only until they are decoded."""
        try:
            parts, held = await read_files(request, settings.max_bytes, budget)
        except UploadError as exc:
            return _error(exc.status, str(exc))
        loop = asyncio.get_running_loop()
        try:
            return list(await asyncio.gather(*(loop.run_in_executor(decode_pool, engine.decode, p.filename, p.data,
                                                                    p.size) for p in parts)))
        finally:
            budget.give(held)

    async def answered(uploads: list[Upload], batcher: MicroBatcher, k: int, key: str) -> JSONResponse:
        """Each decodable upload through `batcher` (concurrently, so a request's files share a batch), each other
        one as its error; the first error's status when nothing could be answered."""

        async def one(upload: Upload) -> dict:
            if upload.pixels is None:
                return {"filename": upload.filename, "error": upload.error}
            return {"filename": upload.filename, **await batcher.submit((upload.pixels, k))}

        async def safe(upload: Upload) -> dict:
            try:
                return await one(upload)
            except BatchFailed as exc:
                upload.status, upload.error = 503, f"the model failed on this batch: {exc}"
                return {"filename": upload.filename, "error": upload.error}

        entries = list(await asyncio.gather(*(safe(u) for u in uploads)))
        failed = [u for u in uploads if u.error is not None]
        if len(failed) == len(uploads):
            first = failed[0]
            message = f"{first.filename}: {first.error}" if len(uploads) == 1 else \
                f"none of the {len(uploads)} files could be used; {first.filename}: {first.error}"
            return _error(first.status, message, **{key: entries})
        return JSONResponse({key: entries})

    @app.post("/predict", summary="Classify uploaded images",
              description=f"multipart/form-data, one or more files under the field name `{FIELD}` (at most "
                          f"{MAX_FILES}, each at most --max-bytes).",
              openapi_extra=_multipart_schema())
    async def predict(request: Request, top_k: int = Query(settings.top_k, ge=1, le=MAX_TOP_K)) -> Response:
        with predict_batcher.arriving():
            uploads = await decoded(request)
        if isinstance(uploads, JSONResponse):
            return uploads
        return await answered(uploads, predict_batcher, min(top_k, len(engine.predictor.classes)), "predictions")

    @app.post("/similar", summary="The training images most similar to uploaded images",
              description=f"multipart/form-data, files under `{FIELD}`; k nearest training images of the run, with "
                          f"cosine scores and thumbnail URLs.", openapi_extra=_multipart_schema())
    async def similar(request: Request, k: int = Query(SIMILAR_K, ge=1, le=MAX_SIMILAR_K)) -> Response:
        if not engine.similar.available:
            return _error(404, f"no similar images: {engine.similar.reason}", available=False)
        with similar_batcher.arriving():
            uploads = await decoded(request)
        if isinstance(uploads, JSONResponse):
            return uploads
        return await answered(uploads, similar_batcher, k, "results")

    @app.get("/train-image/{image_id}", summary="Thumbnail of an indexed training image")
    def train_image(image_id: int) -> Response:
        data = engine.similar.thumbnail(image_id) if engine.similar.available else None
        if data is None:
            return _error(404, f"no training image {image_id} to show (not indexed, or its file is gone or changed)")
        return Response(data, media_type="image/webp", headers={"Cache-Control": "max-age=3600"})

    @app.get("/health", summary="ok once the model is loaded")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/model", summary="The model card")
    def model_card() -> dict:
        return {**engine.card(), "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                                              **{name: b.stats.as_dict() for name, b in app.state.batchers.items()}}}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def _has_swagger_bundle() -> bool:
    try:
        import swagger_ui_bundle  # noqa: F401
    except ImportError:
        return False
    return True


def _multipart_schema() -> dict:
    """The request body as OpenAPI should show it (the route reads the stream itself, bounded)."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [FIELD],
        "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or a one-line `UsageError` (in use, not allowed,
    no such address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def serve(engine: Engine, sock: socket.socket, log_level: str = "warning") -> str | None:
    """Run the server on `sock` until Ctrl-C or SIGTERM, which end it gracefully (requests in flight are answered);
    returns the name of the signal that stopped it.

    uvicorn re-raises the stopping signal once it has shut down, under the handlers it found; the handlers set here
    only note it, so that a clean stop is a normal return (exit 0) rather than a death by signal or an interrupt."""
    import uvicorn

    stopped_by: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda number, frame: stopped_by.append(number))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    config = uvicorn.Config(create_app(engine), log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return signal.Signals(stopped_by[0]).name if stopped_by else None
