"""Files saved next to graphs on disk, shared by the CPU graph cache and compiled Neuron directories.

Both kinds of directory hold the side data an engine needs besides its graphs (so a warm start
builds no transformers model) and a ``manifest.json`` written last, whose presence marks the
directory complete::

    mel_filters.npy  the feature extractor's mel filter bank [n_freq, n_mels]
    tokenizer.json   the fast tokenizer (``tokenizers`` library format)
    manifest.json    what the directory holds; side data fields from :func:`write_side_data`
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from batch_job.engine.bundle import MelFrontend, ModelDims, TokenizerText
from batch_job.engine.loaded_model import AlignmentHeads, alignment_heads_from
from batch_job.engine.tokens import SpecialTokens
from batch_job.fsutil import atomic_write_text

MANIFEST_NAME = "manifest.json"


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` when not installed). Never imports them."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_manifest(out_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """Write ``out_dir/manifest.json`` atomically (written last: its presence marks a complete directory)."""
    return atomic_write_text(Path(out_dir) / MANIFEST_NAME, json.dumps(dict(manifest), indent=2, sort_keys=True) + "\n")


class SideData(NamedTuple):
    """What an engine needs besides its graphs, as :func:`read_side_data` reads it back."""

    tokens: SpecialTokens
    dims: ModelDims
    mel: MelFrontend
    text: TokenizerText
    alignment_heads: AlignmentHeads
    """The heads whose attention the saved step graphs return; ``()`` when they return none."""


def write_side_data(
    directory: Path,
    *,
    tokens: SpecialTokens,
    dims: ModelDims,
    mel: MelFrontend,
    text: TokenizerText,
    alignment_heads: AlignmentHeads = (),
) -> dict[str, Any]:
    """Write ``mel_filters.npy`` and ``tokenizer.json`` into ``directory``; returns the manifest fields that describe them."""
    np.save(directory / "mel_filters.npy", mel.filters)
    (directory / "tokenizer.json").write_text(text.to_json(), encoding="utf-8")
    return {
        "dims": dataclasses.asdict(dims),
        "tokens": tokens.to_json(),
        "mel": {"file": "mel_filters.npy", "n_fft": mel.n_fft, "hop_length": mel.hop_length, "dither": mel.dither},
        "tokenizer": {"file": "tokenizer.json", "clean_up_tokenization_spaces": text.clean_up_spaces},
        "alignment_heads": [list(pair) for pair in alignment_heads],
    }


def read_side_data(directory: Path, manifest: Mapping[str, Any]) -> SideData:
    """What :func:`write_side_data` saved (a manifest without ``alignment_heads`` has none)."""
    dims = ModelDims(**manifest["dims"])
    tokens = SpecialTokens.from_json(manifest["tokens"])
    mel_spec = manifest["mel"]
    mel = MelFrontend(np.load(directory / mel_spec["file"]), mel_spec["n_fft"], mel_spec["hop_length"], mel_spec["dither"])
    if mel.filters.shape[1] != dims.n_mels:
        raise ValueError(f"mel filters {mel.filters.shape} do not match n_mels {dims.n_mels}")
    tok = manifest["tokenizer"]
    text = TokenizerText.from_file(directory / tok["file"], tok["clean_up_tokenization_spaces"])
    return SideData(tokens, dims, mel, text, alignment_heads_from(manifest.get("alignment_heads")))
