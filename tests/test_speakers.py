"""Speaker labels: options, partials, clustering, labels on a transcript, and real voices end to end.

The conversations (tests/conversations.py) join clips of different real speakers of
``../shared/audio``; they are scored by attributed speech time, DER and attributed words.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import shared_clip
from conversations import alternating, score, standard_set

from batch_job.errors import ConfigError
from batch_job.result import Segment, Transcript, Word
from batch_job.settings import Settings
from batch_job.speakers import cluster as clustering
from batch_job.speakers.diarize import Diarizer
from batch_job.speakers.labels import label_transcript
from batch_job.speakers.options import SpeakerOptions
from batch_job.speakers.partials import HOP_S, PARTIAL_S, SEED_PARTIALS, partial_audio, partials, speech_regions
from batch_job.writers import render

# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(("speakers", "low", "high", "message"), [
    ("0", 1, 8, "between 1 and 32"),
    ("33", 1, 8, "between 1 and 32"),
    ("two", 1, 8, "'auto' or a number"),
    ("auto", 0, 8, "at least 1"),
    ("auto", 3, 2, "greater than max_speakers"),
    ("auto", 1, 40, "at most 32"),
])
def test_bad_speaker_settings_are_config_errors(speakers, low, high, message):
    with pytest.raises(ConfigError, match=message):
        SpeakerOptions.from_settings(Settings(diarize=True, speakers=speakers, min_speakers=low, max_speakers=high))


def test_options_off_unless_diarize_and_diarize_turns_word_timestamps_on():
    assert SpeakerOptions.from_settings(Settings(speakers="0")) is None
    assert Settings(diarize=True).word_timestamps and not Settings().word_timestamps
    assert SpeakerOptions.from_settings(Settings(diarize=True, speakers=" 3 ")) == SpeakerOptions(count=3)
    env = Settings.from_env({"WHISPER_BATCH_DIARIZE": "true", "WHISPER_BATCH_MAX_SPEAKERS": "4"})
    assert SpeakerOptions.from_settings(env) == SpeakerOptions(count=None, min_speakers=1, max_speakers=4)


@pytest.mark.parametrize("flags", [["--speakers", "0"], ["--diarize", "--min-speakers", "3", "--max-speakers", "2"]])
def test_cli_bad_speaker_flags_exit_2_before_loading(flags, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "batch_job.cli", "transcribe", *flags, "--output-dir", str(tmp_path),
                           "missing.wav"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "speakers" in proc.stderr and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- partials


def _words(*spans: tuple[float, float]) -> tuple[Word, ...]:
    return tuple(Word(f" w{i}", a, b, 0.9) for i, (a, b) in enumerate(spans))


def test_regions_merge_words_across_short_pauses_only():
    seg = Segment(0.0, 9.0, "x", _words((0.5, 0.9), (1.0, 1.5), (1.8, 2.0), (4.0, 4.4), (8.9, 9.0)))
    bare = Segment(6.0, 7.0, "no words")
    regions = speech_regions([seg, bare], duration=9.0)
    # 0.1 s between w0 and w1 is one region, 0.3 s before w2 is not (REGION_GAP_S 0.2); each padded 0.1 s
    assert [(round(a, 2), round(b, 2)) for a, b in regions] == [(0.4, 1.6), (1.7, 2.1), (3.9, 4.5), (5.9, 7.1), (8.8, 9.0)]


def test_partials_cover_a_region_and_group_into_even_seeds():
    cuts = partials([(0.0, 5.0), (10.0, 10.5)])
    first = [p for p in cuts if p.start < 10]
    assert first[0].start == 0.0 and first[-1].end == pytest.approx(5.0)
    assert all(p.end - p.start == pytest.approx(PARTIAL_S) for p in first)
    assert all(b.start - a.start <= HOP_S + 1e-9 for a, b in zip(first, first[1:]))
    sizes = np.bincount([p.seed for p in first])
    assert sizes.max() <= SEED_PARTIALS and sizes.max() - sizes.min() <= 1  # 9 partials: seeds of 5 and 4
    (short,) = [p for p in cuts if p.start >= 10]
    assert short.seed == first[-1].seed + 1 and short.end == 10.5
    audio = np.ones(16000 * 11, np.float32)
    padded = partial_audio(audio, short)
    assert len(padded) == int(PARTIAL_S * 16000) and padded.sum() == pytest.approx(8000)  # centred, silence around


# --------------------------------------------------------------------------- clustering


def _voices(rng, speakers: int, per: int, spread: float = 0.15):
    centres = rng.normal(size=(speakers, 64))
    points = np.concatenate([c + spread * np.linalg.norm(c) * rng.normal(size=(per, 64)) / 8 for c in centres])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    truth = np.repeat(np.arange(speakers), per)
    return points.astype(np.float32), truth


def test_cluster_finds_the_count_and_respects_the_bounds():
    rng = np.random.default_rng(0)
    points, truth = _voices(rng, 3, 30)
    seeds = np.arange(len(points)) // 3
    auto = clustering.cluster(points, seeds, SpeakerOptions())
    assert auto.count == 3 and list(auto.labels[::30]) == [0, 1, 2]  # numbered by first appearance
    assert all(len(set(auto.labels[truth == k])) == 1 for k in range(3))
    assert clustering.cluster(points, seeds, SpeakerOptions(count=2)).count == 2
    assert clustering.cluster(points, seeds, SpeakerOptions(max_speakers=2)).count == 2
    assert clustering.cluster(points, seeds, SpeakerOptions(min_speakers=4, max_speakers=8)).count == 4
    one, _ = _voices(rng, 1, 40)
    assert clustering.cluster(one, np.arange(40) // 4, SpeakerOptions()).count == 1


def test_a_tiny_cluster_is_folded_into_its_neighbour_in_auto_only():
    rng = np.random.default_rng(1)
    points, _ = _voices(rng, 2, 60)
    stray = rng.normal(size=(1, 64)).astype(np.float32)
    points = np.concatenate([points, stray / np.linalg.norm(stray)])
    seeds = np.concatenate([np.arange(120) // 4, [999]])
    assert clustering.cluster(points, seeds, SpeakerOptions()).count == 2
    assert clustering.cluster(points, seeds, SpeakerOptions(count=3)).count == 3


def test_a_voice_of_under_three_partials_is_folded_even_above_the_share():
    """2 partials of 20 (10% of the speech, above MIN_SHARE) are too little to call a new voice;
    3 are enough (MIN_PARTIALS)."""
    rng = np.random.default_rng(2)
    points, truth = _voices(rng, 2, 20)
    for few, count in ((2, 1), (3, 2)):
        keep = np.concatenate([np.flatnonzero(truth == 0)[: 20 - few], np.flatnonzero(truth == 1)[:few]])
        assert clustering.cluster(points[keep], np.arange(20), SpeakerOptions()).count == count, few


def test_short_padded_partials_get_a_speaker_but_do_not_make_one():
    """3 partials of a stray voice (7% of them, above both floors) make a third speaker when they
    are full; as short regions padded with silence they only take the nearest speaker's label."""
    rng = np.random.default_rng(3)
    points, _ = _voices(rng, 2, 20)
    stray = rng.normal(size=(3, 64)) * 0.05 + rng.normal(size=(1, 64))
    points = np.concatenate([points, (stray / np.linalg.norm(stray, axis=1, keepdims=True)).astype(np.float32)])
    seeds = np.concatenate([np.arange(40) // 2, [100, 100, 101]])
    full = np.full(43, PARTIAL_S)
    assert clustering.cluster(points, seeds, SpeakerOptions(), full).count == 3
    short = full.copy()
    short[40:] = clustering.MIN_VOTING_SPEECH_S - 0.1
    two = clustering.cluster(points, seeds, SpeakerOptions(), short)
    assert two.count == 2 and len(two.labels) == 43 and set(two.labels[40:]) <= {0, 1}
    only_short = clustering.cluster(points[40:], seeds[40:], SpeakerOptions(), short[40:])
    assert only_short.count == 1 and len(only_short.labels) == 3  # none long enough: all of them vote


def test_no_partials_no_clusters():
    assert clustering.cluster(np.zeros((0, 8), np.float32), np.zeros(0, int), SpeakerOptions()).count == 0


# --------------------------------------------------------------------------- labels on a transcript


def _two_voice_fixture():
    """Words 0-3 spoken by voice A (0-4 s), 4-7 by voice B (4-8 s), one segment across the change."""
    a, b = np.eye(4, dtype=np.float32)[:2]
    cuts = partials([(0.0, 8.0)])
    embeddings = np.stack([a if (p.start + p.end) / 2 < 4.0 else b for p in cuts])
    words = _words(*[(i + 0.1, i + 0.9) for i in range(8)])
    transcript = Transcript("t", "en", 8.0, (Segment(0.0, 8.0, "t", words),), "tiny.en")
    return transcript, cuts, embeddings, np.stack([b, a])  # centre 0 is voice B: names follow appearance


def test_a_segment_across_a_change_of_speaker_is_split_at_the_word():
    transcript, cuts, embeddings, centres = _two_voice_fixture()
    out = label_transcript(transcript, cuts, embeddings, centres)
    assert out.speakers == ("SPEAKER_00", "SPEAKER_01")
    first, second = out.segments
    assert (first.speaker, second.speaker) == ("SPEAKER_00", "SPEAKER_01")
    assert [w.word for w in first.words] == [" w0", " w1", " w2", " w3"]
    assert first.text == "w0 w1 w2 w3" and second.text == "w4 w5 w6 w7"
    assert first.start == 0.0 and first.end == 3.9 and second.start == 4.1 and second.end == 8.0
    assert all(w.speaker == s.speaker for s in out.segments for w in s.words)


def test_a_one_word_blip_inside_a_turn_is_smoothed_away():
    a, b = np.eye(4, dtype=np.float32)[:2]
    cuts = partials([(0.0, 8.0)])
    # voice B only around 4.0-4.3 s: one short word would flip to B without smoothing
    embeddings = np.stack([b if 3.3 <= (p.start + p.end) / 2 <= 4.6 else a for p in cuts])
    words = _words(*[(i * 0.5, i * 0.5 + 0.3) for i in range(16)])
    transcript = Transcript("t", "en", 8.0, (Segment(0.0, 8.0, "t", words),), "tiny.en")
    out = label_transcript(transcript, cuts, embeddings, np.stack([a, b]))
    assert out.speakers == ("SPEAKER_00",) and len(out.segments) == 1


def test_labels_render_in_every_format():
    transcript, cuts, embeddings, centres = _two_voice_fixture()
    out = label_transcript(transcript, cuts, embeddings, centres)
    data = json.loads(render(out, "json"))
    assert data["speakers"] == ["SPEAKER_00", "SPEAKER_01"]
    assert [s["speaker"] for s in data["segments"]] == ["SPEAKER_00", "SPEAKER_01"]
    assert {w["speaker"] for w in data["segments"][1]["words"]} == {"SPEAKER_01"}
    assert render(out, "txt") == "SPEAKER_00: w0 w1 w2 w3\nSPEAKER_01: w4 w5 w6 w7\n"
    assert "[SPEAKER_01] w4" in render(out, "srt")
    assert "<v SPEAKER_00>w0" in render(out, "vtt")


# --------------------------------------------------------------------------- real voices


@pytest.fixture(scope="module")
def labelled(tiny_speakers_transcriber):
    """Each standard conversation transcribed with and without speaker labels (same engine and batch size).

    One file at a time: labels are scored against the reference turns by the words' times, and a
    conversation's transcript should not depend on which other files share its batches.
    """
    from batch_job.transcribe import Transcriber

    words_only = Transcriber(tiny_speakers_transcriber.engine, tiny_speakers_transcriber.settings.replace(diarize=False))
    return [(c, tiny_speakers_transcriber.transcribe(c.audio), words_only.transcribe(c.audio)) for c in standard_set()]


def test_real_conversations_right_count_and_speech_attributed(labelled):
    for conv, transcript, _ in labelled:
        result = score(conv, transcript)
        assert result.speakers_found == result.speakers_true, (conv.name, result)
        assert result.attributed_speech >= 0.9, (conv.name, result)
        assert result.attributed_words >= 0.9, (conv.name, result)


def test_one_speaker_gets_one_label(labelled):
    singles = [t for c, t, _ in labelled if len(c.speakers) == 1]
    assert len(singles) == 2
    for transcript in singles:
        assert transcript.speakers == ("SPEAKER_00",)
        assert {w.speaker for s in transcript.segments for w in s.words} == {"SPEAKER_00"}


def test_labels_leave_the_words_unchanged(labelled):
    for _, transcript, plain in labelled:
        assert transcript.text == plain.text
        assert [w.word for s in transcript.segments for w in s.words] == [w.word for s in plain.segments for w in s.words]
        assert plain.speakers == () and all(s.speaker is None for s in plain.segments)
        assert "diarize" in transcript.timings and "diarize" not in plain.timings


def test_fixed_count_on_a_real_conversation(tiny_speakers_transcriber):
    conv = alternating("2 speakers", ["spk1", "spk2"], 4)
    diarizer = tiny_speakers_transcriber.diarizer
    words = tiny_speakers_transcriber.transcribe(conv.audio)
    three = Diarizer(diarizer.encoder, SpeakerOptions(count=3)).label(words, conv.audio)
    assert len(three.speakers) == 3  # asked for three: three, even where two would do
    assert score(conv, Diarizer(diarizer.encoder, SpeakerOptions(count=2)).label(words, conv.audio)).attributed_speech >= 0.9


def test_silence_gets_no_labels(tiny_speakers_transcriber):
    transcript = tiny_speakers_transcriber.transcribe(np.zeros(16000 * 3, np.float32))
    assert transcript.segments == () and transcript.speakers == ()


def test_without_diarize_the_voice_encoder_is_never_imported(tmp_path, model_cache_dir):
    code = ("import sys; from batch_job.cli import main; rc = main(['transcribe', '--no-progress', '--output-dir', "
            f"{str(tmp_path)!r}, {str(shared_clip('jfk.flac'))!r}]); "
            "print('LOADED' if 'batch_job.speakers.encoder' in sys.modules else 'CLEAN'); sys.exit(rc)")
    env = {"WHISPER_BATCH_CACHE_DIR": str(model_cache_dir), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("CLEAN")
    assert "speaker" not in (tmp_path / "jfk.json").read_text()


def test_local_mode_hands_the_speaker_flags_to_its_jobs(monkeypatch):
    """`whisper-batch local --speakers 3`: its jobs get WHISPER_BATCH_* variables, as the stack's job definition sets them."""
    from batch_job.cli import build_parser
    from batch_job.local.cli import _speaker_env

    for name in ("WHISPER_BATCH_DIARIZE", "WHISPER_BATCH_SPEAKERS", "WHISPER_BATCH_MIN_SPEAKERS", "WHISPER_BATCH_MAX_SPEAKERS"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["local", "--speakers", "3", "--max-speakers", "4"])
    env = _speaker_env(args)
    assert env == {"WHISPER_BATCH_DIARIZE": "true", "WHISPER_BATCH_SPEAKERS": "3", "WHISPER_BATCH_MAX_SPEAKERS": "4"}
    assert SpeakerOptions.from_settings(Settings.from_env(env)) == SpeakerOptions(count=3, max_speakers=4)
    assert _speaker_env(build_parser().parse_args(["local"])) == {}
    with pytest.raises(ConfigError):
        _speaker_env(build_parser().parse_args(["local", "--min-speakers", "5", "--max-speakers", "2"]))
