"""Speaker labels (issue #21): how right they are on real voices, and what ``--diarize`` costs.

Conversations are built from ``../shared/audio`` clips of different real speakers
(tests/conversations.py): the standard set of the tests (1-4 speakers, short and long turns), on
which (with the random sets of seeds 21 and 5) ``auto``'s cut was tuned, and a held-out set of
random ones (seed 99, never used for tuning) from the same voices
plus one-turn guests whose voices the tuning never saw, with pauses between turns down to 0.05 s (one breath: Whisper then often runs one segment across the change). Systems, each on the same tiny.en
transcript with word timestamps:

* **ours**: ``--diarize --speakers auto`` (batch_job/speakers: partials over the words' speech,
  seeds of continuous speech, average linkage on seed centres, a speaker per word);
* **floor**: what a user would assemble from the same encoder: one embedding per Whisper
  segment (mean of its partials), plain average-linkage clustering of the segments with a
  distance threshold, one speaker per segment. Its threshold is swept on the standard set and
  the best one is used everywhere (the floor gets its best shot). pyannote's pipeline cannot
  be run here: its weights are not packaged on PyPI.

Scores (tests/conversations.py): right speaker count, attributed speech time, DER (collar
0.25 s), attributed words. Cost: audio seconds per wall second transcribing the standard set
without word timestamps, with them, and with ``--diarize`` (model load excluded, best of
``--rounds``).

    python benchmarks/speakers.py [--rounds 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
import conversations as conv_lib  # noqa: E402
from corpus import error_rates, machine_info  # noqa: E402
from docs_section import write_section  # noqa: E402

from batch_job.result import Transcript  # noqa: E402
from batch_job.settings import Settings  # noqa: E402
from batch_job.speakers.diarize import Diarizer  # noqa: E402
from batch_job.speakers.partials import partial_audio, partials  # noqa: E402
from batch_job.transcribe import Transcriber  # noqa: E402

HEADING = "## Speaker labels: right speakers on real voices, and the cost of --diarize (issue #21)"
GUESTS = ("jfk", "ls2412", "ls1995")
FLOOR_THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


def held_out_set(count: int, seed: int) -> list[conv_lib.Conversation]:
    """Random conversations: 2-4 of the multi-clip voices taking 1-2 clips per turn, maybe one guest,
    pauses between turns of 0.05, 0.15, 0.3 or 0.6 s."""
    rng = random.Random(seed)
    pool = ["lj", "spk1", "spk2", "austen"]
    out = []
    for n in range(count):
        voices = rng.sample(pool, rng.randint(2, 4))
        used = {v: rng.randrange(len(conv_lib.SPEAKERS[v])) for v in voices}
        plan: list[tuple[str, int]] = []
        last = None
        for _ in range(rng.randint(5, 9)):
            voice = rng.choice([v for v in voices if v != last])
            for _ in range(rng.randint(1, 2)):
                plan.append((voice, used[voice] % len(conv_lib.SPEAKERS[voice])))
                used[voice] += 1
            last = voice
        if rng.random() < 0.5:
            plan.insert(rng.randrange(1, len(plan)), (rng.choice(GUESTS), 0))
        pause = rng.choice((0.05, 0.15, 0.3, 0.6))  # quick turn-taking too: Whisper's segments then span speakers
        conv = conv_lib.build(f"held-out {seed}-{n} (pauses {pause} s)", plan, pause_s=pause)
        out.append(conv_lib._merge_same_speaker(conv))
    return out


def floor_labels(transcript: Transcript, audio: np.ndarray, diarizer: Diarizer, threshold: float) -> Transcript:
    """The floor pipeline: one embedding per segment, average linkage at ``threshold``, a speaker per segment."""
    segments = [s for s in transcript.segments if s.end > s.start]
    if not segments:
        return transcript
    vectors = []
    for s in segments:
        cuts = partials([(s.start, s.end)])
        emb = diarizer.encoder.embed(np.stack([partial_audio(audio, p) for p in cuts])).mean(axis=0)
        vectors.append(emb / max(float(np.linalg.norm(emb)), 1e-12))
    if len(vectors) == 1:
        labels = [0]
    else:
        labels = list(fcluster(linkage(np.stack(vectors), method="average", metric="cosine"), t=threshold,
                               criterion="distance"))
    names: dict[int, str] = {}
    labelled = []
    for s, k in zip(segments, labels):
        name = names.setdefault(int(k), f"SPEAKER_{len(names):02d}")
        labelled.append(replace(s, speaker=name, words=tuple(replace(w, speaker=name) for w in s.words)))
    return replace(transcript, segments=tuple(labelled), speakers=tuple(names.values()))


def summarise(scores: list[conv_lib.Score]) -> dict[str, float]:
    return {
        "right_count": sum(s.speakers_found == s.speakers_true for s in scores) / len(scores),
        "speech": float(np.mean([s.attributed_speech for s in scores])),
        "worst_speech": float(np.min([s.attributed_speech for s in scores])),
        "der": float(np.mean([s.der for s in scores])),
        "words": float(np.mean([s.attributed_words for s in scores])),
    }


def wer(convs: list[conv_lib.Conversation], transcripts: list[Transcript]) -> float:
    rows = [{"language": "en", "text": " ".join(t.text for t in c.turns), "hyp": tr.text} for c, tr in zip(convs, transcripts)]
    return float(error_rates(rows, multilingual=False)["en"]["rate"])


def transcribe_all(transcriber: Transcriber, convs: list[conv_lib.Conversation]) -> tuple[list[Transcript], float]:
    t0 = time.perf_counter()
    by_name = {r.name: r.transcript for r in transcriber.transcribe_many((c.name, c.audio) for c in convs)}
    return [by_name[c.name] for c in convs], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds per system (best is kept)")
    parser.add_argument("--held-out", type=int, default=12, help="random conversations in the held-out set")
    parser.add_argument("--seed", type=int, default=99, help="held-out set (21 and 5 were used to tune auto's cut)")
    parser.add_argument("--write-docs", action="store_true", help=f"replace '{HEADING}' in docs/benchmarks.md")
    args = parser.parse_args(argv)
    cache = os.environ.get("WHISPER_BATCH_TEST_CACHE", str(REPO / ".cache" / "test-models"))
    meta = machine_info()
    base = Settings.from_env(model="tiny.en", cache_dir=cache, device="cpu")
    plain = Transcriber.load(base)
    words = Transcriber.load(base.replace(word_timestamps=True))
    diarizing = Transcriber(words.engine, words.settings.replace(diarize=True),
                            diarizer=Diarizer.from_settings(words.settings.replace(diarize=True)))
    sets = {"standard (tuning)": conv_lib.standard_set(), "held-out": held_out_set(args.held_out, args.seed)}
    audio_s = sum(c.duration for c in sets["standard (tuning)"])

    timing: dict[str, float] = {}
    outputs: dict[str, list[Transcript]] = {}
    for name, transcriber in (("plain", plain), ("word timestamps", words), ("--diarize", diarizing)):
        walls = []
        for _ in range(args.rounds):
            outputs[name], wall = transcribe_all(transcriber, sets["standard (tuning)"])
            walls.append(wall)
        timing[name] = min(walls)

    rows = []
    by_count: dict[int, list[conv_lib.Score]] = {}  # held-out, ours: scores by the true number of speakers
    floor_best = None
    word_transcripts = {name: transcribe_all(words, convs)[0] for name, convs in sets.items()}
    diarizer = diarizing.diarizer
    assert diarizer is not None
    for set_name, convs in sets.items():
        ours = [diarizer.label(t, c.audio) for c, t in zip(convs, word_transcripts[set_name])]
        ours_scores = [conv_lib.score(c, t) for c, t in zip(convs, ours)]
        rows.append((set_name, "ours (--diarize, auto)", summarise(ours_scores)))
        if set_name == "held-out":
            for sc in ours_scores:
                by_count.setdefault(sc.speakers_true, []).append(sc)
        if floor_best is None:  # sweep on the tuning set
            sweep = {th: summarise([conv_lib.score(c, floor_labels(t, c.audio, diarizer, th))
                                    for c, t in zip(convs, word_transcripts[set_name])]) for th in FLOOR_THRESHOLDS}
            floor_best = max(sweep, key=lambda th: (sweep[th]["speech"], sweep[th]["right_count"]))
        floor = [floor_labels(t, c.audio, diarizer, floor_best) for c, t in zip(convs, word_transcripts[set_name])]
        rows.append((set_name, f"floor (per segment, threshold {floor_best})",
                     summarise([conv_lib.score(c, t) for c, t in zip(convs, floor)])))

    std = sets["standard (tuning)"]
    lines = ["| set | system | right count | attributed speech (mean / worst) | DER | attributed words |",
             "|---|---|---:|---:|---:|---:|"]
    for set_name, system, s in rows:
        lines.append(f"| {set_name} ({len(sets[set_name])}) | {system} | {s['right_count']:.0%} | "
                     f"{s['speech']:.1%} / {s['worst_speech']:.1%} | {s['der']:.1%} | {s['words']:.1%} |")
    lines += ["", "| held-out, ours, by speakers | conversations | right count | too few / too many | attributed speech (mean / worst) |",
              "|---|---:|---:|---:|---:|"]
    for n, scores in sorted(by_count.items()):
        s = summarise(scores)
        few = sum(sc.speakers_found < sc.speakers_true for sc in scores)
        many = sum(sc.speakers_found > sc.speakers_true for sc in scores)
        lines.append(f"| {n} speaker{'s' if n > 1 else ''} | {len(scores)} | {s['right_count']:.0%} | {few} / {many} | "
                     f"{s['speech']:.1%} / {s['worst_speech']:.1%} |")
    lines += ["", "| tiny.en on the standard set | audio-s/s | vs plain | WER |", "|---|---:|---:|---:|"]
    for name, wall in timing.items():
        lines.append(f"| {name} | {audio_s / wall:.1f} | {timing['plain'] / wall:.2f}x | {wer(std, outputs[name]):.1%} |")
    load = os.getloadavg()
    notes = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {meta['cpu_model']} "
             f"({meta['nproc']} cores), torch {meta['torch']}; load average {meta['loadavg_start'][0]:.1f} at start, "
             f"{load[0]:.1f} at the end. {len(std)} standard conversations ({audio_s:.0f} s of audio), "
             f"{len(sets['held-out'])} held-out (seed {args.seed}); timing best of {args.rounds}, model load excluded.")
    table = "\n".join(lines)
    print(table)
    print()
    print(notes)
    if args.write_docs:
        command = " ".join(["python benchmarks/speakers.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
        write_section(HEADING, f"```\n{command}\n```\n\n" + notes + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
