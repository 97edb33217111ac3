"""Speaker-count options of a diarizing engine, validated once where the engine is built."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from batch_job.errors import ConfigError
from batch_job.settings import Settings

AUTO = "auto"
MOST_SPEAKERS = 32
"""Upper bound on any speaker count (Amazon Transcribe takes up to 30 speakers)."""


@dataclass(frozen=True)
class SpeakerOptions:
    """How many speakers to find: exactly ``count``, or (``count is None``) an estimate in
    ``[min_speakers, max_speakers]``."""

    count: int | None = None
    min_speakers: int = 1
    max_speakers: int = 8

    @classmethod
    def from_settings(cls, settings: Settings) -> SpeakerOptions | None:
        """The options ``settings`` ask for, ``None`` when diarization is off.

        Raises :class:`ConfigError` (exit 2 from the CLI, 78 / a config marker from run-job) for
        a count that is not ``auto`` or a positive number, ``min_speakers < 1``,
        ``min_speakers > max_speakers`` or a bound above :data:`MOST_SPEAKERS`.
        """
        if not settings.diarize:
            return None
        return cls.parse(settings.speakers, settings.min_speakers, settings.max_speakers)

    @classmethod
    def parse(cls, speakers: str, min_speakers: int, max_speakers: int) -> SpeakerOptions:
        """Validated options (see :meth:`from_settings`)."""
        raw = str(speakers).strip().lower()
        count: int | None = None
        if raw != AUTO:
            try:
                count = int(raw)
            except ValueError:
                raise ConfigError(f"speakers (WHISPER_BATCH_SPEAKERS / --speakers) must be 'auto' or a number, not {speakers!r}") from None
            if not 1 <= count <= MOST_SPEAKERS:
                raise ConfigError(f"speakers must be between 1 and {MOST_SPEAKERS}, not {count}")
        if min_speakers < 1:
            raise ConfigError(f"min_speakers (--min-speakers) must be at least 1, not {min_speakers}")
        if max_speakers > MOST_SPEAKERS:
            raise ConfigError(f"max_speakers (--max-speakers) must be at most {MOST_SPEAKERS}, not {max_speakers}")
        if min_speakers > max_speakers:
            raise ConfigError(f"min_speakers ({min_speakers}) is greater than max_speakers ({max_speakers})")
        return cls(count=count, min_speakers=min_speakers, max_speakers=max_speakers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The speaker-label flags, the same on ``transcribe``, ``serve`` and ``local``."""
    group = parser.add_argument_group("speaker labels")
    group.add_argument("--diarize", action="store_true", default=None,
                       help="label who speaks (JSON speaker fields, TXT turns, SRT labels, VTT voice tags; "
                            "turns on word timestamps)")
    group.add_argument("--speakers", metavar="N|auto", help="speaker count, or auto (default); implies --diarize")
    group.add_argument("--min-speakers", type=int, metavar="N", help="fewest speakers auto may find (default: 1)")
    group.add_argument("--max-speakers", type=int, metavar="N", help="most speakers auto may find (default: 8)")


def settings_from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`Settings` fields the flags of :func:`add_arguments` set (``None``: not given)."""
    counts = {"speakers": args.speakers, "min_speakers": args.min_speakers, "max_speakers": args.max_speakers}
    given = any(v is not None for v in counts.values())
    return {"diarize": True if (args.diarize or given) else None, **counts}
