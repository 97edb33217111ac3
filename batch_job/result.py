"""What a transcription produces: frozen dataclasses shared by the engine, writers and the job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Word:
    """One word of a segment with its times (seconds from the start of the FILE).

    ``word`` keeps Whisper's leading space (``" Hello"``), as openai/whisper and faster-whisper
    do; ``probability`` is the mean probability of its tokens.
    """

    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    """One timestamped stretch of text. Times are seconds from the start of the FILE.

    ``words`` is empty unless word-level timestamps were computed.
    """

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``words`` only when there are any (the JSON is unchanged without them)."""
        d: dict[str, Any] = {"start": self.start, "end": self.end, "text": self.text}
        if self.words:
            d["words"] = [asdict(w) for w in self.words]
        return d


@dataclass(frozen=True)
class Transcript:
    """A whole file's transcript.

    ``segments`` are ordered, non-overlapping and inside ``[0, duration]``; ``text`` is their
    texts joined. ``timings`` holds wall-clock seconds per stage (decode_audio, encode, decode...).
    """

    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...]
    model: str
    task: str = "transcribe"
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``.json`` output's core fields)."""
        d = asdict(self)
        d["segments"] = [s.to_dict() for s in self.segments]
        return d


@dataclass(frozen=True)
class FileResult:
    """Outcome for one input of ``Transcriber.transcribe_many``: a transcript or an error."""

    name: str
    transcript: Transcript | None
    error: BaseException | None
