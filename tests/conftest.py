"""Shared fixtures: the real speech in ../shared/audio and the packaged Whisper models."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SHARED_AUDIO = Path(os.environ.get("WHISPER_BATCH_SHARED_AUDIO", REPO.parent / "shared" / "audio"))


def shared_clip(name: str) -> Path:
    """Path of a clip in ../shared/audio; skips the test when the folder is absent."""
    path = SHARED_AUDIO / name
    if not path.exists():
        pytest.skip(f"shared audio not available: {path}")
    return path


def truncated_wav(seconds_promised: float = 6.0, keep: float = 0.5) -> bytes:
    """A 16-bit WAV of real speech whose header promises ``seconds_promised`` but holds ``keep`` of it."""
    audio, rate = sf.read(shared_clip("jfk.flac"), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, audio[: int(seconds_promised * rate)], rate, format="WAV", subtype="PCM_16")
    data = buf.getvalue()
    return data[: int(len(data) * keep)]


def reference_text(name: str) -> str:
    """Reference transcript of a shared clip (its sibling .txt)."""
    return shared_clip(name).with_suffix(".txt").read_text(encoding="utf-8").strip()


@pytest.fixture(scope="session")
def shared_manifest() -> list[dict]:
    path = SHARED_AUDIO / "manifest.jsonl"
    if not path.exists():
        pytest.skip("shared audio manifest not available")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    """One converted-model cache for the whole session (conversion runs once)."""
    env = os.environ.get("WHISPER_BATCH_TEST_CACHE")
    if env:
        return Path(env)
    return tmp_path_factory.mktemp("model-cache")


def load_clip(name: str, seconds: float | None = None):
    """A shared clip as 16 kHz mono float32 (through the product's own audio path)."""
    from batch_job.audio import load_audio

    audio = load_audio(shared_clip(name))
    return audio if seconds is None else audio[: int(seconds * 16000)]


@pytest.fixture(scope="session")
def tiny_settings(model_cache_dir):
    from batch_job.settings import Settings

    return Settings(model="tiny.en", cache_dir=str(model_cache_dir), device="cpu", batch_size=4)


@pytest.fixture(scope="session")
def tiny_transcriber(tiny_settings):
    """The default CPU engine (int8 decoder) on the packaged tiny.en weights."""
    from batch_job.transcribe import Transcriber

    return Transcriber.load(tiny_settings)


@pytest.fixture(scope="session")
def tiny_words_transcriber(tiny_settings):
    """The default CPU engine with word timestamps (its step graphs also return the alignment heads' attention)."""
    from batch_job.transcribe import Transcriber

    return Transcriber.load(tiny_settings.replace(word_timestamps=True))


@pytest.fixture(scope="session")
def tiny_engine_fp32(tiny_settings):
    """tiny.en with fp32 graphs everywhere: token-exact against transformers' generate."""
    from batch_job.engine.loading import load_engine

    return load_engine(tiny_settings.replace(quantize_decoder=False, encoder_dtype="float32"))


@pytest.fixture(scope="session")
def tiny_model(tiny_settings):
    """The transformers tiny.en model itself (float32, eager): the reference the engine is held to."""
    from batch_job.engine.models import load_model

    return load_model(tiny_settings.model, cache_dir=tiny_settings.cache_dir).model


@pytest.fixture(scope="session")
def tiny_speakers_transcriber(tiny_words_transcriber):
    """tiny.en with word timestamps and speaker labels (``--diarize``, ``--speakers auto``) at the
    product's default batch size (8: the transcripts, hence the words' times, are those a user gets)."""
    from batch_job.transcribe import Transcriber

    settings = tiny_words_transcriber.settings.replace(diarize=True, batch_size=8)
    return Transcriber.load(settings)
