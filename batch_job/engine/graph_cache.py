"""CPU graph cache: the engine's traced graphs and model side data, saved after the first load.

A cold CPU start loads the transformers checkpoint, builds :class:`~batch_job.engine.graphs.EncoderGraph`
/ :class:`~batch_job.engine.graphs.DecoderStepGraph`, quantizes the step to int8 and traces both.
That costs seconds (importing transformers' model code, ``quantize_dynamic``, tracing). The
result depends only on the weights and a few settings, so :func:`save` writes it to
``<cache_dir>/graphs/<key>/`` and a warm start (:func:`load`) needs only ``torch.jit.load`` and
``tokenizers``: transformers is never imported on the way to "model ready".

Directory layout (``manifest.json`` is written last, inside a temp dir that is renamed into
place, so a directory under its key is always complete)::

    encoder.pt       torch.jit trace of EncoderGraph at batch 1 (batch-generic: the same graph
                     runs every bucket, output identical to the eager module at batch 4)
    step.pt          one ScriptModule with a traced method ``b<B>`` per batch bucket (int8 when
                     quantized); the methods share one copy of the weights
    mel_filters.npy  the feature extractor's mel filter bank [n_freq, n_mels]
    tokenizer.json   the fast tokenizer (``tokenizers`` library format)
    manifest.json    key, key fields, model dims, SpecialTokens, mel constants, file sizes

The key hashes everything the graphs depend on: weights sha256, static cache length, buckets,
quantize/jit flags, torch / transformers / whisper-batch versions, :data:`GRAPH_CODE_VERSION`
and the source of :mod:`~batch_job.engine.graphs`, :mod:`~batch_job.engine.bundle` and this module (so editing the graph code can never
serve a stale graph). A directory that fails any check (unreadable manifest, wrong key, missing
or truncated file, a graph torch cannot load) is logged, ignored, and replaced by the next cold load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch_job.constants import N_AUDIO_CTX, N_FRAMES
from batch_job.engine.artifacts import MANIFEST_NAME, package_versions, read_side_data, write_manifest, write_side_data
from batch_job.engine.bundle import BucketGraphs, ModelBundle, ModelDims, TracedCpuGraphs

log = logging.getLogger(__name__)

FORMAT = 1
GRAPH_CODE_VERSION = 1
"""Bump when the way graphs are built/traced changes in a way the hashed sources do not show."""

_HASHED_SOURCES = ("graphs.py", "bundle.py", "graph_cache.py")
_FILES = ("encoder.pt", "step.pt", "mel_filters.npy", "tokenizer.json")
_STALE_TMP_S = 3600.0


# --------------------------------------------------------------------------------------------
# key
# --------------------------------------------------------------------------------------------


def key_fields(*, checksum: str, cache_len: int, buckets: Sequence[int], quantize: bool, jit: bool,
               encoder_dtype: str = "float32", word_timestamps: bool = False) -> dict[str, Any]:
    """What the cached graphs depend on (hashed into the key, recorded in the manifest)."""
    import torch

    from batch_job import __version__

    here = Path(__file__).resolve().parent
    sources = hashlib.sha256()
    for name in _HASHED_SOURCES:
        sources.update(name.encode() + b"\0" + (here / name).read_bytes())
    return {
        "format": FORMAT,
        "graph_code_version": GRAPH_CODE_VERSION,
        "graph_sources": sources.hexdigest()[:16],
        "weights_sha256": checksum,
        "cache_len": int(cache_len),
        "buckets": sorted(int(b) for b in buckets),
        "quantize": bool(quantize),
        "jit": bool(jit),
        "encoder_dtype": encoder_dtype,
        "word_timestamps": bool(word_timestamps),
        "torch": torch.__version__,
        "transformers": package_versions(("transformers",))["transformers"],
        "whisper_batch": __version__,
    }


def cache_key(fields: Mapping[str, Any]) -> str:
    blob = json.dumps(dict(fields), sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:24]


def checkpoint_max_positions(checkpoint: str | os.PathLike[str]) -> int:
    """``max_target_positions`` from ``config.json`` (plain JSON read: no transformers import)."""
    config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_target_positions", 448))


def cache_root(cache_dir: str | os.PathLike[str]) -> Path:
    return Path(cache_dir) / "graphs"


@dataclass(frozen=True)
class CacheSlot:
    """Where one engine's CPU graphs live in the cache: the entry for ``fields`` under ``root``.

    ``present`` says an entry existed when the slot was made: if it then fails to load, the
    cold build that follows replaces it (:meth:`save`).
    """

    root: Path
    key: str
    buckets: tuple[int, ...]
    present: bool

    @classmethod
    def at(cls, cache_dir: str | os.PathLike[str], fields: Mapping[str, Any]) -> CacheSlot:
        root = cache_root(cache_dir)
        key = cache_key(fields)
        return cls(root, key, tuple(int(b) for b in fields["buckets"]), (root / key).exists())

    def load(self, model_name: str) -> ModelBundle | None:
        """The cached bundle, or ``None`` (absent or broken)."""
        return load(self.root, self.key, buckets=self.buckets, model_name=model_name)

    def save(self, bundle: ModelBundle, fields: Mapping[str, Any]) -> Path | None:
        """Save a cold-built bundle under the key of ``fields`` (those of the weights actually loaded)."""
        key = cache_key(fields)
        return save(self.root, key, fields, bundle, replace_broken=self.present and key == self.key)


# --------------------------------------------------------------------------------------------
# building (cold) the CPU graphs
# --------------------------------------------------------------------------------------------


def _bucket_steps_class():
    from torch import nn

    class BucketSteps(nn.Module):
        """The decoder step once, traced once per bucket as method ``b<B>`` (weights shared)."""

        def __init__(self, step: nn.Module) -> None:
            super().__init__()
            self.step = step

        def forward(self, tokens, position, self_k, self_v, cross_k, cross_v):
            return self.step(tokens, position, self_k, self_v, cross_k, cross_v)

    return BucketSteps


def trace_cpu_graphs(encoder: Any, step: Any, dims: ModelDims, buckets: Sequence[int], sot: int,
                     cross_dtype: str = "float32") -> TracedCpuGraphs:
    """``torch.jit.trace`` the encoder (at batch 1; batch-generic) and the step at every bucket.

    Inputs are zeros (the graphs have no data-dependent control flow; the step writes nothing).
    The step script has one method ``b<B>`` per bucket, traced for cross K/V in ``cross_dtype``
    (the encoder's output dtype: :class:`~batch_job.engine.graphs.CastEncoder`).
    """
    import warnings

    import torch

    dtype = getattr(torch, cross_dtype)
    cross = lambda b: torch.zeros(dims.layers, b, dims.heads, N_AUDIO_CTX, dims.head_dim, dtype=dtype)  # noqa: E731
    cache = lambda b: torch.zeros(dims.layers, b, dims.heads, dims.cache_len, dims.head_dim)  # noqa: E731
    wrapper = _bucket_steps_class()(step).eval()
    methods = {}
    for b in sorted(buckets):
        setattr(wrapper, f"b{b}", wrapper.forward)
        methods[f"b{b}"] = (torch.full((b, 1), int(sot), dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                            cache(b), cache(b), cross(b), cross(b))
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        enc = torch.jit.trace(encoder, (torch.zeros(1, dims.n_mels, N_FRAMES),), check_trace=False)
        steps = torch.jit.trace_module(wrapper, methods, check_trace=False)
    return TracedCpuGraphs(enc, steps)


def bucket_graphs(traced: TracedCpuGraphs, buckets: Sequence[int]) -> dict[int, BucketGraphs]:
    """Each bucket's graphs: the shared encoder and the step script's method for that size."""
    return {b: BucketGraphs(traced.encoder, getattr(traced.steps, f"b{b}")) for b in buckets}


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def save(root: Path, key: str, fields: Mapping[str, Any], bundle: ModelBundle, *, replace_broken: bool = False) -> Path | None:
    """Write ``bundle``'s traced graphs and side data under ``key``, atomically (temp dir + rename).

    Returns the entry's path, ``None`` on failure. An entry already under ``key`` is kept (a
    concurrent process wrote it) unless ``replace_broken`` (this process failed to load it): then
    it is moved aside and replaced. Never raises: a read-only or full cache dir only costs the
    next start a cold load.
    """
    import torch

    final = root / key
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:12]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        tmp.mkdir()
        if bundle.traced is None:
            raise ValueError("the bundle has no traced CPU graphs")
        torch.jit.save(bundle.traced.encoder, str(tmp / "encoder.pt"))
        torch.jit.save(bundle.traced.steps, str(tmp / "step.pt"))
        manifest = {
            "format": FORMAT,
            "key": key,
            "key_fields": dict(fields),
            "model": {"name": bundle.name, "checksum": fields["weights_sha256"]},
            "buckets": list(fields["buckets"]),
            **write_side_data(tmp, tokens=bundle.tokens, dims=bundle.dims, mel=bundle.mel, text=bundle.text,
                              alignment_heads=bundle.alignment_heads),
            "files": {name: (tmp / name).stat().st_size for name in _FILES},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_manifest(tmp, manifest)  # last: marks the directory complete
        if final.exists():
            if not replace_broken and (final / MANIFEST_NAME).is_file():  # written meanwhile by another process
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            _discard(final, root)  # broken or incomplete: replace it
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MANIFEST_NAME).is_file():  # another process won the race: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            raise
        log.info("graph cache: saved %s", final)
        _prune_superseded(root, key, fields)
        return final
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation, never a failure
        log.warning("graph cache: cannot save %s (%s: %s); next start loads the model again", final, type(exc).__name__, exc)
        shutil.rmtree(tmp, ignore_errors=True)
        return None


def load(root: Path, key: str, *, buckets: Sequence[int], model_name: str) -> ModelBundle | None:
    """The cached bundle for ``key``, or ``None`` (absent, or broken: logged, and left to be replaced)."""
    path = root / key
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        if path.exists():
            log.warning("graph cache: %s has no manifest (incomplete); ignoring it and rebuilding", path)
        return None
    try:
        return _load(path, key, buckets, model_name)
    except Exception as exc:  # noqa: BLE001
        log.warning("graph cache: %s is unusable (%s: %s); ignoring it and rebuilding", path, type(exc).__name__, exc)
        return None


def _load(path: Path, key: str, buckets: Sequence[int], model_name: str) -> ModelBundle:
    import torch

    manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("key") != key:
        raise ValueError(f"manifest format/key mismatch ({manifest.get('format')!r}, {manifest.get('key')!r})")
    for name, size in manifest["files"].items():
        actual = (path / name).stat().st_size
        if actual != size:
            raise ValueError(f"{name} is {actual} bytes, the manifest says {size}")
    missing = sorted(set(int(b) for b in buckets) - set(int(b) for b in manifest["buckets"]))
    if missing:
        raise ValueError(f"no step graph for bucket(s) {missing}")
    side = read_side_data(path, manifest)
    traced = TracedCpuGraphs(
        encoder=torch.jit.load(str(path / "encoder.pt"), map_location="cpu").eval(),
        steps=torch.jit.load(str(path / "step.pt"), map_location="cpu").eval(),
    )
    return ModelBundle(
        name=model_name,
        checksum=manifest["model"]["checksum"],
        device="cpu",
        tokens=side.tokens,
        dims=side.dims,
        text=side.text,
        mel=side.mel,
        graphs=bucket_graphs(traced, buckets),
        alignment_heads=side.alignment_heads,
        source="cache",
        cache_path=path,
    )


def _discard(path: Path, root: Path) -> None:
    """Move a broken entry aside (atomic) and delete it; a concurrent discard is harmless."""
    trash = root / f".trash-{uuid.uuid4().hex[:12]}"
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


_SAME_ENTRY = {"weights_sha256": None, "cache_len": None, "buckets": None, "quantize": None, "jit": None,
               "encoder_dtype": "float32", "word_timestamps": False}
"""Fields that make two entries alternatives (both kept) rather than one superseding the other;
the value is what an entry written before the field existed had."""


def _prune_superseded(root: Path, key: str, fields: Mapping[str, Any]) -> None:
    """Delete entries for the same weights and settings built by other code/versions (never read again)."""
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.name == key:
            continue
        try:
            old = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8")).get("key_fields") or {}
        except (OSError, ValueError):
            continue
        if all(old.get(k, default) == fields.get(k, default) for k, default in _SAME_ENTRY.items()):
            log.info("graph cache: removing %s (superseded by %s)", entry, key)
            _discard(entry, root)


def _remove_stale_tmp(root: Path) -> None:
    """Temp dirs of crashed writers (older than an hour); best effort."""
    now = time.time()
    for entry in root.glob(".tmp-*"):
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass
