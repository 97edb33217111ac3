"""Which objects share a Batch job: packs bounded by objects, bytes and estimated audio seconds.

A job pays a fixed start-up (container, interpreter, model load: docs/benchmarks.md, "Job
overhead") before its first window; a pack spreads that cost over many short files (issue #11).
:func:`make_packs` is pure (no AWS): the Lambda handler and the bulk CLI pack the same way.

Rules (the contract in docs/submitter.md, "Packs"):

* **Alone**: an object of at least ``LONG_JOB_MIN_BYTES`` (long job definition), or whose
  estimated audio exceeds ``PACK_MAX_AUDIO_SECONDS``, or which alone exceeds ``PACK_MAX_BYTES``,
  gets a job of its own.
* **Packed**: the others are bin-packed per bucket (a pack's manifest and outputs live in its
  objects' bucket) into packs of at most ``PACK_MAX_OBJECTS`` objects, ``PACK_MAX_BYTES`` bytes
  and ``PACK_MAX_AUDIO_SECONDS`` estimated seconds, using the fewest packs the bounds allow but
  at least ``min(PACK_PARALLELISM, n objects)`` packs in all, so a small burst still fills that
  many job slots. Objects go longest first to the pack with the least estimated audio that can
  take them (LPT scheduling), which balances the packs' running times.
* **Deterministic**: the same objects in the same order give the same packs. Objects keep their
  input order inside a pack; packs are ordered by their first object's input position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from submitter import rules

if TYPE_CHECKING:  # pragma: no cover
    from submitter.objects import ObjectRef
    from submitter.settings import SubmitterSettings

#: Conservative (LOW) bytes per second of audio, per extension: dividing an object's size by it
#: over-estimates its duration, so a pack's real audio is at most what its bound says. Each value
#: is the floor of what speech is commonly stored at in that container:
#:
#: * ``wav`` 8,000: 8 kHz 8-bit G.711 (mu-law/A-law), the telephony format of call and voicemail
#:   recordings; 16 kHz 16-bit PCM (32,000) and CD audio (176,400) are over-estimated 4x and 22x.
#: * ``flac`` 6,000: lossless 8 kHz 16-bit speech (16,000 raw) compresses to about 40-60 %.
#: * ``mp3``/``m4a``/``aac``/``mp4`` 4,000: 32 kbit/s, the low end of speech encodes (podcasts and
#:   meeting recordings use 48-128 kbit/s; video in ``mp4`` only makes the estimate larger).
#: * ``ogg``/``opus``/``webm`` 2,000: 16 kbit/s Opus/Vorbis voice (voice notes, WebRTC recordings).
#:
#: An encoding below its floor (an 8 kbit/s voice mp3) is under-estimated by floor/actual (2x
#: here); the default bound (2 h) leaves that much margin inside the 1 h attempt timeout at the
#: worker's speed (tens of times real time).
BYTES_PER_SECOND: dict[str, int] = {
    "wav": 8000,
    "flac": 6000,
    "mp3": 4000,
    "m4a": 4000,
    "aac": 4000,
    "mp4": 4000,
    "ogg": 2000,
    "opus": 2000,
    "webm": 2000,
}
#: For an extension outside the table (the rules skip those, but the estimate stays total): the
#: lowest rate of the table, i.e. the largest estimate.
FALLBACK_BYTES_PER_SECOND = min(BYTES_PER_SECOND.values())


@dataclass(frozen=True)
class Pack:
    """The objects of one Batch job (or one array element), in input order.

    ``estimated_seconds`` is the sum of :func:`estimate_audio_seconds` over ``objects``;
    ``bytes`` the sum of their sizes. A pack of one object is submitted exactly as a
    single-object job (no manifest)."""

    objects: tuple[ObjectRef, ...]
    job_definition: str
    estimated_seconds: float
    bytes: int

    @property
    def bucket(self) -> str:
        return self.objects[0].bucket

    def __len__(self) -> int:
        return len(self.objects)


def estimate_audio_seconds(obj: ObjectRef) -> float:
    """An over-estimate of ``obj``'s audio duration from its size and extension (see
    :data:`BYTES_PER_SECOND`); 0 for an object of unknown or zero size."""
    rate = BYTES_PER_SECOND.get(rules.extension(obj.key), FALLBACK_BYTES_PER_SECOND)
    return (obj.size or 0) / rate


def job_definition_for(size: int | None, settings: SubmitterSettings) -> str:
    """The long-timeout definition for objects of at least ``LONG_JOB_MIN_BYTES``."""
    if size is not None and size >= settings.long_job_min_bytes:
        return settings.job_definition_long
    return settings.job_definition


def goes_alone(obj: ObjectRef, settings: SubmitterSettings) -> bool:
    """Whether ``obj`` needs a job of its own (see the module docstring)."""
    size = obj.size or 0
    return (size >= settings.long_job_min_bytes
            or size > settings.pack_max_bytes
            or estimate_audio_seconds(obj) > settings.pack_max_audio_seconds)


def make_packs(objects: Sequence[ObjectRef], settings: SubmitterSettings) -> list[Pack]:
    """Every object of ``objects`` in exactly one :class:`Pack` (see the module docstring)."""
    alone: list[tuple[int, Pack]] = []
    by_bucket: dict[str, list[int]] = {}
    for i, obj in enumerate(objects):
        if goes_alone(obj, settings):
            alone.append((i, _pack([obj], job_definition_for(obj.size, settings))))
        else:
            by_bucket.setdefault(obj.bucket, []).append(i)

    # Job slots the packable objects should spread over, after the lone objects took theirs;
    # shared between buckets in proportion to their objects (rounded up).
    slots = max(0, min(settings.pack_parallelism, len(objects)) - len(alone))
    packable = sum(len(indices) for indices in by_bucket.values())
    packed: list[tuple[int, Pack]] = []
    for bucket_indices in by_bucket.values():
        share = math.ceil(slots * len(bucket_indices) / packable)
        for group in _bin_pack([objects[i] for i in bucket_indices], settings, min_packs=share):
            members = [bucket_indices[j] for j in group]
            packed.append((members[0], _pack([objects[i] for i in members], settings.job_definition)))
    return [pack for _, pack in sorted(alone + packed, key=lambda item: item[0])]


def _bin_pack(objects: Sequence[ObjectRef], settings: SubmitterSettings, *, min_packs: int) -> list[list[int]]:
    """Indices into ``objects`` grouped into packs within the bounds, each group sorted.

    Starts from the lower bound on the pack count (objects, bytes, seconds, ``min_packs``) and
    places objects longest first into the least-loaded pack that can take them; opens a new pack
    when none can (the bounds are not a perfect bin packing, so the lower bound may not suffice).
    """
    seconds = [estimate_audio_seconds(o) for o in objects]
    sizes = [o.size or 0 for o in objects]
    n_packs = max(
        1,
        min(min_packs, len(objects)),
        math.ceil(len(objects) / settings.pack_max_objects),
        math.ceil(sum(sizes) / settings.pack_max_bytes),
        math.ceil(sum(seconds) / settings.pack_max_audio_seconds),
    )
    groups: list[list[int]] = [[] for _ in range(n_packs)]
    load = [0.0] * n_packs
    used_bytes = [0] * n_packs
    for i in sorted(range(len(objects)), key=lambda j: (-seconds[j], j)):
        fits = [p for p in range(len(groups))
                if len(groups[p]) < settings.pack_max_objects
                and used_bytes[p] + sizes[i] <= settings.pack_max_bytes
                and load[p] + seconds[i] <= settings.pack_max_audio_seconds]
        if fits:
            target = min(fits, key=lambda p: (load[p], len(groups[p]), p))
        else:
            groups.append([])
            load.append(0.0)
            used_bytes.append(0)
            target = len(groups) - 1
        groups[target].append(i)
        load[target] += seconds[i]
        used_bytes[target] += sizes[i]
    return [sorted(group) for group in groups if group]


def _pack(objects: list[ObjectRef], job_definition: str) -> Pack:
    return Pack(
        objects=tuple(objects),
        job_definition=job_definition,
        estimated_seconds=sum(estimate_audio_seconds(o) for o in objects),
        bytes=sum(o.size or 0 for o in objects),
    )
