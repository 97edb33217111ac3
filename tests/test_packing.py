"""Packing short stretches of speech into one encoder window, and mapping times back to the file."""

from __future__ import annotations

import numpy as np

from batch_job.segment import Packed, Window, pack_windows

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
