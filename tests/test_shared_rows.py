"""Short windows of different files sharing one encoder row (batch_job/shared_rows.py)."""

from __future__ import annotations

import dataclasses

import jiwer
import numpy as np
from conftest import load_clip, reference_text
from whisper_normalizer.english import EnglishTextNormalizer

from batch_job.engine.decoding import DecodingOptions, DecodingResult
from batch_job.result import FileResult
from batch_job.shared_rows import join_row, part_offsets, plan_rows, split_row
from batch_job.stream import TranscriptionStream
from batch_job.transcribe import Transcriber

SR = 16000
TB = 50363  # tiny.en's <|0.00|>


def ts(seconds: float) -> int:
    return TB + int(round(seconds / 0.02))


def result(tokens: list[int], **kw) -> DecodingResult:
    fields = dict(language="en", avg_logprob=-0.2, no_speech_prob=0.01, temperature=0.0, truncated=False,
                  token_logprobs=tuple(-0.1 for _ in tokens))
    fields.update(kw)
    return DecodingResult(tokens=tuple(tokens), **fields)


def test_plan_rows_first_fit_within_30_s_and_the_row_limit():
    lengths = [20 * SR, 12 * SR, 9 * SR, 8 * SR, 5 * SR, 3 * SR]
    rows = plan_rows(lengths, [True] * 6, max_rows=2, gap=SR)
    assert rows == [(0, 2), (1, 3, 4)]  # 20+1+9 = 30 s; 12+1+8+1+5 = 27 s, +1+3 would be 31 s: waits
    for row in rows:
        assert sum(lengths[i] for i in row) + SR * (len(row) - 1) <= 30 * SR


def test_plan_rows_keeps_unshareable_windows_alone_and_leaves_what_does_not_fit():
    lengths = [10 * SR, 10 * SR, 5 * SR, 5 * SR]
    rows = plan_rows(lengths, [True, False, True, True], max_rows=2, gap=SR)
    assert rows == [(0, 2, 3), (1,)]
    assert plan_rows(lengths, [False] * 4, max_rows=2) == [(0,), (1,)]  # the rest waits


def test_plan_rows_never_puts_windows_of_one_missed_row_together_again():
    lengths = [9 * SR, 8 * SR, 7 * SR, 6 * SR]
    missed = [(3,), (3,), (3,), ()]  # the first three shared row 3, which passed them over
    rows = plan_rows(lengths, [True] * 4, max_rows=4, gap=SR, missed=missed)
    assert rows == [(0, 3), (1,), (2,)]
    assert plan_rows(lengths, [True] * 4, max_rows=4, gap=SR) == [(0, 1, 2), (3,)]


def test_split_row_rebases_each_segment_to_its_window():
    parts = [5 * SR, 4 * SR]
    off = part_offsets(parts, SR)[1] / SR  # 6.0 s
    row = result([ts(0.0), 11, 12, ts(4.8), ts(off + 0.2), 21, 22, 23, ts(off + 3.5)])
    a, b = split_row(row, parts, timestamp_begin=TB, gap=SR)
    assert a.tokens == (ts(0.0), 11, 12, ts(4.8))
    assert b.tokens == (ts(0.2), 21, 22, 23, ts(3.5))
    assert a.alignment is None and b.language == "en"


def test_split_row_refuses_a_segment_across_two_files():
    parts = [5 * SR, 4 * SR]
    row = result([ts(0.0), 11, ts(4.0), ts(4.2), 12, 13, ts(8.0)])  # 4.2-8.0 s covers the join at 5-6 s
    assert split_row(row, parts, timestamp_begin=TB, gap=SR) == [None, None]


def test_split_row_keeps_the_windows_a_crossing_segment_does_not_touch():
    parts = [5 * SR, 4 * SR, 4 * SR]  # windows at 0-5, 6-10 and 11-15 s
    row = result([ts(0.0), 11, ts(4.0), ts(4.2), 12, 13, ts(8.0), ts(11.2), 31, 32, ts(14.5)])
    first, second, third = split_row(row, parts, timestamp_begin=TB, gap=SR)
    assert first is None and second is None  # 4.2-8.0 s lies across the first two: neither gets it
    assert third is not None and third.tokens == (ts(0.2), 31, 32, ts(3.5))


def test_split_row_lets_a_segment_close_in_the_next_windows_leading_silence():
    parts = [5 * SR, 4 * SR]  # the second window (6-10 s) is silent until 0.8 s into it
    row = result([ts(0.0), 11, 12, ts(6.7), ts(6.7), 21, ts(9.5)])  # closed where the next speech starts
    speech = [(0, 5 * SR), (int(0.8 * SR), 4 * SR)]
    a, b = split_row(row, parts, timestamp_begin=TB, gap=SR, speech=speech)
    assert a.tokens == (ts(0.0), 11, 12, ts(5.0)) and b.tokens == (ts(0.7), 21, ts(3.5))
    # the same segment reaching 0.5 s into the next window's speech lies across the two
    late = result([ts(0.0), 11, 12, ts(7.3), ts(7.3), 21, ts(9.5)])
    assert split_row(late, parts, timestamp_begin=TB, gap=SR, speech=speech)[0] is None
    # without the windows' speech extents a window counts as speech from its first sample
    assert split_row(row, parts, timestamp_begin=TB, gap=SR)[0] is None


def test_split_row_returns_unreached_and_silent_windows_for_decoding_alone():
    parts = [5 * SR, 4 * SR, 4 * SR]
    # Decoding stopped after the first window's segment (a repeated timestamp, then the token cap).
    row = result([ts(0.0), 11, ts(3.0), ts(3.0)], truncated=True)
    first, second, third = split_row(row, parts, timestamp_begin=TB, gap=SR)
    assert first is not None and first.tokens[-2:] == (ts(3.0), ts(3.0))  # consumed to 3.0 s, tail after
    assert second is None and third is None
    # A complete row that said nothing in the second window: that window is decoded again.
    row = result([ts(0.0), 11, ts(4.0), ts(12.3), 31, ts(15.0)])
    first, second, third = split_row(row, parts, timestamp_begin=TB, gap=SR)
    assert first is not None and second is None and third is not None


def test_join_row_puts_silence_between_parts():
    a, b = np.ones(3, np.float32), np.full(2, 2.0, np.float32)
    out = join_row([a, b], gap=4)
    assert out.tolist() == [1, 1, 1, 0, 0, 0, 0, 2, 2]


CLIPS = ["jfk.flac", "ljspeech_LJ001-0001.flac", "ljspeech_LJ001-0002.flac", "ljspeech_LJ001-0003.flac",
         "ljspeech_LJ001-0004.flac", "ljspeech_LJ001-0005.flac"]


def wer(refs: list[str], hyps: list[str]) -> float:
    norm = EnglishTextNormalizer()
    return jiwer.wer([norm(r) for r in refs], [norm(h) for h in hyps])


def test_shared_rows_keep_every_files_text_with_it_and_use_fewer_encoder_rows(tiny_settings):
    """Real clips of different speakers through one engine: each file's transcript matches its
    own reference (no words from a neighbour), pooled errors at most 3 words (of 116: 2.6 pt) above decoding each alone."""
    alone = Transcriber.load(dataclasses.replace(tiny_settings, share_rows=False))
    shared = Transcriber.load(dataclasses.replace(tiny_settings, share_rows=True))
    inputs = [(name, load_clip(name)) for name in CLIPS]
    refs = [reference_text(name) for name in CLIPS]
    rows_used: list[int] = []
    original = shared.decode_windows

    def counting(tasks, files, options, rows=None):
        rows_used.append(len(rows) if rows else len(tasks))
        return original(tasks, files, options, rows)

    shared.decode_windows = counting  # type: ignore[method-assign]
    by_alone = {r.name: r.transcript.text for r in alone.transcribe_many(inputs)}
    by_shared = {r.name: r.transcript.text for r in shared.transcribe_many(inputs)}
    assert set(by_shared) == set(CLIPS)
    assert rows_used[0] < len(CLIPS)  # the first batch put several files in one encoder row
    for name, ref in zip(CLIPS, refs):
        own = wer([ref], [by_shared[name]])
        assert own < 0.25, (name, by_shared[name])
        others = [r for n, r in zip(CLIPS, refs) if n != name]
        # No other file's words leaked in: the hypothesis is no closer to any other reference.
        assert all(wer([o], [by_shared[name]]) > own for o in others)
    pooled_alone = wer(refs, [by_alone[n] for n in CLIPS])
    pooled_shared = wer(refs, [by_shared[n] for n in CLIPS])
    # 116 reference words: one word is 0.9 pt. A row's other audio may change a word or two (JFK's
    # "ask" heard as "asked", twice); pooled over 120 clip-decodes the shared rows' WER is lower
    # than alone (docs/benchmarks.md, "Where the time goes"), so this bounds leaks, not word choice.
    words = sum(len(EnglishTextNormalizer()(r).split()) for r in refs)
    assert round((pooled_shared - pooled_alone) * words) <= 3


def test_rows_are_not_shared_with_word_timestamps_or_an_unknown_language(tiny_settings):
    shared = Transcriber.load(dataclasses.replace(tiny_settings, share_rows=True))
    options = shared.options()
    assert shared.shares_rows(options)  # English-only model: the language is known
    words = dataclasses.replace(shared.settings, word_timestamps=True)
    assert not Transcriber.shares_rows(type("T", (), {"settings": words, "engine": shared.engine})(), options)


class _PassOverShared:
    """A WindowHandler whose shared rows never give text (each part comes back ``None``)."""

    batch_size = 8

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, ...]]] = []

    def decode_windows(self, tasks, files, options, rows=None):
        rows = rows or [(i,) for i in range(len(tasks))]
        self.batches.append([tuple(files[tasks[i].file].name for i in row) for row in rows])
        out = [None] * len(tasks)
        for row in rows:
            if len(row) == 1:
                out[row[0]] = (result([ts(0.0), 11, ts(8.0)]),)
        return out

    def accept_window(self, task, result, state):
        return ()

    def finish_file(self, state):
        return FileResult(state.name, None, None)


def test_a_window_a_shared_row_passed_over_meets_new_windows_once_then_goes_alone():
    rng = np.random.default_rng(3)
    t = np.arange(9 * SR) / SR

    def speech() -> np.ndarray:  # 9 s of noise swelling 3 times a second: one window, no pause
        return (rng.standard_normal(len(t)) * 0.3 * (0.55 + 0.45 * np.sin(6 * np.pi * t))).astype(np.float32)

    handler = _PassOverShared()
    stream = TranscriptionStream(handler, share_rows=lambda options: True)
    for name in "abcdef":
        assert stream.add(name, name, speech(), DecodingOptions()) is None
    finished = []
    while len(finished) < 6:
        done, _ = stream.step()
        finished += [k for k, _ in done]
    first, second, third = handler.batches
    assert first == [("a", "b", "c"), ("d", "e", "f")]  # 9 s windows, three to a 30 s row
    assert sorted(second) == [("a", "d"), ("b", "e"), ("c", "f")]  # again shared, never with a first row-mate
    assert sorted(third) == [(n,) for n in "abcdef"]  # passed over twice: alone
    assert sorted(finished) == list("abcdef")
