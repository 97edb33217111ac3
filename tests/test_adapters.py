"""PEFT LoRA adapters as models (batch_job/engine/adapters.py), on the packaged multilingual `base`."""

from __future__ import annotations

import json
import shutil

import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from batch_job.engine import models  # noqa: E402
from batch_job.errors import ModelError  # noqa: E402
from tests.conftest import load_clip  # noqa: E402

CLIP = "jfk.flac"


@pytest.fixture(scope="module")
def base_dir(model_cache_dir):
    return models.resolve_checkpoint("base", model_cache_dir)


@pytest.fixture(scope="module")
def adapter_and_reference(base_dir, tmp_path_factory):
    """A LoRA adapter with non-zero weights on q/v projections, saved by peft with base "base",
    and the checkpoint peft itself merges from it (the reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration.from_pretrained(base_dir, torch_dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = get_peft_model(model, config)
    with torch.no_grad():  # small but real: the transcript moves a little, it does not fall apart
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)
    adapter = root / "my-domain-adapter"
    tuned.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "base"  # resolved like --model base
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))

    reference = root / "peft-merged"
    tuned.merge_and_unload().save_pretrained(reference, safe_serialization=True)
    for side in base_dir.iterdir():
        if side.is_file() and not (reference / side.name).exists() and not side.name.startswith("model"):
            shutil.copy2(side, reference / side.name)
    return adapter, reference


def transcribe(tiny_settings, model: str) -> tuple:
    from batch_job.transcribe import Transcriber

    t = Transcriber.load(tiny_settings.replace(model=str(model), language="en"))
    return t.transcribe(load_clip(CLIP), language="en").segments


def test_adapter_transcribes_exactly_as_peft_merged_checkpoint(adapter_and_reference, model_cache_dir, tiny_settings):
    adapter, reference = adapter_and_reference
    merged = models.resolve_checkpoint(str(adapter), model_cache_dir)
    assert merged.name.startswith("lora-my-domain-adapter-") and (merged / "tokenizer.json").is_file()
    assert json.loads((merged / "source.json").read_text())["merged_lora"]["base"] == "base"
    stamp = (merged / "config.json").stat().st_mtime_ns
    assert models.resolve_checkpoint(str(adapter), model_cache_dir) == merged  # merged once
    assert (merged / "config.json").stat().st_mtime_ns == stamp

    with_adapter = transcribe(tiny_settings, adapter)
    assert with_adapter == transcribe(tiny_settings, reference)
    assert with_adapter != transcribe(tiny_settings, "base")
    assert "country" in " ".join(s.text for s in with_adapter).lower()


def test_adapter_errors_are_clear(adapter_and_reference, tmp_path):
    adapter, _ = adapter_and_reference

    def variant(name: str, **changes) -> str:
        d = tmp_path / name
        shutil.copytree(adapter, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
        return str(d)

    with pytest.raises(ModelError, match="names no base_model_name_or_path"):
        models.resolve_checkpoint(variant("no-base", base_model_name_or_path=None), tmp_path / "c")
    with pytest.raises(ModelError, match="cannot find the base model 'someone/not-cached'"):
        models.resolve_checkpoint(variant("gone", base_model_name_or_path="someone/not-cached"), tmp_path / "c")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="is not a Whisper model"):
        models.resolve_checkpoint(variant("on-bert", base_model_name_or_path=str(bert)), tmp_path / "c")


def test_image_build_fetch_merges_an_adapter(adapter_and_reference, model_cache_dir):
    """The image build's fetch_model: an adapter directory has its base fetched, then is merged."""
    from batch_job.engine.models import fetch_model

    adapter, _ = adapter_and_reference
    assert fetch_model(str(adapter), str(model_cache_dir)) == models.resolve_checkpoint(str(adapter), model_cache_dir)
