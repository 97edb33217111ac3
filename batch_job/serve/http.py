"""The HTTP face of ``whisper-batch serve``: SageMaker's inference-container contract on Starlette.

Routes: ``GET /ping`` (200 once the model is loaded and warm, 503 while it loads),
``POST /invocations`` (one audio file in, its transcript out: :mod:`batch_job.serve.contract`),
``GET /execution-parameters`` (what Batch Transform should send), ``GET /stats`` (the scheduler's
counters, for operators and the benchmark). The handler only receives the body, decodes the
audio (in a worker thread, so that a bad file is answered before it reaches the engine and never
shares a batch), hands the samples to the :class:`~batch_job.serve.scheduler.RequestScheduler`,
awaits its future and renders the result. Each invocation logs one JSON line (stderr) and one
EMF metrics document (stdout).

Why Starlette (under uvicorn): the bodies are raw audio, not JSON models, so FastAPI's request
validation would add a dependency (pydantic) for nothing; Starlette is the ASGI toolkit FastAPI
is built on, small, well kept, with streaming request bodies, and uvicorn drains in-flight
requests on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batch_job import __version__, metrics
from batch_job.audio import DecodedAudio, decode_audio
from batch_job.constants import SAMPLE_RATE
from batch_job.errors import ConfigError, EmptyAudioError, TooLargeError, WhisperBatchError
from batch_job.job.log import JsonLog
from batch_job.result import Transcript
from batch_job.serve.contract import (
    CUSTOM_ATTRIBUTES_HEADER,
    MEDIA_TYPES,
    ModelLoadingError,
    audio_suffix,
    error_body,
    parse_params,
    response_formats,
    status_for,
)
from batch_job.serve.scheduler import Outcome, QueueFullError, RequestScheduler, SchedulerClosedError
from batch_job.settings import Settings
from batch_job.subtitles import CueOptions
from batch_job.transcribe import Transcriber
from batch_job.writers import render

REQUEST_ID_HEADERS = ("x-amzn-sagemaker-inference-id", "x-amzn-requestid", "x-request-id")
"""Headers a caller's request id is taken from (else one is made up); echoed as ``X-Request-Id``."""
WARM_UP_SECONDS = 1.0
"""Noise decoded once per warmed batch size before ``/ping`` says 200."""


class ServingState:
    """The app's shared state: the model once loaded, its scheduler, and why loading failed."""

    def __init__(self, settings: Settings, loader: Callable[[Settings], Transcriber], log: JsonLog) -> None:
        self.settings = settings
        self.loader = loader
        self.log = log
        self.transcriber: Transcriber | None = None
        self.scheduler: RequestScheduler | None = None
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.on_load_failed: Callable[[BaseException], None] | None = None

    def load(self) -> None:
        """Load and warm the model, then start the scheduler (runs in its own thread)."""
        t0 = time.perf_counter()
        try:
            transcriber = self.loader(self.settings)
            warmed = _warm_up(transcriber)
            scheduler = RequestScheduler(transcriber, max_queue=self.settings.serve_max_queue,
                                         gather_seconds=self.settings.serve_batch_wait_ms / 1000.0)
            scheduler.start()
        except BaseException as exc:  # noqa: BLE001 - reported, then the server stops
            self.load_error = exc
            self.log("model_failed", level="error", error=type(exc).__name__, message=str(exc))
            if self.on_load_failed is not None:
                self.on_load_failed(exc)
            return
        self.transcriber, self.scheduler = transcriber, scheduler
        self.ready.set()
        self.log("ready", model=transcriber.model_name, device=transcriber.engine.device,
                 batch_size=transcriber.engine.max_batch, warmed_batch_sizes=warmed,
                 load_seconds=round(time.perf_counter() - t0, 3))


def create_app(settings: Settings, *, loader: Callable[[Settings], Transcriber] = Transcriber.load,
               log: JsonLog | None = None) -> Starlette:
    """The ASGI app. The model loads in a background thread once the app starts (``/ping``: 503 until then)."""
    state = ServingState(settings, loader, log or JsonLog(service="serve"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="whisper-batch-load", daemon=True).start()
        yield
        if state.scheduler is not None:  # uvicorn has drained the requests in flight by now
            stopped = await run_in_threadpool(state.scheduler.close, settings.serve_drain_seconds)
            state.log("stopped", drained=stopped, **asdict(state.scheduler.stats()))

    async def ping(request: Request) -> Response:
        return await _ping(state)

    async def invocations(request: Request) -> Response:
        return await _invocations(state, request)

    async def execution_parameters(request: Request) -> Response:
        return await _execution_parameters(state)

    async def stats(request: Request) -> Response:
        return await _stats(state)

    app = Starlette(routes=[
        Route("/ping", ping, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/execution-parameters", execution_parameters, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.serving = state
    return app


async def _ping(state: ServingState) -> Response:
    if state.ready.is_set():
        assert state.transcriber is not None
        return JSONResponse({"status": "ready", "model": state.transcriber.model_name})
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "message": str(state.load_error)}, status_code=500)
    return JSONResponse({"status": "loading"}, status_code=503)


async def _execution_parameters(state: ServingState) -> Response:
    """Batch Transform asks this once: one record per request, enough concurrency to fill batches."""
    batch = state.transcriber.engine.max_batch if state.transcriber is not None else state.settings.batch_size
    return JSONResponse({
        "MaxConcurrentTransforms": max(1, min(state.settings.serve_max_queue, 2 * batch)),
        "BatchStrategy": "SINGLE_RECORD",
        "MaxPayloadInMB": max(1, min(100, int(state.settings.serve_max_body_mb))),
    })


async def _stats(state: ServingState) -> Response:
    if state.scheduler is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    stats = state.scheduler.stats()
    return JSONResponse({**asdict(stats), "mean_fill": round(stats.mean_fill, 4)})


async def _invocations(state: ServingState, request: Request) -> Response:
    started = time.perf_counter()
    request_id = next((request.headers[h] for h in REQUEST_ID_HEADERS if h in request.headers), None) or uuid.uuid4().hex
    figures: dict[str, Any] = {}
    path: Path | None = None
    try:
        response, path = await _transcribe(state, request, request_id, started, figures)
        reason = None
    except WhisperBatchError as exc:
        response, reason = _error_response(exc, request_id), exc.reason
    except Exception as exc:  # noqa: BLE001 - one request's bug must not take the server down
        state.log("internal_error", level="error", request_id=request_id, error=type(exc).__name__, message=str(exc))
        error = WhisperBatchError(f"internal error: {type(exc).__name__}: {exc}")
        response, reason = _error_response(error, request_id), error.reason
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
    figures["wall_seconds"] = round(time.perf_counter() - started, 4)
    level = "info" if reason is None else ("error" if status_for(reason) >= 500 else "warning")
    state.log("request", level=level, request_id=request_id, status=response.status_code, reason=reason, **figures)
    problem = metrics.publish(
        metrics.invocation_metrics(state.settings, succeeded=reason is None, reason=reason, figures=figures,
                                   properties={"request_id": request_id}),
        state.settings.metrics_mode)
    if problem:
        state.log("metrics", level="warning", message=problem)
    response.headers["X-Request-Id"] = request_id
    return response


async def _transcribe(state: ServingState, request: Request, request_id: str, started: float,
                      figures: dict[str, Any]) -> tuple[Response, Path | None]:
    transcriber, scheduler = state.transcriber, state.scheduler
    if transcriber is None or scheduler is None:
        raise ModelLoadingError("the model is still loading; GET /ping answers 200 once it is ready")
    params = parse_params(request.query_params, request.headers.get(CUSTOM_ATTRIBUTES_HEADER))
    formats = response_formats(request.headers.get("accept"), params)
    suffix = audio_suffix(request.headers.get("content-type"))
    try:
        options = transcriber.options(language=params.language, task=params.task)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    words = state.settings.word_timestamps if params.word_timestamps is None else params.word_timestamps
    if words and not transcriber.settings.word_timestamps:
        raise ConfigError("this server was started without word timestamps: start it with --word-timestamps "
                          "(WHISPER_BATCH_WORD_TIMESTAMPS=true) to ask for them")
    path = await _receive(request, suffix, state.settings)
    figures["input_bytes"] = path.stat().st_size
    t0 = time.perf_counter()
    decoded: DecodedAudio = await run_in_threadpool(decode_audio, path, max_seconds=state.settings.max_audio_seconds)
    decode_seconds = time.perf_counter() - t0
    figures["decode_audio_seconds"] = round(decode_seconds, 4)
    figures["audio_seconds"] = round(len(decoded.samples) / SAMPLE_RATE, 3)
    try:
        future = scheduler.submit(request_id, decoded.samples, options, decode_audio_seconds=decode_seconds)
    except ValueError as exc:  # the same request id twice at once
        raise ConfigError(str(exc)) from None
    outcome: Outcome = await asyncio.wrap_future(future)
    figures.update(queue_seconds=round(outcome.queue_seconds, 4), engine_seconds=round(outcome.engine_seconds, 4),
                   batches=outcome.batches, batch_fill=round(outcome.batch_fill, 4), shared_with=outcome.shared_with)
    error = outcome.result.error
    if error is not None:
        raise error if isinstance(error, WhisperBatchError) else WhisperBatchError(f"transcription failed: {error}")
    transcript = outcome.result.transcript
    assert transcript is not None
    if not words:
        transcript = replace(transcript, segments=tuple(replace(s, words=()) for s in transcript.segments))
    body, media_type = _render(state, transcript, formats, decoded, request, request_id, started, figures)
    headers = {"X-Whisper-Batch-Warnings": ",".join(w.code for w in decoded.warnings)} if decoded.warnings else None
    return Response(body, media_type=media_type, headers=headers), path


def _render(state: ServingState, transcript: Transcript, formats: tuple[str, ...], decoded: DecodedAudio,
            request: Request, request_id: str, started: float, figures: dict[str, Any]) -> tuple[str, str]:
    cue_options = CueOptions.from_settings(state.settings)
    if formats != ("json",) and len(formats) == 1:
        return render(transcript, formats[0], cue_options=cue_options), MEDIA_TYPES[formats[0]]
    extra: dict[str, Any] = {
        "source": {"content_type": request.headers.get("content-type"), "bytes": figures.get("input_bytes")},
        "request": {"id": request_id, "worker_version": __version__, **figures,
                    "wall_seconds": round(time.perf_counter() - started, 4)},
        "warnings": [asdict(w) for w in decoded.warnings],
    }
    others = [f for f in formats if f != "json"]
    if others:
        extra["outputs"] = {f: render(transcript, f, cue_options=cue_options) for f in others}
    return render(transcript, "json", extra=extra), MEDIA_TYPES["json"]


async def _receive(request: Request, suffix: str, settings: Settings) -> Path:
    """Stream the body to a temporary file (``suffix`` tells the decoder the format); bounded."""
    limit = int(settings.serve_max_body_mb * 1024 * 1024)
    too_large = f"request body is larger than the limit of {settings.serve_max_body_mb:g} MB (WHISPER_BATCH_SERVE_MAX_BODY_MB)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"{too_large}: Content-Length is {int(declared)} bytes")
    fd, name = tempfile.mkstemp(prefix="invocation-", suffix=suffix, dir=settings.work_dir or None)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLargeError(too_large)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise EmptyAudioError("the request body is empty: send the audio file's bytes as the body")
    return path


def _error_response(error: WhisperBatchError, request_id: str) -> Response:
    headers = None
    if isinstance(error, QueueFullError):
        headers = {"Retry-After": str(error.retry_after)}
    elif isinstance(error, (SchedulerClosedError, ModelLoadingError)):
        headers = {"Retry-After": "5"}
    return JSONResponse(error_body(error, request_id), status_code=status_for(error.reason), headers=headers)


def _warm_up(transcriber: Transcriber) -> list[int]:
    """Decode noise once per batch size that must not pay its first-run cost on a request.

    CPU: the smallest bucket (its first run proves the graphs; later buckets cost little more on
    first use). Other devices: every bucket (graph loading and first execution are per graph).
    """
    engine = transcriber.engine
    buckets = list(engine.buckets) if engine.device != "cpu" else [engine.buckets[0]]
    noise = (np.random.default_rng(0).standard_normal(int(WARM_UP_SECONDS * SAMPLE_RATE)) * 0.01).astype(np.float32)
    for b in buckets:
        engine.decode([noise] * b, transcriber.options())
    return buckets
