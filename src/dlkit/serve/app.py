"""The REST API over finished runs: `create_app(runs)` -> a FastAPI app (OpenAPI at /docs).

    GET  /health                      liveness: answers at once, models loaded or not
    GET  /ready                       503 until every model is loaded and warmed up, then 200
    GET  /v1/models                   each model: task, classes, input schema, params, test metrics, claim
    POST /v1/models/{name}/predict    multipart `files` or JSON {"inputs": [...]}: dlkit predict's answers
    POST /v1/models/{name}/explain    Grad-CAM PNG (images) or token importance JSON (texts), in PyTorch
    GET  /metrics                     Prometheus text
    GET  /                            the web page

Every error is `{"error": one line}` with its status: 400 bad input, 401 no or wrong API key, 404
unknown model or route, 405 wrong method, 413 too large, 415 unsupported format or content type,
422 malformed JSON, 503 loading / queue full (Retry-After), 504 past the deadline; 500 only for a bug.
"""
from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from dlkit import __version__
from dlkit.data.preprocess import ImagePrep, TablePrep, prep_from_dict
from dlkit.data.text import TextPrep
from dlkit.errors import ConfigError, DlkitError, InputError, did_you_mean
from dlkit.predict import Predictor
from dlkit.rundir import RunDir
from dlkit.serve.batching import Backend, Batcher, TorchBackend
from dlkit.serve.explanations import gradcam_png, token_importance
from dlkit.serve.inputs import Item, answers, image_bytes, prepare, text_value
from dlkit.serve.limits import (
    BODY_LIMIT,
    MAX_FIELDS,
    MAX_INPUTS,
    MAX_TEXT_CHARS,
    QUEUE_LIMIT,
    RETRY_AFTER_S,
    TIMEOUT_S,
    BodyLimit,
    ClientError,
    check_api_key,
    input_status,
)
from dlkit.serve.metrics import Metrics, Shared

log = logging.getLogger("dlkit.serve")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WARMUP_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # the powers of two up to max_batch, and max_batch itself
PAGE_LATER = "<!doctype html><title>dlkit serve</title><p>dlkit serve: the web page comes later; the API is at /docs.</p>"


@dataclass
class Served:
    """One model the server answers for: its run, bundle, summary and input spec (read at once); its
    predictor and batch worker (loaded in the background)."""

    name: str
    run: RunDir
    bundle: dict[str, Any]
    summary: dict[str, Any]
    spec: ImagePrep | TablePrep | TextPrep
    predictor: Predictor | None = None
    batcher: Batcher | None = None

    def describe(self) -> dict[str, Any]:
        """What /v1/models says of the model."""
        spec = self.spec
        if isinstance(spec, ImagePrep):
            schema: dict[str, Any] = {"kind": "image", "channels": spec.channels, "size": list(spec.size),
                                      "framing": spec.framing}
        elif isinstance(spec, TextPrep):
            schema = {"kind": "text", "max_tokens": spec.tokenizer.max_len, "max_chars": MAX_TEXT_CHARS}
        else:
            schema = {"kind": "table", "features": spec.feature_names}
        expect = self.summary.get("expect", {})
        return {"name": self.name, "recipe": self.bundle["recipe"], "task": self.bundle["task"],
                "classes": self.bundle["classes"], "input": schema, "params": self.summary.get("params"),
                "metrics": {k: v for k, v in self.summary.items() if k.startswith("test_")},
                "claim": {"source": expect.get("source"), "note": expect.get("note", ""),
                          "claims": expect.get("claims", [])},
                "ready": self.batcher is not None}


def served_runs(runs: dict[str, str | Path] | list[str | Path]) -> dict[str, Served]:
    """Open every run (finished, readable bundle and summary) under its recipe's name or the NAME
    of `NAME=RUN`; a clash of names or a bad run is one DlkitError."""
    pairs: list[tuple[str | None, str | Path]] = []
    if isinstance(runs, dict):
        pairs = list(runs.items())
    else:
        for item in runs:
            name, sep, path = str(item).partition("=")
            named = sep and NAME.fullmatch(name) and not Path(str(item)).exists()
            pairs.append((name, path) if named else (None, item))
    if not pairs:
        raise ConfigError("no runs to serve; give one or more run directories (or NAME=RUN)")
    served: dict[str, Served] = {}
    for name, path in pairs:
        run = RunDir.open(path)
        bundle, summary = run.bundle(), run.summary()
        name = name or bundle["recipe"]
        if not NAME.fullmatch(name):
            raise ConfigError(f"model name '{name}' must be letters, digits, '.', '_' or '-' (at most 64)")
        if name in served:
            raise ConfigError(f"two runs are both named '{name}' ({served[name].run.path} and {run.path}); "
                              "name them with NAME=RUN")
        served[name] = Served(name, run, bundle, summary, prep_from_dict(bundle["preprocessing"]))
    return served


def backend_factory(kind: str) -> Callable[[Served], Backend]:
    """How each model's predictions run: 'torch' (the run's model) or 'onnx' (ONNX Runtime, imported now
    so that a missing one is one error line before the server starts)."""
    if kind == "torch":
        return lambda served: TorchBackend(served.predictor.model)
    if kind == "onnx":
        try:
            from dlkit.serve.onnx_backend import OnnxBackend
        except ImportError as exc:
            raise ConfigError(f"the onnx backend is not available ({exc}); install dlkit with ONNX support "
                              "or use --backend torch") from None
        return lambda served: OnnxBackend.from_run(served.run)
    raise ConfigError(f"backend must be 'onnx' or 'torch', got '{kind}'")


def create_app(runs: dict[str, str | Path] | list[str | Path], *, backend: str = "onnx", max_batch: int = 32,
               max_wait_ms: float = 0, queue_limit: int = QUEUE_LIMIT, api_key: str | None = None,
               body_limit: int = BODY_LIMIT, cors: str | list[str] | None = None,
               timeout_s: float = TIMEOUT_S, freeze_gc: bool = False, shared_dir: str | None = None,
               workers: int = 1) -> FastAPI:
    """The API over `runs` (run directories, `NAME=RUN` strings, or {name: run}). Runs are checked now;
    models load and warm up in the background once the app starts (/ready says when).

    `freeze_gc` (for a process that only serves: `dlkit serve` sets it) hands everything alive once the
    models are loaded to gc.freeze, out of the collector's sight: a full collection walks the ~300,000
    objects of torch, ONNX Runtime, the libraries and the models (110 ms here), stalling every request in
    flight every few thousand requests (p99 at concurrency 32 went from 5 ms to over 100 in such runs).

    `shared_dir` and `workers` (`dlkit serve --workers N` sets them): the folder where each of the
    `workers` processes publishes its numbers and readiness every second (`metrics.Shared`), so that
    /metrics adds up every worker's and /ready answers 200 only when every worker has its models."""
    if max_batch < 1 or max_wait_ms < 0 or queue_limit < 1 or body_limit < 1 or timeout_s <= 0:
        raise ConfigError("max_batch, queue_limit and body_limit must be at least 1, max_wait_ms at least 0, "
                          "timeout_s positive")
    models = served_runs(runs)
    make_backend = backend_factory(backend)
    metrics = Metrics(lambda: {n: s.batcher.qsize() for n, s in models.items() if s.batcher})
    failures: list[str] = []
    shared = Shared(shared_dir, workers) if shared_dir is not None else None

    def loaded() -> bool:
        return not failures and all(s.batcher is not None for s in models.values())

    async def publish() -> None:
        """Every second: this worker's numbers and readiness, for the other workers' /metrics and /ready."""
        while True:
            shared.publish(metrics.state(), loaded())
            await asyncio.sleep(1)

    async def load_all() -> None:
        for served in models.values():
            try:
                served.predictor = await asyncio.to_thread(Predictor.from_run, served.run.path)
                batcher = Batcher(served.name, await asyncio.to_thread(make_backend, served), max_batch=max_batch,
                                  max_wait_ms=max_wait_ms, queue_limit=queue_limit, timeout_s=timeout_s,
                                  observe=lambda size, name=served.name: metrics.batch(name, size),
                                  # quick batches in the event loop: not for the torch backend (explanations run
                                  # its model on the model's thread), nor images (a large one decodes for long,
                                  # and PIL decodes without the GIL, so the loop runs meanwhile)
                                  inline=backend == "onnx" and not isinstance(served.spec, ImagePrep),
                                  prepare=served.spec.apply if isinstance(served.spec, TablePrep) else None,
                                  finish=partial(answers, served.bundle))
                await batcher.in_thread(_warm_up, batcher.backend, served.bundle, max_batch)
            except DlkitError as exc:
                failures.append(f"model {served.name} failed to load: {exc}")
                log.error(failures[-1])
                continue
            batcher.start()
            served.batcher = batcher
            log.info("model %s ready (%s backend)", served.name, backend)
        if freeze_gc:
            gc.collect()
            gc.freeze()
        if shared is not None:
            shared.publish(metrics.state(), loaded())  # ready now, not at the next second

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(load_all())]
        if shared is not None:
            tasks.append(asyncio.create_task(publish()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if shared is not None:
                shared.publish(metrics.state(), False)  # its last counts stay in the sum; not ready
            for served in models.values():
                if served.batcher is not None:
                    await served.batcher.stop()

    app = FastAPI(title="dlkit serve", version=__version__, lifespan=lifespan,
                  description="Predictions and explanations from finished dlkit runs.")
    _add_error_handlers(app)

    async def require_key(request: Request) -> None:  # async: FastAPI runs a plain def in its thread pool
        if api_key is not None:
            check_api_key({k.lower(): v for k, v in request.headers.items()}, api_key)

    def ready_model(name: str) -> Served:
        served = models.get(name)
        if served is None:
            raise ClientError(404, f"no model named '{name}'{did_you_mean(name, models)}; "
                                   f"this server has {', '.join(models)}")
        if served.batcher is None or served.predictor is None:
            failed = [f for f in failures if f.startswith(f"model {name} ")]
            if failed:
                raise ClientError(503, failed[0])
            raise ClientError(503, f"model {name} is still loading; retry when /ready answers 200",
                              {"Retry-After": str(RETRY_AFTER_S)})
        return served

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: every model loaded and warmed up")
    async def ready() -> JSONResponse:
        waiting = [n for n, s in models.items() if s.batcher is None]
        if failures:
            return JSONResponse({"error": "; ".join(failures)}, 503)
        if waiting:
            return JSONResponse({"error": f"loading models: {', '.join(waiting)} "
                                          f"({len(models) - len(waiting)} of {len(models)} ready)"},
                                503, {"Retry-After": str(RETRY_AFTER_S)})
        if shared is not None and (live := shared.ready_workers()) < shared.workers:
            return JSONResponse({"error": f"{live} of {shared.workers} workers have their models ready"},
                                503, {"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ready", "models": list(models)})

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics_text() -> PlainTextResponse:
        others = shared.others() if shared is not None else []
        return PlainTextResponse(metrics.render(others), media_type="text/plain; version=0.0.4")

    page_html, page_policy = _page()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html, headers={"Content-Security-Policy": page_policy,
                                                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.get("/models", summary="The models served, with their input schema and test metrics")
    async def list_models() -> dict[str, Any]:
        return {"models": [s.describe() for s in models.values()]}

    async def predict_answer(name: str, request: Request) -> Response:
        started = time.perf_counter()
        served = ready_model(name)
        items, uploads = await _read_items(request)
        # prepared when its batch runs, in the model's thread or (a quick batch) the event loop; the batch's
        # logits are made answers at once (`finish`)
        predictions, notes = await served.batcher.submit_later(
            partial(_prepared, served.spec, items, uploads), len(items))
        for prediction, note in zip(predictions, notes):
            if note:
                prediction["note"] = note
        return _json({"model": name, "predictions": predictions,
                      "took_ms": round((time.perf_counter() - started) * 1000, 3)})

    # the route documents predict (OpenAPI); requests are answered by _Predict below, without FastAPI's routing
    @v1.post("/models/{name}/predict", openapi_extra=_BODY_DOC, response_model=dict[str, Any],
             summary="Label, confidence and probabilities per input (as `dlkit predict`)")
    async def predict(name: str, request: Request) -> Response:
        return await predict_answer(name, request)

    @v1.post("/models/{name}/explain", openapi_extra=_BODY_DOC, response_model=None,
             summary="Grad-CAM overlay PNG (image models) or token importance (text models)")
    async def explain(name: str, request: Request) -> Response | dict[str, Any]:
        started = time.perf_counter()
        served = ready_model(name)
        if not isinstance(served.spec, ImagePrep | TextPrep):
            raise ClientError(400, f"model {name} reads table rows; explain draws Grad-CAM for image models "
                                   "and token importance for text models")
        items, uploads = await _read_items(request)
        if len(items) != 1:
            raise ClientError(400, f"explain takes one input, got {len(items)}")
        label, value = items[0]
        if isinstance(served.spec, TextPrep):
            text = text_value(label, value, uploads)
            result = await served.batcher.in_thread(token_importance, served.predictor, served.spec, label, text)
            return {"model": name, **result, "took_ms": round((time.perf_counter() - started) * 1000, 3)}
        data = image_bytes(label, value, uploads)
        png, info = await served.batcher.in_thread(gradcam_png, served.predictor, served.spec, label, data)
        return Response(png, media_type="image/png", headers={
            "X-Label": quote(info["label"]), "X-Confidence": str(info["confidence"]),
            "X-Evidence": str(info["evidence"]).lower()})

    app.include_router(v1)
    app.add_middleware(_Predict, answer=predict_answer, require_key=require_key)
    app.add_middleware(BodyLimit, limit=body_limit)
    app.add_middleware(_Measured, metrics=metrics, names=set(models))
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[cors] if isinstance(cors, str) else list(cors),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    app.state.models = models
    return app


def app_from_settings() -> FastAPI:
    """`dlkit serve --workers N`: each worker process's app, from the settings the command handed over."""
    import os

    settings = json.loads(os.environ["DLKIT_SERVE_SETTINGS"])
    return create_app(settings.pop("runs"), **settings)


def _page() -> tuple[str, str]:
    """The web page (package data) and its Content-Security-Policy: its own inline script and style,
    allowed by their sha256, and nothing else but this origin, blob: images (Grad-CAM) and data: (icon)."""
    html = resources.files("dlkit.serve").joinpath("page.html")
    text = html.read_text(encoding="utf-8") if html.is_file() else PAGE_LATER

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                        for s in found) or "'none'"

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
              "frame-ancestors 'none'")
    return text, policy


def _prepared(spec: ImagePrep | TablePrep | TextPrep, items: list[Item], uploads: bool) -> tuple[torch.Tensor, list]:
    """A request's rows for the model, and each row's note (`prepare`'s answer as one batch); table rows
    not yet normalised (the batcher normalises a batch's rows at once)."""
    prepared = prepare(spec, items, uploads, normalise=False)
    x = prepared[0][0] if len(prepared) == 1 else torch.cat([rows for rows, _ in prepared])
    return x, [note for rows, note in prepared for _ in range(len(rows))]


def _json(content: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer serialised once, as Starlette's JSONResponse writes it (FastAPI would first walk a
    returned dict through its encoder)."""
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return Response(body, status, headers, media_type="application/json")


def _warm_up(backend: Backend, bundle: dict[str, Any], max_batch: int) -> None:
    """Run the model once at each batch size it will see often, so the first requests do not pay for
    allocation and (ONNX Runtime) kernel selection."""
    dtype = getattr(torch, bundle["input_dtype"])
    for size in sorted({s for s in WARMUP_SIZES if s < max_batch} | {max_batch}):
        shape = (size, *bundle["input_shape"])
        # token ids of 1 (the unknown word) for text models: a row of padding alone is no text
        backend(torch.ones(shape, dtype=dtype) if not dtype.is_floating_point else torch.zeros(shape, dtype=dtype))


async def _read_items(request: Request) -> tuple[list[Item], bool]:
    """The request's inputs as (client's name for it, value): multipart files (bytes) or JSON values;
    the bool says uploads."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            async with request.form(max_files=MAX_INPUTS, max_fields=MAX_FIELDS) as form:
                files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
                return [(_file_label(f, i), await f.read()) for i, f in enumerate(files)], True
        except HTTPException as exc:  # Starlette's refusal of a malformed or too-many-parts body
            detail = str(exc.detail)
            if detail.startswith("Too many"):
                raise ClientError(413, f"{detail} Send at most {MAX_INPUTS} files per request") from None
            raise ClientError(400, f"malformed multipart body: {detail}") from None
    if kind == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ClientError(422, f"body is not valid JSON ({exc})") from None
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise ClientError(422, 'expected a JSON object {"inputs": [...]}')
        return [(f"inputs[{i}]", v) for i, v in enumerate(body["inputs"])], False
    raise ClientError(415, f"content type '{kind or 'none'}': send multipart/form-data with files in the field "
                           "'files', or application/json {\"inputs\": [...]}")


def _file_label(upload: UploadFile, index: int) -> str:
    name = Path(upload.filename or "").name[:80]
    return name or f"files[{index}]"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as {"error": one line}; a 500 only for a bug, logged with its traceback."""

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status, headers)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        return error(exc.status, str(exc), exc.headers)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        return error(input_status(exc), str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}; see /docs",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("bug answering %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, "internal error (a bug in dlkit serve, logged by the server); please report it")


_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")


class _Predict:
    """ASGI middleware: `POST /v1/models/{name}/predict` answered here, as its route would answer it (the
    API key, then the model; the same errors), without FastAPI's routing, dependency solving and exception
    middleware, which cost more than the model does for a small one; everything else passes on. It sits
    inside the body limit and the metrics; an exception other than a client's error is left to the app's
    error handler (a logged 500), as from a route."""

    def __init__(self, app: Any, answer: Callable[[str, Request], Any], require_key: Callable[[Request], Any]) -> None:
        self.app, self.answer, self.require_key = app, answer, require_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        hit = _PREDICT.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if hit is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            await self.require_key(request)
            response = await self.answer(hit[1], request)
        except ClientError as exc:
            response = _json({"error": str(exc)}, exc.status, exc.headers)
        except InputError as exc:
            response = _json({"error": str(exc)}, input_status(exc))
        await response(scope, receive, send)


class _Measured:
    """ASGI middleware: each request's status and latency into the metrics, by model and endpoint
    (unknown model names are counted as '-', so a client cannot grow the label set)."""

    def __init__(self, app: Any, metrics: Metrics, names: set[str]) -> None:
        self.app, self.metrics, self.names = app, metrics, names

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        path = scope.get("path", "")
        hit = re.fullmatch(r"/v1/models/([^/]+)/(predict|explain)", path)
        model, endpoint = (hit[1] if hit[1] in self.names else "-", hit[2]) if hit else ("-", _endpoint(path))

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(model, endpoint, status, time.perf_counter() - started)


def _endpoint(path: str) -> str:
    return path if path in ("/", "/health", "/ready", "/metrics", "/v1/models", "/docs", "/openapi.json") else "other"


_BODY_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {"inputs": {
        "type": "array", "description": "images as base64 strings, texts as strings, table rows as lists of "
                                        "numbers or objects by feature name"}}}},
}}}
