"""Packing short stretches of speech into one encoder window, and mapping times back to the file."""

from __future__ import annotations

import numpy as np
import pytest

from batch_job.segment import Joined, Packed, Window, group_to_fill, join_windows, pack_windows

SR = 16000


def test_pack_keeps_order_and_limit():
    windows = [Window(0, 5 * SR), Window(10 * SR, 18 * SR), Window(40 * SR, 52 * SR), Window(60 * SR, 89 * SR)]
    packed = pack_windows(windows, max_seconds=30, gap_seconds=0.5)
    assert [p.spans for p in packed] == [
        ((0, 5 * SR), (10 * SR, 18 * SR), (40 * SR, 52 * SR)),
        ((60 * SR, 89 * SR),),
    ]
    assert all(p.samples <= 30 * SR for p in packed)
    # every input sample range appears exactly once, in order
    flat = [s for p in packed for s in p.spans]
    assert flat == [(w.start, w.end) for w in windows]


def test_audio_and_time_mapping_roundtrip():
    audio = np.arange(100 * SR, dtype=np.float32)  # sample value == file index
    p = Packed(((2 * SR, 4 * SR), (50 * SR, 53 * SR)), gap=SR // 2)
    row = p.audio(audio)
    assert len(row) == p.samples == 5 * SR + SR // 2
    # inside the first span
    assert p.to_file(SR) == int(row[SR]) == 3 * SR
    # inside the second span: window sample -> the same file sample the row holds
    k = 2 * SR + SR // 2 + 100
    assert p.to_file(k) == int(row[k]) == 50 * SR + 100
    # inside the inserted gap: the end of the span before it
    assert p.to_file(2 * SR + 10) == 4 * SR


def test_tail_after_a_consumed_point():
    p = Packed(((0, 10 * SR), (20 * SR, 30 * SR)), gap=SR)
    assert p.tail(5 * SR).spans == ((5 * SR, 10 * SR), (20 * SR, 30 * SR))
    assert p.tail(10 * SR + SR // 2).spans == ((20 * SR, 30 * SR),)  # consumed into the gap
    assert p.tail(13 * SR).spans == ((22 * SR, 30 * SR),)
    assert p.tail(p.samples) is None



def test_join_keeps_parts_in_file_order_and_maps_back():
    late, early = Packed(((50 * SR, 55 * SR),), gap=SR), Packed(((2 * SR, 4 * SR), (8 * SR, 9 * SR)), gap=SR)
    joined = join_windows([late, early])
    assert isinstance(joined, Joined) and joined.parts == (early, late)
    assert joined.samples == late.samples + early.samples + SR
    audio = np.arange(60 * SR, dtype=np.float32)  # sample value == file index
    row = joined.audio(audio)
    assert len(row) == joined.samples
    k = joined.samples - 10  # inside the late part
    assert joined.place(k, k + 5) == (int(row[k]), int(row[k]) + 5) == (55 * SR - 10, 55 * SR - 5)
    # joining a joined window with one more flattens the parts
    third = Packed(((30 * SR, 31 * SR),), gap=SR)
    assert join_windows([joined, third]).parts == (early, third, late)


def test_joined_segment_goes_to_the_part_it_overlaps_most():
    """A timestamp that strays across the join never moves text to the other part of the file."""
    a, b = Packed(((10 * SR, 15 * SR),), gap=SR), Packed(((300 * SR, 320 * SR),), gap=SR)
    joined = join_windows([a, b])  # window: a at 0-5 s, silence 5-6 s, b at 6-26 s
    # a segment of b whose start was stamped 0.5 s early, inside a
    assert joined.place(int(4.5 * SR), 12 * SR) == (300 * SR, 306 * SR)
    # a segment of a whose end runs into the gap and a little into b
    assert joined.place(1 * SR, int(6.2 * SR)) == (11 * SR, 15 * SR)


def test_joined_tail_keeps_the_unread_parts():
    a, b = Packed(((10 * SR, 15 * SR),), gap=SR), Packed(((300 * SR, 320 * SR),), gap=SR)
    joined = join_windows([a, b])
    t = joined.tail(3 * SR)
    assert isinstance(t, Joined) and t.parts == (Packed(((13 * SR, 15 * SR),), gap=SR), b)
    assert joined.tail(int(5.5 * SR)) == b  # consumed into the gap: only b is left, as itself
    assert joined.tail(10 * SR) == Packed(((304 * SR, 320 * SR),), gap=SR)
    assert joined.tail(joined.samples) is None


def test_join_refuses_overlap_and_mixed_gaps():
    with pytest.raises(ValueError, match="overlapping"):
        join_windows([Packed(((0, 10 * SR),), gap=SR), Packed(((5 * SR, 12 * SR),), gap=SR)])
    with pytest.raises(ValueError, match="different gaps"):
        join_windows([Packed(((0, SR),), gap=SR), Packed(((5 * SR, 6 * SR),), gap=0)])


def test_group_to_fill_uses_fewest_passes_within_the_limit():
    gap = SR // 2
    lengths = [28, 5, 9, 12, 4, 2, 30]  # seconds
    windows, at = [], 0
    for n in lengths:
        windows.append(Packed(((at, at + n * SR),), gap=gap))
        at += (n + 10) * SR
    groups = group_to_fill(windows, max_samples=30 * SR)
    assert sorted(i for g in groups for i in g) == list(range(len(windows)))  # each window once
    for g in groups:
        assert join_windows([windows[i] for i in g]).samples <= 30 * SR
    # 28 and 30 s stay alone; the 32 s of short windows (+ gaps) need two passes, not five
    assert len(groups) == 4
    assert sorted(len(g) for g in groups) == [1, 1, 1, 4]


def test_piece_starts_in_window_samples():
    p = Packed(((2 * SR, 4 * SR), (50 * SR, 53 * SR)), gap=SR // 2)
    assert p.piece_starts() == (0, 2 * SR + SR // 2)
    late = Packed(((70 * SR, 71 * SR),), gap=SR // 2)
    joined = join_windows([late, p])
    # the parts in file order, each part's own pieces, the join's gap between the parts
    assert joined.piece_starts() == (0, 2 * SR + SR // 2, p.samples + SR // 2)
    row = joined.audio(np.arange(80 * SR, dtype=np.float32))
    assert [int(row[s]) for s in joined.piece_starts()] == [2 * SR, 50 * SR, 70 * SR]
