"""What an invocation may ask and what it gets back: parameters, media types, error statuses.

One request carries one audio file as its raw body, the way SageMaker real-time, asynchronous
and serverless endpoints and Batch Transform all post it to ``/invocations``:

* ``Content-Type``: ``audio/*`` (suffix hint for the decoder: :data:`AUDIO_SUFFIXES`) or
  ``application/octet-stream`` (the decoder sniffs the bytes). Anything else: 415.
* Parameters, from the query string or ``X-Amzn-SageMaker-Custom-Attributes`` (``key=value``
  pairs separated by ``;`` or ``,``; the query wins): ``language``, ``task``
  (``transcribe``/``translate``), ``word_timestamps`` (``true``/``false``), ``formats`` (one of
  json, txt, srt, vtt picks the response type; several give one JSON document that also holds
  each rendering under ``outputs``). Unknown keys and bad values: 400 ``config_error``.
* Response type by ``Accept`` when ``formats`` is not given (:data:`MEDIA_TYPES`): JSON (the
  default: the same document the Batch job writes), plain text, WebVTT, SubRip. None of them: 406.
* Errors: a JSON body ``{"error": reason, "message", "retryable", "request_id"}`` with the reason
  codes of the Batch job's error markers, status by :data:`STATUS_BY_REASON`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from batch_job.errors import ConfigError, UnsupportedFormatError, WhisperBatchError
from batch_job.writers import FORMATS

CUSTOM_ATTRIBUTES_HEADER = "x-amzn-sagemaker-custom-attributes"
PARAMETERS = ("language", "task", "word_timestamps", "formats")

#: Content types we decode, with the file suffix that tells the decoder what to expect.
AUDIO_SUFFIXES = {
    "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav", "audio/vnd.wave": ".wav",
    "audio/flac": ".flac", "audio/x-flac": ".flac",
    "audio/mpeg": ".mp3", "audio/mp3": ".mp3",
    "audio/ogg": ".ogg", "audio/opus": ".opus", "audio/vorbis": ".ogg",
    "audio/aiff": ".aiff", "audio/x-aiff": ".aiff",
    # ffmpeg's (the decoder says so when ffmpeg is not installed)
    "audio/mp4": ".m4a", "audio/m4a": ".m4a", "audio/x-m4a": ".m4a", "audio/aac": ".aac",
    "audio/webm": ".webm", "audio/amr": ".amr", "audio/3gpp": ".3gp",
}
OCTET_STREAM = "application/octet-stream"

#: Response media type of each output format.
MEDIA_TYPES = {
    "json": "application/json",
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}
#: ``Accept`` media ranges -> output format (exact types first, then wildcards).
_ACCEPTED = {
    "application/json": "json", "text/plain": "txt", "text/vtt": "vtt",
    "application/x-subrip": "srt", "text/srt": "srt", "application/srt": "srt",
    "*/*": "json", "application/*": "json", "text/*": "txt",
}

#: HTTP status for each error reason (anything else: 500).
STATUS_BY_REASON = {
    "config_error": 400, "corrupt_audio": 400, "empty_audio": 400,
    "not_acceptable": 406,
    "too_large": 413, "too_long": 413,
    "unsupported_format": 415,
    "queue_full": 503, "shutting_down": 503, "model_loading": 503,
}


class NotAcceptableError(WhisperBatchError):
    """The client accepts none of the response types we produce (406)."""

    reason = "not_acceptable"
    retryable = False


class ModelLoadingError(WhisperBatchError):
    """The model is not loaded yet (503 until ``/ping`` says 200)."""

    reason = "model_loading"
    retryable = True


@dataclass(frozen=True)
class InvocationParams:
    """One request's parameters. ``word_timestamps=None``: the server's default.
    ``formats=()``: the response type follows ``Accept``."""

    language: str | None = None
    task: str = "transcribe"
    word_timestamps: bool | None = None
    formats: tuple[str, ...] = ()


def parse_params(query: Mapping[str, str], custom_attributes: str | None) -> InvocationParams:
    """Parameters from the custom-attributes header, overridden by the query string.

    Raises :class:`ConfigError` naming the bad key or value.
    """
    values = {**_parse_attributes(custom_attributes or ""), **{k.strip().lower(): v for k, v in query.items()}}
    unknown = sorted(set(values) - set(PARAMETERS))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMETERS)}")
    task = values.get("task", "transcribe").strip().lower() or "transcribe"
    if task not in ("transcribe", "translate"):
        raise ConfigError(f"task must be 'transcribe' or 'translate', not {values['task']!r}")
    language = values.get("language", "").strip().lower() or None
    if language is not None and not re.fullmatch(r"[a-z]{2,3}(_[a-z]+)?", language):
        raise ConfigError(f"language must be a code such as 'en' or 'de', not {values['language']!r}")
    words = None
    if "word_timestamps" in values:
        words = _boolean("word_timestamps", values["word_timestamps"])
    formats = tuple(dict.fromkeys(f.strip().lower() for f in values.get("formats", "").split(",") if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConfigError(f"unknown format(s) {', '.join(bad)} in formats; choose from {','.join(FORMATS)}")
    return InvocationParams(language=language, task=task, word_timestamps=words, formats=formats)


def audio_suffix(content_type: str | None) -> str:
    """The decoder's file suffix for a request's ``Content-Type`` ('' = let it sniff the bytes).

    Raises :class:`UnsupportedFormatError` for a type that is not audio (415).
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in AUDIO_SUFFIXES:
        return AUDIO_SUFFIXES[media]
    if media == OCTET_STREAM or media.startswith("audio/") or not media:
        return ""
    raise UnsupportedFormatError(
        f"Content-Type {content_type!r} is not audio: send the file's bytes as audio/* "
        f"(e.g. audio/flac, audio/mpeg, audio/wav) or {OCTET_STREAM}")


def response_formats(accept: str | None, params: InvocationParams) -> tuple[str, ...]:
    """Formats of the response: ``params.formats`` if given, else the best match of ``Accept``.

    One format: the response is that format. Several: a JSON document holding them all.
    Raises :class:`NotAcceptableError` when ``Accept`` admits none of :data:`MEDIA_TYPES`.
    """
    if params.formats:
        return params.formats
    if not accept or not accept.strip():
        return ("json",)
    ranges = []
    for i, part in enumerate(accept.split(",")):
        media, *attrs = [p.strip().lower() for p in part.split(";")]
        q = 1.0
        for attr in attrs:
            if attr.startswith("q="):
                try:
                    q = float(attr[2:])
                except ValueError:
                    q = 0.0
        if media and q > 0:
            ranges.append((-q, i, media))
    for _, _, media in sorted(ranges):
        if media in _ACCEPTED:
            return (_ACCEPTED[media],)
    raise NotAcceptableError(
        f"Accept {accept!r} admits none of {', '.join(t.split(';')[0] for t in MEDIA_TYPES.values())}")


def status_for(reason: str) -> int:
    """The HTTP status of an error response with this reason code."""
    return STATUS_BY_REASON.get(reason, 500)


def error_body(error: WhisperBatchError, request_id: str) -> dict[str, object]:
    return {"error": error.reason, "message": error.message, "retryable": error.retryable, "request_id": request_id}


def _parse_attributes(raw: str) -> dict[str, str]:
    """``a=1;b=x,y`` or ``a=1,b=x``: a token without ``=`` continues the previous value (lists)."""
    out: dict[str, str] = {}
    last: str | None = None
    for token in re.split(r"[;,]", raw):
        token = token.strip()
        if not token:
            continue
        if "=" in token:
            key, value = token.split("=", 1)
            last = key.strip().lower()
            out[last] = value.strip()
        elif last is not None:
            out[last] += "," + token
        else:
            raise ConfigError(f"custom attribute {token!r} is not key=value")
    return out


def _boolean(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")
