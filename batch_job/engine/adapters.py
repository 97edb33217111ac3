"""PEFT LoRA adapters as models: merged into their base once, cached like a converted checkpoint.

A directory holding ``adapter_config.json`` (+ ``adapter_model.safetensors`` or ``.bin``) is a
model wherever one is accepted (``--model``, ``WHISPER_BATCH_MODEL``, the image build's
``MODEL``). Its ``base_model_name_or_path`` is resolved like any ``--model`` value (packaged
name, directory, locally cached hub id); the adapter is merged with peft's ``merge_and_unload``
and the merged checkpoint is written to ``<cache_dir>/lora-<adapter dir name>-<sha12>/``, where
the hash covers the adapter's files and the base's weights: a new adapter or a new base gives a
new directory, the same pair is merged once. The tokenizer, feature-extractor and generation files
come from the base. peft (extra ``lora``) is needed only for the merge, never to load the result.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from batch_job.engine.checkpoint_files import hash_files, publish_dir
from batch_job.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
_SHA_PREFIX = 12


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter directory (``adapter_config.json``)."""
    return (path / ADAPTER_CONFIG).is_file()


def resolve_adapter(path: Path, cache_dir: Path, resolve_base: Callable[[str], Path],
                    checksum: Callable[[Path], str]) -> Path:
    """The merged checkpoint of adapter ``path``; ``resolve_base`` resolves the base's name
    (:func:`batch_job.engine.models.resolve_checkpoint`), ``checksum`` hashes its weights."""
    base_ref = base_reference(path)
    try:
        base = resolve_base(base_ref)
    except ModelError as exc:
        raise ModelError(f"cannot find the base model {base_ref!r} of adapter {path}: {exc}") from None
    base_type = json.loads((base / "config.json").read_text(encoding="utf-8")).get("model_type")
    if base_type != "whisper":
        raise ModelError(f"the base model {base_ref!r} of adapter {path} is not a Whisper model (model_type {base_type!r})")
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name.startswith("adapter_"))
    key = hashlib.sha256(f"{hash_files(files)}\n{checksum(base)}".encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.resolve().name) or "adapter"
    out = cache_dir / f"lora-{name}-{key[:_SHA_PREFIX]}"
    if not (out / "config.json").is_file():
        _merge(path, base, out, provenance={"adapter": str(path.resolve()), "base": str(base_ref),
                                            "base_dir": str(base), "key_sha256": key})
    return out


def base_reference(path: Path) -> str:
    """The ``--model`` value of adapter ``path``'s base (a relative directory made absolute)."""
    config = _read_config(path)
    base_ref = config.get("base_model_name_or_path")
    if not base_ref:
        raise ModelError(f"{path / ADAPTER_CONFIG} names no base_model_name_or_path: which Whisper does it adapt?")
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{path}: only LoRA adapters can be merged, not {config.get('peft_type')}")
    return _base_name(str(base_ref), path)


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path / ADAPTER_CONFIG}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path / ADAPTER_CONFIG} is not a JSON object")
    return config


def _base_name(ref: str, adapter: Path) -> str:
    """A relative base directory is taken relative to the adapter; names and hub ids as they are."""
    candidate = (adapter / ref).resolve()
    return str(candidate) if not Path(ref).is_absolute() and candidate.is_dir() else ref


def _merge(adapter: Path, base: Path, out: Path, *, provenance: dict) -> None:
    try:
        import torch
        from peft import PeftModel
        from transformers import WhisperForConditionalGeneration
    except ImportError as exc:
        raise ModelError(f"merging the LoRA adapter {adapter} needs peft: pip install 'whisper-batch[lora]' ({exc})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model = WhisperForConditionalGeneration.from_pretrained(base, torch_dtype=torch.float32)
        try:
            merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except Exception as exc:  # wrong shapes, another architecture's module names, ...
            raise ModelError(f"cannot apply adapter {adapter} to {base}: {type(exc).__name__}: {exc}") from None
        merged.save_pretrained(tmp, safe_serialization=True)
        for side in base.iterdir():  # tokenizer, feature extractor, generation config: the base's
            if side.is_file() and not (tmp / side.name).exists() and not side.name.startswith(("model", "pytorch_model")):
                shutil.copy2(side, tmp / side.name)
        (tmp / "source.json").write_text(json.dumps({"merged_lora": provenance}, indent=2) + "\n", encoding="utf-8")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
