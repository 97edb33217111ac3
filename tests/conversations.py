"""Conversations of real voices built from ``../shared/audio`` clips, and how labels are scored.

A conversation is a sequence of turns, each one clip (or a slice of one) of one known speaker,
trimmed of its leading and trailing silence and joined with a short pause. What is known about
it (:class:`Turn`: who spoke when, and the words said) is the reference the speaker labels of a
transcript are scored against, by :func:`score`:

* **attributed speech**: the share of reference speech time (10 ms frames inside turns) whose
  hypothesis label, mapped to reference speakers one-to-one by the assignment that maximises
  agreement (Hungarian, :func:`scipy.optimize.linear_sum_assignment`), is the turn's speaker. A
  frame no labelled word covers takes the label of the nearest word (within the pause between
  turns), so timing gaps between words are not counted as errors; a frame with no word within
  ``max_fill_s`` counts as missed.
* **DER** (diarization error rate, NIST's definition without overlap, since turns never overlap):
  (missed + false alarm + confusion) / reference speech, over frames outside a ``collar`` around
  each reference turn boundary (0.25 s, as NIST and pyannote.metrics use), hypothesis speech
  being the span of each labelled word. pyannote.metrics computes the same from
  ``Annotation``s; it is not used so that tests need no pandas/matplotlib stack.
* **attributed words**: the share of hypothesis words whose mapped label is the speaker of the
  turn their midpoint falls in (or the nearest turn).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from batch_job.audio import SAMPLE_RATE, load_audio
from batch_job.result import Transcript

AUDIO = Path(os.environ.get("WHISPER_BATCH_SHARED_AUDIO", Path(__file__).resolve().parents[1].parent / "shared" / "audio"))
FRAME_S = 0.01
PAUSE_S = 0.6
"""Silence between turns: a short conversational pause."""

SPEAKERS: dict[str, tuple[str, ...]] = {
    "lj": tuple(f"ljspeech_LJ001-{i:04d}.flac" for i in range(1, 33)),
    "spk1": tuple(f"speechbrain_spk1_snt{i}.wav" for i in range(1, 6)),
    "spk2": tuple(f"speechbrain_spk2_snt{i}.wav" for i in range(1, 6)),
    "austen": tuple(f"librivox_sense_and_sensibility_01_austen_64kb-{n:04d}.wav" for n in (870, 880, 890, 920, 930)),
    "jfk": ("jfk.flac",),
    "ls2412": ("librispeech_2412-153948-0000.flac",),
    "ls1995": ("librispeech_1995-1837-0001.wav",),
}
"""Clips by speaker: LJ Speech is one reader, the speechbrain samples two, the LibriVox chapter one."""


@dataclass(frozen=True)
class Turn:
    """One speaker's turn in the conversation: seconds on its timeline and the reference words."""

    speaker: str
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Conversation:
    """16 kHz mono audio and its reference turns."""

    name: str
    audio: np.ndarray
    turns: tuple[Turn, ...]

    @property
    def speakers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.speaker for t in self.turns))

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass(frozen=True)
class Score:
    """How well a labelled transcript matches its conversation (see the module docstring)."""

    speakers_found: int
    speakers_true: int
    attributed_speech: float
    der: float
    attributed_words: float


def _clip_path(name: str) -> Path:
    """A clip of the shared audio; under pytest a missing folder skips the test (as conftest's
    ``shared_clip`` does), elsewhere it is a FileNotFoundError that names the folder."""
    path = AUDIO / name
    if not path.is_file():
        if "pytest" in sys.modules:
            import pytest

            pytest.skip(f"shared audio not available: {path}")
        raise FileNotFoundError(f"shared audio not available: {path} (set WHISPER_BATCH_SHARED_AUDIO)")
    return path


def build(name: str, turns: Sequence[tuple[str, int]], *, pause_s: float = PAUSE_S) -> Conversation:
    """A conversation of ``turns``: ``(speaker, clip index in SPEAKERS[speaker])`` each."""
    pause = np.zeros(int(pause_s * SAMPLE_RATE), np.float32)
    pieces: list[np.ndarray] = []
    out: list[Turn] = []
    at = 0
    for speaker, index in turns:
        clip = SPEAKERS[speaker][index]
        audio = _trim(load_audio(_clip_path(clip)))
        if pieces:
            pieces.append(pause)
            at += len(pause)
        text = (AUDIO / clip).with_suffix(".txt").read_text(encoding="utf-8").strip()
        out.append(Turn(speaker, at / SAMPLE_RATE, (at + len(audio)) / SAMPLE_RATE, text))
        pieces.append(audio)
        at += len(audio)
    return Conversation(name, np.concatenate(pieces), tuple(out))


def alternating(name: str, speakers: Sequence[str], turns: int, *, per_turn: int = 1) -> Conversation:
    """``turns`` turns cycling through ``speakers``, each taking its next ``per_turn`` clips."""
    used = dict.fromkeys(speakers, 0)
    plan: list[tuple[str, int]] = []
    for i in range(turns):
        speaker = speakers[i % len(speakers)]
        for _ in range(per_turn):
            plan.append((speaker, used[speaker] % len(SPEAKERS[speaker])))
            used[speaker] += 1
    conv = build(name, plan)
    return _merge_same_speaker(conv)


def standard_set() -> list[Conversation]:
    """The conversations of the speaker tests and benchmark: 1 to 4 speakers, short and long turns."""
    return [
        alternating("1 speaker (LJ, 6 clips)", ["lj"], 6),
        alternating("1 speaker (LibriVox, 5 clips)", ["austen"], 5),
        alternating("2 speakers, short turns", ["spk1", "spk2"], 10),
        alternating("2 speakers, long turns", ["lj", "austen"], 6, per_turn=2),
        alternating("3 speakers, short turns", ["spk1", "lj", "spk2"], 9),
        alternating("3 speakers, long turns", ["lj", "austen", "spk1"], 6, per_turn=2),
        build("3 speakers, uneven", [("jfk", 0), ("lj", 0), ("jfk", 0), ("spk2", 0), ("lj", 1), ("spk2", 1)]),
        alternating("4 speakers", ["lj", "spk1", "austen", "spk2"], 8),
    ]


def score(conv: Conversation, transcript: Transcript, *, collar: float = 0.25, max_fill_s: float = 1.0) -> Score:
    """Score the speaker labels of ``transcript`` (words with ``speaker``) against ``conv``."""
    n = int(np.ceil(conv.duration / FRAME_S))
    ref_names = list(conv.speakers)
    ref = np.full(n, -1)
    for t in conv.turns:
        ref[_frame(t.start) : _frame(t.end)] = ref_names.index(t.speaker)
    words = [w for s in transcript.segments for w in s.words if w.speaker is not None]
    hyp_names = list(dict.fromkeys(w.speaker for w in words))
    hyp = np.full(n, -1)
    for w in words:
        hyp[_frame(w.start) : max(_frame(w.end), _frame(w.start) + 1)] = hyp_names.index(w.speaker)
    mapping = _best_mapping(ref, hyp, len(ref_names), len(hyp_names))
    mapped = np.array([mapping.get(h, -2) if h >= 0 else -1 for h in hyp])

    filled = _fill_nearest(mapped, int(max_fill_s / FRAME_S))
    speech = ref >= 0
    attributed = float(np.mean(filled[speech] == ref[speech])) if speech.any() else 1.0

    scored = ~_collar_mask(conv, n, collar)
    ref_s, hyp_s = speech & scored, (mapped != -1) & scored
    missed = np.sum(ref_s & ~hyp_s)
    false_alarm = np.sum(hyp_s & ~ref_s)
    confusion = np.sum(ref_s & hyp_s & (mapped != ref))
    der = float((missed + false_alarm + confusion) / max(1, ref_s.sum()))

    right = 0
    for w in words:
        mid = (w.start + w.end) / 2
        turn = min(conv.turns, key=lambda t: 0.0 if t.start <= mid <= t.end else min(abs(mid - t.start), abs(mid - t.end)))
        right += mapping.get(hyp_names.index(w.speaker), -2) == ref_names.index(turn.speaker)
    return Score(len(hyp_names), len(ref_names), attributed, der, right / len(words) if words else 0.0)


def _frame(seconds: float) -> int:
    return int(round(seconds / FRAME_S))


def _trim(audio: np.ndarray, *, below_peak_db: float = 40.0) -> np.ndarray:
    """``audio`` without its leading and trailing frames quieter than ``below_peak_db`` under the loudest."""
    hop = int(FRAME_S * SAMPLE_RATE)
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
    db = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-10)
    loud = np.flatnonzero(db > db.max() - below_peak_db)
    return audio[loud[0] * hop : (loud[-1] + 1) * hop] if len(loud) else audio


def _merge_same_speaker(conv: Conversation) -> Conversation:
    """Consecutive turns of one speaker as one turn (spanning the pause between them)."""
    merged: list[Turn] = []
    for t in conv.turns:
        if merged and merged[-1].speaker == t.speaker:
            last = merged.pop()
            t = Turn(t.speaker, last.start, t.end, f"{last.text} {t.text}")
        merged.append(t)
    return Conversation(conv.name, conv.audio, tuple(merged))


def _best_mapping(ref: np.ndarray, hyp: np.ndarray, n_ref: int, n_hyp: int) -> dict[int, int]:
    """Hypothesis label -> reference speaker, one-to-one, maximising frames that agree."""
    if n_hyp == 0:
        return {}
    both = (ref >= 0) & (hyp >= 0)
    overlap = np.zeros((n_hyp, n_ref))
    np.add.at(overlap, (hyp[both], ref[both]), 1)
    rows, cols = linear_sum_assignment(-overlap)
    return {int(r): int(c) for r, c in zip(rows, cols)}


def _fill_nearest(labels: np.ndarray, reach: int) -> np.ndarray:
    """``labels`` with each unlabelled frame (-1) given the nearest labelled frame's label within ``reach``."""
    known = np.flatnonzero(labels != -1)
    if not len(known):
        return labels
    idx = np.arange(len(labels))
    pos = np.clip(np.searchsorted(known, idx), 1, len(known) - 1) if len(known) > 1 else np.zeros_like(idx)
    if len(known) > 1:
        left, right = known[pos - 1], known[pos]
        nearest = np.where(np.abs(idx - left) <= np.abs(right - idx), left, right)
    else:
        nearest = np.full_like(idx, known[0])
    out = labels.copy()
    gap = (labels == -1) & (np.abs(nearest - idx) <= reach)
    out[gap] = labels[nearest[gap]]
    return out


def _collar_mask(conv: Conversation, n: int, collar: float) -> np.ndarray:
    """Frames within ``collar`` seconds of a reference turn boundary (not scored by DER)."""
    mask = np.zeros(n, bool)
    width = _frame(collar)
    for t in conv.turns:
        for edge in (_frame(t.start), _frame(t.end)):
            mask[max(0, edge - width) : edge + width] = True
    return mask
