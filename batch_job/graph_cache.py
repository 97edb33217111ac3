"""CPU graph cache: the engine's traced graphs and model side data, saved after the first load.

A cold CPU start loads the transformers checkpoint, builds :class:`~batch_job.inference.EncoderGraph`
/ :class:`~batch_job.inference.DecoderStepGraph`, quantizes the step to int8 and traces both.
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
and the source of :mod:`batch_job.inference` and this module (so editing the graph code can never
serve a stale graph). A directory that fails any check (unreadable manifest, wrong key, missing
or truncated file, a graph torch cannot load) is logged, ignored, and replaced by the next cold load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batch_job.constants import N_AUDIO_CTX
from batch_job.decoding import SpecialTokens
from batch_job.neuron.manifest import MANIFEST_NAME, package_versions, write_manifest

log = logging.getLogger(__name__)

FORMAT = 1
GRAPH_CODE_VERSION = 1
"""Bump when the way graphs are built/traced changes in a way the hashed sources do not show."""

_HASHED_SOURCES = ("inference.py", "graph_cache.py")
_FILES = ("encoder.pt", "step.pt", "mel_filters.npy", "tokenizer.json")
_STALE_TMP_S = 3600.0


# --------------------------------------------------------------------------------------------
# the pieces an engine is built from
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """Shapes the engine needs (no transformers config object on the warm path)."""

    layers: int
    heads: int
    d_model: int
    n_mels: int
    vocab_size: int
    max_target_positions: int
    cache_len: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @classmethod
    def from_config(cls, config: Any, cache_len: int) -> ModelDims:
        """From a transformers ``WhisperConfig`` and the static cache length."""
        return cls(
            layers=int(config.decoder_layers),
            heads=int(config.decoder_attention_heads),
            d_model=int(config.d_model),
            n_mels=int(config.num_mel_bins),
            vocab_size=int(config.vocab_size),
            max_target_positions=int(config.max_target_positions),
            cache_len=int(cache_len),
        )


class MelFrontend:
    """Log-mel features, the same computation as ``WhisperFeatureExtractor._torch_extract_fbank_features``.

    ``__call__(padded [B, N] float32) -> torch.Tensor [B, n_mels, N // hop]``.
    """

    def __init__(self, filters: np.ndarray, n_fft: int, hop_length: int, dither: float = 0.0) -> None:
        self.filters = np.ascontiguousarray(filters, dtype=np.float32)
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.dither = float(dither)
        self._filters_t = None
        self._window = None

    @classmethod
    def from_feature_extractor(cls, fe: Any) -> MelFrontend:
        return cls(np.asarray(fe.mel_filters), fe.n_fft, fe.hop_length, float(getattr(fe, "dither", 0.0) or 0.0))

    def __call__(self, padded: np.ndarray):
        import torch

        if self._filters_t is None:
            self._filters_t = torch.from_numpy(self.filters).T
            self._window = torch.hann_window(self.n_fft)
        waveform = torch.from_numpy(padded).to(torch.float32)
        if self.dither != 0.0:
            waveform = waveform + self.dither * torch.randn(waveform.shape, dtype=waveform.dtype)
        stft = torch.stft(waveform, self.n_fft, self.hop_length, window=self._window, return_complex=True)
        magnitudes = (stft[..., :-1].abs() ** 2).contiguous()
        mel_spec = self._filters_t @ magnitudes
        log_spec = torch.clamp(mel_spec, min=1e-10).log10()
        if waveform.dim() == 2:
            max_val = log_spec.max(dim=2, keepdim=True)[0].max(dim=1, keepdim=True)[0]
            log_spec = torch.maximum(log_spec, max_val - 8.0)
        else:
            log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0


class TokenizerText:
    """Token ids -> text with the ``tokenizers`` library (what ``WhisperTokenizerFast.decode`` runs).

    Callers pass text ids only (below ``<|endoftext|>``); special tokens are skipped anyway.
    """

    def __init__(self, tokenizer: Any, clean_up_spaces: bool = False) -> None:
        self.tokenizer = tokenizer
        self.clean_up_spaces = bool(clean_up_spaces)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], clean_up_spaces: bool = False) -> TokenizerText:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), clean_up_spaces)

    def __call__(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        if self.clean_up_spaces:  # transformers' clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text


@dataclass(frozen=True)
class BucketGraphs:
    """One batch bucket's CPU/CUDA graphs: ``encode`` and a :class:`~batch_job.inference.StackedCacheStep`."""

    encode: Callable
    step: Callable

    def inference(self, shape: Any, *, device: Any) -> Any:
        """A :class:`~batch_job.inference.StaticCacheInference` over these graphs (float32 caches)."""
        import torch

        from batch_job.inference import StaticCacheInference

        return StaticCacheInference(self.encode, self.step, shape, device=device, dtype=torch.float32)


@dataclass
class ModelBundle:
    """Everything :class:`~batch_job.engine.Engine` is built from, from the HF model (cold) or the cache (warm)."""

    name: str
    checksum: str
    tokens: SpecialTokens
    dims: ModelDims
    text: Callable[[Sequence[int]], str]
    mel: Callable[[np.ndarray], Any]
    graphs: dict[int, Any]
    """Per batch size: :class:`BucketGraphs`, or :class:`~batch_job.neuron.runtime.StatefulGraphs`
    (compiled); each makes its bucket's inference with ``.inference(shape, device=...)``."""
    loaded: Any = None
    """The :class:`~batch_job.models.LoadedModel` when built cold; ``None`` from the cache."""
    source: str = "model"
    """``model`` (built from the checkpoint), ``cache`` (CPU graph cache) or ``compiled`` (``whisper-batch compile``)."""
    cache_path: Path | None = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# key
# --------------------------------------------------------------------------------------------


def key_fields(*, checksum: str, cache_len: int, buckets: Sequence[int], quantize: bool, jit: bool,
               encoder_dtype: str = "float32") -> dict[str, Any]:
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


def trace_cpu_graphs(encoder: Any, step: Any, dims: ModelDims, buckets: Sequence[int], sot: int) -> tuple[Any, Any]:
    """``torch.jit.trace`` the encoder (at batch 1; batch-generic) and the step at every bucket.

    Inputs are zeros (the graphs have no data-dependent control flow; the step writes nothing).
    Returns ``(encoder_script, step_script)``; the step script
    has one method ``b<B>`` per bucket.
    """
    import warnings

    import torch

    from batch_job.constants import N_FRAMES

    cross = lambda b: torch.zeros(dims.layers, b, dims.heads, N_AUDIO_CTX, dims.head_dim)  # noqa: E731
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
    return enc, steps


def bucket_graphs(encoder: Any, steps: Any, buckets: Sequence[int]) -> dict[int, BucketGraphs]:
    return {b: BucketGraphs(encoder, getattr(steps, f"b{b}")) for b in buckets}


# --------------------------------------------------------------------------------------------
# side data: what an engine needs besides the graphs (the CPU cache and compiled Neuron dirs)
# --------------------------------------------------------------------------------------------


def write_side_data(
    directory: Path, *, tokens: SpecialTokens, dims: ModelDims, mel: MelFrontend, tokenizer_json: str, clean_up_spaces: bool
) -> dict[str, Any]:
    """Write ``mel_filters.npy`` and ``tokenizer.json`` into ``directory``; returns the manifest fields that describe them."""
    np.save(directory / "mel_filters.npy", mel.filters)
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    return {
        "dims": dataclasses.asdict(dims),
        "tokens": tokens_to_json(tokens),
        "mel": {"file": "mel_filters.npy", "n_fft": mel.n_fft, "hop_length": mel.hop_length, "dither": mel.dither},
        "tokenizer": {"file": "tokenizer.json", "clean_up_tokenization_spaces": bool(clean_up_spaces)},
    }


def read_side_data(directory: Path, manifest: Mapping[str, Any]) -> tuple[SpecialTokens, ModelDims, MelFrontend, TokenizerText]:
    """The special tokens, dims, log-mel front end and detokenizer that :func:`write_side_data` saved."""
    dims = ModelDims(**manifest["dims"])
    tokens = tokens_from_json(manifest["tokens"])
    mel_spec = manifest["mel"]
    mel = MelFrontend(np.load(directory / mel_spec["file"]), mel_spec["n_fft"], mel_spec["hop_length"], mel_spec["dither"])
    if mel.filters.shape[1] != dims.n_mels:
        raise ValueError(f"mel filters {mel.filters.shape} do not match n_mels {dims.n_mels}")
    tok = manifest["tokenizer"]
    text = TokenizerText.from_file(directory / tok["file"], tok["clean_up_tokenization_spaces"])
    return tokens, dims, mel, text


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def save(
    root: Path,
    key: str,
    fields: Mapping[str, Any],
    *,
    encoder: Any,
    steps: Any,
    tokens: SpecialTokens,
    dims: ModelDims,
    mel: MelFrontend,
    tokenizer_json: str,
    clean_up_spaces: bool,
    model_name: str,
    replace_broken: bool = False,
) -> Path | None:
    """Write a cache entry atomically (temp dir + rename); returns its path, ``None`` on failure.

    An entry already under ``key`` is kept (a concurrent process wrote it) unless
    ``replace_broken`` (this process failed to load it): then it is moved aside and replaced.
    Never raises: a read-only or full cache dir only costs the next start a cold load.
    """
    import torch

    final = root / key
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:12]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        tmp.mkdir()
        torch.jit.save(encoder, str(tmp / "encoder.pt"))
        torch.jit.save(steps, str(tmp / "step.pt"))
        manifest = {
            "format": FORMAT,
            "key": key,
            "key_fields": dict(fields),
            "model": {"name": model_name, "checksum": fields["weights_sha256"]},
            "buckets": list(fields["buckets"]),
            **write_side_data(tmp, tokens=tokens, dims=dims, mel=mel, tokenizer_json=tokenizer_json,
                              clean_up_spaces=clean_up_spaces),
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
    tokens, dims, mel, text = read_side_data(path, manifest)
    encoder = torch.jit.load(str(path / "encoder.pt"), map_location="cpu").eval()
    steps = torch.jit.load(str(path / "step.pt"), map_location="cpu").eval()
    return ModelBundle(
        name=model_name,
        checksum=manifest["model"]["checksum"],
        tokens=tokens,
        dims=dims,
        text=text,
        mel=mel,
        graphs=bucket_graphs(encoder, steps, buckets),
        source="cache",
        cache_path=path,
    )


def tokens_to_json(tokens: SpecialTokens) -> dict[str, Any]:
    out = dataclasses.asdict(tokens)
    out["suppress"] = list(tokens.suppress)
    out["begin_suppress"] = list(tokens.begin_suppress)
    return out


def tokens_from_json(data: Mapping[str, Any]) -> SpecialTokens:
    values = dict(data)
    values["languages"] = {str(k): int(v) for k, v in (values.get("languages") or {}).items()}
    values["suppress"] = tuple(int(t) for t in values.get("suppress") or ())
    values["begin_suppress"] = tuple(int(t) for t in values.get("begin_suppress") or ())
    return SpecialTokens(**values)


def _discard(path: Path, root: Path) -> None:
    """Move a broken entry aside (atomic) and delete it; a concurrent discard is harmless."""
    trash = root / f".trash-{uuid.uuid4().hex[:12]}"
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


_SAME_ENTRY = ("weights_sha256", "cache_len", "buckets", "quantize", "jit")


def _prune_superseded(root: Path, key: str, fields: Mapping[str, Any]) -> None:
    """Delete entries for the same weights and settings built by other code/versions (never read again)."""
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.name == key:
            continue
        try:
            old = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8")).get("key_fields") or {}
        except (OSError, ValueError):
            continue
        if all(old.get(k) == fields.get(k) for k in _SAME_ENTRY):
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
