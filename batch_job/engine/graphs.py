"""The fixed-shape graphs every device runs, and the ``Inference`` objects that drive them.

These modules are exactly what gets compiled: ``torch.jit.trace`` on CPU/CUDA and
``torch_neuronx.trace`` for Inferentia2 take the same :class:`EncoderGraph` and
:class:`DecoderStepGraph`, so every device runs identical math and the decoding loop in
:mod:`batch_job.engine.decoding` never knows which device it is on.

Shapes (``B`` batch, ``M`` mel bins, ``L`` decoder layers, ``H`` heads, ``Dh`` head dim,
``S`` = 1500 encoder positions, ``T`` static self-attention cache length, ``V`` vocabulary):

* ``EncoderGraph(mel [B, M, 3000]) -> (cross_k [L, B, H, S, Dh], cross_v [L, B, H, S, Dh])``:
  the audio encoder plus every decoder layer's cross-attention key/value projection, run once
  per batch.
* ``DecoderStepGraph(tokens [B, 1] int32, position [1] int32, self_k, self_v, cross_k, cross_v)
  -> (logits [B, V] float32, new_k [L, B, H, 1, Dh], new_v [L, B, H, 1, Dh])`` with the caches
  given per layer (``self_*``: L x ``[B, H, T, Dh]``, ``cross_*``: L x ``[B, H, S, Dh]``). It is
  **pure**: it attends over the cache slots before ``position`` plus the new token's own key
  (NxDI's prior/active split) and returns the new key/value instead of writing them, so no
  input is ever modified. Masked scores take ``finfo(float32).min`` (never ``-inf``) and every
  softmax runs in float32. Built with ``alignment_heads`` (word timestamps), it also returns
  ``alignment [B, A, S]`` float32: the cross-attention probabilities of those ``A`` heads for
  the new token, a small extra output instead of a second decoding pass.

Where the cache lives is the one thing that differs, and it is decided outside the math:

* CPU/CUDA (:class:`StackedCacheStep` + :class:`StaticCacheInference`): the caches are graph
  inputs (stacked ``[L, B, H, T, Dh]`` tensors); the host writes ``new_k``/``new_v`` at
  ``position`` after each step (an in-place ``index_copy_`` of ``L x B x H x Dh`` values).
* Neuron (:class:`StatefulDecoderStep` + :class:`StatefulInference`): every cache is a
  per-layer state tensor on the NeuronCore. The traced step takes only ``tokens`` and
  ``position``, writes the new key/value with ``torch.scatter`` into new tensors and returns
  them (and the cross K/V, unchanged) as outputs aliased to their states, which the runtime
  keeps on the device. Cross K/V are copied into their states once per batch (``copy_``, as the
  Neuron T5 tutorial and optimum-neuron do). ``--backend jit`` runs the same module on CPU with
  the aliasing emulated (:class:`StatefulInference` with ``emulate_aliases``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batch_job.constants import N_AUDIO_CTX as SOURCE_POSITIONS

MASKED = torch.finfo(torch.float32).min
"""Score of a masked cache slot: the float32 minimum, not ``-inf`` (``-inf`` under auto-cast
risks NaN on NeuronCore-v2; the minimum gives exactly 0 after the float32 softmax)."""
STATE_KINDS = ("self_k", "self_v", "cross_k", "cross_v")
"""Order of the Neuron step's states (``L`` each): state ``j`` is ``STATE_KINDS[j // L]`` of
layer ``j % L`` and is aliased to output ``j + 1`` (output 0 is the logits)."""


class Inference(Protocol):
    """What the decoding loop needs from a device: one call per decoder step."""

    def logits(self, tokens: Tensor, position: int) -> Tensor:
        """Run one step. ``tokens [B, 1]`` integer ids at ``position`` -> next-token logits ``[B, V]`` float32."""
        ...


class BatchInference(Inference, Protocol):
    """An :class:`Inference` for one batch size that the engine starts on each new batch.

    ``alignment``: when its step graph returns the alignment heads' attention (word
    timestamps), the attention of every position run since :meth:`start`,
    ``[T, B, A, S]`` float16 (row ``p`` = the query at ``position == p``); else ``None``.
    """

    alignment: Tensor | None

    def start(self, mel: Tensor) -> None:
        """Encode ``mel [B, M, 3000]`` float32 and make its cross K/V the decoder's."""
        ...

    def finish(self) -> None:
        """Release per-batch buffers."""
        ...


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, H*Dh] -> [B, H, N, Dh]`` (contiguous: the matmuls' fast path needs it)."""
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2).contiguous()


def _one_query_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Attention of ONE (pre-scaled) query per row over ``S`` keys: ``q [B, H, 1, Dh]``, ``k, v [B, H, S, Dh]``
    -> ``(out [B, H, 1, Dh] in q's dtype, probs [B, H, 1, S] float32)``.

    Two batched matmuls and a float32 softmax: for one query this is faster on CPU than
    ``scaled_dot_product_attention``, whose kernels are built for blocks of queries. ``k, v``
    may be held in a narrower dtype than ``q`` (the CPU path's bfloat16 cross K/V, see
    :class:`CastEncoder`): the query meets them in their dtype, the output returns in ``q``'s.
    """
    probs = torch.softmax(torch.matmul(q.to(k.dtype), k.transpose(-1, -2)).float(), dim=-1)  # [B, H, 1, S]
    return torch.matmul(probs.to(v.dtype), v).to(q.dtype), probs


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, cache_k: Tensor, cache_v: Tensor, past: Tensor) -> Tensor:
    """Self-attention of the new token over the cache slots before it plus itself (no cache write).

    ``q, k, v [B, H, 1, Dh]`` (``q`` pre-scaled), ``cache_k, cache_v [B, H, T, Dh]``, ``past [1, 1, 1, T]``
    bool (slot < position) -> ``[B, H, 1, Dh]``. Equal to writing ``k, v`` at ``position`` and
    attending over slots ``<= position``; slots at or after ``position`` may hold anything finite.
    """
    past_scores = torch.matmul(q, cache_k.transpose(-1, -2)).float()  # [B, H, 1, T]
    past_scores = torch.where(past, past_scores, MASKED)
    own_score = (q * k).sum(dim=-1, keepdim=True).float()  # [B, H, 1, 1]
    probs = torch.softmax(torch.cat([past_scores, own_score], dim=-1), dim=-1).to(v.dtype)
    t = cache_k.shape[2]
    return torch.matmul(probs[..., :t], cache_v) + probs[..., t:] * v


class Float32LayerNorm(nn.LayerNorm):
    """A LayerNorm that normalizes in float32 whatever the activations' dtype (bf16 graphs)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def cast_for_inference(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model`` (in place) to ``dtype`` for inference, keeping every LayerNorm in float32.

    Weights, activations and caches take ``dtype``; layer norms compute (and keep their
    weights) in float32; the graphs compute softmax and logits in float32 anyway. A float32
    ``dtype`` leaves the model as it is.
    """
    model.to(dtype)
    if dtype == torch.float32:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                norm = Float32LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine)
                norm.load_state_dict({k: v.float() for k, v in child.state_dict().items()})
                setattr(parent, name, norm)
    return model


class EncoderGraph(nn.Module):
    """Audio encoder + cross-attention K/V for every decoder layer.

    ``forward(mel [B, M, 3000]) -> (cross_k, cross_v)``, each ``[L, B, H, 1500, Dh]``, in the model's dtype.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        whisper = model.model
        self.encoder = whisper.encoder
        self.heads = whisper.config.decoder_attention_heads
        self.k_projs = nn.ModuleList(layer.encoder_attn.k_proj for layer in whisper.decoder.layers)
        self.v_projs = nn.ModuleList(layer.encoder_attn.v_proj for layer in whisper.decoder.layers)

    def forward(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.encoder(mel).last_hidden_state  # [B, S, D]
        ks = [_split_heads(k(hidden), self.heads) for k in self.k_projs]
        vs = [_split_heads(v(hidden), self.heads) for v in self.v_projs]
        return torch.stack(ks), torch.stack(vs)


class CastEncoder(nn.Module):
    """An encoder graph computed in ``dtype`` (bfloat16 on CPUs that multiply it natively).

    ``forward(mel [B, M, 3000] float32) -> (cross_k, cross_v)`` as :class:`EncoderGraph`'s, in
    ``output_dtype`` (default ``dtype``). They were computed in ``dtype``, so widening them adds
    no precision, only bytes: a CPU decoder step is bound by reading the cross K/V
    (``2 x [L, B, H, 1500, Dh]``) every step, and the float32 step graph reads them in their dtype
    (:func:`_one_query_attention`), its own activations and self-attention cache staying float32.
    Word timestamps read the alignment heads' attention probabilities themselves, which bf16
    scores would move; their graphs ask for float32 (``output_dtype``). The weights are a
    converted copy: the checkpoint's modules (shared with the decoder and the caller) stay as
    they are.
    """

    def __init__(self, encoder: nn.Module, dtype: torch.dtype, output_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.inner = copy.deepcopy(encoder).to(dtype)
        self.dtype = dtype
        self.output_dtype = output_dtype or dtype

    def forward(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.inner(mel.to(self.dtype))
        return k.to(self.output_dtype), v.to(self.output_dtype)


class DecoderStepGraph(nn.Module):
    """One pure Whisper decoder step over a static KV cache (shapes in the module docstring).

    It reuses the checkpoint's own modules (embeddings, layer norms, projections), so fine-tuned
    weights and the int8-quantized Linear layers of the CPU path are picked up unchanged.
    ``alignment_heads``: ``(layer, head)`` pairs (the checkpoint's generation config) whose
    cross-attention is returned as a fourth output ``[B, A, S]``, in the given order.
    """

    def __init__(self, model: nn.Module, alignment_heads: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__()
        decoder = model.model.decoder
        config = model.config
        self.embed_tokens = decoder.embed_tokens
        self.embed_positions = decoder.embed_positions
        self.layers = decoder.layers
        self.layer_norm = decoder.layer_norm
        self.proj_out = model.proj_out  # tied to embed_tokens in every Whisper checkpoint
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        self.scale = self.head_dim**-0.5
        self.activation = decoder.layers[0].activation_fn
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.alignment_heads = tuple((int(layer), int(head)) for layer, head in alignment_heads)
        for layer, head in self.alignment_heads:
            if not (0 <= layer < len(self.layers) and 0 <= head < self.heads):
                raise ValueError(f"alignment head ({layer}, {head}) is outside {len(self.layers)} layers x {self.heads} heads")
        self._alignment_layers = frozenset(layer for layer, _ in self.alignment_heads)

    def forward(
        self,
        tokens: Tensor,
        position: Tensor,
        self_k: Sequence[Tensor],
        self_v: Sequence[Tensor],
        cross_k: Sequence[Tensor],
        cross_v: Sequence[Tensor],
    ) -> tuple[Tensor, ...]:
        cache_len = self_k[0].shape[2]
        slots = torch.arange(cache_len, dtype=position.dtype, device=position.device)
        past = (slots < position).view(1, 1, 1, cache_len)
        x = self.embed_tokens(tokens) * self.embed_scale + self.embed_positions.weight.index_select(0, position)
        new_k, new_v = [], []
        cross_probs: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers):
            # --- causal self-attention: the cache before `position` plus this token
            h = layer.self_attn_layer_norm(x)
            attn = layer.self_attn
            q = _split_heads(attn.q_proj(h), self.heads) * self.scale  # [B, H, 1, Dh]
            k = _split_heads(attn.k_proj(h), self.heads)
            v = _split_heads(attn.v_proj(h), self.heads)
            o = _cached_attention(q, k, v, self_k[i], self_v[i], past)
            x = x + attn.out_proj(o.transpose(1, 2).reshape(x.shape))
            new_k.append(k)
            new_v.append(v)
            # --- cross-attention over the encoder output (K/V computed once per batch)
            h = layer.encoder_attn_layer_norm(x)
            cross = layer.encoder_attn
            q = _split_heads(cross.q_proj(h), self.heads) * self.scale
            o, probs = _one_query_attention(q, cross_k[i], cross_v[i])
            if i in self._alignment_layers:
                cross_probs[i] = probs
            x = x + cross.out_proj(o.transpose(1, 2).reshape(x.shape))
            # --- MLP
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(self.activation(layer.fc1(h)))
        x = self.layer_norm(x)
        logits = self.proj_out(x[:, 0, :]).float()  # [B, V]
        if not self.alignment_heads:
            return logits, torch.stack(new_k), torch.stack(new_v)
        alignment = torch.stack([cross_probs[layer][:, head, 0, :] for layer, head in self.alignment_heads], dim=1)
        return logits, torch.stack(new_k), torch.stack(new_v), alignment  # alignment [B, A, S]


class StackedCacheStep(nn.Module):
    """:class:`DecoderStepGraph` with the caches passed as stacked tensors (the CPU/CUDA graph).

    ``forward(tokens [B, 1], position [1], self_k [L, B, H, T, Dh], self_v, cross_k [L, B, H, S, Dh],
    cross_v) -> (logits [B, V], new_k [L, B, H, 1, Dh], new_v[, alignment [B, A, S]])``; unbinding
    the stacks costs nothing.
    """

    def __init__(self, step: nn.Module) -> None:
        super().__init__()
        self.step = step

    def forward(self, tokens, position, self_k, self_v, cross_k, cross_v):
        return self.step(tokens, position, self_k.unbind(0), self_v.unbind(0), cross_k.unbind(0), cross_v.unbind(0))


class StatefulDecoderStep(nn.Module):
    """:class:`DecoderStepGraph` with every cache as state: what ``torch_neuronx.trace`` compiles.

    ``states`` holds ``4L`` tensors in :data:`STATE_KINDS` order (``self_*``: ``[B, H, T, Dh]``,
    ``cross_*``: ``[B, H, S, Dh]``). ``forward(tokens [B, 1] int32, position [1] int32) ->
    (logits [B, V] float32, *self_k, *self_v, *cross_k, *cross_v[, alignment [B, A, S]])``
    (the alignment output last, after the aliased ones): the self caches come back
    with this token's key/value scattered in at ``position`` (new tensors, the states are only
    read) and the cross caches unchanged, so :attr:`aliases` maps state ``j`` to output
    ``j + 1`` and the runtime keeps all of them on the device.
    """

    def __init__(self, step: DecoderStepGraph, *, batch: int, cache_len: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.step = step
        self.layers = len(step.layers)
        self_shape = (batch, step.heads, cache_len, step.head_dim)
        cross_shape = (batch, step.heads, SOURCE_POSITIONS, step.head_dim)
        shapes = [self_shape] * (2 * self.layers) + [cross_shape] * (2 * self.layers)
        self.states = nn.ParameterList(
            nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False) for shape in shapes
        )

    def kind(self, name: str) -> list[Tensor]:
        """The ``L`` state tensors of one :data:`STATE_KINDS` entry, by layer."""
        start = STATE_KINDS.index(name) * self.layers
        return [self.states[j] for j in range(start, start + self.layers)]

    @property
    def aliases(self) -> dict[nn.Parameter, int]:
        """``{state: output index}``, the ``input_output_aliases`` of ``torch_neuronx.trace``."""
        return {state: j + 1 for j, state in enumerate(self.states)}

    def forward(self, tokens: Tensor, position: Tensor) -> tuple[Tensor, ...]:
        self_k, self_v, cross_k, cross_v = (self.kind(name) for name in STATE_KINDS)
        logits, new_k, new_v, *alignment = self.step(tokens, position, self_k, self_v, cross_k, cross_v)
        index = position.long().view(1, 1, 1, 1).expand_as(new_k[0])  # [B, H, 1, Dh]
        written_k = [torch.scatter(cache, 2, index, new_k[i]) for i, cache in enumerate(self_k)]
        written_v = [torch.scatter(cache, 2, index, new_v[i]) for i, cache in enumerate(self_v)]
        return (logits, *written_k, *written_v, *cross_k, *cross_v, *alignment)


@dataclass(frozen=True)
class CacheShape:
    """Static KV-cache geometry for one batch size."""

    layers: int
    batch: int
    heads: int
    length: int
    head_dim: int

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return (self.layers, self.batch, self.heads, self.length, self.head_dim)


EncodeFn = Callable[[Tensor], tuple[Tensor, Tensor]]
StepFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, ...]]
ALIGNMENT_DTYPE = torch.float16
"""Storage of recorded attention (probabilities; float16 keeps ~3 digits, halves the buffer)."""


def _alignment_buffer(shape: CacheShape, heads: int, device: torch.device | None = None) -> Tensor | None:
    """``[T, B, A, S]`` zeros for one batch's recorded attention, or ``None`` without alignment heads."""
    if heads <= 0:
        return None
    return torch.zeros((shape.length, shape.batch, heads, SOURCE_POSITIONS), dtype=ALIGNMENT_DTYPE, device=device)


class StaticCacheInference:
    """CPU/CUDA :class:`BatchInference`: caches as graph inputs, the new key/value written by the host.

    One instance per batch size; the cache is allocated once and reused for every batch, so the
    decoder never allocates a cache. ``step`` is a :class:`StackedCacheStep` (possibly traced);
    with ``alignment_heads`` > 0 it returns the heads' attention, recorded per position into
    :attr:`alignment` (allocated per batch, released by :meth:`finish`).
    """

    def __init__(self, encode: EncodeFn, step: StepFn, shape: CacheShape, *, device: torch.device, dtype: torch.dtype,
                 alignment_heads: int = 0) -> None:
        self._encode = encode
        self._step = step
        self.shape = shape
        self.device = device
        self.self_k = torch.zeros(shape.dims, device=device, dtype=dtype)
        self.self_v = torch.zeros(shape.dims, device=device, dtype=dtype)
        self.cross_k: Tensor | None = None
        self.cross_v: Tensor | None = None
        self._positions = [torch.tensor([p], device=device, dtype=torch.int32) for p in range(shape.length)]
        self._slots = [torch.tensor([p], device=device, dtype=torch.long) for p in range(shape.length)]
        self.alignment_heads = int(alignment_heads)
        self.alignment: Tensor | None = None
        self._alignment_rows: Tensor | None = None  # after move_rows: this batch's rows in the record

    def start(self, mel: Tensor) -> None:
        if mel.shape[0] != self.shape.batch:
            raise ValueError(f"batch of {mel.shape[0]} does not match the compiled batch size {self.shape.batch}")
        self.cross_k, self.cross_v = self._encode(mel.to(self.device))
        self._alignment_rows = None
        # Slots >= position are masked, so stale values never count; zeroing keeps padded rows
        # deterministic for one memset per batch.
        self.self_k.zero_()
        self.self_v.zero_()
        self.alignment = _alignment_buffer(self.shape, self.alignment_heads, self.device)

    def finish(self) -> None:
        """Drop the batch's cross-attention K/V (``2 x [L, B, H, 1500, Dh]``, the largest buffers)."""
        self.cross_k = self.cross_v = None
        self.alignment = None
        self._alignment_rows = None

    def move_rows(self, keep: Tensor, into: StaticCacheInference) -> StaticCacheInference:
        """Hand the rows ``keep`` (``[n]`` int64, in that order) of this batch, caches as they are, to
        ``into`` (an inference of exactly ``n`` rows, same cache length); this one's batch is released.

        Decoding goes on in ``into`` at the next position: its self caches get these rows' slots
        (all of them; slots at or after the position are masked anyway) and its cross K/V these
        rows' (a copy of ``n x 2L x [H, 1500, Dh]``). The word-timestamp record stays the first
        batch's (``[T, B0, A, S]``): ``into`` writes each row's attention into that row's place in it.
        """
        if self.cross_k is None or self.cross_v is None:
            raise RuntimeError("call start() first")
        if into.shape.batch != len(keep) or into.shape.length != self.shape.length or into is self:
            raise ValueError(f"cannot move {len(keep)} rows into a batch of {into.shape.batch}")
        index = keep.to(self.device)
        torch.index_select(self.self_k, 1, index, out=into.self_k)
        torch.index_select(self.self_v, 1, index, out=into.self_v)
        into.cross_k, into.cross_v = self.cross_k.index_select(1, index), self.cross_v.index_select(1, index)
        into.alignment = self.alignment
        if self.alignment is None:
            into._alignment_rows = None
        else:
            into._alignment_rows = index if self._alignment_rows is None else self._alignment_rows.index_select(0, index)
        self.finish()
        return into

    def logits(self, tokens: Tensor, position: int) -> Tensor:
        if position >= self.shape.length:
            raise IndexError(f"position {position} is past the static cache length {self.shape.length}")
        assert self.cross_k is not None and self.cross_v is not None, "call start() first"
        logits, new_k, new_v, *attention = self._step(
            tokens.to(self.device, torch.int32), self._positions[position], self.self_k, self.self_v, self.cross_k, self.cross_v
        )
        self.self_k.index_copy_(3, self._slots[position], new_k)
        self.self_v.index_copy_(3, self._slots[position], new_v)
        if self.alignment is not None and attention:
            if self._alignment_rows is None:
                self.alignment[position].copy_(attention[0])
            else:
                self.alignment[position].index_copy_(0, self._alignment_rows, attention[0].to(self.alignment.dtype))
        return logits


class StatefulInference:
    """Neuron :class:`BatchInference`: the caches are the step graph's state, on the device.

    ``states`` are the compiled step's state tensors in :data:`STATE_KINDS` order (``L`` layers).
    :meth:`start` runs the encoder and copies its cross K/V into the cross states (one host ->
    device copy per batch); each :meth:`logits` call sends only ``tokens [B, 1]`` and
    ``position [1]`` (int32). On Neuron the runtime writes the aliased outputs back into the
    states; with ``emulate_aliases`` (the ``jit`` backend on CPU) this class does it, as the
    runtime would: after every call, output ``j + 1`` is copied into state ``j``. A step built
    with alignment heads returns their attention as its last output: recorded into
    :attr:`alignment` when ``alignment_heads`` > 0, ignored otherwise.
    """

    def __init__(
        self,
        encode: EncodeFn,
        step: Callable[[Tensor, Tensor], Sequence[Tensor]],
        states: Sequence[Tensor],
        shape: CacheShape,
        *,
        dtype: torch.dtype,
        emulate_aliases: bool,
        alignment_heads: int = 0,
    ) -> None:
        if len(states) != 4 * shape.layers:
            raise ValueError(f"expected {4 * shape.layers} state tensors for {shape.layers} layers, got {len(states)}")
        self._encode = encode
        self._step = step
        self.states = list(states)
        self.shape = shape
        self.dtype = dtype
        self.emulate_aliases = emulate_aliases
        self._positions = [torch.tensor([p], dtype=torch.int32) for p in range(shape.length)]
        self._started = False
        self.alignment_heads = int(alignment_heads)
        self.alignment: Tensor | None = None

    def start(self, mel: Tensor) -> None:
        if mel.shape[0] != self.shape.batch:
            raise ValueError(f"batch of {mel.shape[0]} does not match the compiled batch size {self.shape.batch}")
        cross_k, cross_v = self._encode(mel.to(self.dtype))
        L = self.shape.layers
        with torch.no_grad():
            for i in range(L):
                self.states[2 * L + i].copy_(cross_k[i])
                self.states[3 * L + i].copy_(cross_v[i])
        self.alignment = _alignment_buffer(self.shape, self.alignment_heads)
        self._started = True

    def finish(self) -> None:
        self._started = False
        self.alignment = None

    def logits(self, tokens: Tensor, position: int) -> Tensor:
        if position >= self.shape.length:
            raise IndexError(f"position {position} is past the static cache length {self.shape.length}")
        assert self._started, "call start() first"
        outputs = self._step(tokens.to(torch.int32), self._positions[position])
        if self.emulate_aliases:
            with torch.no_grad():
                for j, state in enumerate(self.states):
                    out = outputs[j + 1]
                    if out.data_ptr() != state.data_ptr():  # cross K/V come back as the state itself
                        state.copy_(out)
        if self.alignment is not None and len(outputs) > 1 + len(self.states):
            self.alignment[position].copy_(outputs[-1])
        return outputs[0].float()
