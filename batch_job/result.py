"""What a transcription produces: frozen dataclasses shared by the engine, writers and the job.

Speaker labels (``--diarize``, :mod:`batch_job.speakers`) are optional everywhere: ``Word.speaker``
and ``Segment.speaker`` are ``None`` and ``Transcript.speakers`` is ``()`` unless a diarizer set
them. ``to_dict`` writes ``"speaker"`` on a segment or word only when it is set and
``"speakers"`` on the transcript only when it is non-empty, so a transcript without labels
serialises byte-for-byte as it did before labels existed. How the text formats show labels is
described in :mod:`batch_job.writers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Word:
    """One word of a segment with its times (seconds from the start of the FILE).

    ``word`` keeps Whisper's leading space (``" Hello"``), as openai/whisper and faster-whisper
    do; ``probability`` is the mean probability of its tokens. ``speaker`` is the label of who
    said it (``"SPEAKER_00"``) when the transcript was diarized.
    """

    word: str
    start: float
    end: float
    probability: float
    speaker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``speaker`` only when set."""
        d: dict[str, Any] = {"word": self.word, "start": self.start, "end": self.end, "probability": self.probability}
        if self.speaker is not None:
            d["speaker"] = self.speaker
        return d


@dataclass(frozen=True)
class Segment:
    """One timestamped stretch of text. Times are seconds from the start of the FILE.

    ``words`` is empty unless word-level timestamps were computed. ``speaker`` is the label of
    who speaks in it when the transcript was diarized (the diarizer splits a segment where its
    words change speaker, so a labelled segment has one speaker).
    """

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()
    speaker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``speaker`` and ``words`` only when set (the JSON is unchanged without them)."""
        d: dict[str, Any] = {"start": self.start, "end": self.end, "text": self.text}
        if self.speaker is not None:
            d["speaker"] = self.speaker
        if self.words:
            d["words"] = [w.to_dict() for w in self.words]
        return d


@dataclass(frozen=True)
class Transcript:
    """A whole file's transcript.

    ``segments`` are ordered, non-overlapping and inside ``[0, duration]``; ``text`` is their
    texts joined. ``timings`` holds wall-clock seconds per stage (decode_audio, encode, decode...).
    ``speakers`` lists the speaker labels in order of first appearance; empty when not diarized.
    """

    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...]
    model: str
    task: str = "transcribe"
    timings: dict[str, float] = field(default_factory=dict)
    speakers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``.json`` output's core fields); ``speakers`` only when non-empty."""
        d: dict[str, Any] = {
            "text": self.text,
            "language": self.language,
            "duration": self.duration,
            "segments": [s.to_dict() for s in self.segments],
            "model": self.model,
            "task": self.task,
            "timings": dict(self.timings),
        }
        if self.speakers:
            d["speakers"] = list(self.speakers)
        return d


@dataclass(frozen=True)
class FileResult:
    """Outcome for one input of ``Transcriber.transcribe_many``: a transcript or an error."""

    name: str
    transcript: Transcript | None
    error: BaseException | None
