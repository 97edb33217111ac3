"""batch_job.subtitles cues and their SRT/VTT rendering: line limits, cue durations, word-level VTT."""

from __future__ import annotations

import json
import re

import pytest

from batch_job.result import Segment, Transcript, Word
from batch_job.subtitles import Cue, CueOptions, cue_times, cues, wrap
from batch_job.writers import render

LOREM = (
    "Whisper is a general purpose speech recognition model trained on a large dataset of diverse audio "
    "and it is also a multitasking model that can perform multilingual speech recognition, speech "
    "translation and language identification across many languages."
)
VTT_TAG = re.compile(r"<(\d{2,}):(\d{2}):(\d{2})\.(\d{3})>")
SRT_BLOCK = re.compile(r"^(\d+)\n(\S+) --> (\S+)\n((?:[^\n]+\n)+)$")


def _ms(stamp: str) -> int:
    h, m, rest = stamp.replace(",", ".").split(":")
    s, ms = rest.split(".")
    return ((int(h) * 60 + int(m)) * 60 + int(s)) * 1000 + int(ms)


def _timed(text: str, start: float, per_word: float) -> tuple[Word, ...]:
    return tuple(Word(f" {w}", start + i * per_word, start + (i + 1) * per_word, 0.9) for i, w in enumerate(text.split()))


def _transcript(*segments: Segment, duration: float = 120.0) -> Transcript:
    return Transcript(text=" ".join(s.text for s in segments), language="en", duration=duration, segments=segments, model="tiny")


def _check_cues(got: list[Cue], opts: CueOptions, seg_bounds: tuple[int, int] | None = None) -> None:
    prev_end = 0
    for cue in got:
        assert 1 <= len(cue.lines) <= opts.max_line_count
        for line in cue.lines:
            assert line and line == " ".join(line.split())
            assert len(line) <= opts.max_line_width or " " not in line  # only a lone long word may overflow
        assert prev_end <= cue.start_ms <= cue.end_ms
        prev_end = cue.end_ms
        if seg_bounds:
            assert seg_bounds[0] <= cue.start_ms and cue.end_ms <= seg_bounds[1]
        if cue.words:
            assert tuple(" ".join(w.text for w in cue.words if w.line == n) for n in range(len(cue.lines))) == cue.lines
            assert cue.start_ms == cue.words[0].start_ms and cue.end_ms == cue.words[-1].end_ms


def _all_words(got: list[Cue]) -> list[str]:
    return " ".join(line for cue in got for line in cue.lines).split()


def test_wrap_greedy_and_long_words() -> None:
    assert wrap(["aa", "bb", "cc"], 5) == [["aa", "bb"], ["cc"]]
    assert wrap(["a", "x" * 12, "b"], 5) == [["a"], ["x" * 12], ["b"]]  # never cut mid-word
    assert wrap([], 5) == []


def test_long_segment_without_words_split_by_characters() -> None:
    opts = CueOptions()
    t = _transcript(Segment(10.0, 30.0, f"  {LOREM}\n"))
    got = cues(t, opts)
    assert len(got) > 1
    _check_cues(got, opts, (10_000, 30_000))
    assert _all_words(got) == LOREM.split()  # nothing lost or duplicated
    assert got[0].start_ms == 10_000 and got[-1].end_ms == 30_000
    assert all(a.end_ms == b.start_ms for a, b in zip(got, got[1:]))  # the segment's time shared out
    assert all(not c.words for c in got)


def test_long_segment_with_words_split_at_words_and_time_limit() -> None:
    opts = CueOptions(max_cue_seconds=3.0)
    words = _timed(LOREM, 5.0, 0.4)  # 0.4 s a word: 7 words fit in 3 s
    t = _transcript(Segment(5.0, words[-1].end, LOREM, words))
    got = cues(t, opts)
    _check_cues(got, opts, (5_000, round(words[-1].end * 1000)))
    assert _all_words(got) == LOREM.split()
    assert all(c.end_ms - c.start_ms <= 3_000 for c in got)
    assert [w.text for c in got for w in c.words] == LOREM.split()
    default = cues(t)  # 7 s would allow more; the two-line limit cuts instead
    _check_cues(default, CueOptions())
    assert all(c.end_ms - c.start_ms <= 7_000 for c in default) and len(default) < len(got)


def test_a_lone_overlong_word_gets_its_own_line() -> None:
    long_word = "Pneumonoultramicroscopicsilicovolcanoconiosis-and-more"
    text = f"a {long_word} b"
    opts = CueOptions(max_line_width=20)
    for seg in (Segment(0.0, 3.0, text), Segment(0.0, 3.0, text, _timed(text, 0.0, 1.0))):
        got = cues(_transcript(seg), opts)
        _check_cues(got, opts)
        assert long_word in [line for c in got for line in c.lines]
        assert _all_words(got) == text.split()


def test_word_times_clamped_into_the_segment_and_blank_words_dropped() -> None:
    words = (Word(" early", 0.5, 1.2, 1.0), Word("  ", 1.2, 1.3, 1.0), Word(" late", 1.3, 9.0, 1.0))
    t = _transcript(Segment(1.0, 2.0, "early late", words))
    (cue,) = cues(t)
    assert cue.lines == ("early late",)
    assert (cue.start_ms, cue.end_ms) == (1_000, 2_000)
    assert [(w.start_ms, w.end_ms) for w in cue.words] == [(1_000, 1_200), (1_300, 2_000)]


def test_short_segments_without_words_one_cue_each_same_times() -> None:
    segs = (Segment(0.0, 1.5, " Hi there."), Segment(1.2, 3.0, " Bye."), Segment(3.0, 4.0, "  "))
    t = _transcript(*segs, duration=10.0)
    got = cues(t)
    assert [c.lines for c in got] == [("Hi there.",), ("Bye.",)]
    assert [(c.start_ms, c.end_ms) for c in got] == cue_times(segs, 10.0)[:2]


def test_srt_numbering_continuous_and_multiline() -> None:
    t = _transcript(Segment(0.0, 12.0, LOREM), Segment(12.0, 14.0, " Short."), Segment(14.0, 30.0, LOREM, _timed(LOREM, 14.0, 0.4)))
    srt = render(t, "srt")
    blocks = srt.split("\n\n")
    numbers = []
    for block in blocks:
        block = block if block.endswith("\n") else block + "\n"
        m = SRT_BLOCK.match(block)
        assert m, block
        numbers.append(int(m.group(1)))
        lines = m.group(4).splitlines()
        assert 1 <= len(lines) <= 2 and all(len(line) <= 42 for line in lines)
    assert numbers == list(range(1, len(blocks) + 1))
    assert len(blocks) == len(cues(t))
    assert "Short." in srt


def test_word_level_vtt_tags_ordered_and_inside_the_cue() -> None:
    text = "one two <three> & four five six seven eight nine ten eleven twelve"
    words = _timed(text, 2.0, 0.5)
    t = _transcript(Segment(2.0, 8.0, text, words))
    opts = CueOptions(word_level=True)
    vtt = render(t, "vtt", cue_options=opts)
    body = vtt[len("WEBVTT\n\n") :]
    blocks = body.rstrip("\n").split("\n\n")
    assert len(blocks) == len(cues(t, opts))
    seen_words = []
    for block in blocks:
        timing, *lines = block.split("\n")
        start, end = (_ms(x) for x in timing.split(" --> "))
        payload = "\n".join(lines)
        tags = [_ms(f"{h}:{m}:{s}.{ms}") for h, m, s, ms in VTT_TAG.findall(payload)]
        assert tags, "expected karaoke tags"
        assert all(start < a < end for a in tags) and tags == sorted(set(tags))
        plain = VTT_TAG.sub("", payload)
        assert "<" not in plain and ">" not in plain  # text escaped
        assert not payload.startswith("<")  # the first word has no tag
        seen_words += plain.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").split()
    assert seen_words == text.split()
    # the default (word_level off) writes no tags, and segments without words never get any
    assert not VTT_TAG.search(render(t, "vtt"))
    assert not VTT_TAG.search(render(_transcript(Segment(2.0, 8.0, text)), "vtt", cue_options=opts))


def test_word_level_vtt_skips_tags_that_would_not_be_strictly_inside() -> None:
    words = (Word(" a", 1.0, 1.0, 1.0), Word(" b", 1.0, 1.5, 1.0), Word(" c", 2.0, 2.0, 1.0))
    t = _transcript(Segment(1.0, 2.0, "a b c", words))
    vtt = render(t, "vtt", cue_options=CueOptions(word_level=True))
    assert vtt.endswith("00:00:01.000 --> 00:00:02.000\na b c\n")  # b starts at the cue start, c at its end


def test_json_lists_words_only_when_present() -> None:
    plain = json.loads(render(_transcript(Segment(0.0, 1.0, " hi")), "json"))
    assert plain["segments"] == [{"start": 0.0, "end": 1.0, "text": " hi"}]
    with_words = json.loads(render(_transcript(Segment(0.0, 1.0, " hi", (Word(" hi", 0.1, 0.9, 0.75),))), "json"))
    assert with_words["segments"][0]["words"] == [{"word": " hi", "start": 0.1, "end": 0.9, "probability": 0.75}]


@pytest.mark.parametrize("kw", [{"max_line_width": 0}, {"max_line_count": 0}, {"max_cue_seconds": 0.0}])
def test_cue_options_validated(kw: dict) -> None:
    with pytest.raises(ValueError):
        CueOptions(**kw)
