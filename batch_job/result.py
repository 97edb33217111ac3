"""What a transcription produces: frozen dataclasses shared by the engine, writers and the job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Segment:
    """One timestamped stretch of text. Times are seconds from the start of the FILE."""

    start: float
    end: float
    text: str


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
        d["segments"] = [asdict(s) for s in self.segments]
        return d


@dataclass(frozen=True)
class FileResult:
    """Outcome for one input of ``Transcriber.transcribe_many``: a transcript or an error."""

    name: str
    transcript: Transcript | None
    error: BaseException | None
