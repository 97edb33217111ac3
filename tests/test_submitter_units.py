"""Submitter pieces without AWS: settings validation, skip rules, job naming and sizing."""

from __future__ import annotations

import dataclasses
import re

import pytest
from test_submitter_support import ENV

from submitter import rules
from submitter.jobs import job_name, submit_job_request
from submitter.objects import ObjectRef, normalize_etag
from submitter.settings import SettingsError, SubmitterSettings

JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def settings(**env) -> SubmitterSettings:
    return SubmitterSettings.from_env({**ENV, **env})


# ---- settings -------------------------------------------------------------------------------------

def test_settings_from_env():
    s = settings()
    assert s.job_queue == "whisper-batch-jobs" and s.long_job_min_bytes == 50 * 1024 * 1024
    assert s.input_prefix == "uploads/" and s.output_prefix == "transcripts/"
    assert s.idempotency_expires_seconds == 7 * 24 * 3600
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.job_queue = "other"  # frozen


def test_settings_error_lists_every_problem():
    with pytest.raises(SettingsError) as err:
        SubmitterSettings.from_env({"JOB_QUEUE": "q", "LONG_JOB_MIN_BYTES": "big", "MAX_OBJECT_BYTES": "-5",
                                    "OUTPUT_PREFIX": "", "INPUT_PREFIX": "/abs/"})
    message = str(err.value)
    for expected in ("JOB_DEFINITION is not set", "JOB_DEFINITION_LONG is not set", "IDEMPOTENCY_TABLE is not set",
                     "LONG_JOB_MIN_BYTES='big' is not an integer", "MAX_OBJECT_BYTES='-5' must be a positive integer",
                     "INPUT_PREFIX='/abs/' must not start with '/'", "OUTPUT_PREFIX must not be empty"):
        assert expected in message, message
    assert message.startswith("invalid submitter configuration (7 problems)")
    assert len(err.value.problems) == 7


def test_settings_reject_input_under_output():
    with pytest.raises(SettingsError, match="lies under OUTPUT_PREFIX"):
        settings(INPUT_PREFIX="transcripts/in/")


def test_input_prefix_defaults_to_whole_bucket_and_overrides_win():
    env = dict(ENV)
    del env["INPUT_PREFIX"]
    assert SubmitterSettings.from_env(env).input_prefix == ""
    assert SubmitterSettings.from_env(env, job_queue="other", max_object_bytes="10").max_object_bytes == 10


def test_importing_the_handler_with_a_bad_environment_fails_at_cold_start(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env.update({"JOB_QUEUE": "q", "POWERTOOLS_TRACE_DISABLED": "1"})
    proc = subprocess.run([sys.executable, "-c", "import submitter.app"], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode != 0
    assert "SettingsError: invalid submitter configuration (6 problems)" in proc.stderr
    assert "JOB_DEFINITION_LONG is not set" in proc.stderr


# ---- rules ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,size,reason", [
    ("uploads/a.wav", 1, None),
    ("uploads/deep/dir/A.FLAC", 1, None),
    ("uploads/x.tar.opus", 1, None),
    ("transcripts/uploads/a.wav.json", 1, rules.UNDER_OUTPUT_PREFIX),
    ("other/a.wav", 1, rules.OUTSIDE_INPUT_PREFIX),
    ("uploads/dir/", 0, rules.FOLDER_PLACEHOLDER),
    ("uploads/.wav", 1, rules.UNSUPPORTED_EXTENSION),
    ("uploads/a.wav.txt", 1, rules.UNSUPPORTED_EXTENSION),
    ("uploads/a.wav", 0, rules.EMPTY_OBJECT),
    ("uploads/a.wav", 2 * 1024**3, None),
    ("uploads/a.wav", 2 * 1024**3 + 1, rules.TOO_LARGE),
])
def test_skip_rules(key, size, reason):
    assert rules.skip_reason(key, size, settings()) == reason


def test_output_prefix_wins_even_when_it_lies_under_the_input_prefix():
    s = settings(INPUT_PREFIX="", OUTPUT_PREFIX="transcripts/")
    assert rules.skip_reason("transcripts/a.wav.json", 5, s) == rules.UNDER_OUTPUT_PREFIX
    assert rules.skip_reason("anything/a.webm", 5, s) is None


def test_supported_extensions_are_the_documented_list():
    assert rules.SUPPORTED_EXTENSIONS == {"wav", "flac", "ogg", "mp3", "m4a", "mp4", "aac", "webm", "opus"}


# ---- job naming / sizing ------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [
    "uploads/meeting notes.wav", "uploads/c++ talk+q&a.mp3", "uploads/100% done.flac",
    "uploads/日本語の会議.m4a", "uploads/Café Müller.ogg", "uploads/-_-.wav", "uploads/" + "x" * 1000 + ".wav",
    "uploads/....wav",
])
def test_job_names_follow_batch_rules(key):
    name = job_name("bucket", key, '"etag"')
    assert JOB_NAME_RE.match(name) and len(name) <= 128, name


def test_job_names_are_readable_and_unique_per_content():
    a = job_name("b", "uploads/Café Müller/Weekly sync 2026-11-22.mp3", "e1")
    assert a.startswith("Weekly_sync_2026-11-22_mp3-")
    assert job_name("b", "uploads/日本語.wav", "e1").startswith("wav-")
    assert a != job_name("b", "uploads/Café Müller/Weekly sync 2026-11-22.mp3", "e2")  # new content
    assert a != job_name("other", "uploads/Café Müller/Weekly sync 2026-11-22.mp3", "e1")  # other bucket
    assert a == job_name("b", "uploads/Café Müller/Weekly sync 2026-11-22.mp3", '"e1"')  # quoting is irrelevant


def test_submit_request_parameters_and_sizing():
    s = settings(LONG_JOB_MIN_BYTES="100")
    small = submit_job_request(ObjectRef("bkt", "uploads/a b;rm -rf $HOME.wav", "e", 99), s)
    big = submit_job_request(ObjectRef("bkt", "uploads/long.wav", "e", 100), s)
    assert small["parameters"] == {"input": "s3://bkt/uploads/a b;rm -rf $HOME.wav", "output": "s3://bkt/transcripts/"}
    assert small["jobDefinition"] == ENV["JOB_DEFINITION"] and big["jobDefinition"] == ENV["JOB_DEFINITION_LONG"]
    assert small["jobQueue"] == ENV["JOB_QUEUE"] and small["propagateTags"] is True
    assert normalize_etag('"abc"') == "abc" and normalize_etag(None) == ""
