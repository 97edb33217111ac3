"""run-job given a pack (issue #11), in-process against moto: one model load for many objects,
per-object markers, skips before any load, bad objects isolated, retries redo only what is left,
SIGTERM keeps finished objects, truncated WAVs transcribed with a warning, pack metrics."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")

from conftest import shared_clip, truncated_wav  # noqa: E402
from test_job import (  # noqa: E402, F401 - fixtures and helpers shared with the single-object tests
    IN,
    OUT,
    PREFIX,
    CountingFactory,
    Recorder,
    StandIn,
    aws,
    get_json,
    inject_5xx,
    no_model,
    out_keys,
    real_transcriber,
    settings,
    upload,
    work_dir,
)

from batch_job import exit_codes  # noqa: E402
from batch_job.errors import ConfigError, InterruptedJobError, ModelError, StorageError  # noqa: E402
from batch_job.job import JobContext, JobResult, JsonLog, run_pack  # noqa: E402
from batch_job.job.pack import exit_code_of  # noqa: E402

MANIFEST = f"s3://{OUT}/{PREFIX}_manifests/pack.jsonl"
CLIPS = ["ljspeech_LJ001-0002.flac", "jfk.flac", "librispeech_61-70968-0000.flac"]


def run(s3, keys, settings, rec=None, **kw):
    rec = rec or Recorder(s3)
    kw.setdefault("context", JobContext(job_id="pack-job", attempt=1))
    result = run_pack([(f"s3://{IN}/{k}", f"s3://{OUT}/{PREFIX}") for k in keys], settings=settings, s3=s3,
                      manifest=MANIFEST, log=JsonLog(rec.log_stream), metrics_stream=rec.metrics_stream, **kw)
    return result, rec


class ManyStandIn(StandIn):
    """StandIn that counts transcribe_many calls and the files each one received."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[list[str]] = []

    def transcribe_many(self, inputs, **kw):
        names: list[str] = []
        self.calls.append(names)
        for name, audio in inputs:
            names.append(name)
            yield from super().transcribe_many([(name, audio)], **kw)


def test_pack_loads_the_model_once_and_isolates_a_bad_object(aws, settings, real_transcriber):
    keys = [f"p/{c}" for c in CLIPS] + ["p/bad.wav", "p/cut.wav"]
    for key, clip in zip(keys, CLIPS, strict=False):
        upload(aws, key, shared_clip(clip))
    upload(aws, "p/bad.wav", os.urandom(20_000))
    upload(aws, "p/cut.wav", truncated_wav())
    factory = CountingFactory(real_transcriber)
    result, rec = run(aws, keys, settings, transcriber_factory=factory)

    assert factory.calls == 1
    assert result.exit_code == exit_codes.INPUT_ERROR  # one permanent failure, nothing to retry
    assert [r.status for r in result.objects] == ["succeeded"] * 3 + ["failed", "succeeded"]
    for key in keys[:3] + ["p/cut.wav"]:
        marker = get_json(aws, f"{PREFIX}{key}.json")
        assert marker["pack"] == {"manifest": MANIFEST, "objects": 5}
        assert marker["source"]["key"] == key and marker["job"]["audio_seconds"] > 0
        assert f"{PREFIX}{key}.txt" in out_keys(aws)
    assert "fellow americans" in get_json(aws, f"{PREFIX}p/jfk.flac.json")["text"].lower()
    assert get_json(aws, f"{PREFIX}p/jfk.flac.json")["warnings"] == []
    (warning,) = get_json(aws, f"{PREFIX}p/cut.wav.json")["warnings"]
    assert warning["code"] == "truncated_audio" and "6.00 s" in warning["message"]
    assert 2.5 < get_json(aws, f"{PREFIX}p/cut.wav.json")["duration"] < 3.5
    err = get_json(aws, f"{PREFIX}p/bad.wav.error.json")
    assert err["reason"] == "corrupt_audio" and err["retryable"] is False and err["job_id"] == "pack-job"
    assert not any(k.startswith(f"{PREFIX}p/bad.wav.") and k.endswith((".txt", ".json")) and "error" not in k
                   for k in out_keys(aws))

    docs = rec.emf()
    per_object = [d for d in docs if "Input" in d]
    assert sorted(d.get("JobsSucceeded", 0) for d in per_object) == [0, 1, 1, 1, 1]
    assert all("ModelLoadSeconds" not in d for d in per_object)  # counted once, by the pack
    pack = docs[-1]
    assert pack["PackObjects"] == 5 and pack["ModelLoadSeconds"] >= 0
    audio = sum(get_json(aws, f"{PREFIX}{k}.json")["job"]["audio_seconds"] for k in keys if k != "p/bad.wav")
    assert pack["PackAudioSeconds"] == pytest.approx(audio, abs=0.01)
    assert pack["PackThroughput"] == pytest.approx(pack["PackAudioSeconds"] / pack["PackWallSeconds"], rel=0.01)
    stages = rec.stages()
    assert [s["stage"] for s in stages].count("model_ready") == 1
    assert {s["input"] for s in stages if s["stage"] == "done"} == {f"s3://{IN}/{k}" for k in keys if k != "p/bad.wav"}
    (done,) = [s for s in stages if s["stage"] == "pack_done"]
    assert (done["succeeded"], done["failed"], done["exit_code"]) == (4, 1, 65)

    # the same pack again (a retry, a second delivery): nothing is downloaded, no model is loaded;
    # the object that failed for good in this job is not redone and still fails the job
    again, rec2 = run(aws, keys, settings, transcriber_factory=no_model)
    assert again.exit_code == exit_codes.INPUT_ERROR
    assert [r.status for r in again.objects] == ["skipped"] * 3 + ["failed", "skipped"]
    assert not any(op == "GetObject" and k.startswith("p/") for op, k in rec2.calls)
    # another job (a new upload of the same bytes after a fix) would try the bad object again
    other, _ = run(aws, ["p/bad.wav"], settings, transcriber_factory=no_model,
                   context=JobContext(job_id="another-job", attempt=1))
    assert other.objects[0].reason == "corrupt_audio"


def test_windows_of_a_pack_go_through_one_transcribe_many(aws, settings):
    keys = [f"m/{n}.flac" for n in range(4)]
    for key in keys:
        upload(aws, key, shared_clip(CLIPS[0]))
    engine = ManyStandIn()
    result, _ = run(aws, keys + keys[:1], settings, transcriber=engine)  # listed twice: done once
    assert result.exit_code == 0 and len(result.objects) == 5
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 4
    assert get_json(aws, f"{PREFIX}m/0.flac.json")["pack"]["objects"] == 4  # distinct objects, not lines


def test_transient_failure_retries_only_what_is_left(aws, settings, monkeypatch):
    monkeypatch.setattr("batch_job.s3io.time.sleep", lambda s: None)
    keys = ["t/a.flac", "t/b.flac", "t/c.flac"]
    for key in keys:
        upload(aws, key, shared_clip(CLIPS[0]))
    state = inject_5xx(aws, "GET", IN, "t/b.flac", times=-1)
    s = settings.replace(s3_max_attempts=1)
    result, _ = run(aws, keys, s, transcriber=StandIn())
    assert result.exit_code == exit_codes.TRANSIENT
    assert [r.status for r in result.objects] == ["succeeded", "failed", "succeeded"]
    assert get_json(aws, f"{PREFIX}t/b.flac.error.json")["reason"] == "s3_error"

    state["left"] = 0  # S3 recovers; Batch retries the job (attempt 2)
    rec = Recorder(aws)
    factory = CountingFactory(StandIn(text="second attempt"))
    retry, _ = run(aws, keys, s, rec=rec, transcriber_factory=factory, context=JobContext(job_id="pack-job", attempt=2))
    assert retry.exit_code == 0 and factory.calls == 1
    assert [r.status for r in retry.objects] == ["skipped", "succeeded", "skipped"]
    assert [k for op, k in rec.calls if op == "GetObject" and k.startswith("t/")] == ["t/b.flac"]
    assert get_json(aws, f"{PREFIX}t/b.flac.json")["text"] == "second attempt"
    assert f"{PREFIX}t/b.flac.error.json" not in out_keys(aws)  # the stale error marker is gone


def test_sigterm_keeps_finished_objects_and_marks_the_rest(aws, settings):
    keys = ["s/a.flac", "s/b.flac", "s/c.flac"]
    for key in keys:
        upload(aws, key, shared_clip(CLIPS[0]))
    calls = {"n": 0}

    def sigterm_in_second_file(i):
        calls["n"] += 1
        if calls["n"] == 4:  # windows 1-2 are the first file's; this is the second's second
            os.kill(os.getpid(), signal.SIGTERM)

    result, rec = run(aws, keys, settings, transcriber=StandIn(windows=2, hook=sigterm_in_second_file))
    assert result.exit_code == exit_codes.TRANSIENT
    assert [(r.status, r.reason) for r in result.objects] == [
        ("succeeded", None), ("failed", "interrupted"), ("failed", "interrupted")]
    assert sorted(k for k in out_keys(aws) if k.startswith(PREFIX + "s/a.flac")) == sorted(
        f"{PREFIX}s/a.flac{ext}" for ext in (".json", ".srt", ".txt", ".vtt"))
    for key in keys[1:]:
        err = get_json(aws, f"{PREFIX}{key}.error.json")
        assert err["reason"] == "interrupted" and err["retryable"] is True and err["exit_code"] == 75
        assert not any(k.startswith(PREFIX + key) and not k.endswith(".error.json") for k in out_keys(aws))


def test_sigterm_while_writing_an_object_removes_only_its_partial_outputs(aws, settings):
    keys = ["w/a.flac", "w/b.flac"]
    for key in keys:
        upload(aws, key, shared_clip(CLIPS[0]))

    def on_put(params, **kwargs):
        if params.get("Key") == f"{PREFIX}w/b.flac.srt":
            os.kill(os.getpid(), signal.SIGTERM)

    aws.meta.events.register("before-parameter-build.s3.PutObject", on_put)
    result, _ = run(aws, keys, settings, transcriber=StandIn())
    assert result.exit_code == exit_codes.TRANSIENT
    assert f"{PREFIX}w/a.flac.json" in out_keys(aws)
    assert [k for k in out_keys(aws) if k.startswith(f"{PREFIX}w/b.flac")] == [f"{PREFIX}w/b.flac.error.json"]


def test_model_load_failure_marks_every_object_and_never_downloads_after_it(aws, settings):
    keys = ["f/a.flac", "f/b.flac"]
    for key in keys:
        upload(aws, key, shared_clip(CLIPS[0]))

    def broken(settings):
        raise FileNotFoundError("model.safetensors missing from the image")

    result, rec = run(aws, keys, settings, transcriber_factory=broken)
    assert result.exit_code == exit_codes.CONFIG_ERROR
    for key in keys:
        assert get_json(aws, f"{PREFIX}{key}.error.json")["reason"] == "model_error"
    assert [k for op, k in rec.calls if op == "GetObject" and k.startswith("f/")] == ["f/a.flac"]


def test_a_pack_of_finished_objects_never_loads_the_model(aws, settings):
    upload(aws, "d/a.flac", shared_clip(CLIPS[0]))
    assert run(aws, ["d/a.flac"], settings, transcriber=StandIn())[0].exit_code == 0
    upload(aws, "d/gone.flac", b"x")
    aws.delete_object(Bucket=IN, Key="d/gone.flac")  # deleted before its job ran
    result, rec = run(aws, ["d/a.flac", "d/gone.flac"], settings, transcriber_factory=no_model)
    assert result.exit_code == exit_codes.INPUT_ERROR
    assert [(r.status, r.reason) for r in result.objects] == [("skipped", None), ("failed", "missing_input")]
    assert "model_ready" not in [s["stage"] for s in rec.stages()]


def test_exit_code_priority():
    def r(code):
        return JobResult(code, "failed" if code else "succeeded")

    assert exit_code_of([r(0), r(0)]) == 0
    assert exit_code_of([r(0), r(65)]) == 65
    assert exit_code_of([r(65), r(78)]) == 78
    assert exit_code_of([r(78), r(70)]) == 70
    assert exit_code_of([r(70), r(75), r(65)]) == 75


def test_for_error_maps_every_error_type():
    assert exit_codes.for_error(ConfigError("bad uri")) == exit_codes.CONFIG_ERROR
    assert exit_codes.for_error(ModelError("no graphs")) == exit_codes.CONFIG_ERROR
    assert exit_codes.for_error(StorageError("503")) == exit_codes.TRANSIENT
    assert exit_codes.for_error(InterruptedJobError("SIGTERM")) == exit_codes.TRANSIENT
    assert exit_codes.for_error(RuntimeError("bug")) == exit_codes.INTERNAL


def test_truncated_wav_decodes_what_is_there_with_a_warning(tmp_path):
    from batch_job.audio import SAMPLE_RATE, decode_audio, load_audio

    cut = tmp_path / "cut.wav"
    cut.write_bytes(truncated_wav(6.0, 0.5))
    whole = tmp_path / "whole.wav"
    whole.write_bytes(truncated_wav(6.0, 1.0))
    decoded = decode_audio(cut)
    assert len(decoded.samples) / SAMPLE_RATE == pytest.approx(3.0, abs=0.05)
    (warning,) = decoded.warnings
    assert warning.code == "truncated_audio" and "6.00 s" in warning.message and "3.00 s" in warning.message
    assert decode_audio(whole).warnings == ()
    np.testing.assert_array_equal(load_audio(cut), decoded.samples)


@pytest.fixture
def shared_rows_transcriber(model_cache_dir):
    """The real tiny.en model with run-job's settings (share_rows on); needs torch, so the floors
    step (.ci/floors_plugin.py) leaves out the tests that request it."""
    from batch_job.settings import Settings
    from batch_job.transcribe import Transcriber

    return Transcriber.load(Settings.for_batch_job({}, model="tiny.en", cache_dir=str(model_cache_dir)))


def test_a_pack_with_shared_encoder_rows_keeps_each_objects_text_with_it(aws, settings, shared_rows_transcriber):
    """run-job's default (Settings.for_batch_job: share_rows on): short objects of one pack share
    encoder rows, and every marker still holds its own object's words and nobody else's."""
    shared = shared_rows_transcriber
    assert shared.settings.share_rows and shared.shares_rows(shared.options())
    keys = [f"s/{c}" for c in CLIPS]
    for key, clip in zip(keys, CLIPS, strict=True):
        upload(aws, key, shared_clip(clip))
    result, _ = run(aws, keys, settings, transcriber=shared)
    assert result.exit_code == 0 and [r.status for r in result.objects] == ["succeeded"] * 3
    texts = {c: get_json(aws, f"{PREFIX}s/{c}.json")["text"].lower() for c in CLIPS}
    assert "modern" in texts["ljspeech_LJ001-0002.flac"] and "americans" not in texts["ljspeech_LJ001-0002.flac"]
    assert "fellow americans" in texts["jfk.flac"] and "modern" not in texts["jfk.flac"]
    assert "wizard" in texts["librispeech_61-70968-0000.flac"]
    assert "americans" not in texts["librispeech_61-70968-0000.flac"]
