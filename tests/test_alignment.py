"""batch_job.alignment: openai/whisper's word timing (DTW, median filter, word split, merges, clamps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batch_job.alignment import (
    TOKENS_PER_SECOND,
    DurationLimits,
    WordTiming,
    assign_words,
    constrain_segment,
    dtw,
    duration_limits,
    find_alignment,
    median_filter,
    merge_punctuations,
    shift_words,
    split_to_word_tokens,
    truncate_at_sentence_ends,
)


def _dtw_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """openai's dtw_cpu + backtrace, as plain loops (column-major order, float32 accumulator)."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = -np.ones((n + 1, m + 1), dtype=np.float32)
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        if trace[i, j] == 0:
            i, j = i - 1, j - 1
        elif trace[i, j] == 1:
            i -= 1
        else:
            j -= 1
    out = np.array(path[::-1]).T
    return out[0], out[1]


def _zero_path_cost(shape: tuple[int, int], cells: list[tuple[int, int]]) -> np.ndarray:
    cost = np.ones(shape)
    for cell in cells:
        cost[cell] = 0.0
    return cost


# --------------------------------------------------------------------------- DTW


def test_dtw_diagonal_with_left_steps() -> None:
    # token 0 spans frames 0-1, token 1 frames 2-3, token 2 frame 4: the path steps left within a token.
    cost = _zero_path_cost((3, 5), [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4)])
    text, time = dtw(cost)
    assert text.tolist() == [0, 0, 1, 1, 2]
    assert time.tolist() == [0, 1, 2, 3, 4]


def test_dtw_up_steps_when_tokens_share_a_frame() -> None:
    cost = _zero_path_cost((4, 2), [(0, 0), (1, 0), (2, 1), (3, 1)])
    text, time = dtw(cost)
    assert text.tolist() == [0, 1, 2, 3]
    assert time.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 5), (9, 4), (17, 40)])
def test_dtw_matches_openai_loops_including_ties(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for x in (rng.normal(size=shape), np.round(rng.normal(size=shape))):  # rounded: many ties
        got, want = dtw(x), _dtw_reference(x)
        assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()


def test_dtw_rejects_empty() -> None:
    with pytest.raises(ValueError):
        dtw(np.zeros((0, 3)))


# --------------------------------------------------------------------------- median filter


def test_median_filter_reflect_padding_by_hand() -> None:
    x = np.array([1.0, 5.0, 2.0, 8.0, 3.0])
    # width 3, padded [5 | 1 5 2 8 3 | 8]
    assert median_filter(x, 3).tolist() == [5.0, 2.0, 5.0, 3.0, 8.0]
    # width 5, padded [2 5 | 1 5 2 8 3 | 8 2]
    assert median_filter(x, 5).tolist() == [2.0, 5.0, 3.0, 5.0, 3.0]
    rows = median_filter(np.stack([x, -x]), 3)  # along the last axis, rows independent
    assert rows.tolist() == [[5.0, 2.0, 5.0, 3.0, 8.0], [-5.0, -2.0, -5.0, -3.0, -8.0]]


def test_median_filter_short_input_unchanged_and_width_checked() -> None:
    x = np.array([3.0, 1.0, 2.0])
    assert median_filter(x, 7).tolist() == [3.0, 1.0, 2.0]  # T <= width // 2: as openai
    with pytest.raises(ValueError):
        median_filter(x, 4)


# --------------------------------------------------------------------------- words

TEXT_VOCAB = {1: " Hello", 2: ",", 3: " wor", 4: "ld", 5: "!", 6: " it", 7: "'s", 8: "."}


def _decode_text(ids) -> str:
    return "".join(TEXT_VOCAB[i] for i in ids)


BYTE_VOCAB = {
    10: "你".encode(),
    11: b"\xe5\xa5",  # first two bytes of 好
    12: b"\xbd",  # its last byte
    13: "。".encode(),
    14: b"\xff",  # never valid UTF-8
    20: b" caf",
    21: b"\xc3",  # é split over two tokens
    22: b"\xa9",
    23: b"!",
}


def _decode_bytes(ids) -> str:
    return b"".join(BYTE_VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def test_split_on_spaces_and_punctuation() -> None:
    words, tokens = split_to_word_tokens([1, 2, 3, 4, 5, 6, 7], _decode_text, no_space=False)
    assert words == [" Hello", ",", " world", "!", " it's"]
    assert tokens == [[1], [2], [3, 4], [5], [6, 7]]


def test_split_on_unicode_waits_for_whole_characters() -> None:
    words, tokens = split_to_word_tokens([10, 11, 12, 13], _decode_bytes, no_space=True)
    assert words == ["你", "好", "。"]
    assert tokens == [[10], [11, 12], [13]]
    # an invalid byte is a U+FFFD in the full text too: it is a piece of its own, not a wait
    words, tokens = split_to_word_tokens([10, 14, 11, 12], _decode_bytes, no_space=True)
    assert words == ["你", "\ufffd", "好"] and tokens == [[10], [14], [11, 12]]
    # spaced languages first split on characters: é's two tokens stay inside " café"
    words, tokens = split_to_word_tokens([20, 21, 22, 23, 13], _decode_bytes, no_space=False)
    assert words == [" café", "!。"] and tokens == [[20, 21, 22], [23, 13]]  # "。" is not ASCII punctuation (openai)


# --------------------------------------------------------------------------- find_alignment


def _block_attention(blocks: list[tuple[int, int]], heads: int = 3, frames: int = 1500) -> np.ndarray:
    """[heads, len(blocks), frames]: row r attends (softmax) to frames blocks[r], a little to the rest."""
    logits = np.zeros((heads, len(blocks), frames))
    for r, (a, b) in enumerate(blocks):
        logits[:, r, a:b] = 6.0
    logits[:, -1, 200:] = 9.0  # eot row also stares at padding past the real audio: cropped away
    logits += np.random.default_rng(0).normal(scale=0.3, size=logits.shape)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


# tokens " Hello" | " wor" "ld" | "." | eot, over encoder positions 0-25 | 25-60 | 60-75 | 75-100
BLOCKS = [(0, 25), (25, 45), (45, 60), (60, 75), (75, 100)]
TOKENS = [1, 3, 4, 8]
PROBS = [0.9, 0.8, 0.6, 0.5]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_find_alignment_recovers_block_times(as_tensor: bool) -> None:
    weights = _block_attention(BLOCKS)
    if as_tensor:
        weights = torch.tensor(weights, dtype=torch.float32)
    words = find_alignment(weights, TOKENS, PROBS, num_frames=200, decode=_decode_text, no_space=False)
    assert [w.word for w in words] == [" Hello", " world", "."]
    assert [w.tokens for w in words] == [(1,), (3, 4), (8,)]
    expected = [(0.0, 0.5), (0.5, 1.2), (1.2, 1.5)]
    for w, (start, end) in zip(words, expected):
        assert w.start == pytest.approx(start, abs=0.02) and w.end == pytest.approx(end, abs=0.02)
    assert [w.probability for w in words] == pytest.approx([0.9, 0.7, 0.5])


def test_find_alignment_words_monotonic_on_noise() -> None:
    rng = np.random.default_rng(1)
    w = rng.random((4, 8, 1500))
    w /= w.sum(axis=-1, keepdims=True)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    words = find_alignment(w, tokens, [0.5] * 7, num_frames=3000, decode=_decode_text, no_space=False)
    assert sum(len(x.tokens) for x in words) == len(tokens)
    for a, b in zip(words, words[1:]):
        assert a.start <= a.end == b.start <= b.end
    assert all(0.0 <= x.start <= x.end <= 1500 / TOKENS_PER_SECOND for x in words)


def test_find_alignment_shapes_checked() -> None:
    assert find_alignment(np.zeros((1, 1, 10)), [], [], 20, _decode_text, no_space=False) == []
    with pytest.raises(ValueError, match="text tokens \\+ eot"):
        find_alignment(np.ones((2, 4, 10)), TOKENS, PROBS, 20, _decode_text, no_space=False)


# --------------------------------------------------------------------------- post-processing


def _w(word: str, start: float, end: float, tokens: tuple[int, ...] = (0,), p: float = 1.0) -> WordTiming:
    return WordTiming(word=word, tokens=tokens, start=start, end=end, probability=p)


def test_merge_punctuations() -> None:
    words = [_w(' "', 0, 0.1, (1,)), _w("Hello", 0.1, 0.5, (2,)), _w(",", 0.5, 0.6, (3,)), _w(" world", 0.6, 1, (4,)), _w(".", 1, 1.1, (5,))]
    merged = merge_punctuations(words)
    assert [w.word for w in merged] == [' "Hello,', " world."]
    assert [w.tokens for w in merged] == [(1, 2, 3), (4, 5)]
    assert [(w.start, w.end) for w in merged] == [(0.1, 0.5), (0.6, 1)]  # the receiving word's times
    # a leading mark without a space before it, or after a word ending in a space, stays put
    kept = merge_punctuations([_w("(", 0, 1), _w(" a", 1, 2)])
    assert [w.word for w in kept] == ["(", " a"]
    assert [w.word for w in merge_punctuations([_w(" a ", 0, 1), _w("!", 1, 2)])] == [" a ", "!"]


def test_sentence_end_truncation() -> None:
    words = [_w(" a", 0, 0.2), _w(" b", 0.2, 0.4), _w(".", 0.4, 0.5), _w(" c", 0.5, 3.0), _w(" d", 3.0, 3.2)]
    limits = duration_limits(words)
    assert limits == DurationLimits(median=pytest.approx(0.2), max=pytest.approx(0.4))
    out = truncate_at_sentence_ends(words, limits)
    assert out[3].start == pytest.approx(2.6) and out[3].end == 3.0  # the word after "." loses its head
    long_mark = truncate_at_sentence_ends([_w(" a", 0, 0.2), _w("!", 0.2, 2.0)], DurationLimits(0.2, 0.4))
    assert long_mark[1].end == pytest.approx(0.6)
    assert duration_limits([_w(" a", 0, 5.0)]).median == 0.7  # capped


def test_constrain_segment_prefers_segment_bounds_for_overlong_edges() -> None:
    limits = DurationLimits(0.2, 0.4)
    words = [_w(" a", 0.0, 1.0), _w(" b", 1.0, 3.0)]
    seg = constrain_segment(words, 0.8, 2.0, limits, last_speech=0.9)
    assert seg.words[0].start == pytest.approx(0.8) and seg.start == 0.8
    assert seg.words[-1].end == pytest.approx(2.0) and seg.end == 2.0
    # words that agree with the segment: the segment snaps to them
    snapped = constrain_segment([_w(" a", 1.1, 1.3)], 1.0, 1.5, limits, last_speech=1.0)
    assert (snapped.start, snapped.end) == (1.1, 1.3)
    assert constrain_segment([], 1.0, 2.0, limits, last_speech=0.0).start == 1.0


def test_assign_words_by_token_count_with_offset() -> None:
    alignment = [_w(" Hello", 0.0, 0.5, (1,)), _w(",", 0.5, 0.6, (2,)), _w(" world", 0.6, 1.0, (3, 4)), _w("!", 1.0, 1.2, (5,))]
    segs, last = assign_words(alignment, [[1, 2], [3, 4, 5]], [(10.0, 10.6), (10.6, 11.2)], last_speech=10.0, time_offset=10.0)
    assert [[w.word for w in s.words] for s in segs] == [[" Hello,"], [" world!"]]
    assert [w.tokens for s in segs for w in s.words] == [(1, 2), (3, 4, 5)]
    assert (segs[1].words[0].start, segs[1].words[0].end) == (10.6, 11.0)
    assert last == segs[1].end
    with pytest.raises(ValueError):
        assign_words(alignment, [[1]], [], last_speech=0.0)


def test_shift_words() -> None:
    shifted = shift_words([_w(" a", 0.5, 1.0)], 30.0)
    assert (shifted[0].start, shifted[0].end, shifted[0].word) == (30.5, 31.0, " a")
