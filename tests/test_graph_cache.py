"""CPU graph cache (batch_job/engine/graph_cache.py): warm starts load traced graphs, not transformers.

* the warm engine (graphs from the cache) decodes real audio to the same tokens and text as the
  cold engine that built them, buckets 1 and 4;
* a warm start in a fresh process never imports transformers;
* the cached encoder (traced at batch 1) equals the eager encoder at batch 4;
* ``tokenizers`` text == ``WhisperTokenizerFast.decode``; the torch log-mel == the feature extractor;
* the key follows quantize / cache_len / buckets; broken entries are logged and rebuilt.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import REPO, SHARED_AUDIO, shared_clip  # noqa: E402

from batch_job.engine import graph_cache  # noqa: E402

CLIPS = ("jfk.flac", "librispeech_61-70968-0000.flac", "ljspeech_LJ001-0001.flac")
MAX_TOKENS = 96  # plenty for these clips; small cache


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, model_cache_dir) -> Path:
    """A fresh cache dir (empty graph cache) that reuses the session's converted tiny.en."""
    from batch_job.engine.models import resolve_checkpoint

    checkpoint = resolve_checkpoint("tiny.en", model_cache_dir)  # converts once per session
    out = tmp_path_factory.mktemp("graph-cache")
    (out / checkpoint.name).symlink_to(checkpoint, target_is_directory=True)
    shutil.copy(Path(model_cache_dir) / "tiny.en.source.json", out / "tiny.en.source.json")
    return out


@pytest.fixture(scope="module")
def settings(cache_dir):
    from batch_job.settings import Settings

    return Settings(model="tiny.en", device="cpu", batch_size=4, max_new_tokens=MAX_TOKENS,
                    cache_dir=str(cache_dir), threads=2)


@pytest.fixture(scope="module")
def cold(settings):
    from batch_job.engine.loading import load_engine

    engine = load_engine(settings)
    assert engine.bundle.source == "model"
    return engine


@pytest.fixture(scope="module")
def warm(cold, settings):
    from batch_job.engine.loading import load_engine

    engine = load_engine(settings)
    assert engine.bundle.source == "cache" and engine.bundle.loaded is None
    return engine


@pytest.fixture(scope="module")
def rows():
    from batch_job.audio import load_audio

    return [load_audio(shared_clip(name)) for name in CLIPS]


def _entries(settings) -> list[Path]:
    root = graph_cache.cache_root(settings.cache_dir)
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


# --------------------------------------------------------------------------- warm == cold
def test_warm_engine_decodes_like_cold(cold, warm, rows):
    from batch_job.engine.decoding import DecodingOptions

    assert warm.buckets == cold.buckets == (1, 2, 3, 4)
    assert warm.tokens == cold.tokens and warm.cache_len == cold.cache_len == MAX_TOKENS + 4
    assert warm.max_new_tokens == cold.max_new_tokens
    options = DecodingOptions(max_new_tokens=cold.max_new_tokens)
    for row in rows:  # bucket 1
        a = cold.decode([row], options)[0][0]
        b = warm.decode([row], options)[0][0]
        assert a.tokens == b.tokens and a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-6)
        assert warm.text(b.tokens) == cold.text(a.tokens)
    cold_rows = cold.decode(rows, options)[0]  # 3 rows -> bucket 4
    warm_rows = warm.decode(rows, options)[0]
    assert [r.tokens for r in warm_rows] == [r.tokens for r in cold_rows]
    texts = [warm.text(r.tokens) for r in warm_rows]
    assert "fellow Americans" in texts[0]
    # the tokenizers-based text equals WhisperTokenizerFast.decode on these real transcripts
    tokenizer = cold.bundle.loaded.tokenizer
    eot = cold.tokens.eot
    for r, text in zip(warm_rows, texts):
        assert text == tokenizer.decode([t for t in r.tokens if t < eot], skip_special_tokens=True)


def test_warm_start_imports_no_transformers(warm, settings):
    code = (
        "import json, sys, time\n"
        "t0 = time.perf_counter()\n"
        "from batch_job.engine.loading import load_engine\n"
        "from batch_job.settings import Settings\n"
        f"engine = load_engine(Settings(**json.loads({json.dumps(json.dumps(_settings_dict(settings)))})))\n"
        "print(json.dumps({'source': engine.bundle.source, 'seconds': time.perf_counter() - t0,\n"
        "    'transformers': sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["source"] == "cache"
    assert report["transformers"] == []


def _settings_dict(settings) -> dict:
    return {k: getattr(settings, k) for k in ("model", "device", "batch_size", "max_new_tokens", "cache_dir", "threads")}


def test_cached_encoder_is_batch_generic(cold, warm, rows, settings):
    """The encoder is traced once at batch 1; at batch 4 it must equal the eager module."""
    from batch_job.engine.graphs import CastEncoder, EncoderGraph
    from batch_job.engine.loading import cpu_encoder_dtype

    mel = warm.log_mel(rows, 4)
    eager = EncoderGraph(cold.bundle.loaded.model).eval()
    if cpu_encoder_dtype(settings) == "bfloat16":  # the same dtype as the cached graph
        eager = CastEncoder(eager, torch.bfloat16).eval()
    with torch.inference_mode():
        want = eager(mel)
        got = warm.bundle.graphs[4].encode(mel)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- text and features
def test_tokenizers_text_matches_whisper_tokenizer(cold, warm):
    """Reference transcripts of the shared clips (many languages), encoded and decoded both ways."""
    tokenizer = cold.bundle.loaded.tokenizer
    texts = [p.read_text(encoding="utf-8").strip() for p in sorted(SHARED_AUDIO.glob("*.txt"))]
    if not texts:
        pytest.skip("no shared transcripts")
    eot = cold.tokens.eot
    for text in texts + [" Ask not.", "  two  spaces , and don't ?", ""]:
        ids = [i for i in tokenizer.encode(text, add_special_tokens=False) if i < eot]
        assert warm.text(ids) == tokenizer.decode(ids, skip_special_tokens=True), text


def test_log_mel_matches_feature_extractor(cold, warm, rows):
    import numpy as np

    from batch_job.constants import N_SAMPLES as WINDOW_SAMPLES

    fe = cold.bundle.loaded.feature_extractor
    padded = np.zeros((2, WINDOW_SAMPLES), dtype=np.float32)
    padded[0, : len(rows[0])] = rows[0][:WINDOW_SAMPLES]
    padded[1] = np.random.default_rng(0).standard_normal(WINDOW_SAMPLES).astype(np.float32) * 0.1
    want = torch.from_numpy(fe._torch_extract_fbank_features(padded, "cpu"))
    assert torch.equal(warm.bundle.mel(padded), want)
    assert torch.equal(warm.bundle.mel(padded[:1]), torch.from_numpy(fe._torch_extract_fbank_features(padded[:1], "cpu")))


# --------------------------------------------------------------------------- key
def test_key_follows_settings(warm, settings):
    from batch_job.engine.loading import cache_slot

    base = cache_slot(settings)
    assert base is not None and (base.root / base.key / "manifest.json").is_file()
    assert warm.bundle.cache_path == base.root / base.key
    for change in ({"quantize_decoder": False}, {"max_new_tokens": MAX_TOKENS + 1}, {"batch_size": 8}):
        other = cache_slot(settings.replace(**change))
        assert other.key != base.key, change
    assert cache_slot(settings.replace(threads=1)).key == base.key
    fields = graph_cache.key_fields(checksum="a" * 64, cache_len=100, buckets=[1, 4], quantize=True, jit=True)
    key = graph_cache.cache_key(fields)
    assert graph_cache.cache_key({**fields, "cache_len": 101}) != key
    assert graph_cache.cache_key({**fields, "quantize": False}) != key
    assert graph_cache.cache_key({**fields, "torch": "0.0"}) != key
    manifest = json.loads((base.root / base.key / "manifest.json").read_text())
    assert manifest["key_fields"]["quantize"] is True and manifest["key_fields"]["cache_len"] == MAX_TOKENS + 4


# --------------------------------------------------------------------------- broken entries
def test_broken_entries_are_ignored(warm, settings, tmp_path, caplog):
    from batch_job.engine.loading import cache_slot

    slot = cache_slot(settings)
    good = slot.root / slot.key
    root = tmp_path / "graphs"
    root.mkdir()
    kw = {"buckets": (1, 2, 4), "model_name": "tiny.en"}
    caplog.set_level(logging.WARNING, logger="batch_job.engine.graph_cache")
    assert graph_cache.load(root, slot.key, **kw) is None  # absent: no warning
    assert not caplog.records
    (root / slot.key).mkdir()  # no manifest
    assert graph_cache.load(root, slot.key, **kw) is None
    shutil.rmtree(root / slot.key)
    shutil.copytree(good, root / slot.key)
    assert graph_cache.load(root, slot.key, **kw) is not None
    assert graph_cache.load(root, slot.key, buckets=(1, 8), model_name="tiny.en") is None  # bucket not traced
    (root / slot.key / "manifest.json").write_text("{not json")
    assert graph_cache.load(root, slot.key, **kw) is None
    assert len([r for r in caplog.records if "rebuilding" in r.getMessage()]) == 3


def test_corrupt_cache_is_rebuilt(warm, settings, caplog):
    """A truncated graph in the real cache: the next load logs it, builds from the checkpoint, replaces it."""
    from batch_job.engine.loading import cache_slot, load_engine

    slot = cache_slot(settings)
    entry = slot.root / slot.key
    step = entry / "step.pt"
    step.write_bytes(step.read_bytes()[: 1000])
    caplog.set_level(logging.INFO)
    engine = load_engine(settings)
    assert engine.bundle.source == "model"
    assert any("unusable" in r.getMessage() for r in caplog.records if r.name == "batch_job.engine.graph_cache")
    assert _entries(settings) == [entry]
    assert not [p for p in slot.root.iterdir() if p.name.startswith(".")]  # no temp/trash left
    again = graph_cache.load(slot.root, slot.key, buckets=slot.buckets, model_name="tiny.en")
    assert again is not None and again.source == "cache"


def test_save_is_atomic_and_keeps_a_concurrent_entry(cold, settings, tmp_path):
    """A second writer of the same key keeps the first complete entry; no temp dirs are left behind."""
    from batch_job.engine.loading import cache_slot

    slot = cache_slot(settings)
    bundle = cold.bundle
    fields = json.loads((slot.root / slot.key / "manifest.json").read_text())["key_fields"]
    assert bundle.traced is not None
    root = tmp_path / "graphs"
    first = graph_cache.save(root, slot.key, fields, bundle)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert graph_cache.save(root, slot.key, fields, bundle) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp  # the first writer's entry stays
    assert graph_cache.save(root, slot.key, fields, bundle, replace_broken=True) == first
    assert sorted(p.name for p in root.iterdir()) == [slot.key]
    assert graph_cache.load(root, slot.key, buckets=slot.buckets, model_name="tiny.en") is not None
    # an entry for the same weights/settings from other code or versions is pruned on save
    stale = root / ("0" * 24)
    shutil.copytree(first, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["key"], manifest["key_fields"]["torch"] = stale.name, "0.0"
    (stale / "manifest.json").write_text(json.dumps(manifest))
    other = root / ("1" * 24)
    shutil.copytree(stale, other)
    manifest["key"], manifest["key_fields"]["cache_len"] = other.name, 7  # other settings: kept
    (other / "manifest.json").write_text(json.dumps(manifest))
    graph_cache.save(root, slot.key, fields, bundle, replace_broken=True)
    assert sorted(p.name for p in root.iterdir()) == sorted([slot.key, other.name])
