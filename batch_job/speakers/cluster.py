"""Voice embeddings -> speakers: seeds of continuous speech, clustered by average linkage.

The embedding of one 1.6 s partial is noisy: two partials of one person are often as far apart
(cosine) as partials of two people. The mean over a few seconds of continuous speech (a *seed*,
:mod:`~batch_job.speakers.partials`) is much steadier, so seeds are what gets clustered:

1. the centre of each seed (mean of its partials, unit length);
2. the average-linkage dendrogram of the seed centres on cosine distance
   (:func:`scipy.cluster.hierarchy.linkage`), cut into ``--speakers N`` clusters, or for ``auto``
   at :data:`AUTO_DISTANCE` with the count kept within ``[min_speakers, max_speakers]``;
3. ``auto``: a cluster holding less than :data:`MIN_SHARE` of the partials is noise (a laugh, a
   word on a turn boundary) and is folded into its nearest neighbour, down to ``min_speakers``;
4. refine: every partial goes to its nearest centre and the centres are recomputed, twice
   (k-means steps that undo the linkage's greedy merges).

Only partials with at least :data:`MIN_VOTING_SPEECH_S` of speech take part in steps 1-4: a
short region is one partial padded with silence, and its embedding is the least steady of all
(JFK's "And so," said twice, 1.1 s each, made a cluster of its own on some CPUs). Such partials
still get the nearest speaker; they only do not pick the speakers (all of them do when none is
long enough).

:data:`AUTO_DISTANCE` and :data:`MIN_PARTIALS` were tuned on 32 conversations of real voices
(docs/benchmarks.md, speaker labels: the tests' 8 and 24 random ones, seeds 21 and 5, with pauses
down to 0.05 s): the speaker count is right in 31 of 32 for cuts from 0.32 to 0.36, less often
below (spurious speakers) and above (two voices merged: at 0.38 one conversation falls to 53%
of its speech attributed); the value is the middle of that range. Without the 3-partial floor the
first second of one voice (JFK's "And so,", said twice) became a speaker of its own (30 of 32).
:data:`MIN_VOTING_SPEECH_S` came later, when that cluster came back on an Intel CPU with AMX,
whose oneDNN kernels move word times by up to 0.12 s: with any value from 1.2 to 1.4 s the
count is right in 31 of 32 again on both kinds of kernel (docs/benchmarks.md, speaker labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from batch_job.speakers.options import SpeakerOptions

AUTO_DISTANCE = 0.34
"""``auto``: clusters whose seeds are farther apart than this (average cosine distance) are different people."""
MIN_SHARE = 0.05
"""``auto``: a cluster with fewer partials than this share of all of them is folded into its neighbour."""
MIN_PARTIALS = 3
"""``auto``: ... or with fewer partials than this (about 2.4 s of speech): one seed is too little to
tell a new voice from a known one that sounds different for a moment."""
REFINE_ROUNDS = 2
MIN_VOTING_SPEECH_S = 1.3
"""A partial with less speech than this (a short region padded with silence) is labelled, but does not pick the speakers."""


@dataclass(frozen=True)
class Clusters:
    """``labels [N]`` (0..k-1, in order of first appearance) of N partials, ``centres [k, D]`` (unit length)."""

    labels: np.ndarray
    centres: np.ndarray

    @property
    def count(self) -> int:
        return int(self.centres.shape[0])


def cluster(embeddings: np.ndarray, seeds: np.ndarray, options: SpeakerOptions,
            speech_s: np.ndarray | None = None) -> Clusters:
    """Speakers of ``embeddings [N, D]`` (unit length) whose ``seeds [N]`` say which belong together,
    as ``options`` ask: exactly ``count`` speakers, or an estimate within the bounds.

    ``speech_s [N]``: seconds of speech in each partial (``None``: all full); the partials under
    :data:`MIN_VOTING_SPEECH_S` get labels but do not pick the speakers.
    """
    if embeddings.shape[0] == 0:
        return Clusters(np.zeros(0, int), np.zeros((0, embeddings.shape[1]), np.float32))
    voters = np.ones(len(embeddings), bool) if speech_s is None else np.asarray(speech_s) >= MIN_VOTING_SPEECH_S
    if not voters.any():
        voters[:] = True
    points = embeddings[voters]
    seed_of = np.unique(seeds[voters], return_inverse=True)[1]
    centres = _centres(points, _cut(_centres(points, seed_of), options)[seed_of])
    if options.count is None:
        centres = _fold_small(points, centres, options.min_speakers)
    for _ in range(REFINE_ROUNDS):
        labels = _nearest(points, centres)
        centres = _centres(points, np.unique(labels, return_inverse=True)[1])
    return _by_first_appearance(_nearest(embeddings, centres), centres)


def _cut(points: np.ndarray, options: SpeakerOptions) -> np.ndarray:
    """Cluster (0-based, consecutive) of each seed centre in ``points [S, D]``."""
    if len(points) == 1:
        return np.zeros(1, int)
    tree = linkage(points, method="average", metric="cosine")
    if options.count is not None:
        labels = fcluster(tree, t=min(options.count, len(points)), criterion="maxclust")
    else:
        labels = fcluster(tree, t=AUTO_DISTANCE, criterion="distance")
        found = len(np.unique(labels))
        if not options.min_speakers <= found <= options.max_speakers:
            bound = min(max(found, options.min_speakers), options.max_speakers)
            labels = fcluster(tree, t=min(bound, len(points)), criterion="maxclust")
    return np.unique(labels, return_inverse=True)[1]


def _fold_small(points: np.ndarray, centres: np.ndarray, min_speakers: int) -> np.ndarray:
    """``centres`` without the clusters too small to be a speaker (smallest first), down to ``min_speakers``."""
    while centres.shape[0] > max(1, min_speakers):
        counts = np.bincount(_nearest(points, centres), minlength=centres.shape[0])
        smallest = int(np.argmin(counts))
        if counts[smallest] >= max(MIN_SHARE * len(points), MIN_PARTIALS):
            break
        centres = np.delete(centres, smallest, axis=0)
    return centres


def _centres(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unit-length mean ``[k, D]`` of the points of each cluster ``0..labels.max()``."""
    sums = np.zeros((int(labels.max()) + 1, points.shape[1]), np.float64)
    np.add.at(sums, labels, points)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return np.argmax(points @ centres.T, axis=1)


def _by_first_appearance(labels: np.ndarray, centres: np.ndarray) -> Clusters:
    """Clusters renumbered in order of first appearance; a centre no partial is nearest to is dropped."""
    order = list(dict.fromkeys(int(x) for x in labels))
    remap = np.zeros(centres.shape[0], int)
    remap[order] = np.arange(len(order))
    return Clusters(remap[labels], centres[order])
