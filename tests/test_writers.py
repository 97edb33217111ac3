"""batch_job.writers: JSON/TXT/SRT/VTT checked against their specs by parsing."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from batch_job.result import Segment, Transcript
from batch_job.writers import FORMATS, cue_times, format_timestamp, render, write_outputs

SRT_TIME = r"(\d{2,}):([0-5]\d):([0-5]\d),(\d{3})"
VTT_TIME = r"(\d{2,}):([0-5]\d):([0-5]\d)\.(\d{3})"
SRT_CUE = re.compile(rf"^(\d+)\n{SRT_TIME} --> {SRT_TIME}\n([^\n]+)\n$")
VTT_CUE = re.compile(rf"^{VTT_TIME} --> {VTT_TIME}\n([^\n]+)\n$")


def _ms(h: str, m: str, s: str, ms: str) -> int:
    return ((int(h) * 60 + int(m)) * 60 + int(s)) * 1000 + int(ms)


def _transcript(segments: list[tuple[float, float, str]], duration: float = 20.0, **kw) -> Transcript:
    segs = tuple(Segment(a, b, t) for a, b, t in segments)
    return Transcript(text=" ".join(s.text.strip() for s in segs), language="en", duration=duration, segments=segs, model="tiny.en", **kw)


SAMPLE = _transcript(
    [
        (0.0, 2.5, " Hello world."),
        (2.5, 5.0004, " Grüße, 世界! Ünïcödé ✓"),
        (5.0, 7.25, " a --> b <i>not a tag</i> & more"),
        (7.25, 9.9996, " line one\nline two\n\nafter a blank line"),
    ]
)


def parse_srt(text: str) -> list[tuple[int, int, int, str]]:
    """(number, start_ms, end_ms, text) per cue; asserts the whole file matches the grammar."""
    if not text:
        return []
    assert text.endswith("\n") and not text.endswith("\n\n\n")
    cues = []
    for block in text.split("\n\n"):
        block = block if block.endswith("\n") else block + "\n"
        m = SRT_CUE.match(block)
        assert m, f"bad SRT cue: {block!r}"
        g = m.groups()
        cues.append((int(g[0]), _ms(*g[1:5]), _ms(*g[5:9]), g[9]))
    return cues


def parse_vtt(text: str) -> list[tuple[int, int, str]]:
    assert text.startswith("WEBVTT\n")
    body = text[len("WEBVTT\n") :]
    if not body:
        return []
    assert body.startswith("\n")
    cues = []
    for block in body[1:].split("\n\n"):
        block = block if block.endswith("\n") else block + "\n"
        m = VTT_CUE.match(block)
        assert m, f"bad VTT cue: {block!r}"
        g = m.groups()
        assert "-->" not in g[8]
        cues.append((_ms(*g[0:4]), _ms(*g[4:8]), g[8]))
    return cues


def _check_times(times: list[tuple[int, int]], duration_ms: int) -> None:
    prev_end = 0
    for start, end in times:
        assert 0 <= start <= end <= duration_ms
        assert start >= prev_end
        prev_end = end


def test_srt_spec() -> None:
    cues = parse_srt(render(SAMPLE, "srt"))
    assert [c[0] for c in cues] == [1, 2, 3, 4]
    assert cues[0][1:3] == (0, 2500)
    assert cues[1][3] == "Grüße, 世界! Ünïcödé ✓"
    assert "-->" not in cues[2][3] and "not a tag" in cues[2][3]
    assert cues[3][3] == "line one line two after a blank line"
    _check_times([c[1:3] for c in cues], 20_000)


def test_vtt_spec() -> None:
    text = render(SAMPLE, "vtt")
    cues = parse_vtt(text)
    assert len(cues) == 4
    assert cues[1][2] == "Grüße, 世界! Ünïcödé ✓"
    assert cues[2][2] == "a --&gt; b &lt;i&gt;not a tag&lt;/i&gt; &amp; more"  # displays as the original text
    _check_times([c[:2] for c in cues], 20_000)


def test_txt_one_segment_per_line() -> None:
    lines = render(SAMPLE, "txt").splitlines()
    assert lines == ["Hello world.", "Grüße, 世界! Ünïcödé ✓", "a --> b <i>not a tag</i> & more", "line one line two after a blank line"]


def test_json_is_to_dict_plus_extra() -> None:
    extra = {"source": {"etag": "abc", "version_id": None}, "words": "ünï"}
    text = render(SAMPLE, "json", extra=extra)
    assert "世界" in text  # ensure_ascii=False
    assert text.startswith("{\n  ")  # indent 2
    data = json.loads(text)
    expected = SAMPLE.to_dict()
    expected.update(extra)
    assert data == json.loads(json.dumps(expected))


def test_json_non_finite_numbers_become_null() -> None:
    t = _transcript([(0, 1, "x")], timings={"encode": float("nan")})
    assert json.loads(render(t, "json"))["timings"]["encode"] is None


def test_times_clamped_monotonic_and_never_inverted() -> None:
    t = _transcript(
        [
            (-1.0, 0.4, "before zero"),
            (0.3, 0.2, "inverted and overlapping"),
            (1.0004, 1.0006, "rounding"),  # 1000 ms → 1001 ms: fine; must not invert
            (1.0006, 1.0004, "rounding inverted"),
            (float("nan"), 2.0, "nan start"),
            (19.5, 25.0, "past the end"),
            (30.0, 31.0, "entirely past the end"),
        ],
        duration=20.0,
    )
    times = cue_times(t.segments, t.duration)
    _check_times(times, 20_000)
    assert times[0] == (0, 400)
    assert times[5] == (19_500, 20_000) and times[6] == (20_000, 20_000)
    srt = parse_srt(render(t, "srt"))
    vtt = parse_vtt(render(t, "vtt"))
    assert [c[1:3] for c in srt] == times == [c[:2] for c in vtt]


def test_unknown_duration_does_not_clamp_to_zero() -> None:
    t = _transcript([(1.0, 2.0, "x")], duration=0.0)
    assert cue_times(t.segments, t.duration) == [(1000, 2000)]


def test_timestamps_over_100_hours() -> None:
    assert format_timestamp(0) == "00:00:00,000"
    assert format_timestamp(3599.9996) == "01:00:00,000"
    assert format_timestamp(100 * 3600 + 61.5, decimal=".") == "100:01:01.500"
    t = _transcript([(360_000.0, 360_001.25, "late")], duration=400_000.0)
    assert parse_srt(render(t, "srt"))[0][1:3] == (360_000_000, 360_001_250)
    assert parse_vtt(render(t, "vtt"))[0][:2] == (360_000_000, 360_001_250)


def test_empty_transcript_gives_valid_empty_files(tmp_path: Path) -> None:
    t = _transcript([], duration=0.0)
    assert render(t, "srt") == "" and parse_srt("") == []
    assert render(t, "txt") == ""
    assert render(t, "vtt") == "WEBVTT\n" and parse_vtt(render(t, "vtt")) == []
    assert json.loads(render(t, "json"))["segments"] == []
    paths = write_outputs(t, tmp_path, "empty", FORMATS)
    assert [p.name for p in paths] == ["empty.txt", "empty.srt", "empty.vtt", "empty.json"]
    assert (tmp_path / "empty.vtt").read_text(encoding="utf-8") == "WEBVTT\n"


def test_blank_segments_are_skipped_and_numbering_stays_dense() -> None:
    t = _transcript([(0, 1, "a"), (1, 2, "   "), (2, 3, "b")])
    assert [c[0] for c in parse_srt(render(t, "srt"))] == [1, 2]
    assert render(t, "txt") == "a\nb\n"


def test_write_outputs_atomic_json_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_replace = os.replace

    def spy(src, dst):
        order.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "out"
    paths = write_outputs(SAMPLE, out, "dir/sub/talk.mp3", ["JSON", "srt", "txt", "vtt", "srt"], extra={"job": 1})
    assert order == ["talk.mp3.srt", "talk.mp3.txt", "talk.mp3.vtt", "talk.mp3.json"]
    assert paths == [out / "dir/sub" / n for n in order]
    assert json.loads(paths[-1].read_text(encoding="utf-8"))["job"] == 1
    assert sorted(p.name for p in (out / "dir/sub").iterdir()) == sorted(order)  # no temp files left
    assert paths[0].read_bytes().decode("utf-8") == render(SAMPLE, "srt")


def test_unknown_format_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="docx"):
        write_outputs(SAMPLE, tmp_path, "x", ["txt", "docx"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        render(SAMPLE, "pdf")


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_outputs(SAMPLE, tmp_path, "x", ["json"])
    assert list(tmp_path.iterdir()) == []
