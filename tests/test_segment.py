"""batch_job.segment: windows ≤ 30 s at pauses, checked against Silero VAD as an oracle."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import shared_clip
from faster_whisper.vad import VadOptions, get_speech_timestamps

from batch_job.audio import SAMPLE_RATE, load_audio
from batch_job.segment import Window, frame_energy_db, speech_extent, split_at_pauses

SR = SAMPLE_RATE
LONG_SILENCE_S = 5.0


@dataclass
class LongAudio:
    audio: np.ndarray
    silences: list[tuple[int, int]]  # inserted 5 s silences, samples
    speech: np.ndarray  # bool per sample: Silero-detected speech


def _silero_mask(audio: np.ndarray) -> np.ndarray:
    stamps = get_speech_timestamps(audio, VadOptions(min_silence_duration_ms=100, speech_pad_ms=0))
    mask = np.zeros(len(audio), dtype=bool)
    for s in stamps:
        mask[s["start"] : s["end"]] = True
    return mask


def _covered(windows: list[Window], n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for w in windows:
        mask[w.start : w.end] = True
    return mask


@pytest.fixture(scope="module")
def long_audio(shared_manifest: list[dict]) -> LongAudio:
    """All shared clips (~14 min) joined with 0.1–0.6 s gaps, and a 5 s silence after every 6th clip."""
    rng = np.random.default_rng(0)
    parts: list[np.ndarray] = []
    silences: list[tuple[int, int]] = []
    pos = 0
    for i, item in enumerate(shared_manifest):
        clip = load_audio(shared_clip(item["audio"]))
        gap = np.zeros(int(rng.uniform(0.1, 0.6) * SR), dtype=np.float32)
        parts += [clip, gap]
        pos += len(clip) + len(gap)
        if i % 6 == 5:
            parts.append(np.zeros(int(LONG_SILENCE_S * SR), dtype=np.float32))
            silences.append((pos, pos + int(LONG_SILENCE_S * SR)))
            pos += int(LONG_SILENCE_S * SR)
    audio = np.concatenate(parts)
    return LongAudio(audio, silences, _silero_mask(audio))


@pytest.fixture(scope="module")
def long_windows(long_audio: LongAudio) -> list[Window]:
    return split_at_pauses(long_audio.audio)


def _check_structure(windows: list[Window], n: int, max_seconds: float = 30.0) -> None:
    assert windows, "expected windows"
    for w in windows:
        assert 0 <= w.start < w.end <= n
        assert w.end - w.start <= int(max_seconds * SR)
    for a, b in zip(windows, windows[1:]):
        assert a.end <= b.start, "windows must be sorted and non-overlapping"


def test_long_audio_structure(long_audio: LongAudio, long_windows: list[Window]) -> None:
    _check_structure(long_windows, len(long_audio.audio))
    # few, long windows: compute is per window, so windows should be well filled
    assert len(long_windows) < 1.6 * len(long_audio.audio) / SR / 30


def test_silero_speech_is_inside_windows(long_audio: LongAudio, long_windows: list[Window]) -> None:
    speech = long_audio.speech
    inside = (speech & _covered(long_windows, len(speech))).sum() / speech.sum()
    assert inside >= 0.98, f"only {inside:.4f} of the Silero speech samples are windowed"


def test_long_silences_are_not_windowed(long_audio: LongAudio, long_windows: list[Window]) -> None:
    covered = _covered(long_windows, len(long_audio.audio))
    margin = int(0.5 * SR)  # padding and the clips' own edges
    for a, b in long_audio.silences:
        assert not covered[a + margin : b - margin].any(), f"silence at {a / SR:.1f}s is windowed"


def test_windows_do_not_start_or_end_far_from_speech(long_audio: LongAudio, long_windows: list[Window]) -> None:
    """Windows hold speech, not long stretches of silence.

    Not every window: Silero misses the whispered / falsetto clips in the shared set (mfa_*),
    which the energy detector rightly keeps.
    """
    with_speech = [w for w in long_windows if long_audio.speech[w.start : w.end].mean() > 0.1]
    assert len(with_speech) >= 0.9 * len(long_windows)
    windowed = _covered(long_windows, len(long_audio.audio)).sum()
    assert windowed <= 1.5 * long_audio.speech.sum()


def _cuts(windows: list[Window]) -> list[int]:
    """Samples where a stretch of audio was cut between two adjoining windows."""
    return [a.end for a, b in zip(windows, windows[1:]) if a.end == b.start]


@pytest.fixture(scope="module")
def continuous(long_audio: LongAudio, shared_manifest: list[dict]) -> tuple[np.ndarray, list[Window], np.ndarray]:
    """~4 min of clips with only 0.1 s gaps: no silence long enough to skip, so windows must be cut."""
    clips = [load_audio(shared_clip(m["audio"])) for m in shared_manifest[:30]]
    gap = np.zeros(SR // 10, dtype=np.float32)
    audio = np.concatenate([x for c in clips for x in (c, gap)])
    return audio, split_at_pauses(audio), _silero_mask(audio)


def test_continuous_speech_is_cut_at_low_energy(continuous) -> None:
    audio, windows, speech = continuous
    _check_structure(windows, len(audio))
    cuts = _cuts(windows)
    assert len(cuts) >= len(audio) / SR / 30
    db = frame_energy_db(audio, 160)
    for cut in cuts:
        f = cut // 160
        around = float(db[max(0, f - 2) : f + 2].mean())
        assert (db < around).mean() < 0.15, f"cut at {cut / SR:.2f}s is not in a quiet frame"
    in_speech = sum(bool(speech[c]) for c in cuts)
    assert in_speech <= 0.25 * len(cuts), f"{in_speech}/{len(cuts)} cuts inside Silero speech"
    inside = (speech & _covered(windows, len(audio))).sum() / speech.sum()
    assert inside >= 0.98


def test_no_pauses_at_all_still_respects_max(jfk16: np.ndarray) -> None:
    """Loud modulated tone with no pause: fallback cuts at the quietest frame, never > 30 s."""
    t = np.arange(100 * SR) / SR
    audio = (0.3 * (1.2 + np.sin(2 * np.pi * 0.37 * t)) * np.sin(2 * np.pi * 220 * t) / 2.2).astype(np.float32)
    windows = split_at_pauses(audio)
    _check_structure(windows, len(audio))
    assert windows[0].start == 0 and windows[-1].end == len(audio)
    assert all(a.end == b.start for a, b in zip(windows, windows[1:]))


@pytest.fixture(scope="module")
def jfk16() -> np.ndarray:
    return load_audio(shared_clip("jfk.flac"))


def test_timeline_is_kept(jfk16: np.ndarray) -> None:
    lead = 10 * SR
    audio = np.concatenate([np.zeros(lead, dtype=np.float32), jfk16, np.zeros(3 * SR, dtype=np.float32)])
    windows = split_at_pauses(audio)
    speech = _silero_mask(audio)
    first = int(np.flatnonzero(speech)[0])
    assert len(windows) >= 1
    assert lead - 0.3 * SR < windows[0].start <= first  # pad before the first sound
    assert windows[0].start_s == windows[0].start / SR
    assert windows[-1].end <= lead + len(jfk16) + SR
    assert windows[0].duration_s == pytest.approx(windows[0].end_s - windows[0].start_s)
    assert np.array_equal(windows[0].slice(audio), audio[windows[0].start : windows[0].end])


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: np.zeros(60 * SR, dtype=np.float32),
        lambda rng: rng.normal(0, 0.01, 60 * SR).astype(np.float32),  # stationary noise floor
        lambda rng: rng.normal(0, 1e-5, 60 * SR).astype(np.float32),  # dither
        lambda rng: np.zeros(0, dtype=np.float32),
        lambda rng: np.zeros(10, dtype=np.float32),
    ],
    ids=["silence", "noise", "dither", "empty", "tiny"],
)
def test_no_windows_without_speech(make) -> None:
    assert split_at_pauses(make(np.random.default_rng(0))) == []


def test_too_short_to_hold_speech(jfk16: np.ndarray) -> None:
    assert split_at_pauses(jfk16[SR : SR + 800]) == []  # 50 ms


def test_click_in_silence_is_ignored() -> None:
    audio = np.zeros(20 * SR, dtype=np.float32)
    audio[5 * SR : 5 * SR + 40] = 0.8
    assert split_at_pauses(audio) == []


def test_speech_in_noise(jfk16: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    audio = np.concatenate([np.zeros(5 * SR, np.float32), jfk16, np.zeros(5 * SR, np.float32), jfk16])
    audio = audio + rng.normal(0, 0.005, len(audio)).astype(np.float32)
    windows = split_at_pauses(audio)
    speech = _silero_mask(audio)
    assert (speech & _covered(windows, len(audio))).sum() / speech.sum() >= 0.98
    assert not _covered(windows, len(audio))[: 4 * SR].any()


def test_window_equality_ignores_sample_rate() -> None:
    assert Window(0, 16000) == Window(0, 16000, sample_rate=8000)
    assert Window(16000, 48000).duration_s == 2.0


def test_one_hour_is_fast(long_audio: LongAudio) -> None:
    reps = int(np.ceil(3600 * SR / len(long_audio.audio)))
    hour = np.tile(long_audio.audio, reps)[: 3600 * SR]
    t0 = time.perf_counter()
    windows = split_at_pauses(hour)
    elapsed = time.perf_counter() - t0
    _check_structure(windows, len(hour))
    assert elapsed < 2.0, f"1 h took {elapsed:.2f} s"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        split_at_pauses(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(ValueError):
        split_at_pauses(np.zeros(100, dtype=np.float32), max_seconds=20, target_seconds=25)


def test_speech_extent_finds_where_the_speech_of_a_window_begins_and_ends(jfk16: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    lead, trail = int(1.5 * SR), int(0.7 * SR)
    audio = np.concatenate([np.zeros(lead, np.float32), jfk16, np.zeros(trail, np.float32)])
    audio = audio + rng.normal(0, 0.002, len(audio)).astype(np.float32)
    first, end = speech_extent(audio)
    speech = np.flatnonzero(_silero_mask(audio))
    assert abs(first - speech[0]) < 0.3 * SR and abs(end - speech[-1]) < 0.5 * SR
    assert lead - 0.02 * SR <= first and end <= lead + len(jfk16) + 0.02 * SR
    assert speech_extent(np.zeros(SR, np.float32)) == (0, SR)  # nothing active: nothing to trim
