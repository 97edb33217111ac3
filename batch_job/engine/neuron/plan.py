"""Device and host memory plan for the Neuron graphs, from a Whisper config alone (no weights).

Per batch-size bucket ``B`` two graphs are compiled, each with its OWN copy of its weights on the
NeuronCore. ``D``: graph dtype (bfloat16 = 2 bytes on Neuron; float32 = 4); ``L``/``H``: decoder
layers/heads, ``Dh = d_model / H``; ``S = max_source_positions`` (1500); ``T``: cache_len
(``max_new_tokens + 4`` prompt slots, <= ``max_target_positions``); ``M``: mel bins; ``V``: vocab.

* **encoder**: weights = the encoder + each decoder layer's cross-attention ``k_proj`` (no bias) and
  ``v_proj``; input ``mel [B, M, 3000]`` D; outputs ``cross_k``, ``cross_v`` ``[L, B, H, S, Dh]`` D.
* **step** (one token for all rows): weights = the decoder minus those projections (``embed_tokens``
  tied to ``proj_out``, counted once); inputs ``tokens [B, 1]``, ``position [1]`` int32; aliased
  device state per layer ``self_k.i``/``self_v.i`` ``[B, H, T, Dh]`` and ``cross_k.i``/``cross_v.i``
  ``[B, H, S, Dh]`` D; output ``logits [B, V]`` float32 (aliased state outputs cost nothing extra).

LayerNorm parameters stay float32 in both graphs. Scratch figures are ESTIMATES (the real
scratchpad is known only after neuronx-cc); the rest is exact arithmetic on shapes. Stdlib only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from batch_job.constants import CHUNK_SECONDS as WINDOW_SECONDS
from batch_job.constants import N_FRAMES, SAMPLE_RATE
from batch_job.errors import ModelError

# ----------------------------------------------------------------------------------- constants
GIB, MIB = 1 << 30, 1 << 20
NEURON_CORE_HBM_BYTES = 16 * GIB  # one NeuronCore-v2's share: half of the inf2 chip's 32 GiB HBM
DEVICE_BYTES_PER_CORE_LIMIT = 13 * GIB  # planning budget: headroom for the runtime's own scratch, NEFFs
HOST_BYTES_PER_JOB_LIMIT = 7168 * MIB  # Batch job definitions' MEMORY (template.yaml; a test keeps them equal)
HOST_BASELINE_BYTES = 1 * GIB  # ASSUMPTION: Python + torch + torch-neuronx + tokenizer + feature extractor
AUDIO_DECODE_ALLOWANCE_BYTES = 64 * MIB  # ASSUMPTION: decode/resample buffers beyond the batch's audio
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LAYER_NORM_BYTES = 4  # LayerNorm weights/biases kept float32 even when D is bf16
SOFTMAX_BYTES = 4  # attention scores/probabilities computed in float32
INDEX_BYTES = 4  # int32 tokens and position
ENC_HIDDEN_BUFFERS = 8  # [B, S, d] in D: residual, normed, q, k, v, attn out, conv1 out [B, d, 3000] (x2)
ENC_FFN_BUFFERS = 2  # [B, S, encoder_ffn] in D: fc1 out, GELU out
STEP_HIDDEN_BUFFERS = 8  # [B, max(d, decoder_ffn)] float32, per step (small)


# ----------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class WhisperDims:
    """The config.json fields that fix every graph shape (see the module docstring)."""

    num_mel_bins: int
    vocab_size: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_layers: int
    decoder_attention_heads: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int

    def __post_init__(self) -> None:
        if self.d_model % self.decoder_attention_heads or self.d_model % self.encoder_attention_heads:
            raise ModelError(f"d_model {self.d_model} is not divisible by the attention heads")

    @property
    def head_dim(self) -> int:
        """``Dh = d_model / decoder_attention_heads``."""
        return self.d_model // self.decoder_attention_heads

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WhisperDims:
        """From a config.json mapping (extra keys ignored); a missing field is a :class:`ModelError`."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise ModelError(f"Whisper config lacks {', '.join(missing)}")
        return cls(**{n: int(config[n]) for n in names})


def _config(d: int, layers: int, dec_layers: int, heads: int, mels: int, vocab: int) -> dict[str, int]:
    return {"num_mel_bins": mels, "vocab_size": vocab, "d_model": d, "encoder_layers": layers,
            "encoder_attention_heads": heads, "encoder_ffn_dim": 4 * d, "decoder_layers": dec_layers,
            "decoder_attention_heads": heads, "decoder_ffn_dim": 4 * d, "max_source_positions": 1500,
            "max_target_positions": 448}


KNOWN_CONFIGS: Mapping[str, Mapping[str, int]] = {
    "openai/whisper-large-v3": _config(1280, 32, 32, 20, 128, 51866),
    "openai/whisper-large-v3-turbo": _config(1280, 32, 4, 20, 128, 51866),
    "tiny.en": _config(384, 4, 4, 6, 80, 51864),
    "base": _config(512, 6, 6, 8, 80, 51865),
}
"""Shape fields of published config.json files (hub files cannot be downloaded here)."""
_ALIASES = {"large-v3": "openai/whisper-large-v3", "large-v3-turbo": "openai/whisper-large-v3-turbo",
            "turbo": "openai/whisper-large-v3-turbo", "openai/whisper-tiny.en": "tiny.en",
            "openai/whisper-base": "base"}


def dims_for_model(name_or_dir: str, cache_dir: str | Path | None = None) -> WhisperDims:
    """Dims from the checkpoint's config.json when one is at hand, else from :data:`KNOWN_CONFIGS`.

    A directory must hold config.json. Hub ids are read from the local HF cache only; packaged
    models (tiny.en, base) are resolved (converted once) only when ``cache_dir`` is given.
    Raises :class:`ModelError` when neither source knows the model.
    """
    from batch_job.engine.models import PACKAGED_MODELS, resolve_checkpoint

    is_dir = Path(name_or_dir).expanduser().is_dir()
    if is_dir or name_or_dir not in PACKAGED_MODELS or cache_dir is not None:
        try:
            checkpoint = resolve_checkpoint(name_or_dir, cache_dir or ".")  # cache_dir: packaged models only
        except ModelError:
            if is_dir:
                raise  # a directory without config.json: say so, do not guess from its name
        else:
            return WhisperDims.from_config(json.loads((checkpoint / "config.json").read_text(encoding="utf-8")))
    known = KNOWN_CONFIGS.get(_ALIASES.get(name_or_dir, name_or_dir))
    if known is None:
        raise ModelError(
            f"no config for model {name_or_dir!r}: not a directory with config.json, not in the local HF "
            f"cache, and not one of the known configs {sorted(KNOWN_CONFIGS)} (aliases {sorted(_ALIASES)})"
        )
    return WhisperDims(**known)


# ----------------------------------------------------------------------------------- parameters
def _layer_norm_params(dims: WhisperDims) -> tuple[int, int]:
    """LayerNorm parameters (kept float32) in (encoder graph, step graph)."""
    d = dims.d_model
    return 2 * d * (2 * dims.encoder_layers + 1), 2 * d * (3 * dims.decoder_layers + 1)


def parameter_counts(dims: WhisperDims) -> tuple[int, int]:
    """``(encoder_graph_params, step_graph_params)``: exact numel of the weights each graph holds."""
    d, m = dims.d_model, dims.num_mel_bins
    attn4 = 4 * d * d + 3 * d  # q, k, v, out; k_proj has no bias
    enc_layer = attn4 + 2 * d * dims.encoder_ffn_dim + dims.encoder_ffn_dim + d
    encoder = (3 * m * d + d) + (3 * d * d + d) + dims.max_source_positions * d + dims.encoder_layers * enc_layer
    cross_kv = dims.decoder_layers * (2 * d * d + d)  # encoder_attn k_proj (no bias) + v_proj
    dec_layer = attn4 + (2 * d * d + 2 * d) + 2 * d * dims.decoder_ffn_dim + dims.decoder_ffn_dim + d
    step = (dims.vocab_size + dims.max_target_positions) * d + dims.decoder_layers * dec_layer
    enc_ln, step_ln = _layer_norm_params(dims)
    return encoder + cross_kv + enc_ln, step + step_ln


# ----------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class GraphMemory:
    """Device bytes of one compiled graph (``graph`` is ``"encoder"`` or ``"step"``) for bucket ``B``."""

    graph: str
    batch_size: int
    weights: int
    state: int
    inputs: int  # host->device bytes per call (the step's must stay tiny)
    outputs: int
    scratch: int  # an estimate (see the module docstring)

    @property
    def total(self) -> int:
        return self.weights + self.state + self.inputs + self.outputs + self.scratch


@dataclass(frozen=True)
class HostMemory:
    """Host bytes of the job process: ``peak = baseline + max(load_peak, run_peak)``.

    ``load_peak``: the largest graph file held by ``torch.jit.load`` before it moves to the device
    (encoder weights, or step weights + its saved initial state). ``run_peak``: cross K/V copied
    back from the encoder (D) + ``mel [B, M, 3000]`` float32 + logits + audio windows + allowance.
    """

    baseline: int
    load_peak: int
    run_peak: int

    @property
    def peak(self) -> int:
        return self.baseline + max(self.load_peak, self.run_peak)


@dataclass(frozen=True)
class MemoryPlan:
    """All graphs of all buckets on one NeuronCore, and the job's host memory."""

    dims: WhisperDims
    dtype: str
    cache_len: int
    graphs: tuple[GraphMemory, ...]
    host: HostMemory
    device_limit: int = DEVICE_BYTES_PER_CORE_LIMIT
    host_limit: int = HOST_BYTES_PER_JOB_LIMIT

    @property
    def device_total(self) -> int:
        """Bytes per NeuronCore: every graph of every bucket is resident at once."""
        return sum(g.total for g in self.graphs)

    @property
    def host_peak(self) -> int:
        return self.host.peak

    @property
    def fits(self) -> dict[str, bool]:
        """``{"device": device_total <= device_limit, "host": host_peak <= host_limit}``."""
        return {"device": self.device_total <= self.device_limit, "host": self.host_peak <= self.host_limit}


def plan(dims: WhisperDims, batch_sizes: Iterable[int], cache_len: int, dtype: str = "bfloat16") -> MemoryPlan:
    """The memory plan for buckets ``batch_sizes`` with a ``cache_len``-slot self cache, graphs in ``dtype``."""
    dt = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, str(dtype).replace("torch.", ""))
    if dt not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPE_BYTES)}")
    nbytes = DTYPE_BYTES[dt]
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, got {sizes}")
    if not 1 <= cache_len <= dims.max_target_positions:
        raise ValueError(f"cache_len {cache_len} is outside 1..{dims.max_target_positions}")
    d, S, T, L, V = dims.d_model, dims.max_source_positions, cache_len, dims.decoder_layers, dims.vocab_size
    enc_params, step_params = parameter_counts(dims)
    enc_ln, step_ln = _layer_norm_params(dims)
    enc_weights = (enc_params - enc_ln) * nbytes + enc_ln * LAYER_NORM_BYTES
    step_weights = (step_params - step_ln) * nbytes + step_ln * LAYER_NORM_BYTES
    graphs: list[GraphMemory] = []
    load_peak = run_peak = 0
    for B in sizes:
        cross = 2 * L * B * S * d * nbytes  # cross_k + cross_v, [L, B, H, S, Dh] each
        self_cache = 2 * L * B * T * d * nbytes  # self_k.i + self_v.i, [B, H, T, Dh] per layer
        mel_device = B * dims.num_mel_bins * N_FRAMES * nbytes
        enc_scratch = (2 * B * dims.encoder_attention_heads * S * S * SOFTMAX_BYTES  # one layer's scores + probs
                       + (ENC_HIDDEN_BUFFERS * d + ENC_FFN_BUFFERS * dims.encoder_ffn_dim) * B * S * nbytes)
        logits = B * V * 4
        step_scratch = (B * V * nbytes + 2 * L * B * dims.decoder_attention_heads * (S + T) * SOFTMAX_BYTES
                        + STEP_HIDDEN_BUFFERS * B * max(d, dims.decoder_ffn_dim) * 4)
        graphs.append(GraphMemory("encoder", B, enc_weights, 0, mel_device, cross, enc_scratch))
        graphs.append(GraphMemory("step", B, step_weights, cross + self_cache, (B + 1) * INDEX_BYTES, logits,
                                  step_scratch))
        load_peak = max(load_peak, enc_weights, step_weights + cross + self_cache)
        audio = B * WINDOW_SECONDS * SAMPLE_RATE * 4 + AUDIO_DECODE_ALLOWANCE_BYTES
        run_peak = max(run_peak, cross + B * dims.num_mel_bins * N_FRAMES * 4 + logits + audio)
    return MemoryPlan(dims, dt, cache_len, tuple(graphs), HostMemory(HOST_BASELINE_BYTES, load_peak, run_peak))


# ----------------------------------------------------------------------------------- report
def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB" if n >= MIB else f"{n} B"


def _verdict(used: int, limit: int) -> str:
    return f"fits ({_size(limit - used)} spare)" if used <= limit else f"DOES NOT FIT ({_size(used - limit)} over)"


def format_plan(p: MemoryPlan) -> str:
    """A readable table of :func:`plan`'s rows, totals, limits and a verdict per limit."""
    dm = p.dims
    head = (f"Neuron memory plan: d_model={dm.d_model} enc_layers={dm.encoder_layers} dec_layers={dm.decoder_layers} "
            f"heads={dm.decoder_attention_heads} vocab={dm.vocab_size} mels={dm.num_mel_bins}, "
            f"{p.dtype}, cache_len={p.cache_len}")
    cols = ("weights", "state", "inputs", "outputs", "scratch*", "total")
    lines = [head, f"{'B':>4} {'graph':<8}" + "".join(f"{c:>12}" for c in cols)]
    for g in p.graphs:
        values = (g.weights, g.state, g.inputs, g.outputs, g.scratch, g.total)
        lines.append(f"{g.batch_size:>4} {g.graph:<8}" + "".join(f"{_size(v):>12}" for v in values))
    h = p.host
    lines += [
        f"device per NeuronCore: {_size(p.device_total)} of limit {_size(p.device_limit)} "
        f"(HBM {_size(NEURON_CORE_HBM_BYTES)}): {_verdict(p.device_total, p.device_limit)}",
        f"host peak: baseline {_size(h.baseline)} (assumed) + max(load {_size(h.load_peak)}, run {_size(h.run_peak)})"
        f" = {_size(h.peak)} of limit {_size(p.host_limit)}: {_verdict(h.peak, p.host_limit)}",
        "* scratch is an estimate: one encoder layer's fp32 attention scores+probs plus a few activation "
        "buffers; the compiler's real scratchpad is known only after neuronx-cc.",
    ]
    return "\n".join(lines)
