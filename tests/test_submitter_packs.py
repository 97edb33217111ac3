"""Packs and pack manifests without AWS: submitter.packs, submitter.manifest, the PACK_* settings."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from test_submitter_support import ENV

from submitter.jobs import manifest_job_request, submit_job_request
from submitter.manifest import build_manifest
from submitter.objects import ObjectRef
from submitter.packs import BYTES_PER_SECOND, Pack, estimate_audio_seconds, goes_alone, make_packs
from submitter.settings import SettingsError, SubmitterSettings

LONG = 50 * 1024 * 1024  # LONG_JOB_MIN_BYTES of the test environment
JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def settings(**changes) -> SubmitterSettings:
    return SubmitterSettings.from_env(ENV).replace(**changes)


def wav(name: str, seconds: float, bucket: str = "b") -> ObjectRef:
    """A WAV object whose size the table reads as ``seconds`` of audio."""
    return ObjectRef(bucket, f"uploads/{name}.wav", etag=f"e-{name}", size=int(seconds * BYTES_PER_SECOND["wav"]))


def keys(pack: Pack) -> list[str]:
    return [o.key.removeprefix("uploads/") for o in pack.objects]


# ---- settings ---------------------------------------------------------------------------------------

def test_pack_settings_default_to_the_contract():
    s = settings()
    assert (s.pack_max_objects, s.pack_max_bytes, s.pack_max_audio_seconds, s.pack_parallelism) == (50, 512 * 1024**2, 7200, 1)
    s = SubmitterSettings.from_env({**ENV, "PACK_MAX_OBJECTS": "1", "PACK_MAX_BYTES": "1000",
                                    "PACK_MAX_AUDIO_SECONDS": "60", "PACK_PARALLELISM": "2"})
    assert (s.pack_max_objects, s.pack_max_bytes, s.pack_max_audio_seconds, s.pack_parallelism) == (1, 1000, 60, 2)


def test_pack_settings_are_validated_with_the_others():
    with pytest.raises(SettingsError) as err:
        SubmitterSettings.from_env({**ENV, "PACK_MAX_OBJECTS": "0", "PACK_MAX_BYTES": "lots",
                                    "PACK_PARALLELISM": "-2", "PACK_MAX_AUDIO_SECONDS": "1.5"})
    assert sorted(err.value.problems) == [
        "PACK_MAX_AUDIO_SECONDS='1.5' is not an integer (bytes/seconds)",
        "PACK_MAX_BYTES='lots' is not an integer (bytes/seconds)",
        "PACK_MAX_OBJECTS='0' must be a positive integer",
        "PACK_PARALLELISM='-2' must be a positive integer",
    ]


# ---- the estimate -------------------------------------------------------------------------------------

def test_estimate_is_size_over_the_conservative_rate():
    assert estimate_audio_seconds(ObjectRef("b", "a/x.wav", size=80_000)) == 10.0
    assert estimate_audio_seconds(ObjectRef("b", "a/X.MP3", size=80_000)) == 20.0  # case-insensitive
    assert estimate_audio_seconds(ObjectRef("b", "a/x.opus", size=80_000)) == 40.0
    assert estimate_audio_seconds(ObjectRef("b", "a/x.wav", size=None)) == 0.0
    # a 16 kHz 16-bit mono WAV (32,000 bytes/s) is over-estimated, never under-estimated
    assert estimate_audio_seconds(ObjectRef("b", "a/x.wav", size=32_000 * 60)) >= 60
    # unknown extension: the lowest rate of the table (the largest estimate)
    assert estimate_audio_seconds(ObjectRef("b", "a/x.xyz", size=80_000)) == 80_000 / min(BYTES_PER_SECOND.values())


def test_the_table_covers_exactly_the_supported_extensions():
    from submitter.rules import SUPPORTED_EXTENSIONS

    assert set(BYTES_PER_SECOND) == SUPPORTED_EXTENSIONS


# ---- packing ----------------------------------------------------------------------------------------

def test_no_objects_no_packs():
    assert make_packs([], settings(pack_parallelism=4)) == []


def test_small_objects_share_one_pack_in_input_order():
    objs = [wav(n, 10) for n in ("c", "a", "b")]
    (pack,) = make_packs(objs, settings())
    assert pack.objects == tuple(objs) and pack.job_definition == ENV["JOB_DEFINITION"]
    assert pack.estimated_seconds == pytest.approx(30) and pack.bytes == 3 * 80_000 and len(pack) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        pack.bytes = 0


@pytest.mark.parametrize("bound,value,expected_packs", [
    ("pack_max_objects", 4, 3),               # 10 objects, 4 per pack
    ("pack_max_bytes", 5 * 80_000, 2),        # 10 x 80,000 bytes, 400,000 per pack
    ("pack_max_audio_seconds", 30, 4),        # 10 x 10 s, 30 s per pack
])
def test_each_bound_caps_the_packs_with_the_fewest_packs(bound, value, expected_packs):
    s = settings(**{bound: value})
    packs = make_packs([wav(f"{i:02d}", 10) for i in range(10)], s)
    assert len(packs) == expected_packs
    assert sorted(o.key for p in packs for o in p.objects) == [f"uploads/{i:02d}.wav" for i in range(10)]
    for p in packs:
        assert len(p) <= s.pack_max_objects and p.bytes <= s.pack_max_bytes
        assert p.estimated_seconds <= s.pack_max_audio_seconds
    assert max(map(len, packs)) - min(map(len, packs)) <= 1  # equal objects: balanced counts


def test_mixed_sizes_stay_within_every_bound_at_once():
    s = settings(pack_max_objects=5, pack_max_bytes=900_000, pack_max_audio_seconds=100)
    seconds = [97, 3, 50, 50, 1, 1, 1, 1, 1, 1, 1, 1, 60, 40, 25, 25, 25, 25, 9, 90]
    objs = [wav(f"{i:02d}", sec) for i, sec in enumerate(seconds)]
    packs = make_packs(objs, s)
    assert sorted(o.key for p in packs for o in p.objects) == sorted(o.key for o in objs)
    for p in packs:
        assert len(p) <= 5 and p.bytes <= 900_000 and p.estimated_seconds <= 100
    # the lower bound is ceil(sum(seconds) / 100) = 6 packs; greedy placement stays close to it
    assert 6 <= len(packs) <= 7


def test_parallelism_spreads_a_small_burst_over_balanced_packs():
    s = settings(pack_parallelism=2)
    objs = [wav("long", 40), wav("a", 10), wav("b", 10), wav("c", 20), wav("d", 5), wav("e", 5)]
    packs = make_packs(objs, s)
    assert len(packs) == 2
    assert sorted(p.estimated_seconds for p in packs) == [pytest.approx(45), pytest.approx(45)]
    # longest first to the least loaded pack (ties: fewer objects): long, c, a, b, d, e
    assert [keys(p) for p in packs] == [["long.wav", "d.wav"], ["a.wav", "b.wav", "c.wav", "e.wav"]]


def test_parallelism_never_makes_empty_packs():
    packs = make_packs([wav("a", 1), wav("b", 1), wav("c", 1)], settings(pack_parallelism=8))
    assert [keys(p) for p in packs] == [["a.wav"], ["b.wav"], ["c.wav"]]


def test_balance_beats_filling_one_pack_first():
    # 8 equal objects, room for 6 per pack: 2 packs of 4 (not 6 + 2)
    packs = make_packs([wav(f"{i}", 10) for i in range(8)], settings(pack_max_objects=6))
    assert [len(p) for p in packs] == [4, 4]


def test_large_objects_go_alone():
    s = settings(pack_max_audio_seconds=100, pack_max_bytes=2_000_000)
    objs = [
        wav("small-1", 10),
        ObjectRef("b", "uploads/hour.wav", "e1", LONG),        # >= LONG_JOB_MIN_BYTES: long definition
        wav("talky", 101),                                    # estimate > PACK_MAX_AUDIO_SECONDS
        ObjectRef("b", "uploads/big.opus", "e2", 2_000_001),  # alone bigger than PACK_MAX_BYTES
        wav("small-2", 10),
    ]
    packs = make_packs(objs, s)
    assert [keys(p) for p in packs] == [["small-1.wav", "small-2.wav"], ["hour.wav"], ["talky.wav"], ["big.opus"]]
    assert [p.job_definition for p in packs] == [ENV["JOB_DEFINITION"], ENV["JOB_DEFINITION_LONG"],
                                                 ENV["JOB_DEFINITION"], ENV["JOB_DEFINITION"]]
    assert [goes_alone(o, s) for o in objs] == [False, True, True, True, False]


def test_lone_objects_count_towards_parallelism():
    s = settings(pack_parallelism=2)
    packs = make_packs([ObjectRef("b", "uploads/hour.wav", "e", LONG), wav("a", 1), wav("b", 1)], s)
    assert [keys(p) for p in packs] == [["hour.wav"], ["a.wav", "b.wav"]]


def test_one_object_per_pack_is_one_job_per_object():
    objs = [wav(f"{i}", 10) for i in range(5)] + [ObjectRef("b", "uploads/hour.wav", "e", LONG)]
    packs = make_packs(objs, settings(pack_max_objects=1))
    assert [p.objects for p in packs] == [(o,) for o in objs]


def test_packs_never_mix_buckets():
    objs = [wav("a1", 1, bucket="one"), wav("b1", 1, bucket="two"), wav("a2", 1, bucket="one")]
    packs = make_packs(objs, settings())
    assert [[o.uri for o in p.objects] for p in packs] == [
        ["s3://one/uploads/a1.wav", "s3://one/uploads/a2.wav"], ["s3://two/uploads/b1.wav"]]


def test_packing_is_deterministic():
    objs = [wav(f"{i:03d}", (i * 37) % 90 + 1) for i in range(120)]
    s = settings(pack_max_objects=7, pack_parallelism=3)
    first = make_packs(objs, s)
    assert first == make_packs(list(objs), s)
    # packs come in the order of their first object, objects in input order inside a pack
    firsts = [objs.index(p.objects[0]) for p in first]
    assert firsts == sorted(firsts)
    for p in first:
        positions = [objs.index(o) for o in p.objects]
        assert positions == sorted(positions)


# ---- manifest and request ---------------------------------------------------------------------------

def test_manifest_lines_follow_the_contract():
    objs = [ObjectRef("bkt", "uploads/Café Müller/a b+c.wav", "e1", 11), ObjectRef("bkt", "uploads/x.mp3", "e2", 22)]
    m = build_manifest([objs], output_prefix="transcripts/", job_definition="def", now=1_796_400_000)
    assert re.fullmatch(r"transcripts/_manifests/20261204T160000Z-[0-9a-f]{10}\.jsonl", m.key), m.key
    assert m.uri == f"s3://bkt/{m.key}" and m.output == "s3://bkt/transcripts/" and m.count == 2
    lines = [json.loads(line) for line in m.body.decode("utf-8").splitlines()]
    assert lines == [
        {"index": 0, "input": "s3://bkt/uploads/Café Müller/a b+c.wav", "output": "s3://bkt/transcripts/",
         "etag": "e1", "size": 11},
        {"index": 0, "input": "s3://bkt/uploads/x.mp3", "output": "s3://bkt/transcripts/", "etag": "e2", "size": 22},
    ]
    assert "Café" in m.body.decode("utf-8")  # UTF-8, not \\u escapes
    same = build_manifest([objs], output_prefix="transcripts/", job_definition="def", now=1_796_400_000)
    other = build_manifest([objs[:1]], output_prefix="transcripts/", job_definition="def", now=1_796_400_000)
    assert same.key == m.key and other.key != m.key  # the name hashes the content


def test_array_manifest_lines_carry_their_element():
    elements = [[wav("a", 1), wav("b", 1)], [wav("c", 1)], [wav("d", 1), wav("e", 1)]]
    m = build_manifest(elements, output_prefix="t/", job_definition="def")
    assert [(x["index"], x["input"]) for x in map(json.loads, m.body.decode().splitlines())] == [
        (0, "s3://b/uploads/a.wav"), (0, "s3://b/uploads/b.wav"), (1, "s3://b/uploads/c.wav"),
        (2, "s3://b/uploads/d.wav"), (2, "s3://b/uploads/e.wav")]
    with pytest.raises(ValueError, match="exactly one bucket"):
        build_manifest([[wav("a", 1, bucket="x"), wav("b", 1, bucket="y")]], output_prefix="t/", job_definition="d")


def test_manifest_put_carries_count_and_definition():
    class S3:
        def put_object(self, **kwargs):
            self.kwargs = kwargs

    m = build_manifest([[wav("a", 1), wav("b", 1)]], output_prefix="t/", job_definition="whisper-batch-job")
    s3 = S3()
    m.put(s3)
    assert s3.kwargs == {"Bucket": "b", "Key": m.key, "Body": m.body, "ContentType": "application/x-ndjson",
                         "Metadata": {"count": "2", "job-definition": "whisper-batch-job"}}


def test_pack_job_request_names_the_manifest():
    s = settings()
    m = build_manifest([[wav("a", 1), wav("b", 1)]], output_prefix=s.output_prefix, job_definition=s.job_definition)
    request = manifest_job_request(m, s)
    assert request["jobName"] == f"pack-{m.name}" and JOB_NAME_RE.match(request["jobName"])
    assert request["parameters"] == {"input": m.uri, "output": "s3://b/transcripts/"}
    assert request["jobDefinition"] == s.job_definition and request["jobQueue"] == s.job_queue
    assert request["tags"]["source"] == "lambda" and request["propagateTags"] is True
    assert "arrayProperties" not in request
    array = manifest_job_request(m, s, name_prefix="bulk", array_size=2, source="bulk")
    assert array["arrayProperties"] == {"size": 2} and array["jobName"].startswith("bulk-")
    # a pack of one is today's request: the object itself, no manifest
    assert submit_job_request(wav("a", 1), s)["parameters"]["input"] == "s3://b/uploads/a.wav"
