"""Who said what: a transcript with word times + its audio -> the same transcript with speaker labels.

Steps (each its own module): speech regions from the words, cut into 1.6 s partials
(:mod:`~batch_job.speakers.partials`); one GE2E embedding per partial, in batches, on the
engine's device (:mod:`~batch_job.speakers.encoder`); speakers by clustering them
(:mod:`~batch_job.speakers.cluster`); a speaker per word and segments split where it changes
(:mod:`~batch_job.speakers.labels`). Loaded once per process next to the engine, only when
diarization is on.
"""

from __future__ import annotations

import numpy as np

from batch_job.constants import SAMPLE_RATE
from batch_job.result import Transcript
from batch_job.settings import Settings
from batch_job.speakers.cluster import cluster
from batch_job.speakers.encoder import SpeakerEncoder, normalize_volume
from batch_job.speakers.labels import label_transcript
from batch_job.speakers.options import SpeakerOptions
from batch_job.speakers.partials import partial_audio, partials, speech_regions


class Diarizer:
    """A loaded voice encoder and the speaker-count options; :meth:`label` is thread-compatible, not thread-safe."""

    def __init__(self, encoder: SpeakerEncoder, options: SpeakerOptions) -> None:
        self.encoder = encoder
        self.options = options

    @classmethod
    def from_settings(cls, settings: Settings, device: str = "cpu") -> Diarizer | None:
        """The diarizer ``settings`` ask for on ``device`` (``None`` when off; nothing is loaded then).

        Raises ``ConfigError`` for bad speaker counts or a missing ``speakers`` extra.
        """
        options = SpeakerOptions.from_settings(settings)
        if options is None:
            return None
        return cls(SpeakerEncoder.load(device), options)

    def label(self, transcript: Transcript, audio: np.ndarray) -> Transcript:
        """``transcript`` (of ``audio``, 16 kHz mono float32) with ``speaker`` on segments and words.

        A transcript without speech is returned as it is.
        """
        regions = speech_regions(transcript.segments, len(audio) / SAMPLE_RATE)
        if not regions:
            return transcript
        speech = np.zeros(len(audio), bool)
        for a, b in regions:
            speech[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] = True
        audio = normalize_volume(audio, speech)
        cuts = partials(regions)
        embeddings = self.encoder.embed(np.stack([partial_audio(audio, p) for p in cuts]))
        speakers = cluster(embeddings, np.array([p.seed for p in cuts]), self.options,
                           np.array([p.end - p.start for p in cuts]))
        return label_transcript(transcript, cuts, embeddings, speakers.centres)
