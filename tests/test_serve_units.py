"""The server's parts without a model: the request contract and the request scheduler."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from batch_job.engine.decoding import DecodingOptions, DecodingResult
from batch_job.errors import ConfigError, UnsupportedFormatError
from batch_job.result import FileResult, Transcript
from batch_job.serve.contract import (
    InvocationParams,
    NotAcceptableError,
    audio_suffix,
    parse_params,
    response_formats,
    status_for,
)
from batch_job.serve.scheduler import QueueFullError, RequestScheduler, SchedulerClosedError

SR = 16000


# ---------------------------------------------------------------------------- contract
def test_parameters_from_custom_attributes_and_query_the_query_wins():
    p = parse_params({"task": "translate"}, "language=DE;task=transcribe;formats=json,srt;word_timestamps=true")
    assert p == InvocationParams(language="de", task="translate", word_timestamps=True, formats=("json", "srt"))
    # comma-separated attributes: a token without '=' continues the list before it
    assert parse_params({}, "formats=srt,vtt,language=fr").formats == ("srt", "vtt")
    assert parse_params({}, "formats=srt,vtt,language=fr").language == "fr"
    assert parse_params({}, None) == InvocationParams()


@pytest.mark.parametrize("query, attributes, needle", [
    ({"speed": "fast"}, None, "unknown parameter(s) speed"),
    ({}, "task=summarize", "task must be"),
    ({"word_timestamps": "maybe"}, None, "word_timestamps must be true or false"),
    ({"formats": "json,docx"}, None, "unknown format(s) docx"),
    ({"language": "english please"}, None, "language must be a code"),
    ({}, "justtext", "is not key=value"),
])
def test_bad_parameters_are_config_errors_that_name_the_problem(query, attributes, needle):
    with pytest.raises(ConfigError) as err:
        parse_params(query, attributes)
    assert needle in str(err.value)
    assert status_for(err.value.reason) == 400


@pytest.mark.parametrize("accept, expected", [
    (None, "json"), ("", "json"), ("*/*", "json"), ("text/vtt", "vtt"), ("application/x-subrip", "srt"),
    ("text/plain", "txt"), ("text/*", "txt"), ("text/vtt;q=0.5, text/plain;q=0.9", "txt"),
    ("image/png, application/json;q=0.1", "json"), ("text/vtt;q=0, text/plain", "txt"),
])
def test_accept_picks_the_best_supported_type(accept, expected):
    assert response_formats(accept, InvocationParams()) == (expected,)


def test_formats_parameter_overrides_accept_and_nothing_acceptable_is_406():
    assert response_formats("text/vtt", InvocationParams(formats=("srt",))) == ("srt",)
    with pytest.raises(NotAcceptableError) as err:
        response_formats("image/png, application/pdf", InvocationParams())
    assert status_for(err.value.reason) == 406


def test_content_types():
    assert audio_suffix("audio/flac") == ".flac"
    assert audio_suffix("audio/mpeg; charset=binary") == ".mp3"
    assert audio_suffix("audio/x-something-new") == ""  # sniffed from the bytes
    assert audio_suffix("application/octet-stream") == ""
    with pytest.raises(UnsupportedFormatError) as err:
        audio_suffix("application/json")
    assert status_for(err.value.reason) == 415


# ---------------------------------------------------------------------------- scheduler
def _speech(seconds: float) -> np.ndarray:
    """Noise swelling 3 times a second: the segmenter hears speech with no pause (a window per <= 30 s)."""
    t = np.arange(int(seconds * SR)) / SR
    swell = 0.55 + 0.45 * np.sin(2 * np.pi * 3 * t)
    return (np.random.default_rng(0).standard_normal(len(t)) * 0.3 * swell).astype(np.float32)


class _FakeTranscriber:
    """A WindowHandler that 'decodes' instantly and records every batch it was given."""

    def __init__(self, batch_size: int = 4, fail_when=None) -> None:
        self.batch_size = batch_size
        self.batches: list[list[str]] = []
        self.fail_when = fail_when or (lambda names: False)
        self.gate = threading.Event()
        self.gate.set()

    def decode_windows(self, tasks, files, options):
        self.gate.wait(10)
        names = [files[t.file].name for t in tasks]
        self.batches.append(names)
        if self.fail_when(names):
            raise RuntimeError("device fell over")
        return [(DecodingResult((), "en", 0.0, 0.0, 0.0, False),) for _ in tasks]

    def accept_window(self, task, result, state):
        return ()

    def finish_file(self, state):
        return FileResult(state.name, Transcript(text=state.name, language="en", duration=len(state.audio) / SR,
                                                 segments=(), model="fake"), None)


def _run(scheduler, requests):
    futures = {key: scheduler.submit(key, audio, DecodingOptions()) for key, audio in requests}
    return {key: f.result(timeout=10) for key, f in futures.items()}


def test_requests_that_arrive_together_share_batches():
    fake = _FakeTranscriber(batch_size=4)
    scheduler = RequestScheduler(fake, max_queue=8, gather_seconds=0.5)
    fake.gate.clear()  # hold the engine until all three are in
    scheduler.start()
    futures = [scheduler.submit(f"r{i}", _speech(5), DecodingOptions()) for i in range(3)]
    fake.gate.set()
    outcomes = [f.result(timeout=10) for f in futures]
    scheduler.close(5)
    assert fake.batches == [["r0", "r1", "r2"]]
    assert all(o.batches == 1 and o.shared_with == 2 and o.batch_fill == 0.75 for o in outcomes)
    assert scheduler.stats().mean_fill == 0.75


def test_a_long_request_does_not_starve_a_short_one_that_came_after_it():
    fake = _FakeTranscriber(batch_size=2)
    scheduler = RequestScheduler(fake, max_queue=8, gather_seconds=0)
    fake.gate.clear()
    scheduler.start()
    long = scheduler.submit("long", _speech(170), DecodingOptions())  # 6 windows
    time.sleep(0.2)  # the engine is busy with the long one's first batch when the short one comes
    short = scheduler.submit("short", _speech(4), DecodingOptions())
    fake.gate.set()
    assert short.result(timeout=10).batches == 1
    assert long.result(timeout=10).batches >= 3
    scheduler.close(5)
    first_with_short = next(i for i, names in enumerate(fake.batches) if "short" in names)
    assert first_with_short == 1  # the very next batch, not after the long file's six windows
    assert fake.batches[1].count("long") == 1


def test_requests_with_other_options_never_share_a_batch():
    fake = _FakeTranscriber(batch_size=4)
    scheduler = RequestScheduler(fake, max_queue=8, gather_seconds=0.3)
    fake.gate.clear()
    scheduler.start()
    a = scheduler.submit("en", _speech(3), DecodingOptions(language="en"))
    b = scheduler.submit("de", _speech(3), DecodingOptions(language="de"))
    fake.gate.set()
    a.result(timeout=10), b.result(timeout=10)
    scheduler.close(5)
    assert sorted(fake.batches) == [["de"], ["en"]]


def test_the_queue_is_bounded_and_says_when_to_retry():
    fake = _FakeTranscriber(batch_size=4)
    scheduler = RequestScheduler(fake, max_queue=2, gather_seconds=0)
    fake.gate.clear()
    scheduler.start()
    held = [scheduler.submit(f"r{i}", _speech(3), DecodingOptions()) for i in range(2)]
    with pytest.raises(QueueFullError) as err:
        scheduler.submit("one-too-many", _speech(3), DecodingOptions())
    assert err.value.retry_after >= 1 and status_for(err.value.reason) == 503
    fake.gate.set()
    [f.result(timeout=10) for f in held]
    assert scheduler.submit("after", _speech(3), DecodingOptions()).result(timeout=10).result.error is None
    scheduler.close(5)


def test_a_failing_batch_fails_only_its_requests_and_the_server_goes_on():
    fake = _FakeTranscriber(batch_size=2, fail_when=lambda names: "poison" in names)
    scheduler = RequestScheduler(fake, max_queue=8, gather_seconds=0.3)
    fake.gate.clear()
    scheduler.start()
    bad = scheduler.submit("poison", _speech(3), DecodingOptions())
    fake.gate.set()
    assert isinstance(bad.result(timeout=10).result.error, RuntimeError)
    after = _run(scheduler, [("fine", _speech(3))])
    assert after["fine"].result.error is None and after["fine"].result.transcript.text == "fine"
    scheduler.close(5)


def test_silence_is_answered_without_a_batch():
    fake = _FakeTranscriber()
    scheduler = RequestScheduler(fake, gather_seconds=0)
    scheduler.start()
    outcome = _run(scheduler, [("quiet", np.zeros(3 * SR, np.float32))])["quiet"]
    scheduler.close(5)
    assert outcome.batches == 0 and outcome.result.transcript.text == "quiet" and fake.batches == []


def test_close_finishes_admitted_requests_then_refuses_new_ones():
    fake = _FakeTranscriber(batch_size=1)
    scheduler = RequestScheduler(fake, gather_seconds=0)
    fake.gate.clear()
    scheduler.start()
    pending = [scheduler.submit(f"r{i}", _speech(3), DecodingOptions()) for i in range(3)]
    closer = threading.Thread(target=scheduler.close, args=(10,))
    closer.start()
    time.sleep(0.1)
    with pytest.raises(SchedulerClosedError):
        scheduler.submit("late", _speech(3), DecodingOptions())
    fake.gate.set()
    closer.join(10)
    assert [f.result(timeout=1).result.error for f in pending] == [None, None, None]
    assert not closer.is_alive()
