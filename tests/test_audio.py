"""batch_job.audio: every kind of input gives a correct array or a specific error, never a crash/hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import REPO, shared_clip

from batch_job.audio import SAMPLE_RATE, load_audio
from batch_job.errors import (
    AudioError,
    CorruptAudioError,
    EmptyAudioError,
    TooLongError,
    UnsupportedFormatError,
)


@pytest.fixture(scope="module")
def jfk16() -> np.ndarray:
    """jfk.flac (44.1 kHz stereo FLAC) decoded to 16 kHz mono."""
    return load_audio(shared_clip("jfk.flac"))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def _load_quickly(path: Path, **kwargs) -> np.ndarray:
    """load_audio, asserting it returns (or raises) within a few seconds: no hangs."""
    t0 = time.monotonic()
    try:
        return load_audio(path, **kwargs)
    finally:
        assert time.monotonic() - t0 < 10, f"load_audio({path.name}) took too long"


# --------------------------------------------------------------------------- good inputs


@pytest.mark.parametrize(
    "name",
    ["jfk.flac", "aishell_BAC009S0724W0121.wav", "librivox_sonnet001_en.mp3", "librispeech_61-70968-0000.flac"],
)
def test_real_clips_decode_to_16k_mono_float32(name: str, shared_manifest: list[dict]) -> None:
    audio = load_audio(shared_clip(name))
    seconds = next(m["seconds"] for m in shared_manifest if m["audio"] == name)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / SAMPLE_RATE - seconds) < 0.1
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert 0.01 < float(np.sqrt(np.mean(audio**2))) < 0.5  # real speech level, not silence or garbage


@pytest.mark.parametrize("rate,fmt", [(8000, "WAV"), (48000, "FLAC"), (22050, "OGG"), (44100, "WAV")])
def test_other_sample_rates_resample_faithfully(tmp_path: Path, jfk16: np.ndarray, rate: int, fmt: str) -> None:
    src = soxr.resample(jfk16, SAMPLE_RATE, rate)
    path = tmp_path / f"jfk_{rate}.{fmt.lower()}"
    sf.write(path, src, rate, format=fmt)
    audio = load_audio(path)
    assert abs(len(audio) - len(jfk16)) <= SAMPLE_RATE // 100
    # 8 kHz loses the 4-8 kHz band; everything else should be near-identical
    assert _corr(audio, jfk16) > (0.95 if rate == 8000 else 0.99)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_S8"])
def test_8bit_audio(tmp_path: Path, jfk16: np.ndarray, subtype: str) -> None:
    fmt = "WAV" if subtype == "PCM_U8" else "AIFF"  # WAV's 8-bit is unsigned, AIFF's signed
    path = tmp_path / f"jfk8.{fmt.lower()}"
    sf.write(path, jfk16, SAMPLE_RATE, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert len(audio) == len(jfk16)
    assert abs(float(audio.mean())) < 0.01  # unsigned 8-bit centred, not offset by +0.5
    assert _corr(audio, jfk16) > 0.95


def test_6_channel_is_downmixed_by_mean(tmp_path: Path, jfk16: np.ndarray) -> None:
    weights = np.array([1.0, 0.5, 0.0, 0.25, 0.75, 0.5], dtype=np.float32)
    multi = jfk16[:, None] * weights[None, :] * 0.9
    path = tmp_path / "six.wav"
    sf.write(path, multi, 48000, subtype="FLOAT")  # 48 kHz label: resampled too
    audio = load_audio(path)
    expected = soxr.resample(jfk16 * float(weights.mean()) * 0.9, 48000, SAMPLE_RATE)
    assert abs(len(audio) - len(expected)) <= 16
    assert _corr(audio, expected) > 0.999
    assert np.sqrt(np.mean(audio**2)) == pytest.approx(np.sqrt(np.mean(expected**2)), rel=0.02)


def test_silence_only_decodes_to_zeros(tmp_path: Path) -> None:
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(3 * 44100, dtype=np.int16), 44100)
    audio = load_audio(path)
    assert len(audio) == 3 * SAMPLE_RATE and not audio.any()


def test_50ms_clip(tmp_path: Path, jfk16: np.ndarray) -> None:
    path = tmp_path / "short.flac"
    sf.write(path, jfk16[16000:16800], SAMPLE_RATE)
    audio = load_audio(path)
    assert len(audio) == 800 and np.allclose(audio, jfk16[16000:16800], atol=1e-4)


def test_float_wav_with_nan_and_overs_is_sanitised(tmp_path: Path) -> None:
    x = np.zeros(1600, dtype=np.float32)
    x[:4] = [np.nan, np.inf, -np.inf, 3.0]
    path = tmp_path / "bad_floats.wav"
    sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    audio = load_audio(path)
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["empty.wav", "empty.mp3", "empty.flac", "empty.m4a"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(EmptyAudioError, match=name):
        _load_quickly(path)


def test_header_only_wav(tmp_path: Path) -> None:
    path = tmp_path / "header_only.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    assert path.stat().st_size == 44
    with pytest.raises(EmptyAudioError, match="header_only.wav"):
        _load_quickly(path)


@pytest.mark.parametrize("name,keep", [("jfk.flac", 0.5), ("librivox_sonnet001_en.mp3", 0.5), ("aishell_BAC009S0724W0121.wav", 0.5)])
def test_truncated_file_decodes_what_is_there(tmp_path: Path, name: str, keep: float) -> None:
    data = shared_clip(name).read_bytes()
    full = load_audio(shared_clip(name))
    path = tmp_path / f"truncated_{name}"
    path.write_bytes(data[: int(len(data) * keep)])
    audio = _load_quickly(path)
    assert 0.3 * len(full) < len(audio) < 0.7 * len(full)
    assert _corr(audio[: len(audio) // 2], full[: len(audio) // 2]) > 0.99  # the same audio, in place


@pytest.mark.parametrize("name,nbytes", [("jfk.flac", 20), ("aishell_BAC009S0724W0121.wav", 30)])
def test_truncated_inside_header(tmp_path: Path, name: str, nbytes: int) -> None:
    path = tmp_path / f"stub_{name}"
    path.write_bytes(shared_clip(name).read_bytes()[:nbytes])
    with pytest.raises((CorruptAudioError, EmptyAudioError), match=path.name):
        _load_quickly(path)


@pytest.mark.parametrize("name", ["random.mp3", "random.wav", "random.flac", "random.ogg", "random.bin", "random"])
def test_random_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(7).bytes(200_000))
    with pytest.raises((CorruptAudioError, UnsupportedFormatError), match=name) as info:
        _load_quickly(path)
    assert "\n" not in str(info.value)


def test_text_file_named_mp3(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp3"
    path.write_text("This is not audio, it is a shopping list.\n" * 200, encoding="utf-8")
    with pytest.raises((CorruptAudioError, UnsupportedFormatError), match="notes.mp3"):
        _load_quickly(path)


def test_libsndfile_errors_never_escape(tmp_path: Path) -> None:
    """Whatever goes wrong inside soundfile surfaces as one of our AudioError classes."""
    for i, size in enumerate([1, 4, 12, 45, 1000]):
        path = tmp_path / f"junk{i}.wav"
        path.write_bytes(b"RIFF" + np.random.default_rng(i).bytes(size))
        try:
            _load_quickly(path)
        except AudioError:
            pass


def _no_ffmpeg_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_m4a_without_ffmpeg_is_unsupported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "voice memo.m4a"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom" + b"\x00" * 2000)
    _no_ffmpeg_path(monkeypatch, tmp_path)
    with pytest.raises(UnsupportedFormatError) as info:
        _load_quickly(path)
    msg = str(info.value)
    assert "voice memo.m4a" in msg and ".m4a needs ffmpeg" in msg and "not on PATH" in msg and "\n" not in msg
    assert info.value.reason == "unsupported_format"


def test_mp4_content_with_wrong_extension_without_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "upload.dat"
    path.write_bytes(b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2mp41" + b"\x00" * 2000)
    _no_ffmpeg_path(monkeypatch, tmp_path)
    with pytest.raises(UnsupportedFormatError, match="needs ffmpeg"):
        _load_quickly(path)


# --------------------------------------------------------------------------- limits


def test_too_long_is_checked_from_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the header already says too long")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    with pytest.raises(TooLongError, match="jfk.flac") as info:
        load_audio(shared_clip("jfk.flac"), max_seconds=5.0)
    assert info.value.reason == "too_long"


def test_max_seconds_not_exceeded_is_fine(jfk16: np.ndarray) -> None:
    assert len(load_audio(shared_clip("jfk.flac"), max_seconds=11.0)) == len(jfk16)


def test_missing_file_is_not_an_audio_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "nope.wav")


# --------------------------------------------------------------------------- ffmpeg path (only with ffmpeg)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not on PATH")
def test_m4a_via_ffmpeg(tmp_path: Path, jfk16: np.ndarray) -> None:
    wav = tmp_path / "jfk.wav"
    sf.write(wav, jfk16, SAMPLE_RATE)
    m4a = tmp_path / "jfk.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(wav), "-c:a", "aac", "-b:a", "96k", str(m4a)], check=True)
    audio = load_audio(m4a)
    assert audio.dtype == np.float32 and abs(len(audio) - len(jfk16)) < SAMPLE_RATE // 10
    lag = int(np.argmax(np.correlate(audio[8000:24000], jfk16[8000:16000], mode="valid")))  # AAC priming delay
    assert _corr(audio[lag:], jfk16) > 0.95
    with pytest.raises(TooLongError):
        load_audio(m4a, max_seconds=5.0)
    bad = tmp_path / "bad.m4a"
    bad.write_bytes(np.random.default_rng(3).bytes(50_000))
    with pytest.raises((CorruptAudioError, UnsupportedFormatError), match="bad.m4a"):
        _load_quickly(bad)


# --------------------------------------------------------------------------- memory

_MEMORY_PROBE = r"""
import json, resource, sys
import numpy as np
import psutil
from batch_job.audio import load_audio
def peak_mb():
    # VmHWM: this process image's own peak RSS. (ru_maxrss is not used: Linux carries the
    # parent's high-water mark across fork+exec, so a big pytest parent inflates it.)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
before = psutil.Process().memory_info().rss / 2**20  # current RSS, not the import-time peak
audio = load_audio(sys.argv[1])
print(json.dumps({"before_mb": before, "after_mb": peak_mb(), "samples": len(audio)}))
"""


def _write_long_flac(path: Path, minutes: float, rate: int = 44100, channels: int = 2) -> None:
    """A long speech-like FLAC written block by block (tiled real speech when available)."""
    try:
        speech = sf.read(shared_clip("jfk.flac"), dtype="float32", always_2d=True)[0][:, :1]
    except pytest.skip.Exception:
        speech = (0.3 * np.sin(np.arange(rate * 5) * 0.05)).astype(np.float32)[:, None]
    block = np.repeat(speech, channels, axis=1)
    total = int(minutes * 60 * rate)
    with sf.SoundFile(path, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as out:
        written = 0
        while written < total:
            chunk = block[: total - written]
            out.write(chunk)
            written += len(chunk)


def test_long_file_memory_is_bounded(tmp_path: Path) -> None:
    minutes = 20
    path = tmp_path / "long.flac"
    _write_long_flac(path, minutes)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path)], capture_output=True, text=True, env=env, timeout=300, check=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    out_mb = minutes * 60 * SAMPLE_RATE * 4 / 2**20
    growth = stats["after_mb"] - stats["before_mb"]
    assert abs(stats["samples"] - minutes * 60 * SAMPLE_RATE) < SAMPLE_RATE
    assert growth < 2.0 * out_mb, f"peak RSS grew {growth:.0f} MB for a {out_mb:.0f} MB output"
