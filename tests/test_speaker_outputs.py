"""Speaker labels through the data model and every output format (issue #21, item 3).

The golden renderings below were produced by the writers as they were BEFORE labels existed
(commit 26c281c); a transcript without labels must still render to exactly these bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

from batch_job.result import Segment, Transcript, Word
from batch_job.subtitles import CueOptions, cues
from batch_job.writers import render

VTT_TAG = re.compile(r"<\d{2,}:\d{2}:\d{2}\.\d{3}>")


def _unlabelled() -> Transcript:
    """Words, a segment without words, text that needs escaping, timings: every JSON branch."""
    words = (Word(" Hello", 0.0, 0.4, 0.91), Word(" there,", 0.4, 0.9, 0.8765), Word(" Grüße", 1.0, 1.6, 0.5))
    segs = (
        Segment(0.0, 1.6, " Hello there, Grüße", words),
        Segment(1.6, 3.25, " no words <b> & -->"),
        Segment(3.25, 5.0, " second", (Word(" second", 3.3, 4.9, 0.99),)),
    )
    return Transcript(text="Hello there, Grüße no words <b> & --> second", language="en", duration=6.0,
                      segments=segs, model="tiny.en", timings={"encode": 0.5, "decode": 1.25})


GOLDEN_JSON = '''\
{
  "text": "Hello there, Grüße no words <b> & --> second",
  "language": "en",
  "duration": 6.0,
  "segments": [
    {
      "start": 0.0,
      "end": 1.6,
      "text": " Hello there, Grüße",
      "words": [
        {
          "word": " Hello",
          "start": 0.0,
          "end": 0.4,
          "probability": 0.91
        },
        {
          "word": " there,",
          "start": 0.4,
          "end": 0.9,
          "probability": 0.8765
        },
        {
          "word": " Grüße",
          "start": 1.0,
          "end": 1.6,
          "probability": 0.5
        }
      ]
    },
    {
      "start": 1.6,
      "end": 3.25,
      "text": " no words <b> & -->"
    },
    {
      "start": 3.25,
      "end": 5.0,
      "text": " second",
      "words": [
        {
          "word": " second",
          "start": 3.3,
          "end": 4.9,
          "probability": 0.99
        }
      ]
    }
  ],
  "model": "tiny.en",
  "task": "transcribe",
  "timings": {
    "encode": 0.5,
    "decode": 1.25
  },
  "job": {
    "id": "x"
  }
}
'''
GOLDEN_TXT = "Hello there, Grüße\nno words <b> & -->\nsecond\n"
GOLDEN_SRT = (
    "1\n00:00:00,000 --> 00:00:01,600\nHello there, Grüße\n\n"
    "2\n00:00:01,600 --> 00:00:03,250\nno words <b> & ->\n\n"
    "3\n00:00:03,300 --> 00:00:04,900\nsecond\n"
)
GOLDEN_VTT = (
    "WEBVTT\n\n"
    "00:00:00.000 --> 00:00:01.600\nHello there, Grüße\n\n"
    "00:00:01.600 --> 00:00:03.250\nno words &lt;b&gt; &amp; --&gt;\n\n"
    "00:00:03.300 --> 00:00:04.900\nsecond\n"
)
GOLDEN_VTT_WORDS = (
    "WEBVTT\n\n"
    "00:00:00.000 --> 00:00:01.600\nHello <00:00:00.400>there, <00:00:01.000>Grüße\n\n"
    "00:00:01.600 --> 00:00:03.250\nno words &lt;b&gt; &amp; --&gt;\n\n"
    "00:00:03.300 --> 00:00:04.900\nsecond\n"
)


def _labelled() -> Transcript:
    """Two speakers, two turns of SPEAKER_00 segments, a blank segment, words on some segments."""
    a_words = (Word(" Hello", 0.0, 0.4, 0.9, "SPEAKER_00"), Word(" there.", 0.4, 0.9, 0.8, "SPEAKER_00"))
    segs = (
        Segment(0.0, 0.9, " Hello there.", a_words, "SPEAKER_00"),
        Segment(1.0, 2.0, " How are you?", speaker="SPEAKER_00"),
        Segment(2.0, 2.1, "  ", speaker="SPEAKER_01"),
        Segment(2.2, 3.0, " Fine, thanks.", (Word(" Fine,", 2.2, 2.5, 0.7, "SPEAKER_01"),
                                             Word(" thanks.", 2.5, 3.0, 0.6, "SPEAKER_01")), "SPEAKER_01"),
        Segment(3.0, 4.0, " And you?", speaker="SPEAKER_01"),
        Segment(4.0, 5.0, " Great.", speaker="SPEAKER_00"),
    )
    return Transcript(text="Hello there. How are you? Fine, thanks. And you? Great.", language="en", duration=6.0,
                      segments=segs, model="tiny.en", speakers=("SPEAKER_00", "SPEAKER_01"))


def _keys(value: object) -> set[str]:
    """Every dict key anywhere in a JSON-ready structure."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


# --------------------------------------------------------------------------- no labels: unchanged


def test_without_labels_every_format_is_byte_identical_to_before() -> None:
    t = _unlabelled()
    assert render(t, "json", extra={"job": {"id": "x"}}) == GOLDEN_JSON
    assert render(t, "txt") == GOLDEN_TXT
    assert render(t, "srt") == GOLDEN_SRT
    assert render(t, "vtt") == GOLDEN_VTT
    assert render(t, "vtt", cue_options=CueOptions(word_level=True)) == GOLDEN_VTT_WORDS


def test_without_labels_no_speaker_key_anywhere() -> None:
    data = _unlabelled().to_dict()
    assert "speaker" not in _keys(data) and "speakers" not in _keys(data)
    assert list(data["segments"][0]) == ["start", "end", "text", "words"]
    assert list(data["segments"][0]["words"][0]) == ["word", "start", "end", "probability"]
    assert all(c.speaker is None for c in cues(_unlabelled()))


def test_constructors_and_replace_keep_working() -> None:
    word = Word(" hi", 0.0, 1.0, 0.5)  # positional, as the engine builds them
    seg = Segment(0.0, 1.0, " hi", (word,))
    assert word.speaker is None and seg.speaker is None and _unlabelled().speakers == ()
    labelled = replace(seg, words=(replace(word, speaker="SPEAKER_00"),), speaker="SPEAKER_00")
    t = replace(_unlabelled(), segments=(labelled,), speakers=("SPEAKER_00",))
    assert t.segments[0].words[0].speaker == "SPEAKER_00" and t.speakers == ("SPEAKER_00",)
    unlabelled_again = replace(labelled, words=tuple(replace(w, speaker=None) for w in labelled.words), speaker=None)
    assert unlabelled_again == seg and unlabelled_again.to_dict() == seg.to_dict()


# --------------------------------------------------------------------------- JSON


def test_json_carries_labels_only_where_set() -> None:
    t = _labelled()
    t = replace(t, segments=(*t.segments, Segment(5.0, 5.5, " unlabelled", (Word(" unlabelled", 5.0, 5.5, 0.5),))))
    data = json.loads(render(t, "json"))
    assert data["speakers"] == ["SPEAKER_00", "SPEAKER_01"]
    first = data["segments"][0]
    assert list(first) == ["start", "end", "text", "speaker", "words"] and first["speaker"] == "SPEAKER_00"
    assert first["words"][0] == {"word": " Hello", "start": 0.0, "end": 0.4, "probability": 0.9, "speaker": "SPEAKER_00"}
    assert [s.get("speaker") for s in data["segments"]] == [s.speaker for s in t.segments]
    assert "speaker" not in data["segments"][-1] and "speaker" not in data["segments"][-1]["words"][0]


# --------------------------------------------------------------------------- TXT


def test_txt_one_line_per_speaker_turn() -> None:
    assert render(_labelled(), "txt").splitlines() == [
        "SPEAKER_00: Hello there. How are you?",
        "SPEAKER_01: Fine, thanks. And you?",  # the blank SPEAKER_01 segment gives nothing
        "SPEAKER_00: Great.",
    ]


def test_txt_unlabelled_segment_in_a_labelled_transcript_keeps_its_own_line() -> None:
    segs = (Segment(0, 1, "a", speaker="SPEAKER_00"), Segment(1, 2, "b"), Segment(2, 3, "c"), Segment(3, 4, "d", speaker="SPEAKER_00"))
    t = Transcript(text="a b c d", language="en", duration=4.0, segments=segs, model="tiny.en", speakers=("SPEAKER_00",))
    assert render(t, "txt") == "SPEAKER_00: a\nb\nc\nSPEAKER_00: d\n"


# --------------------------------------------------------------------------- SRT


def test_srt_prefixes_the_first_line_of_each_cue_and_does_not_count_it() -> None:
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    seg = Segment(0.0, 8.0, text, speaker="SPEAKER_01")  # no words: cut by characters into several cues
    t = Transcript(text=text, language="en", duration=8.0, segments=(seg,), model="tiny.en", speakers=("SPEAKER_01",))
    opts = CueOptions(max_line_width=20)
    blocks = render(t, "srt", cue_options=opts).rstrip("\n").split("\n\n")
    assert len(blocks) == len(cues(t, opts)) > 1
    for block, cue in zip(blocks, cues(t, opts)):
        _, _, first, *rest = block.split("\n")
        assert first == f"[SPEAKER_01] {cue.lines[0]}" and rest == list(cue.lines[1:])
        assert len(cue.lines[0]) <= 20  # the text obeys the width; the prefix comes on top
    assert any(len(block.split("\n")[2]) > 20 for block in blocks)


def test_srt_label_with_arrow_or_newline_stays_one_cue_line() -> None:
    t = Transcript(text="hi", language="en", duration=2.0, model="tiny.en",
                   segments=(Segment(0.0, 1.0, " hi", speaker="A -->\nB"),))
    assert render(t, "srt") == "1\n00:00:00,000 --> 00:00:01,000\n[A -> B] hi\n"


# --------------------------------------------------------------------------- VTT


def test_vtt_voice_span_at_the_start_of_each_labelled_cue() -> None:
    vtt = render(_labelled(), "vtt")
    blocks = vtt[len("WEBVTT\n\n"):].rstrip("\n").split("\n\n")
    assert blocks[0] == "00:00:00.000 --> 00:00:00.900\n<v SPEAKER_00>Hello there."
    assert blocks[2] == "00:00:02.200 --> 00:00:03.000\n<v SPEAKER_01>Fine, thanks."
    assert all(b.split("\n")[1].startswith(("<v SPEAKER_00>", "<v SPEAKER_01>")) for b in blocks)
    assert "</v>" not in vtt  # the voice span is the whole cue text: the spec lets the end tag go


def test_vtt_voice_span_with_word_level_tags() -> None:
    vtt = render(_labelled(), "vtt", cue_options=CueOptions(word_level=True))
    assert "00:00:02.200 --> 00:00:03.000\n<v SPEAKER_01>Fine, <00:00:02.500>thanks.\n" in vtt
    assert VTT_TAG.search(vtt)


def test_vtt_label_is_escaped_not_dropped() -> None:
    seg = Segment(0.0, 1.0, " <b>hi</b>", speaker="Tom & <Jerry>")
    t = Transcript(text="hi", language="en", duration=2.0, model="tiny.en", segments=(seg,), speakers=("Tom & <Jerry>",))
    assert render(t, "vtt") == "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n<v Tom &amp; &lt;Jerry&gt;>&lt;b&gt;hi&lt;/b&gt;\n"


def test_blank_label_is_no_label() -> None:
    seg = Segment(0.0, 1.0, " hi", speaker=" \n")
    t = Transcript(text="hi", language="en", duration=2.0, model="tiny.en", segments=(seg,))
    assert render(t, "txt") == "hi\n"
    assert render(t, "srt").endswith("\nhi\n") and render(t, "vtt").endswith("\nhi\n")


# --------------------------------------------------------------------------- cues never mix speakers


def _mixed_segment() -> Segment:
    """One segment whose words change speaker twice; one word has no label (takes the segment's)."""
    spk = ["SPEAKER_00", "SPEAKER_00", "SPEAKER_01", "SPEAKER_01", None, "SPEAKER_00"]
    texts = ["so", "anyway", "yes", "right", "sure", "ok"]
    words = tuple(Word(f" {w}", i * 0.5, i * 0.5 + 0.4, 0.9, s) for i, (w, s) in enumerate(zip(texts, spk)))
    return Segment(0.0, 3.0, " so anyway yes right sure ok", words, "SPEAKER_01")


def test_cues_break_at_every_change_of_word_speaker() -> None:
    t = Transcript(text="x", language="en", duration=5.0, segments=(_mixed_segment(),), model="tiny.en")
    got = cues(t)  # everything would fit one cue by width and time: only the speakers cut it
    assert [(c.speaker, c.lines) for c in got] == [
        ("SPEAKER_00", ("so anyway",)),
        ("SPEAKER_01", ("yes right sure",)),
        ("SPEAKER_00", ("ok",)),
    ]
    assert [(c.start_ms, c.end_ms) for c in got] == [(0, 900), (1000, 2400), (2500, 2900)]
    vtt = render(t, "vtt", cue_options=CueOptions(word_level=True))
    assert "\n<v SPEAKER_01>yes <00:00:01.500>right <00:00:02.000>sure\n" in vtt
    srt = render(t, "srt")
    assert [line for line in srt.split("\n") if line.startswith("[")] == ["[SPEAKER_00] so anyway", "[SPEAKER_01] yes right sure",
                                                                         "[SPEAKER_00] ok"]


def test_cue_speaker_without_words_is_the_segments() -> None:
    t = Transcript(text="x", language="en", duration=5.0, model="tiny.en",
                   segments=(Segment(0.0, 1.0, " a", speaker="SPEAKER_03"), Segment(1.0, 2.0, " b")))
    assert [c.speaker for c in cues(t)] == ["SPEAKER_03", None]
