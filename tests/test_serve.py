"""``whisper-batch serve`` as SageMaker runs it: a real server process, spoken to over HTTP.

Every server binds 127.0.0.1 only and dies with the test process (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO, load_clip, shared_clip

from batch_job.local import die_with_parent, free_port

HOST = "127.0.0.1"
JFK_WORDS = "ask not what your country can do for you"


def _words(text: str | bytes) -> str:
    """Lower case, punctuation gone: what a transcript says, not how it is punctuated."""
    text = text.decode() if isinstance(text, bytes) else text
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


class Server:
    """One ``whisper-batch serve`` subprocess and an HTTP client for it."""

    def __init__(self, cache_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port(HOST)
        self.stdout: list[str] = []  # EMF metrics documents
        self.stderr: list[str] = []  # the JSON log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batch_job.cli", "serve", "--host", HOST, "--port", str(self.port), *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent,
            env={**os.environ, "WHISPER_BATCH_CACHE_DIR": str(cache_dir), "WHISPER_BATCH_DEVICE": "cpu",
                 "WHISPER_BATCH_METRICS_MODE": "emf", **(env or {})})
        self._readers = [threading.Thread(target=_collect, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for reader in self._readers:
            reader.start()
        self.pings: list[int] = []

    def wait_ready(self, timeout: float = 120) -> float:
        """Poll /ping until 200; returns seconds from process start. Records every status seen."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log_text()}")
            try:
                status, _, _ = self.request("GET", "/ping", timeout=2)
                self.pings.append(status)
                if status == 200:
                    return time.monotonic() - t0
            except OSError:
                pass  # not listening yet
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout} s: {self.log_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def invoke(self, body: bytes, content_type: str = "audio/flac", path: str = "/invocations", **headers: str):
        status, head, data = self.request("POST", path, body, {"Content-Type": content_type, **headers})
        return status, head, data

    def log_lines(self) -> list[dict]:
        if self.proc.poll() is not None:
            [reader.join(timeout=10) for reader in self._readers]
        return [json.loads(line) for line in list(self.stderr) if line.startswith("{")]

    def metrics_documents(self) -> list[dict]:
        return [json.loads(line) for line in list(self.stdout) if line.startswith("{")]

    def log_text(self) -> str:
        return "".join(self.stderr)[-3000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _collect(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@pytest.fixture(scope="module")
def server(model_cache_dir):
    srv = Server(model_cache_dir, "--model", "tiny.en", "--batch-size", "4", "--batch-wait-ms", "400",
                 "--max-body-mb", "3")
    srv.ready_seconds = srv.wait_ready()
    yield srv
    srv.stop()


def _flac(name: str = "jfk.flac") -> bytes:
    return shared_clip(name).read_bytes()


def _encode(audio: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


# ---------------------------------------------------------------------------- the contract
def test_ping_says_loading_then_ready_and_execution_parameters(server):
    assert server.pings[-1] == 200 and 503 in server.pings  # 503 while the model loaded
    status, _, body = server.request("GET", "/ping")
    assert status == 200 and json.loads(body)["model"] == "tiny.en"
    status, _, body = server.request("GET", "/execution-parameters")
    params = json.loads(body)
    assert status == 200 and params["BatchStrategy"] == "SINGLE_RECORD"
    assert params["MaxPayloadInMB"] == 3 and params["MaxConcurrentTransforms"] >= 4
    assert server.request("GET", "/invocations")[0] == 405


def test_json_is_the_batch_jobs_document(server, tiny_settings):
    from batch_job.transcribe import Transcriber

    status, head, body = server.invoke(_flac())
    assert status == 200 and head["content-type"].startswith("application/json") and head["x-request-id"]
    doc = json.loads(body)
    local = Transcriber.load(tiny_settings).transcribe(shared_clip("jfk.flac"))
    assert doc["text"] == local.text and doc["model"] == "tiny.en" and doc["language"] == "en"
    assert [(s["start"], s["end"], s["text"]) for s in doc["segments"]] == [(s.start, s.end, s.text) for s in local.segments]
    assert doc["request"]["id"] == head["x-request-id"] and doc["request"]["audio_seconds"] == 11.0
    assert doc["request"]["batches"] >= 1 and doc["warnings"] == []


def test_accept_variants_and_formats_parameter(server):
    status, head, body = server.invoke(_flac(), Accept="text/vtt")
    assert status == 200 and head["content-type"].startswith("text/vtt") and body.startswith(b"WEBVTT\n")
    status, head, body = server.invoke(_flac(), Accept="application/x-subrip")
    assert status == 200 and body.startswith(b"1\n00:00:00,") and b" --> " in body
    status, head, body = server.invoke(_flac(), Accept="text/plain")
    assert status == 200 and head["content-type"].startswith("text/plain") and JFK_WORDS in _words(body)
    # custom attributes (as SageMaker forwards them): several formats -> one JSON holding them all
    status, _, body = server.invoke(_flac(), **{"X-Amzn-SageMaker-Custom-Attributes": "formats=json,srt,vtt"})
    doc = json.loads(body)
    assert status == 200 and set(doc["outputs"]) == {"srt", "vtt"} and doc["outputs"]["vtt"].startswith("WEBVTT")
    status, head, body = server.invoke(_flac(), path="/invocations?formats=txt", Accept="text/vtt")
    assert status == 200 and head["content-type"].startswith("text/plain")
    status, _, body = server.invoke(_flac(), Accept="image/png")
    assert status == 406 and json.loads(body)["error"] == "not_acceptable"


@pytest.mark.parametrize("kind", ["mp3", "ogg", "wav-8k-u8", "flac-stereo-44k", "octet-stream"])
def test_every_format_the_worker_decodes(server, kind):
    if kind == "mp3":
        body, ctype = _flac("librivox_sonnet001_en.mp3"), "audio/mpeg"
    else:
        audio = load_clip("jfk.flac")
        if kind == "ogg":
            body, ctype = _encode(audio, 16000, "OGG", "VORBIS"), "audio/ogg"
        elif kind == "wav-8k-u8":
            import soxr

            body, ctype = _encode(soxr.resample(audio, 16000, 8000), 8000, "WAV", "PCM_U8"), "audio/wav"
        elif kind == "flac-stereo-44k":
            import soxr

            up = soxr.resample(audio, 16000, 44100)
            body, ctype = _encode(np.stack([up, up * 0.5], axis=1), 44100, "FLAC"), "audio/x-flac"
        else:
            body, ctype = _encode(audio, 16000, "WAV", "PCM_16"), "application/octet-stream"
    status, _, data = server.invoke(body, ctype, Accept="text/plain")
    assert status == 200, data
    text = _words(data)
    assert ("sonnet" in text or "fairest" in text) if kind == "mp3" else JFK_WORDS in text


# ---------------------------------------------------------------------------- bad input
def test_every_bad_input_gets_its_status_and_reason(server):
    cases = [
        (dict(body=_flac(), content_type="image/png"), 415, "unsupported_format"),
        (dict(body=b"", content_type="audio/wav"), 400, "empty_audio"),
        (dict(body=os.urandom(4000), content_type="audio/wav"), 400, "corrupt_audio"),
        (dict(body=b"\0" * (4 * 1024 * 1024), content_type="audio/wav"), 413, "too_large"),
        (dict(body=_flac(), path="/invocations?speed=fast"), 400, "config_error"),
        (dict(body=_flac(), path="/invocations?task=translate"), 400, "config_error"),  # tiny.en is English-only
        (dict(body=_flac(), path="/invocations?word_timestamps=true"), 400, "config_error"),  # not loaded
    ]
    for kwargs, status, reason in cases:
        got, head, data = server.invoke(**kwargs)
        doc = json.loads(data)
        assert (got, doc["error"]) == (status, reason), (kwargs.get("path"), doc)
        assert doc["message"] and doc["request_id"] == head["x-request-id"]
    big = json.loads(server.invoke(b"\0" * (4 * 1024 * 1024), "audio/wav")[2])["message"]
    assert "3 MB" in big  # the limit is in the message
    assert server.request("GET", "/ping")[0] == 200  # none of it took the server down


def test_a_truncated_file_is_transcribed_as_far_as_it_goes_with_a_warning(server):
    whole = _encode(load_clip("jfk.flac"), 16000, "WAV", "PCM_16")
    status, head, body = server.invoke(whole[: len(whole) * 2 // 3], "audio/wav")
    doc = json.loads(body)
    assert status == 200 and head["x-whisper-batch-warnings"] == "truncated_audio"
    assert [w["code"] for w in doc["warnings"]] == ["truncated_audio"] and 6.0 < doc["duration"] < 8.0
    assert "ask not" in _words(doc["text"])


# ---------------------------------------------------------------------------- batching
def test_concurrent_requests_share_batches_and_a_bad_one_poisons_none(server):
    clips = ["ljspeech_LJ001-0001.flac", "ljspeech_LJ001-0002.flac", "ljspeech_LJ001-0003.flac", "jfk.flac"]
    bodies = [(_flac(c), "audio/flac") for c in clips] + [(os.urandom(3000), "audio/flac")]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: server.invoke(*b), bodies))
    good, bad = answers[:-1], answers[-1]
    assert [a[0] for a in good] == [200] * 4 and bad[0] == 400
    docs = [json.loads(a[2]) for a in good]
    # Every request arrived within the 400 ms gathering window: they shared the engine's batches.
    assert max(d["request"]["shared_with"] for d in docs) >= 1
    assert max(d["request"]["batch_fill"] for d in docs) > 0.25  # more than one row of 4 held a window
    assert JFK_WORDS in _words(docs[3]["text"])
    stats = json.loads(server.request("GET", "/stats")[2])
    assert stats["batches"] >= 1 and stats["in_flight"] == 0


def test_each_request_logs_one_line_and_one_metrics_document(server):
    server.invoke(_flac(), **{"X-Request-Id": "trace-me-123"})
    time.sleep(0.2)
    lines = [entry for entry in server.log_lines() if entry.get("request_id") == "trace-me-123"]
    assert len(lines) == 1 and lines[0]["stage"] == "request" and lines[0]["status"] == 200
    for field in ("audio_seconds", "queue_seconds", "batch_fill", "wall_seconds"):
        assert isinstance(lines[0][field], (int, float)), field
    (doc,) = [d for d in server.metrics_documents() if d.get("request_id") == "trace-me-123"]
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    names = {m["Name"] for m in directive["Metrics"]}
    assert directive["Namespace"] == "WhisperBatch" and directive["Dimensions"] == [["Service"]]
    assert {"Invocations", "InvocationAudioSeconds", "InvocationWallSeconds", "InvocationQueueSeconds", "BatchFill"} <= names
    assert doc["InvocationAudioSeconds"] == 11.0 and doc["Invocations"] == 1
    failed = [d for d in server.metrics_documents() if d.get("Reason") == "unsupported_format"]
    assert failed and failed[0]["InvocationsFailed"] == 1  # from the bad-input test before


# ---------------------------------------------------------------------------- queue and shutdown
def test_a_full_queue_is_503_with_retry_after_and_sigterm_drains_in_flight_requests(model_cache_dir):
    # One request at a time, and an idle engine that waits 3 s for company: the first request is
    # held in the scheduler long enough for the second to find the queue full, and for SIGTERM.
    srv = Server(model_cache_dir, "--model", "tiny.en", "--batch-size", "2", "--max-queue", "1",
                 "--batch-wait-ms", "3000")
    try:
        srv.wait_ready()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(srv.invoke, _flac(), Accept="text/plain")
            time.sleep(1.0)
            status, head, body = srv.invoke(_flac())
            assert status == 503 and int(head["retry-after"]) >= 1 and json.loads(body)["error"] == "queue_full"
            srv.proc.send_signal(signal.SIGTERM)  # while the first is still in flight
            status, _, text = first.result(timeout=60)
        assert status == 200 and JFK_WORDS in _words(text)
        assert srv.proc.wait(timeout=60) == 0
        stages = [entry["stage"] for entry in srv.log_lines()]
        assert stages.index("request") < stages.index("stopped")
    finally:
        srv.stop()


def test_a_model_that_cannot_load_stops_the_server_with_the_config_exit_code(model_cache_dir, tmp_path):
    srv = Server(model_cache_dir, "--model", str(tmp_path / "no-such-model"))
    try:
        assert srv.proc.wait(timeout=120) == 78
        assert any(entry["stage"] == "model_failed" for entry in srv.log_lines())
    finally:
        srv.stop()


def test_a_diarizing_server_labels_speakers_in_json_and_vtt(model_cache_dir):
    """`serve --diarize`: the same labels as the batch job, in every response format; a request that turns
    word timestamps off still gets labelled segments."""
    from conversations import alternating, score

    from batch_job.result import Segment, Transcript, Word

    conv = alternating("2 speakers", ["spk1", "spk2"], 4)
    srv = Server(model_cache_dir, "--model", "tiny.en", "--diarize")
    try:
        srv.wait_ready()
        status, _, body = srv.invoke(_encode(conv.audio, 16000, "WAV"), content_type="audio/wav")
        assert status == 200, body
        doc = json.loads(body)
        assert doc["speakers"] == ["SPEAKER_00", "SPEAKER_01"]
        transcript = Transcript(doc["text"], "en", doc["duration"], tuple(
            Segment(s["start"], s["end"], s["text"], tuple(Word(**w) for w in s["words"]), s["speaker"])
            for s in doc["segments"]), "tiny.en")
        assert score(conv, transcript).attributed_speech >= 0.9
        status, _, vtt = srv.invoke(_encode(conv.audio, 16000, "WAV"), content_type="audio/wav", Accept="text/vtt")
        assert status == 200 and b"<v SPEAKER_01>" in vtt
        status, _, body = srv.invoke(_encode(conv.audio, 16000, "WAV"), content_type="audio/wav",
                                     path="/invocations?word_timestamps=false")
        segments = json.loads(body)["segments"]
        assert status == 200 and all("words" not in s and s["speaker"].startswith("SPEAKER_") for s in segments)
    finally:
        assert srv.stop() == 0
