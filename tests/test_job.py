"""run-job in-process against moto S3/CloudWatch: outputs, markers, idempotency, bad input, faults.

Happy-path tests use the REAL tiny.en Transcriber (loaded once per module) on shared audio;
fault-injection tests use a small stand-in with the same interface.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")

from conftest import shared_clip  # noqa: E402

from batch_job import exit_codes  # noqa: E402
from batch_job.errors import StorageError  # noqa: E402
from batch_job.job import ConfigError, JobContext, JsonLog, read_pack, run_job  # noqa: E402
from batch_job.result import Segment, Transcript  # noqa: E402
from batch_job.settings import Settings  # noqa: E402

IN = "in-bucket"
OUT = "out-bucket"
PREFIX = "transcripts/"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def aws(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_BATCH_JOB_ATTEMPT", "AWS_BATCH_JOB_ID",
                 "AWS_BATCH_JOB_ARRAY_INDEX", "NEURON_RT_VISIBLE_CORES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=IN)
        s3.create_bucket(Bucket=OUT)
        yield s3


@pytest.fixture
def work_dir(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    yield d
    # temp files are removed on every exit path
    assert list(d.iterdir()) == [], f"job left temp files behind: {list(d.rglob('*'))}"


@pytest.fixture
def settings(work_dir, model_cache_dir):
    return Settings(model="tiny.en", cache_dir=str(model_cache_dir), work_dir=str(work_dir),
                    s3_max_attempts=3, download_attempts=2, metrics_mode="emf",
                    neuron_monitor="neuron-monitor-not-installed-here")


class Recorder:
    """Captures log lines, EMF lines and the S3 calls the job makes (in order)."""

    def __init__(self, s3):
        self.log_stream = io.StringIO()
        self.metrics_stream = io.StringIO()
        self.calls: list[tuple[str, str]] = []
        s3.meta.events.register("before-parameter-build.s3", self._record)

    def _record(self, params, model, **kwargs):
        self.calls.append((model.name, params.get("Key", "")))

    def puts(self):
        return [k for op, k in self.calls if op == "PutObject"]

    def stages(self):
        return [json.loads(line) for line in self.log_stream.getvalue().splitlines()]

    def emf(self):
        return [json.loads(line) for line in self.metrics_stream.getvalue().splitlines()]


def run(s3, key, settings, rec=None, **kw):
    rec = rec or Recorder(s3)
    kw.setdefault("context", JobContext(job_id="job-1", attempt=1))
    result = run_job(f"s3://{IN}/{key}", f"s3://{OUT}/{PREFIX}", settings=settings, s3=s3,
                     log=JsonLog(rec.log_stream), metrics_stream=rec.metrics_stream, **kw)
    return result, rec


def out_keys(s3):
    resp = s3.list_objects_v2(Bucket=OUT)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def get_json(s3, key):
    return json.loads(s3.get_object(Bucket=OUT, Key=key)["Body"].read())


def upload(s3, key, path_or_bytes):
    body = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return s3.put_object(Bucket=IN, Key=key, Body=body)["ETag"]


@pytest.fixture(scope="module")
def real_transcriber(model_cache_dir):
    from batch_job.transcribe import Transcriber

    return Transcriber.load(Settings(model="tiny.en", cache_dir=str(model_cache_dir)))


class CountingFactory:
    def __init__(self, transcriber):
        self.transcriber = transcriber
        self.calls = 0

    def __call__(self, settings):
        self.calls += 1
        return self.transcriber


class StandIn:
    """Same interface as Transcriber: fixed text, optional per-window sleep / failure / hook."""

    model_name = "stand-in"

    def __init__(self, text="hello from the stand in", windows=2, sleep=0.0, fail=None, hook=None):
        self.text, self.windows, self.sleep, self.fail, self.hook = text, windows, sleep, fail, hook

    def transcribe(self, audio, *, language=None, task="transcribe", progress=False, on_window=None):
        duration = float(len(audio)) / 16000
        for i in range(self.windows):
            if self.hook:
                self.hook(i)
            if self.fail is not None:
                raise self.fail
            time.sleep(self.sleep)
            if on_window:
                on_window(i + 1, self.windows)
        return Transcript(text=self.text, language=language or "en", duration=duration,
                          segments=(Segment(0.0, min(duration, 1.0), self.text),), model=self.model_name, task=task)

    def transcribe_many(self, inputs, *, language=None, task="transcribe", on_window=None):
        from batch_job.result import FileResult

        for name, audio in inputs:
            yield FileResult(name, self.transcribe(audio, language=language, task=task, on_window=on_window), None)


def no_model(settings):
    raise AssertionError("the model must not be loaded here")


# --------------------------------------------------------------------------- happy path (real model)
def test_happy_path_real_model(aws, settings, real_transcriber):
    key = "calls/2024/jfk.flac"
    etag = upload(aws, key, shared_clip("jfk.flac"))
    factory = CountingFactory(real_transcriber)
    result, rec = run(aws, key, settings, transcriber_factory=factory)

    assert result.exit_code == exit_codes.OK and result.status == "succeeded", rec.stages()
    assert factory.calls == 1
    base = PREFIX + key
    assert out_keys(aws) == sorted(base + ext for ext in (".json", ".srt", ".txt", ".vtt"))
    # the completion marker is the LAST object written
    assert rec.puts()[-1] == base + ".json" and len(rec.puts()) == 4
    text = aws.get_object(Bucket=OUT, Key=base + ".txt")["Body"].read().decode()
    assert "ask not what your country can do for you" in text.lower().replace(",", "")
    assert "-->" in aws.get_object(Bucket=OUT, Key=base + ".srt")["Body"].read().decode()
    assert aws.get_object(Bucket=OUT, Key=base + ".vtt")["Body"].read().decode().startswith("WEBVTT")

    marker = get_json(aws, base + ".json")
    assert marker["source"] == {"bucket": IN, "key": key, "etag": etag.strip('"'), "version_id": None,
                                "size": shared_clip("jfk.flac").stat().st_size}
    assert "country" in marker["text"].lower() and marker["segments"]
    job = marker["job"]
    assert job["audio_seconds"] == pytest.approx(11.0, abs=0.1)
    assert job["processing_seconds"] > 0 and job["model_load_seconds"] >= 0
    assert job["real_time_factor"] == pytest.approx(job["processing_seconds"] / job["audio_seconds"], rel=0.01)
    assert job["worker_version"] and job["attempt"] == 1 and job["job_id"] == "job-1"
    assert "neuroncore_utilization_avg" not in job  # no neuron-monitor here

    # EMF: one line, parseable, all the per-job metrics under the settings' namespace/dimension
    (emf,) = rec.emf()
    directives = emf["_aws"]["CloudWatchMetrics"]
    names = {m["Name"] for d in directives for m in d["Metrics"]}
    assert {"AudioSeconds", "ProcessingSeconds", "RealTimeFactor", "ModelLoadSeconds", "JobsSucceeded"} <= names
    assert all(d["Namespace"] == "WhisperBatch" and ["Service"] in d["Dimensions"] for d in directives)
    assert emf["Service"] == "whisper-batch" and emf["JobsSucceeded"] == 1
    assert emf["AudioSeconds"] == pytest.approx(11.0, abs=0.1)

    stages = [s["stage"] for s in rec.stages()]
    for stage in ("start", "head", "download", "audio", "model_ready", "first_window", "transcribed", "uploaded", "done"):
        assert stage in stages
    assert all("elapsed_s" in s and "ts" in s for s in rec.stages())


def test_word_timestamps_setting_reaches_the_outputs(aws, settings, tiny_words_transcriber):
    """WHISPER_BATCH_WORD_TIMESTAMPS / Settings.word_timestamps (the stack's WordTimestamps): JSON
    words on the file's timeline, and subtitle cues within the configured line width."""
    key = "words/jfk.flac"
    upload(aws, key, shared_clip("jfk.flac"))
    settings = settings.replace(word_timestamps=True, max_line_width=16)
    result, rec = run(aws, key, settings, transcriber_factory=CountingFactory(tiny_words_transcriber))
    assert result.exit_code == exit_codes.OK, rec.stages()
    marker = get_json(aws, PREFIX + key + ".json")
    words = [w for seg in marker["segments"] for w in seg["words"]]
    assert len(words) >= 20 and words[-1]["end"] <= marker["duration"]
    assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:]))
    srt = aws.get_object(Bucket=OUT, Key=PREFIX + key + ".srt")["Body"].read().decode()
    text_lines = [line for line in srt.splitlines() if line and "-->" not in line and not line.isdigit()]
    assert text_lines and all(len(line) <= 16 for line in text_lines)


def test_impossible_cue_settings_are_a_config_error(aws, settings):
    upload(aws, "cue/jfk.flac", shared_clip("jfk.flac"))
    result, _ = run(aws, "cue/jfk.flac", settings.replace(max_line_count=0), transcriber_factory=no_model)
    assert result.exit_code == exit_codes.CONFIG_ERROR
    assert out_keys(aws) == []


def test_diarize_setting_labels_speakers_in_every_output(aws, settings, tiny_speakers_transcriber):
    """WHISPER_BATCH_DIARIZE (the stack's SpeakerLabels): a two-voice conversation gets two labels in
    the marker JSON, speaker turns in TXT, labelled SRT cues and VTT voice tags."""
    import soundfile as sf
    from conversations import alternating

    conv = alternating("2 speakers", ["spk1", "spk2"], 4)
    body = io.BytesIO()
    sf.write(body, conv.audio, 16000, format="WAV")
    upload(aws, "calls/two.wav", body.getvalue())
    factory = CountingFactory(tiny_speakers_transcriber)
    result, rec = run(aws, "calls/two.wav", settings.replace(diarize=True), transcriber_factory=factory)
    assert result.exit_code == exit_codes.OK, rec.stages()
    marker = get_json(aws, PREFIX + "calls/two.wav.json")
    assert marker["speakers"] == ["SPEAKER_00", "SPEAKER_01"]
    assert all(w["speaker"] == s["speaker"] for s in marker["segments"] for w in s["words"])
    text = {fmt: aws.get_object(Bucket=OUT, Key=PREFIX + f"calls/two.wav.{fmt}")["Body"].read().decode()
            for fmt in ("txt", "srt", "vtt")}
    assert [line.split(":")[0] for line in text["txt"].splitlines()] == ["SPEAKER_00", "SPEAKER_01"] * 2
    assert "[SPEAKER_01] " in text["srt"] and "<v SPEAKER_01>" in text["vtt"]


def test_bad_speaker_count_is_a_config_error_before_the_model(aws, settings):
    upload(aws, "spk/jfk.flac", shared_clip("jfk.flac"))
    result, _ = run(aws, "spk/jfk.flac", settings.replace(diarize=True, speakers="0"), transcriber_factory=no_model)
    assert result.exit_code == exit_codes.CONFIG_ERROR
    assert out_keys(aws) == []


@pytest.mark.parametrize("key", [
    "folder with spaces/my recording 1.flac",
    "ünïcødé/日本語 クリップ.flac",
    "a+b/c+d=e&f.flac",
])
def test_keys_used_verbatim(aws, settings, real_transcriber, key):
    upload(aws, key, shared_clip("ljspeech_LJ001-0002.flac"))
    result, rec = run(aws, key, settings, transcriber=real_transcriber)
    assert result.exit_code == 0, rec.stages()
    assert out_keys(aws) == sorted(PREFIX + key + ext for ext in (".json", ".srt", ".txt", ".vtt"))
    assert "modern" in get_json(aws, PREFIX + key + ".json")["text"].lower()
    assert get_json(aws, PREFIX + key + ".json")["source"]["key"] == key


def test_same_key_in_two_folders_never_collides(aws, settings):
    for key in ("a/x.flac", "b/x.flac"):
        upload(aws, key, shared_clip("ljspeech_LJ001-0002.flac"))
        assert run(aws, key, settings, transcriber=StandIn(text=key))[0].exit_code == 0
    assert get_json(aws, PREFIX + "a/x.flac.json")["text"] == "a/x.flac"
    assert get_json(aws, PREFIX + "b/x.flac.json")["text"] == "b/x.flac"


def test_rerun_same_etag_does_no_work(aws, settings, real_transcriber):
    key = "rerun.flac"
    upload(aws, key, shared_clip("ljspeech_LJ001-0002.flac"))
    assert run(aws, key, settings, transcriber_factory=CountingFactory(real_transcriber))[0].exit_code == 0
    before = aws.get_object(Bucket=OUT, Key=PREFIX + key + ".json")["LastModified"]

    factory = CountingFactory(real_transcriber)
    result, rec = run(aws, key, settings, transcriber_factory=factory)
    assert result.exit_code == 0 and result.status == "skipped"
    assert factory.calls == 0  # no model load
    assert rec.puts() == [] and not any(op == "GetObject" and k == key for op, k in rec.calls)  # no download
    assert aws.get_object(Bucket=OUT, Key=PREFIX + key + ".json")["LastModified"] == before
    assert "skip" in [s["stage"] for s in rec.stages()]


def test_changed_etag_is_transcribed_again(aws, settings, real_transcriber):
    key = "changing.flac"
    first = upload(aws, key, shared_clip("ljspeech_LJ001-0002.flac"))
    assert run(aws, key, settings, transcriber=real_transcriber)[0].exit_code == 0
    assert "modern" in get_json(aws, PREFIX + key + ".json")["text"].lower()

    second = upload(aws, key, shared_clip("jfk.flac"))
    assert second != first
    factory = CountingFactory(real_transcriber)
    result, rec = run(aws, key, settings, transcriber_factory=factory)
    assert result.exit_code == 0 and result.status == "succeeded" and factory.calls == 1
    marker = get_json(aws, PREFIX + key + ".json")
    assert marker["source"]["etag"] == second.strip('"') and "country" in marker["text"].lower()
    assert "country" in aws.get_object(Bucket=OUT, Key=PREFIX + key + ".txt")["Body"].read().decode().lower()
    # the old marker was removed before the first new output was written, the new one is last
    puts = rec.puts()
    deletes = [i for i, (op, k) in enumerate(rec.calls) if op == "DeleteObjects"]
    first_put = next(i for i, (op, k) in enumerate(rec.calls) if op == "PutObject")
    assert deletes and deletes[0] < first_put and puts[-1] == PREFIX + key + ".json"


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name,body,overrides,reason", [
    ("garbage.wav", os.urandom(4096), {}, "corrupt_audio"),
    ("truncated.flac", None, {}, "corrupt_audio"),
    ("empty.wav", b"", {}, "empty_audio"),
    ("slides.pdf", b"%PDF-1.4\n" + b"1 0 obj <<>> endobj\n" * 50, {}, "unsupported_format"),
    ("long.flac", "jfk.flac", {"max_audio_seconds": 2.0}, "too_long"),
    ("big.flac", "jfk.flac", {"max_download_bytes": 1000}, "too_large"),
    ("never-uploaded.flac", "MISSING", {}, "missing_input"),
])
def test_bad_input_gives_reason_and_exit_code(aws, settings, name, body, overrides, reason):
    if body is None:
        body = shared_clip("jfk.flac").read_bytes()[:400]
    elif isinstance(body, str) and body != "MISSING":
        body = shared_clip(body).read_bytes()
    if body != "MISSING":
        upload(aws, name, body)
    result, rec = run(aws, name, settings.replace(**overrides), transcriber_factory=no_model,
                      context=JobContext(job_id="job-9", attempt=2))

    assert result.exit_code == exit_codes.INPUT_ERROR and result.reason == reason
    assert out_keys(aws) == [PREFIX + name + ".error.json"]  # no completion marker, no outputs
    err = get_json(aws, PREFIX + name + ".error.json")
    assert err["reason"] == reason and err["retryable"] is False and err["exit_code"] == 65
    assert err["attempt"] == 2 and err["message"]
    assert err["source"]["bucket"] == IN and err["source"]["key"] == name
    assert (err["source"]["etag"] is None) == (reason == "missing_input")
    if reason == "too_large":  # refused from HEAD, before any GET of the object
        assert not any(op == "GetObject" and k == name for op, k in rec.calls)
    (emf,) = rec.emf()
    assert emf["JobsFailed"] == 1 and emf["Reason"] == reason
    assert [["Service"], ["Service", "Reason"]] in [d["Dimensions"] for d in emf["_aws"]["CloudWatchMetrics"]]


def test_model_load_failure_is_config_error(aws, settings):
    upload(aws, "ok.flac", shared_clip("ljspeech_LJ001-0002.flac"))

    def broken(settings):
        raise FileNotFoundError("model.safetensors missing from the image")

    result, _ = run(aws, "ok.flac", settings, transcriber_factory=broken)
    assert result.exit_code == exit_codes.CONFIG_ERROR and result.reason == "model_error"
    assert get_json(aws, PREFIX + "ok.flac.error.json")["reason"] == "model_error"


def test_unexpected_exception_is_internal_and_retryable(aws, settings):
    upload(aws, "ok.flac", shared_clip("ljspeech_LJ001-0002.flac"))
    result, rec = run(aws, "ok.flac", settings, transcriber=StandIn(fail=RuntimeError("boom")))
    assert result.exit_code == exit_codes.INTERNAL and result.reason == "internal_error"
    err = get_json(aws, PREFIX + "ok.flac.error.json")
    assert err["retryable"] is True and "boom" in err["message"]
    assert out_keys(aws) == [PREFIX + "ok.flac.error.json"]


def test_bad_parameters_are_config_errors(aws, settings):
    result = run_job("https://example.com/x.wav", f"s3://{OUT}/", settings=settings, s3=aws,
                     log=JsonLog(io.StringIO()), metrics_stream=io.StringIO(), transcriber_factory=no_model)
    assert result.exit_code == exit_codes.CONFIG_ERROR
    result = run_job(f"s3://{IN}/x.wav", f"s3://{OUT}/", settings=settings.replace(formats="json,docx"), s3=aws,
                     log=JsonLog(io.StringIO()), metrics_stream=io.StringIO(), transcriber_factory=no_model)
    assert result.exit_code == exit_codes.CONFIG_ERROR and out_keys(aws) == []


# --------------------------------------------------------------------------- fault injection
class _Raw:
    def __init__(self, body):
        self._body = body

    def stream(self, *args, **kwargs):
        yield self._body


def inject_5xx(s3, method, bucket, key, times):
    """Answer the next ``times`` HTTP requests for exactly ``bucket/key`` with a 500 (-1 = always)."""
    from urllib.parse import unquote, urlsplit

    from botocore.awsrequest import AWSResponse

    state = {"left": times, "seen": 0}

    def before_send(request, **kwargs):
        url = urlsplit(request.url)
        if request.method == method and bucket in request.url and unquote(url.path).endswith("/" + key):
            state["seen"] += 1
            if state["left"] != 0:
                state["left"] -= 1
                body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                return AWSResponse(request.url, 500, {"Content-Type": "application/xml"}, _Raw(body))
        return None

    s3.meta.events.register("before-send.s3", before_send)
    return state


def test_transient_get_error_is_retried(aws, settings):
    upload(aws, "flaky.flac", shared_clip("ljspeech_LJ001-0002.flac"))
    state = inject_5xx(aws, "GET", IN, "flaky.flac", times=2)
    result, rec = run(aws, "flaky.flac", settings, transcriber=StandIn())
    assert result.exit_code == 0, rec.stages()
    assert state["seen"] >= 3  # two failures, then the successful GET
    assert PREFIX + "flaky.flac.json" in out_keys(aws)


def test_persistent_get_error_is_s3_error_and_retryable(aws, settings, monkeypatch):
    monkeypatch.setattr("batch_job.s3io.time.sleep", lambda s: None)
    upload(aws, "down.flac", shared_clip("ljspeech_LJ001-0002.flac"))
    inject_5xx(aws, "GET", IN, "down.flac", times=-1)
    result, _ = run(aws, "down.flac", settings.replace(s3_max_attempts=1), transcriber_factory=no_model)
    assert result.exit_code == exit_codes.TRANSIENT and result.reason == "s3_error"
    err = get_json(aws, PREFIX + "down.flac.error.json")
    assert err["reason"] == "s3_error" and err["retryable"] is True and err["exit_code"] == 75
    assert out_keys(aws) == [PREFIX + "down.flac.error.json"]


def test_object_overwritten_during_download_is_not_mixed(aws, settings):
    """The GET is pinned to HEAD's ETag: an overwrite in between fails the attempt (retryable)."""
    key = "racing.flac"
    upload(aws, key, shared_clip("ljspeech_LJ001-0002.flac"))
    done = {}

    def overwrite(model, params, **kwargs):
        if model.name == "GetObject" and params.get("Key") == key and not done:
            done["x"] = True
            boto3.client("s3").put_object(Bucket=IN, Key=key, Body=shared_clip("jfk.flac").read_bytes())

    aws.meta.events.register("before-parameter-build.s3.GetObject", overwrite)
    result, _ = run(aws, key, settings, transcriber=StandIn())
    assert result.exit_code == exit_codes.TRANSIENT and result.reason == "s3_error"
    assert "changed" in get_json(aws, PREFIX + key + ".error.json")["message"]


def test_failing_marker_put_leaves_no_marker_and_no_partial_outputs(aws, settings):
    key = "put-fails.flac"
    upload(aws, key, shared_clip("ljspeech_LJ001-0002.flac"))
    inject_5xx(aws, "PUT", OUT, PREFIX + key + ".json", times=-1)  # only the marker (not .error.json)
    result, rec = run(aws, key, settings, transcriber=StandIn())
    assert result.exit_code == exit_codes.TRANSIENT and result.reason == "s3_error"
    # the siblings were written first, then removed again
    assert {PREFIX + key + ext for ext in (".txt", ".srt", ".vtt")} <= set(rec.puts())
    assert out_keys(aws) == [PREFIX + key + ".error.json"]
    assert get_json(aws, PREFIX + key + ".error.json")["retryable"] is True


def test_stale_error_marker_removed_by_later_success(aws, settings):
    key = "second-time-lucky.flac"
    upload(aws, key, shared_clip("ljspeech_LJ001-0002.flac"))
    result, _ = run(aws, key, settings, transcriber=StandIn(fail=StorageError("throttled")),
                    context=JobContext(attempt=1))
    assert result.exit_code == exit_codes.TRANSIENT
    assert get_json(aws, PREFIX + key + ".error.json")["attempt"] == 1
    result, _ = run(aws, key, settings, transcriber=StandIn(), context=JobContext(attempt=2))
    assert result.exit_code == 0
    assert out_keys(aws) == sorted(PREFIX + key + ext for ext in (".json", ".srt", ".txt", ".vtt"))


def test_sigterm_mid_decode_in_process(aws, settings):
    key = "spot.flac"
    upload(aws, key, shared_clip("ljspeech_LJ001-0002.flac"))

    def sigterm(i):
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    result, rec = run(aws, key, settings, transcriber=StandIn(windows=3, hook=sigterm))
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    assert result.exit_code == exit_codes.TRANSIENT and result.reason == "interrupted"
    assert out_keys(aws) == [PREFIX + key + ".error.json"]
    err = get_json(aws, PREFIX + key + ".error.json")
    assert err["reason"] == "interrupted" and err["retryable"] is True and err["exit_code"] == 75


def test_sigterm_during_upload_removes_uploaded_outputs(aws, settings):
    key = "spot-upload.flac"
    upload(aws, key, shared_clip("ljspeech_LJ001-0002.flac"))

    def on_put(params, **kwargs):
        if params.get("Key") == PREFIX + key + ".srt":
            os.kill(os.getpid(), signal.SIGTERM)

    aws.meta.events.register("before-parameter-build.s3.PutObject", on_put)
    result, rec = run(aws, key, settings, transcriber=StandIn())
    assert result.exit_code == exit_codes.TRANSIENT and result.reason == "interrupted"
    assert PREFIX + key + ".txt" in rec.puts()
    assert out_keys(aws) == [PREFIX + key + ".error.json"]


def test_signal_swallowed_by_engine_still_interrupts(aws, settings):
    """An engine that catches the InterruptedJobError still stops at the next window."""
    key = "swallow.flac"
    upload(aws, key, shared_clip("ljspeech_LJ001-0002.flac"))

    def swallow(i):
        if i == 0:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except Exception:
                pass

    result, _ = run(aws, key, settings, transcriber=StandIn(windows=3, hook=swallow))
    assert result.exit_code == exit_codes.TRANSIENT and result.reason == "interrupted"
    assert out_keys(aws) == [PREFIX + key + ".error.json"]


# --------------------------------------------------------------------------- metrics (put mode), manifest, CLI
def test_put_metric_data_mode(aws, settings):
    upload(aws, "m.flac", shared_clip("ljspeech_LJ001-0002.flac"))
    upload(aws, "bad.wav", b"")
    cw = boto3.client("cloudwatch")
    s = settings.replace(metrics_mode="put", metrics_namespace="Test/WB", metrics_service="svc")
    result, rec = run(aws, "m.flac", s, transcriber=StandIn(), cloudwatch=cw)
    assert result.exit_code == 0 and rec.emf() == []
    run(aws, "bad.wav", s, transcriber_factory=no_model, cloudwatch=cw)
    metrics = cw.list_metrics(Namespace="Test/WB")["Metrics"]
    by_name = {}
    for m in metrics:
        by_name.setdefault(m["MetricName"], []).append({d["Name"]: d["Value"] for d in m["Dimensions"]})
    assert {"AudioSeconds", "ProcessingSeconds", "RealTimeFactor", "JobsSucceeded", "JobsFailed"} <= set(by_name)
    assert {"Service": "svc", "Reason": "empty_audio"} in by_name["JobsFailed"]
    assert {"Service": "svc"} in by_name["JobsFailed"]


def test_read_pack(aws):
    """The submitter's manifest lines (submitter/manifest.py), and plain {bucket, key} lines."""
    lines = [{"index": 0, "input": f"s3://{IN}/a.flac", "output": f"s3://{OUT}/t/", "etag": '"1"', "size": 3},
             {"index": 1, "input": f"s3://{IN}/dir/b c+d.flac", "output": f"s3://{OUT}/t/", "etag": '"2"', "size": 4},
             {"index": 1, "input": f"s3://{IN}/e.flac", "output": f"s3://{OUT}/t/", "etag": '"3"', "size": 5}]
    aws.put_object(Bucket=IN, Key="t/_manifests/m.jsonl", Body="\n".join(json.dumps(x) for x in lines) + "\n")
    uri = f"s3://{IN}/t/_manifests/m.jsonl"
    element = read_pack(aws, uri, 1)
    assert [(e.input_uri, e.output_uri, e.etag) for e in element] == [
        (f"s3://{IN}/dir/b c+d.flac", f"s3://{OUT}/t/", '"2"'), (f"s3://{IN}/e.flac", f"s3://{OUT}/t/", '"3"')]
    assert [e.input_uri for e in read_pack(aws, uri)] == [x["input"] for x in lines]  # no index: all lines
    with pytest.raises(ConfigError, match="array element 2 lists no object"):
        read_pack(aws, uri, 2)
    with pytest.raises(ConfigError, match="does not exist"):
        read_pack(aws, f"s3://{IN}/gone.jsonl", 0)
    aws.put_object(Bucket=IN, Key="plain.jsonl", Body=json.dumps({"bucket": IN, "key": "k.wav", "etag": "e"}) + "\n")
    (plain,) = read_pack(aws, f"s3://{IN}/plain.jsonl", 0)
    assert (plain.input_uri, plain.output_uri) == (f"s3://{IN}/k.wav", None)
    aws.put_object(Bucket=IN, Key="broken.jsonl", Body='{"input": "s3://b/k"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        read_pack(aws, f"s3://{IN}/broken.jsonl")


@pytest.fixture
def cli_env(aws, work_dir, monkeypatch):
    from batch_job.job import pack

    monkeypatch.setattr(pack, "load_transcriber", lambda settings: StandIn())
    monkeypatch.setenv("AWS_BATCH_JOB_ATTEMPT", "3")
    monkeypatch.setenv("WHISPER_BATCH_WORK_DIR", str(work_dir))
    monkeypatch.setenv("WHISPER_BATCH_NEURON_MONITOR", "neuron-monitor-not-installed-here")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # run-job sets them; keep them test-local
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    return monkeypatch


def test_cli_array_job_with_submitter_manifest(aws, cli_env, capsys):
    """Array job as submitted by `whisper-batch submit`: --input is the manifest, element = index."""
    from batch_job import cli

    upload(aws, "x y.flac", shared_clip("ljspeech_LJ001-0002.flac"))
    upload(aws, "z.flac", shared_clip("ljspeech_LJ001-0002.flac"))
    lines = [{"index": i, "input": f"s3://{IN}/{k}", "output": f"s3://{OUT}/{PREFIX}", "etag": "e", "size": 1}
             for i, k in enumerate(["z.flac", "x y.flac"])]
    aws.put_object(Bucket=OUT, Key=PREFIX + "_manifests/m.jsonl", Body="\n".join(json.dumps(x) for x in lines))
    cli_env.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "1")
    code = cli.main(["run-job", "--input", f"s3://{OUT}/{PREFIX}_manifests/m.jsonl",
                     "--output", f"s3://{OUT}/{PREFIX}", "--formats", "txt,json"])
    assert code == 0
    assert out_keys(aws) == [PREFIX + "_manifests/m.jsonl", PREFIX + "x y.flac.json", PREFIX + "x y.flac.txt"]
    out, err = capsys.readouterr()
    docs = [json.loads(line) for line in out.strip().splitlines()]  # EMF on stdout
    assert [d.get("JobsSucceeded") for d in docs if "Input" in d] == [1]
    assert docs[-1]["PackObjects"] == 1 and docs[-1]["Manifest"].endswith("/m.jsonl")  # the pack's document
    stages = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert {"manifest", "start", "done"} <= {s["stage"] for s in stages}
    assert all(s.get("attempt") == 3 for s in stages)


def test_cli_plain_job_and_config_errors(aws, cli_env, capsys):
    from batch_job import cli

    upload(aws, "one.flac", shared_clip("ljspeech_LJ001-0002.flac"))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert cli.main(["run-job", "--input", f"s3://{IN}/one.flac", "--output", f"s3://{OUT}/{PREFIX}"]) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    assert PREFIX + "one.flac.json" in out_keys(aws)
    # default output: s3://<input bucket>/transcripts/
    assert cli.main(["run-job", "--input", f"s3://{IN}/one.flac"]) == 0
    assert aws.head_object(Bucket=IN, Key="transcripts/one.flac.json")
    assert cli.main(["run-job"]) == exit_codes.CONFIG_ERROR  # no input at all
    assert cli.main(["run-job", "--input", f"s3://{IN}/m.jsonl"]) == exit_codes.CONFIG_ERROR  # manifest, no index
    cli_env.setenv("WHISPER_BATCH_BATCH_SIZE", "eight")
    assert cli.main(["run-job", "--input", f"s3://{IN}/one.flac"]) == exit_codes.CONFIG_ERROR
    capsys.readouterr()


def test_batch_jobs_share_encoder_rows_by_default_and_the_env_turns_it_off(aws, cli_env, capsys):
    """run-job (packs, local mode) shares short files' encoder rows unless WHISPER_BATCH_SHARE_ROWS
    says otherwise; everything else (transcribe, serve) keeps Settings' default, off."""
    from batch_job import cli
    from batch_job.job import pack

    seen = []
    cli_env.setattr(pack, "load_transcriber", lambda settings: seen.append(settings) or StandIn())
    upload(aws, "one.flac", shared_clip("ljspeech_LJ001-0002.flac"))
    assert cli.main(["run-job", "--input", f"s3://{IN}/one.flac", "--output", f"s3://{OUT}/{PREFIX}"]) == 0
    cli_env.setenv("WHISPER_BATCH_SHARE_ROWS", "0")
    assert cli.main(["run-job", "--input", f"s3://{IN}/one.flac", "--output", f"s3://{OUT}/{PREFIX}x/"]) == 0
    assert [s.share_rows for s in seen] == [True, False]
    assert Settings.for_batch_job({}).share_rows is True
    assert Settings.for_batch_job({"WHISPER_BATCH_SHARE_ROWS": "off"}).share_rows is False
    assert Settings.for_batch_job({}, share_rows=False).share_rows is False  # an explicit override wins
    assert Settings.from_env({}).share_rows is False  # transcribe and serve
    capsys.readouterr()


def test_error_marker_is_tagged_for_lifecycle_expiry(aws, settings):
    """docs/deploy.md: error markers carry whisper-batch:marker=error (lifecycle expires them)."""
    upload(aws, "empty.wav", b"")
    run(aws, "empty.wav", settings, transcriber_factory=no_model)
    tags = aws.get_object_tagging(Bucket=OUT, Key=PREFIX + "empty.wav.error.json")["TagSet"]
    assert tags == [{"Key": "whisper-batch:marker", "Value": "error"}]
    upload(aws, "good.flac", shared_clip("ljspeech_LJ001-0002.flac"))
    run(aws, "good.flac", settings, transcriber=StandIn())
    assert aws.get_object_tagging(Bucket=OUT, Key=PREFIX + "good.flac.json")["TagSet"] == []  # transcripts untagged


def test_neuroncore_utilization_sampled_into_marker_and_metrics(aws, settings, tmp_path, monkeypatch):
    """With a (fake) neuron-monitor on PATH, the marker and EMF carry the job core's utilization."""
    import stat
    import sys

    from test_neuron_monitor import FAKE

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "neuron-monitor"
    report = Path(__file__).parent / "data" / "neuron_monitor_report.json"
    exe.write_text(FAKE.format(python=sys.executable, report=str(report)))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ["PATH"])
    upload(aws, "inf2.flac", shared_clip("ljspeech_LJ001-0002.flac"))

    def wait_for_samples(i):  # decode "takes" long enough for several reports
        time.sleep(0.4)

    s = settings.replace(neuron_monitor="neuron-monitor", neuron_monitor_period=0.1)
    result, rec = run(aws, "inf2.flac", s, transcriber=StandIn(windows=3, hook=wait_for_samples))
    assert result.exit_code == 0, rec.stages()
    job = get_json(aws, PREFIX + "inf2.flac.json")["job"]
    assert job["neuroncore_utilization_samples"] >= 2
    assert 10.0 <= job["neuroncore_utilization_avg"] <= job["neuroncore_utilization_peak"] <= 90.0
    (emf,) = rec.emf()
    assert emf["NeuronCoreUtilization"] == job["neuroncore_utilization_avg"]
    assert emf["NeuronCoreUtilizationPeak"] == job["neuroncore_utilization_peak"]


def test_versioned_bucket_pins_version_id(aws, settings):
    aws.put_bucket_versioning(Bucket=IN, VersioningConfiguration={"Status": "Enabled"})
    key = "versioned.flac"
    first = aws.put_object(Bucket=IN, Key=key, Body=shared_clip("ljspeech_LJ001-0002.flac").read_bytes())
    gets = []
    aws.meta.events.register("before-parameter-build.s3.GetObject",
                             lambda params, **kw: gets.append(dict(params)) if params.get("Key") == key else None)
    result, _ = run(aws, key, settings, transcriber=StandIn())
    assert result.exit_code == 0
    assert get_json(aws, PREFIX + key + ".json")["source"]["version_id"] == first["VersionId"]
    assert gets and all(g.get("VersionId") == first["VersionId"] for g in gets)
    # a rerun is a no-op; a new version is transcribed again
    assert run(aws, key, settings, transcriber_factory=no_model)[0].status == "skipped"
    second = aws.put_object(Bucket=IN, Key=key, Body=shared_clip("jfk.flac").read_bytes())
    assert run(aws, key, settings, transcriber=StandIn(text="v2"))[0].status == "succeeded"
    marker = get_json(aws, PREFIX + key + ".json")
    assert marker["source"]["version_id"] == second["VersionId"] and marker["text"] == "v2"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_process_age_is_true_to_the_clock():
    """Stage times count from process creation: the age must match a clock started at launch.

    (psutil's create_time() is off by up to 1 s: it adds the start tick to a boot time the
    kernel reports in whole seconds.)
    """
    import subprocess
    import time

    from batch_job.job import process_age_seconds

    t0 = time.monotonic()
    child = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.5)
        age, expected = process_age_seconds(child.pid), time.monotonic() - t0
        assert abs(age - expected) < 0.1, (age, expected)
    finally:
        child.kill()
        child.wait()
