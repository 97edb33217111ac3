"""The engine on real weights: padded fixed-shape batches give generate()'s tokens; guards work."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from batch_job.engine.decoding import ApplyTimestampRules, DecodeState, DecodingOptions, DecodingResult
from batch_job.engine.tokens import SpecialTokens
from batch_job.result import Word
from batch_job.segment import Packed, join_windows
from batch_job.stream import FileState, Piece, TranscriptionStream, WindowTask
from batch_job.transcribe import Guards, Transcriber, _place_words
from tests.conftest import load_clip, reference_text

CLIPS = ["jfk.flac", "librispeech_61-70968-0000.flac", "ljspeech_LJ001-0002.flac", "mfa_cold_corpus.wav"]


def _generate(model, engine, audio: np.ndarray, *, timestamps: bool) -> list[int]:
    """transformers' own eager, unpadded greedy generate on one window (the reference)."""
    mel = engine.log_mel([audio], 1)
    with torch.inference_mode():
        out = model.generate(mel, return_timestamps=timestamps, max_new_tokens=engine.max_new_tokens)
    toks = out[0].tolist()
    # Depending on the version, generate() may return the prompt too: drop any prompt tokens.
    sp = engine.tokens
    prompt_ids = {sp.sot, sp.no_timestamps, sp.transcribe, sp.translate, *sp.languages.values()}
    while toks and toks[0] in prompt_ids:
        toks = toks[1:]
    if engine.tokens.eot in toks:
        toks = toks[: toks.index(engine.tokens.eot)]
    return toks


@pytest.mark.parametrize("timestamps", [True, False])
def test_padded_batch_matches_unpadded_generate(tiny_engine_fp32, tiny_model, timestamps):
    engine = tiny_engine_fp32
    rows = [load_clip(c, seconds=30) for c in CLIPS[:3]]  # 3 rows in a bucket of 4: one padding row
    options = DecodingOptions(without_timestamps=not timestamps, max_new_tokens=engine.max_new_tokens)
    results, _ = engine.decode(rows, options)
    assert len(results) == 3
    for clip, row, result in zip(CLIPS, rows, results):
        expected = _generate(tiny_model, engine, row, timestamps=timestamps)
        assert list(result.tokens) == expected, clip
        assert not result.truncated


def test_rows_stop_independently(tiny_engine_fp32):
    """A short row in a batch with a long one gets exactly its solo tokens (nothing leaks across rows)."""
    engine = tiny_engine_fp32
    long_row, short_row = load_clip("mfa_cold_corpus.wav"), load_clip("ljspeech_LJ001-0002.flac")
    options = DecodingOptions(max_new_tokens=engine.max_new_tokens)
    together, _ = engine.decode([long_row, short_row], options)
    alone, _ = engine.decode([short_row], options)
    assert together[1].tokens == alone[0].tokens
    assert len(together[0].tokens) > 3 * len(together[1].tokens)


def test_text_has_no_special_tokens(tiny_transcriber):
    t = tiny_transcriber.transcribe(load_clip("jfk.flac"))
    assert "<|" not in t.text and all("<|" not in s.text for s in t.segments)
    assert "ask not what your country can do for you" in t.text.lower().replace(",", "")


def test_silence_gives_no_text(tiny_transcriber):
    t = tiny_transcriber.transcribe(np.zeros(16000 * 20, dtype=np.float32))
    assert t.text == "" and t.segments == ()
    noise = (np.random.default_rng(0).standard_normal(16000 * 10) * 1e-4).astype(np.float32)
    assert tiny_transcriber.transcribe(noise).text == ""


def test_long_audio_timestamps_true_to_file(tiny_transcriber):
    """Clips joined with pauses: segments are ordered, inside the audio, and land near each clip."""
    names = ["jfk.flac", "mfa_cold_corpus.wav", "librispeech_2412-153948-0000.flac", "mfa_acoustic_corpus.wav"]
    gap = np.zeros(16000 * 2, dtype=np.float32)
    parts, starts, pos = [], [], 0
    for n in names:
        a = load_clip(n)
        starts.append(pos / 16000)
        parts += [a, gap]
        pos += len(a) + len(gap)
    audio = np.concatenate(parts)
    t = tiny_transcriber.transcribe(audio)
    assert t.duration == pytest.approx(len(audio) / 16000, abs=1e-3)
    prev_end = 0.0
    for s in t.segments:
        assert 0 <= s.start <= s.end <= t.duration
        assert s.start >= prev_end - 1e-6
        prev_end = s.end
    # The JFK sentence is transcribed near where JFK is in the file, not elsewhere.
    jfk = [s for s in t.segments if "americans" in s.text.lower()]
    assert jfk and all(s.start < starts[1] for s in jfk)
    from jiwer import wer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    ref = " ".join(reference_text(n) for n in names)
    assert wer(norm(ref), norm(t.text)) < 0.3


def test_english_only_model_rejects_other_languages(tiny_transcriber):
    with pytest.raises(ValueError, match="English-only"):
        tiny_transcriber.transcribe(np.zeros(16000, np.float32), language="de")
    with pytest.raises(ValueError, match="English-only"):
        tiny_transcriber.transcribe(np.zeros(16000, np.float32), task="translate")


# ---------------------------------------------------------------- guards (no model needed)


class _FakeEngine:
    """Just enough engine for Transcriber.accept_window: text of tokens is their ids joined."""

    def __init__(self, words: dict[int, str]) -> None:
        self.words = words
        self.tokens = SpecialTokens(sot=1000, eot=999, no_timestamps=1001, timestamp_begin=1002, no_speech=None, transcribe=None, translate=None)
        self.model_name = "fake"
        self.load_seconds = 0.0

    def text(self, tokens):
        return "".join(self.words.get(t, "") for t in tokens if t < 999)


def _result(tokens, *, logprob=-0.2, no_speech=0.01):
    return DecodingResult(tuple(tokens), "en", logprob, no_speech, 0.0, False)


def test_repetition_loop_is_redecoded_then_cut():
    ts = lambda s: 1002 + int(s / 0.02)  # noqa: E731
    engine = _FakeEngine({1: " the same words again and again"})
    tr = Transcriber(engine, settings=None, guards=Guards(temperatures=(0.0, 0.5)))  # type: ignore[arg-type]
    looping = []
    for i in range(12):
        looping += [ts(i), 1, ts(i + 1)]
    state = FileState(name="x", audio=np.zeros(16000 * 20, np.float32), pending=1)
    task = WindowTask(file=0, window=Packed(((0, 16000 * 20),)))
    (retry,) = tr.accept_window(task, _result(looping), state)
    assert retry.attempt == 1 and state.segments == []
    # Still looping at the last temperature: keep it, but cut consecutive repeats.
    assert tr.accept_window(retry, _result(looping), state) == ()
    assert [s[2] for s in state.segments] == ["the same words again and again"]


def test_no_speech_window_is_dropped():
    engine = _FakeEngine({1: " Thank you."})
    tr = Transcriber(engine, settings=None)  # type: ignore[arg-type]
    state = FileState(name="x", audio=np.zeros(16000 * 5, np.float32), pending=1)
    out = tr.accept_window(WindowTask(0, Packed(((0, 16000 * 5),))), _result([1002, 1, 1100], logprob=-1.5, no_speech=0.9), state)
    assert out == () and state.segments == []


def test_unconsumed_tail_is_requeued():
    """Decoding that stops on a closed segment pair before the window end re-queues the tail."""
    engine = _FakeEngine({1: " hello"})
    tr = Transcriber(engine, settings=None)  # type: ignore[arg-type]
    state = FileState(name="x", audio=np.zeros(16000 * 30, np.float32), pending=1)
    toks = [1002, 1, 1002 + 250, 1002 + 250]  # "hello" 0-5 s, then a new segment starts at 5 s and stops
    (follow,) = tr.accept_window(WindowTask(0, Packed(((0, 16000 * 30),))), _result(toks), state)
    assert follow.window.spans == ((5 * 16000, 30 * 16000),)
    assert state.segments[0][:3] == (0.0, 5.0, "hello")


@pytest.mark.parametrize("continuation", [0, 4])  # 4 = Guards.max_continuations: spent, still resumed
def test_pieces_after_the_decoded_text_are_decoded_again(continuation):
    """A packed window whose text ends (eot) inside its first piece leaves the later pieces
    undecoded: they are re-queued from the next piece on, even short and past the tail budget."""
    sr = 16000
    engine = _FakeEngine({1: " hello"})
    tr = Transcriber(engine, settings=None)  # type: ignore[arg-type]
    state = FileState(name="x", audio=np.zeros(sr * 40, np.float32), pending=1)
    window = Packed(((0, 5 * sr), (20 * sr, 20 * sr + sr // 2), (30 * sr, 31 * sr)), gap=sr // 2)  # 5 s, 0.5 s, 1 s
    toks = [1002, 1, 1002 + 240]  # "hello" 0-4.8 s, then <|endoftext|>: "the window is done"
    (follow,) = tr.accept_window(WindowTask(0, window, continuation=continuation), _result(toks), state)
    assert follow.window.spans == window.spans[1:]
    assert follow.continuation == continuation
    assert state.segments[0][:3] == (0.0, 4.8, "hello")
    # the model now reads the 0.5 s piece (0-0.5 s of the tail) and stops: the 1 s piece goes on
    (again,) = tr.accept_window(follow, _result([1002, 1, 1002 + 25]), state)
    assert again.window.spans == window.spans[2:]
    # text running into the last piece ends it: nothing is left unheard
    assert tr.accept_window(again, _result([1002, 1, 1002 + 50]), state) == ()
    assert [seg[0] for seg in state.segments] == [0.0, 20.0, 30.0]


def test_a_window_read_to_its_last_piece_is_done():
    sr = 16000
    tr = Transcriber(_FakeEngine({1: " hello"}), settings=None)  # type: ignore[arg-type]
    state = FileState(name="x", audio=np.zeros(sr * 40, np.float32), pending=1)
    window = Packed(((0, 5 * sr), (20 * sr, 24 * sr)), gap=sr // 2)  # the second piece starts at 5.5 s
    toks = [1002, 1, 1002 + 250, 1002 + 250, 1, 1002 + 470]  # two segments, the second inside piece two
    assert tr.accept_window(WindowTask(0, window), _result(toks), state) == ()
    assert [seg[2] for seg in state.segments] == ["hello", "hello"]


def test_words_of_a_joined_window_land_in_their_own_part():
    """Word times in window seconds -> the file, through a joined window: each word in the part it
    was said in (0.4 s gap between parts), clamped into its segment, monotonic."""
    sr = 16000
    early, late = Packed(((2 * sr, 6 * sr),), gap=sr * 2 // 5), Packed(((50 * sr, 53 * sr),), gap=sr * 2 // 5)
    joined = join_windows([late, early])  # window: early 0-4 s, gap, late 4.4-7.4 s
    said = [Word(" one", 0.5, 0.9, 0.9), Word(" two", 3.6, 4.2, 0.8), Word(" three", 4.5, 5.0, 0.7)]
    first = _place_words(said[:2], joined, 2.5, 6.0)  # the segment said in the early part
    assert [(w.word, w.start, w.end) for w in first] == [(" one", 2.5, 2.9), (" two", 5.6, 6.0)]
    second = _place_words(said[2:], joined, 50.0, 51.0)
    assert [(w.word, w.start, w.end) for w in second] == [(" three", 50.1, 50.6)]
    # a word starting before its segment (timing slack) is clamped into it, never before it
    assert _place_words([Word(" x", 4.3, 4.6, 0.5)], joined, 50.0, 51.0)[0].start == 50.0


class _ScriptedEngine(_FakeEngine):
    """A fake engine whose model leaves the last 10 s of any row over 22 s undecoded.

    Each row gets one segment "hello" from 0 s to (length - 10) s, then a segment start and a
    stop: the decoding loop's tail case. Shorter rows are read whole, as two segments (one per
    half). Records every batch.
    """

    max_batch = 8
    max_new_tokens = 224

    def __init__(self) -> None:
        # text at a speaking rate, and not repetitive: neither the under-read guard
        # (Guards.min_chars_per_second) nor the compression-ratio fallback fires
        super().__init__({1: " hello there, this sentence is read at an ordinary pace by a patient speaker"})
        self.batches: list[list[float]] = []

    def decode(self, rows, options, *, temperatures):
        ts = lambda s: 1002 + int(round(s / 0.02))  # noqa: E731
        self.batches.append([round(len(r) / 16000, 1) for r in rows])
        results = []
        for row in rows:
            seconds = len(row) / 16000
            if seconds > 22:
                toks = [ts(0), 1, ts(seconds - 10), ts(seconds - 10)]
            else:  # two segments, halves of the row
                toks = [ts(0), 1, ts(seconds / 2), ts(seconds / 2), 1, ts(seconds)]
            results.append(_result(toks))
        return results, {}


def test_tails_of_distant_windows_share_one_encoder_pass():
    """Two 25 s stretches, far apart: both leave a 10 s tail, and the two tails take ONE pass."""
    rng = np.random.default_rng(0)
    audio = np.zeros(16000 * 70, np.float32)
    for a, b in ((0, 25), (40, 65)):
        audio[a * 16000 : b * 16000] = rng.normal(0, 0.1, (b - a) * 16000)
    engine = _ScriptedEngine()
    tr = Transcriber(engine, settings=None)  # type: ignore[arg-type]
    t = tr.transcribe(audio)
    first, *rest = engine.batches
    assert len(first) == 2 and all(24 <= n <= 26 for n in first)  # one window per stretch
    assert len(rest) == 1 and len(rest[0]) == 1  # the two tails, joined
    assert 20 <= rest[0][0] <= 22
    # Four segments in file order: each tail's text lands in its own stretch of the file
    # (a join's times do not send the second tail's words to the first stretch).
    starts = [s.start for s in t.segments]
    assert starts == sorted(starts) and len(starts) == 4
    assert 14 <= starts[1] <= 16 and 39 <= starts[2] <= 41 and 54 <= starts[3] <= 56
    assert all(s.end <= n.start for s, n in zip(t.segments, t.segments[1:]))


def _two_part_window(sr=16000):
    """A joined window of two distant stretches: 0-6 s of the file, then 100-106 s (at 6.4 s)."""
    return join_windows([Packed(((0, 6 * sr),), gap=sr * 2 // 5), Packed(((100 * sr, 106 * sr),), gap=sr * 2 // 5)])


def test_a_segment_across_a_join_is_decoded_again_from_where_it_starts():
    """Segment two runs from part one into part two: only segment one is kept, and decoding goes
    on where segment two began (part two is never lost to part one's timeline)."""
    ts = lambda s: 1002 + int(round(s / 0.02))  # noqa: E731
    tr = Transcriber(_FakeEngine({1: " hello", 2: " across"}), settings=None)  # type: ignore[arg-type]
    state = FileState(name="x", audio=np.zeros(16000 * 120, np.float32), pending=1)
    window = _two_part_window()
    toks = [ts(0), 1, ts(3), ts(3), 2, ts(9), ts(9), 1, ts(12)]
    (follow,) = tr.accept_window(WindowTask(0, window), _result(toks), state)
    assert [p[:3] for p in state.segments] == [(0.0, 3.0, "hello")]
    assert follow.attempt == 0 and follow.window.start == 3 * 16000
    assert [p.spans for p in follow.window.parts] == [((3 * 16000, 6 * 16000),), ((100 * 16000, 106 * 16000),)]


def test_a_first_segment_across_a_join_sends_each_part_back_alone():
    """Nothing can be placed when the window's first segment spans the join: each part it touched
    is decoded again in a row of its own, and the queue never joins them again."""
    from batch_job.stream import share_encoder_passes

    ts = lambda s: 1002 + int(round(s / 0.02))  # noqa: E731
    tr = Transcriber(_FakeEngine({1: " hello"}), settings=None)  # type: ignore[arg-type]
    state = FileState(name="x", audio=np.zeros(16000 * 120, np.float32), pending=1)
    window = _two_part_window()
    follow = tr.accept_window(WindowTask(0, window, continuation=2), _result([ts(1), 1, ts(10)]), state)
    assert state.segments == []
    assert [t.window for t in follow] == list(window.parts)
    assert all(t.alone and t.attempt == 0 and t.continuation == 2 for t in follow)
    queue = list(follow)
    assert share_encoder_passes(queue, {0: state}) == 0 and len(queue) == 2
    # a timestamp straying less than JOIN_SLACK_SECONDS across the join is only noise
    state = FileState(name="x", audio=np.zeros(16000 * 120, np.float32), pending=1)
    assert tr.accept_window(WindowTask(0, window), _result([ts(1), 1, ts(6.7), ts(6.7), 1, ts(12.4)]), state) == ()
    assert [p[:2] for p in state.segments] == [(1.0, 6.0), (100.3, 106.0)]


def test_a_first_segment_across_a_join_leaves_the_parts_it_did_not_touch_joinable():
    """Three parts, the first segment across the first join: parts one and two go back alone,
    part three as it was (it may be joined again), so one bad join costs two solo rows, not three."""
    sr = 16000
    ts = lambda s: 1002 + int(round(s / 0.02))  # noqa: E731
    tr = Transcriber(_FakeEngine({1: " hello"}), settings=None)  # type: ignore[arg-type]
    state = FileState(name="x", audio=np.zeros(sr * 220, np.float32), pending=1)
    gap = sr * 2 // 5
    window = join_windows([Packed(((0, 6 * sr),), gap=gap), Packed(((100 * sr, 106 * sr),), gap=gap),
                           Packed(((200 * sr, 206 * sr),), gap=gap)])  # parts at 0, 6.4 and 12.8 s
    follow = tr.accept_window(WindowTask(0, window, continuation=1), _result([ts(1), 1, ts(10)]), state)
    assert state.segments == []
    assert [t.window for t in follow] == list(window.parts)
    assert [t.alone for t in follow] == [True, True, False]
    assert all(t.attempt == 0 and t.continuation == 1 for t in follow)


def test_a_file_with_tails_finishes_while_other_files_still_decode():
    """A file is handed back as soon as its last window (tails included) is decoded, not when the
    whole queue runs dry: the server answers a request while others go on."""
    from batch_job.stream import TranscriptionStream

    rng = np.random.default_rng(1)
    engine = _ScriptedEngine()
    engine.max_batch = 2
    tr = Transcriber(engine, settings=None)  # type: ignore[arg-type]
    stream = TranscriptionStream(tr, order="fair")  # the server's order: each file a row per batch

    def stretches(n: int, seconds: int) -> np.ndarray:  # n stretches of "speech", 15 s of silence after each
        audio = np.zeros(16000 * (seconds + 15) * n, np.float32)
        for i in range(n):
            start = 16000 * (seconds + 15) * i
            audio[start : start + 16000 * seconds] = rng.normal(0, 0.1, 16000 * seconds)
        return audio

    assert stream.add("short", "short", stretches(1, 25), DecodingOptions()) is None  # one window and its tail
    assert stream.add("long", "long", stretches(8, 15), DecodingOptions()) is None  # eight windows, no tails
    finished_at: dict[str, int] = {}
    for step in range(100):
        done, report = stream.step()
        finished_at.update({key: step for key, _ in done})
        if report is None:
            break
    assert finished_at["short"] < finished_at["long"]
    assert stream.done_windows == stream.total_windows


def test_an_under_read_segment_is_decoded_again_in_two_halves():
    """A 20 s segment of five words (Whisper skipped most of it): the segment before it is kept,
    and its audio is decoded again as two windows cut at the quietest point of its middle third,
    each alone; a half read as badly again is split once more, then kept."""
    sr = 16000
    ts = lambda s: 1002 + int(round(s / 0.02))  # noqa: E731
    tr = Transcriber(_FakeEngine({1: " hello", 2: " tear a thin sheet"}), settings=None)  # type: ignore[arg-type]
    audio = np.random.default_rng(0).normal(0, 0.1, sr * 30).astype(np.float32)
    audio[int(sr * 15.5) : int(sr * 15.6)] = 0.0  # a breath in the middle third of 4-24 s
    state = FileState(name="x", audio=audio, pending=1)
    window = Packed(((0, 30 * sr),))
    halves = tr.accept_window(WindowTask(0, window), _result([ts(0), 1, ts(4), ts(4), 2, ts(24)]), state)
    assert [p[:3] for p in state.segments] == [(0.0, 4.0, "hello")]
    (head,), (tail,) = (h.window.spans for h in halves)
    assert head[0] == 4 * sr and head[1] == tail[0] and tail[1] == 30 * sr
    assert 15.5 * sr <= head[1] < 15.6 * sr  # cut in the breath, not through a word
    assert all(h.alone and h.rereads == 1 for h in halves)
    # the second half under-read again: split again; at the limit the text is kept as it is
    again = tr.accept_window(halves[1], _result([ts(0), 2, ts(12)]), state)
    assert len(again) == 2 and all(h.rereads == 2 for h in again)
    assert tr.accept_window(again[1], _result([ts(0), 2, ts(9)]), state) == ()
    assert state.segments[-1][2] == "tear a thin sheet"
    # text at a speaking rate is never split; short segments never are
    state = FileState(name="x", audio=audio, pending=1)
    words = _FakeEngine({1: " a fairly long sentence that is read at a normal rate of speech, no skipping at all"})
    assert Transcriber(words, settings=None).accept_window(  # type: ignore[arg-type]
        WindowTask(0, window), _result([ts(0), 1, ts(12)]), state) == ()
    assert tr.accept_window(WindowTask(0, window), _result([ts(0), 2, ts(7)]), state) == ()


def test_packed_head_is_what_tail_leaves_out():
    sr = 16000
    window = Packed(((0, 5 * sr), (20 * sr, 24 * sr)), gap=sr // 2)  # the second span starts at 5.5 s in the window
    for cut in (sr, 5 * sr, int(5.2 * sr), 6 * sr):
        head, tail = window.head(cut), window.tail(cut)
        assert head is not None and tail is not None
        covered = sum(b - a for w in (head, tail) for a, b in w.spans)
        assert covered == sum(b - a for a, b in window.spans)  # every sample once: nothing lost, nothing twice
        assert head.spans[-1][1] <= tail.spans[0][0]
    assert window.head(0) is None
    assert window.head(6 * sr).spans == ((0, 5 * sr), (20 * sr, 20 * sr + sr // 2))


def test_finish_cuts_a_segment_that_runs_past_the_next_one():
    engine = _FakeEngine({})
    tr = Transcriber(engine, settings=None)  # type: ignore[arg-type]
    state = FileState(name="x", audio=np.zeros(16000 * 400, np.float32))
    state.segments = [Piece(10.0, 300.0, "runs across a join", 0), Piece(50.0, 55.0, "later", 1),
                      Piece(300.0, 305.0, "last", 2)]
    t = tr.finish_file(state).transcript
    assert [(s.start, s.end) for s in t.segments] == [(10.0, 50.0), (50.0, 55.0), (300.0, 305.0)]


# ---------------------------------------------------------------- timestamp rules vs a per-row reference


def _reference_rules(logits, histories, tb, eot, max_initial):
    """openai/whisper's ApplyTimestampRules, row by row (the readable reference)."""
    logits = logits.clone()
    for k, seq in enumerate(histories):
        if not seq:
            logits[k, :tb] = -np.inf
            logits[k, tb + max_initial + 1 :] = -np.inf
        else:
            last_ts = seq[-1] >= tb
            pen_ts = len(seq) < 2 or seq[-2] >= tb
            if last_ts:
                if pen_ts:
                    logits[k, tb:] = -np.inf
                else:
                    logits[k, :eot] = -np.inf
            stamps = [t for t in seq if t >= tb]
            if stamps:
                floor = stamps[-1] if (last_ts and not pen_ts) else stamps[-1] + 1
                logits[k, tb:floor] = -np.inf
        lp = torch.log_softmax(logits[k].float(), -1)
        if torch.logsumexp(lp[tb:], -1) > lp[:tb].max():
            logits[k, :tb] = -np.inf
    return logits


@pytest.mark.parametrize("step", [0, 1, 2, 5])
def test_vectorised_timestamp_rules_match_reference(step):
    rng = random.Random(step)
    V, tb, eot, B = 60, 40, 30, 16
    tokens = SpecialTokens(sot=31, eot=eot, no_timestamps=39, timestamp_begin=tb, no_speech=None, transcribe=None, translate=None)
    histories = []
    for _ in range(B):
        seq, t = [], tb
        for _ in range(step):
            if rng.random() < 0.4:
                t = min(V - 1, t + rng.randrange(0, 4))
                seq.append(t)
            else:
                seq.append(rng.randrange(0, eot))
        histories.append(seq)
    logits = torch.randn(B, V) * 3
    m1 = lambda i: torch.tensor([h[i] if len(h) >= -i else -1 for h in histories])  # noqa: E731
    last_ts = torch.tensor([max([t for t in h if t >= tb], default=-1) for h in histories])
    state = DecodeState(step=step, last=m1(-1), penultimate=m1(-2), last_timestamp=last_ts)
    ours = logits.clone()
    ApplyTimestampRules(tokens, 5).apply(ours, state)
    assert torch.equal(torch.isinf(ours), torch.isinf(_reference_rules(logits, histories, tb, eot, 5)))


@pytest.mark.slow
def test_one_hour_file_stays_under_memory_budget(tmp_path, model_cache_dir):
    """Issue target: a 1-hour file transcribes under 1.5 GB peak RSS with tiny.en (slow: ~2 min).

    Measured on a warm start (graphs built once beforehand, as the image build does).
    """
    import os
    import subprocess
    import sys

    import soundfile as sf

    clip = load_clip("librivox_sonnet001_en.mp3")
    hour = np.tile(clip, int(3600 * 16000 // len(clip)) + 1)[: 3600 * 16000]
    path = tmp_path / "hour.flac"
    sf.write(path, hour, 16000)
    del hour
    # VmHWM, not ru_maxrss: Linux carries the (large) pytest parent's high-water mark across exec.
    code = (
        "import sys; from batch_job.cli import main; rc = main(['transcribe', sys.argv[1], "
        "'--output-dir', sys.argv[2], '--no-progress']); "
        "print('PEAK', next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))); sys.exit(rc)"
    )
    env = {**os.environ, "WHISPER_BATCH_CACHE_DIR": str(model_cache_dir)}
    warm = tmp_path / "warm.flac"
    sf.write(warm, clip[: 16000 * 5], 16000)
    subprocess.run([sys.executable, "-c", code, str(warm), str(tmp_path)], env=env, capture_output=True, check=True)
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path)], env=env, capture_output=True, text=True, check=True)
    peak_kb = int(out.stdout.split("PEAK")[1].split()[0])
    assert peak_kb < 1.5 * 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
    assert (tmp_path / "hour.json").exists()


def test_a_joined_window_keeps_the_budget_of_its_freshest_part():
    """A never-decoded window joined to a tail at the continuation cap must not lose its audio."""
    from batch_job.stream import share_encoder_passes

    sr = 16000
    state = FileState(name="x", audio=np.zeros(sr * 200, np.float32), pending=2)
    tired_tail = WindowTask(0, Packed(((10 * sr, 15 * sr),)), continuation=Guards().max_continuations)
    fresh = WindowTask(0, Packed(((100 * sr, 120 * sr),)))
    other_file = WindowTask(1, Packed(((0, 5 * sr),)))
    retry = WindowTask(0, Packed(((150 * sr, 153 * sr),)), attempt=1)
    queue = [tired_tail, fresh, other_file, retry]
    saved = share_encoder_passes(queue, {0: state, 1: FileState(name="y", audio=np.zeros(sr * 5, np.float32), pending=1)})
    assert saved == 1 and state.pending == 1
    joined = [t for t in queue if t.file == 0 and t.attempt == 0]
    assert len(joined) == 1 and joined[0].continuation == 0
    assert joined[0].window.samples == 25 * sr + joined[0].window.gap
    assert other_file in queue and retry in queue  # other files and retries are never joined


def test_encoder_dtype_setting(monkeypatch):
    from batch_job.engine.loading import cpu_encoder_dtype
    from batch_job.settings import Settings

    assert cpu_encoder_dtype(Settings(encoder_dtype="float32")) == "float32"
    assert cpu_encoder_dtype(Settings(encoder_dtype="bfloat16")) == "bfloat16"
    with pytest.raises(ValueError, match="encoder_dtype must be one of"):
        cpu_encoder_dtype(Settings(encoder_dtype="fp8"))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert cpu_encoder_dtype(Settings()) == "float32"  # auto never picks emulated bf16


def test_bf16_encoder_is_close_and_leaves_the_checkpoint_alone(tiny_engine_fp32, tiny_model):
    """CastEncoder computes in bf16 on a copy; its bf16 cross K/V (what the step reads) stay close to the fp32 graph's."""
    from batch_job.engine.graphs import CastEncoder, EncoderGraph

    model = tiny_model
    fp32 = EncoderGraph(model).eval()
    bf16 = CastEncoder(fp32, torch.bfloat16).eval()
    mel = tiny_engine_fp32.log_mel([load_clip("jfk.flac")], 1)
    with torch.inference_mode():
        want, got = fp32(mel), bf16(mel)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the shared checkpoint untouched
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        assert (a.float() - b).norm() / b.norm() < 0.05


def test_step_reads_bf16_cross_kv_close_to_float32(tiny_engine_fp32, tiny_model):
    """The CPU path hands the step bf16 cross K/V (CastEncoder): the float32 step meets them in
    bf16 and returns float32 logits with the same next token as reading them widened to float32."""
    from batch_job.engine.graphs import CastEncoder, DecoderStepGraph, EncoderGraph, StackedCacheStep

    dims = tiny_engine_fp32.dims
    encoder = CastEncoder(EncoderGraph(tiny_model).eval(), torch.bfloat16).eval()
    step = StackedCacheStep(DecoderStepGraph(tiny_model)).eval()
    mel = tiny_engine_fp32.log_mel([load_clip("jfk.flac")], 1)
    cache = torch.zeros(dims.layers, 1, dims.heads, tiny_engine_fp32.cache_len, dims.head_dim)
    tokens, position = torch.full((1, 1), tiny_engine_fp32.tokens.sot, dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    with torch.inference_mode():
        cross_k, cross_v = encoder(mel)
        narrow, new_k, _ = step(tokens, position, cache, cache, cross_k, cross_v)
        wide, *_ = step(tokens, position, cache, cache, cross_k.float(), cross_v.float())
    assert cross_k.dtype == torch.bfloat16 and narrow.dtype == torch.float32 and new_k.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: the logits move by about 1%, how much depending on the CPU's
    # bf16 kernels (oneDNN's AMX ones round differently from AVX512-BF16); the ranking must not.
    assert (narrow - wide).norm() / wide.norm() < 0.02
    assert narrow.topk(5).indices.tolist() == wide.topk(5).indices.tolist()


def _fixed_then_shrunk(engine, rows, options):
    """``rows`` decoded in a batch that keeps its size, then in one that shrinks; and the moves
    (``(from, to)`` bucket sizes) the second one made."""
    moves = []
    original = type(engine._inference[4]).move_rows

    def counting(self, keep, into):
        moves.append((self.shape.batch, into.shape.batch))
        return original(self, keep, into)

    try:
        engine.shrinks = False
        fixed, _ = engine.decode(rows, options)
        engine.shrinks = True
        type(engine._inference[4]).move_rows = counting
        shrunk, _ = engine.decode(rows, options)
    finally:
        type(engine._inference[4]).move_rows = original
        engine.shrinks = True
    return fixed, shrunk, moves


def test_batch_shrinks_as_rows_finish_with_the_same_tokens(tiny_engine_fp32):
    """Rows that finish leave the batch (the step runs on the bucket of the rows left): with float32
    graphs every row's tokens and log-probabilities are those of the fixed-size batch."""
    engine = tiny_engine_fp32
    rows = [load_clip("jfk.flac", s) for s in (11.0, 2.0, 6.0, 4.0)]  # texts of different lengths
    assert engine.shrinks
    fixed, shrunk, moves = _fixed_then_shrunk(engine, rows, DecodingOptions(max_new_tokens=96))
    assert moves and all(a > b for a, b in moves) and moves[0][0] == 4  # 4 rows -> fewer, never back
    assert len({len(r.tokens) for r in fixed}) > 1
    for a, b in zip(fixed, shrunk, strict=True):
        assert a.tokens == b.tokens
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-4)
        assert max((abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)), default=0.0) < 1e-3
    assert all(i.cross_k is None for i in engine._inference.values())  # every bucket it used released


def test_move_rows_needs_a_batch_of_exactly_the_rows_kept(tiny_engine_fp32):
    engine = tiny_engine_fp32
    four, two = engine._inference[4], engine._inference[2]
    with pytest.raises(RuntimeError, match="start"):
        four.move_rows(torch.tensor([0, 1]), two)
    with torch.inference_mode():
        four.start(engine.log_mel([load_clip("jfk.flac", 3.0)], 4))
        try:
            with pytest.raises(ValueError, match="cannot move 3 rows into a batch of 2"):
                four.move_rows(torch.tensor([0, 1, 3]), two)
            moved = four.move_rows(torch.tensor([3, 1]), two)
            assert moved is two and four.cross_k is None
            assert torch.equal(two.cross_k[:, 0], two.cross_k[:, 1])  # rows 1 and 3 were both padding (silence)
        finally:
            four.finish()
            two.finish()


def test_rows_that_leave_the_batch_keep_their_word_timestamp_attention(tiny_words_transcriber):
    """With word timestamps the batch shrinks too: each row's attention goes on into its own
    place in the first batch's record, so its words' times are those of the fixed-size batch."""
    engine = tiny_words_transcriber.engine
    rows = [load_clip("jfk.flac", s) for s in (11.0, 2.0, 6.0, 4.0)]
    fixed, shrunk, moves = _fixed_then_shrunk(engine, rows, DecodingOptions(max_new_tokens=96))
    assert moves and moves[0][0] == 4
    same = [(a, b) for a, b in zip(fixed, shrunk, strict=True) if a.tokens == b.tokens]
    assert len(same) >= 3  # int8 steps of another batch size may round one row differently
    for a, b in same:
        assert a.alignment is not None and b.alignment is not None and a.alignment.shape == b.alignment.shape
        assert float(np.abs(a.alignment - b.alignment).max()) < 0.02
        assert float(b.alignment[:, -1].sum()) > 0  # the last query (the one that chose eot) was written


def test_rows_of_one_array_are_encoded_once_with_the_same_tokens(tiny_engine_fp32):
    """One window at several temperatures (the same array in every row) runs the encoder once, in
    the bucket of its distinct rows, then fills the batch: greedy rows give the tokens of copies."""
    engine = tiny_engine_fp32
    clip, other = load_clip("jfk.flac", 6.0), load_clip("jfk.flac", 3.0)
    started = []
    original = type(engine._inference[2]).start

    def counting(self, mel):
        started.append(self.shape.batch)
        return original(self, mel)

    options = DecodingOptions(max_new_tokens=64)
    copies, _ = engine.decode([clip.copy(), clip.copy(), other, clip.copy()], options)
    type(engine._inference[2]).start = counting
    try:
        shared, _ = engine.decode([clip, clip, other, clip], options)
    finally:
        type(engine._inference[2]).start = original
    assert started == [2]  # two distinct arrays: bucket 2 encoded, the 4-row batch decoded
    assert [r.tokens for r in shared] == [r.tokens for r in copies]
    assert shared[0].tokens == shared[1].tokens == shared[3].tokens != shared[2].tokens
    assert all(i.cross_k is None for i in engine._inference.values())


def test_a_failed_window_is_retried_at_the_other_temperatures_at_once():
    """The retry of a window that fails at temperature 0 asks for every temperature left in one
    task; the stream takes its attempts in order, so the first that passes is the one kept."""
    ts = lambda s: 1002 + int(s / 0.02)  # noqa: E731
    engine = _FakeEngine({1: " the same words again and again", 2: " a sentence that reads well"})
    tr = Transcriber(engine, settings=None)  # type: ignore[arg-type]
    looping = [t for i in range(12) for t in (ts(i), 1, ts(i + 1))]
    state = FileState(name="x", audio=np.zeros(16000 * 20, np.float32), pending=1)
    task = WindowTask(file=0, window=Packed(((0, 16000 * 20),)))
    (retry,) = tr.accept_window(task, _result(looping), state)
    assert (retry.attempt, retry.fan) == (1, 5) and retry.window is task.window

    class Handler:
        batch_size = 8

        def __init__(self):
            self.batches = []

        def decode_windows(self, tasks, files, options, rows=None):
            self.batches.append([(t.attempt, t.fan) for t in tasks])
            good = _result([ts(0), 2, ts(3)])
            # attempts 1, 2 loop again, 3 and 4 read well: 3 must win, as one after another
            return [tuple(_result(looping) if a < 3 else good for a in range(t.attempt, t.attempt + t.fan))
                    for t in tasks]

        accept_window = tr.accept_window
        finish_file = tr.finish_file

    handler = Handler()
    stream = TranscriptionStream(handler)
    stream._files[0] = state
    stream._queue.append(retry)
    seen = []
    real_accept = tr.accept_window
    handler.accept_window = lambda t, r, s: seen.append(t.attempt) or real_accept(t, r, s)
    finished, _ = stream.step()
    assert handler.batches == [[(1, 5)]]  # one batch, all five temperatures
    assert seen == [1, 2, 3]  # attempt 3 passed: attempts 4 and 5 are never looked at
    assert [s[2] for s in state.segments] == ["a sentence that reads well"]
    assert [k for k, _ in finished] == [0]


def test_a_fallback_wider_than_the_batch_is_split_to_fit():
    """With a batch of 2 rows the five temperatures left go two at a time, in order."""
    ts = lambda s: 1002 + int(s / 0.02)  # noqa: E731
    tr = Transcriber(_FakeEngine({1: " again and again and again"}), settings=None)  # type: ignore[arg-type]
    looping = [t for i in range(12) for t in (ts(i), 1, ts(i + 1))]

    class Handler:
        batch_size = 2
        batches: list = []

        def decode_windows(self, tasks, files, options, rows=None):
            self.batches.append([(t.attempt, t.fan) for t in tasks])
            return [tuple(_result(looping) for _ in range(t.fan)) for t in tasks]

        accept_window = tr.accept_window
        finish_file = tr.finish_file

    handler = Handler()
    stream = TranscriptionStream(handler)
    stream._files[0] = FileState(name="x", audio=np.zeros(16000 * 20, np.float32), pending=1)
    stream._queue.append(WindowTask(file=0, window=Packed(((0, 16000 * 20),))))
    while stream.queued:
        stream.step()
    assert handler.batches == [[(0, 1)], [(1, 2)], [(3, 2)], [(5, 1)]]


def test_a_row_stops_at_its_token_budget_and_counts_as_truncated(tiny_engine_fp32):
    """``max_tokens`` stops one row early (truncated, its tokens a prefix of the full decoding);
    the other row decodes as it would alone. ``token_budget``: 16 a second + 32, capped."""
    from batch_job.engine.decoding import decode_batch, token_budget

    engine = tiny_engine_fp32
    rows = [load_clip("jfk.flac", 11.0), load_clip("jfk.flac", 11.0)]
    options = DecodingOptions(max_new_tokens=96)
    inference = engine._inference[2]
    with torch.inference_mode():
        inference.start(engine.log_mel(rows, 2))
        try:
            full = decode_batch(inference, engine.tokens, options, n_rows=2, batch_size=2)
            inference.start(engine.log_mel(rows, 2))
            capped = decode_batch(inference, engine.tokens, options, n_rows=2, batch_size=2, max_tokens=[7, 96])
        finally:
            inference.finish()
    assert len(full[0].tokens) > 7 and not full[0].truncated
    assert capped[0].tokens == full[0].tokens[:7] and capped[0].truncated
    assert capped[1].tokens == full[1].tokens and not capped[1].truncated
    assert token_budget(16000 * 5, 224) == 32 + 80
    assert token_budget(int(16000 * 0.5), 224) == 40
    assert token_budget(16000 * 30, 224) == 224


def test_the_fair_order_fits_a_fallback_in_the_rows_left_or_keeps_it_for_the_next_batch():
    """The server's round robin counts a fallback's rows: with 3 of 4 rows taken, a file whose next
    window is a 2-row fallback waits for the next batch, where it goes first (oldest file)."""
    tr = Transcriber(_FakeEngine({1: " fine"}), settings=None)  # type: ignore[arg-type]

    class Handler:
        batch_size = 4
        batches: list = []

        def decode_windows(self, tasks, files, options, rows=None):
            self.batches.append([(files[t.file].name, t.fan) for t in tasks])
            return [tuple(_result([1002, 1, 1002 + 50]) for _ in range(t.fan)) for t in tasks]

        accept_window = tr.accept_window
        finish_file = tr.finish_file

    handler = Handler()
    stream = TranscriptionStream(handler, order="fair")
    one = Packed(((0, 16000),))
    for key, name in enumerate("abc"):
        stream._files[key] = FileState(name=name, audio=np.zeros(16000 * 2, np.float32), pending=2 if name == "c" else 1)
    stream._queue += [WindowTask(0, one), WindowTask(1, one), WindowTask(2, one), WindowTask(2, one, attempt=1, fan=2)]
    stream.step()
    stream.step()
    assert handler.batches == [[("a", 1), ("b", 1), ("c", 1)], [("c", 2)]]
