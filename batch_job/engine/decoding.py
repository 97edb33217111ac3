"""The decoding loop: greedy (or temperature) decoding with timestamp tokens, for a batch of windows.

One loop for every device: it talks to the model only through :class:`~batch_job.engine.graphs.Inference`
(``logits(tokens [B, 1], position) -> [B, V]``), so CPU, CUDA and Neuron differ only in how the
graphs behind it were compiled. Every step has the same tensor shapes; rows stop independently
(a finished row keeps feeding ``<|endoftext|>`` and its outputs are ignored).

Logit rules are small :class:`LogitFilter` classes, vectorised over the batch (no per-row Python
loop per step), following openai/whisper's ``decoding.py``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from batch_job.constants import MAX_TOKENS_BASE, MAX_TOKENS_PER_SECOND, SAMPLE_RATE, SECONDS_PER_TIMESTAMP
from batch_job.engine.graphs import Inference
from batch_job.engine.tokens import SpecialTokens


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode one batch. Frozen: a fallback pass is a :func:`dataclasses.replace` away."""

    task: str = "transcribe"
    language: str | None = None
    """Language code; ``None`` detects it per window (multilingual models only)."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples (used by the repetition/low-confidence fallback)."""
    max_new_tokens: int = 224
    without_timestamps: bool = False
    max_initial_timestamp: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class DecodingResult:
    """Decoded tokens of one window (prompt excluded) and the figures the guards need."""

    tokens: tuple[int, ...]
    language: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    truncated: bool
    """True when the row hit ``max_new_tokens`` (or its own ``max_tokens``) before ``<|endoftext|>``."""
    token_logprobs: tuple[float, ...] = ()
    """Log-probability of each of ``tokens`` when it was chosen (after the logit filters)."""
    alignment: np.ndarray | None = field(default=None, compare=False, repr=False)
    """With word timestamps: the alignment heads' attention ``[A, n, S]`` float32 of the queries
    whose outputs were ``tokens`` and then ``<|endoftext|>`` (row ``i`` chose ``tokens[i]``;
    ``n = len(tokens) + 1``, or ``len(tokens)`` for a truncated row); ``None`` otherwise."""


Shrink = Callable[[Tensor], Inference | None]
"""``shrink(keep)``: ``keep [n]`` int64, the positions (among the current inference's rows) of the
rows still decoding -> an :class:`~batch_job.engine.graphs.Inference` that holds exactly those rows,
in that order, with their caches as they are; or ``None`` to go on with the current one."""


class LogitFilter(Protocol):
    def apply(self, logits: Tensor, state: DecodeState) -> None:
        """Mask ``logits [B, V]`` in place (set forbidden ids to ``-inf``)."""
        ...


@dataclass
class DecodeState:
    """Per-row history the filters read, as tensors (``[B]`` each)."""

    step: int  # tokens generated so far (same for every row)
    last: Tensor  # last generated token, -1 before the first
    penultimate: Tensor  # the one before, -1 when absent
    last_timestamp: Tensor  # last timestamp token generated, -1 when none


class SuppressTokens:
    """Never emit the given ids (non-speech symbols, ``<|notimestamps|>`` in timestamp mode)."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long)

    def apply(self, logits: Tensor, state: DecodeState) -> None:
        if self.ids.numel():
            logits.index_fill_(1, self.ids.to(logits.device), float("-inf"))


class SuppressBlank:
    """At the first generated text position, forbid a blank or an immediate end of text."""

    def __init__(self, ids: Sequence[int], first_step: int) -> None:
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long)
        self.first_step = first_step

    def apply(self, logits: Tensor, state: DecodeState) -> None:
        if state.step == self.first_step and self.ids.numel():
            logits.index_fill_(1, self.ids.to(logits.device), float("-inf"))


class ApplyTimestampRules:
    """Whisper's timestamp grammar, vectorised over rows.

    Timestamps come in pairs (end, start) except right before ``<|endoftext|>``; they never
    decrease; the first token is a timestamp no later than ``max_initial_timestamp``; and when the
    total probability of all timestamps beats every single text token, a timestamp is forced.
    """

    def __init__(self, tokens: SpecialTokens, max_initial_timestamp_index: int | None) -> None:
        self.tb = tokens.timestamp_begin
        self.eot = tokens.eot
        self.max_initial = max_initial_timestamp_index

    def apply(self, logits: Tensor, state: DecodeState) -> None:
        # Work on slices ([B, n_timestamps] and [B, n_text]) rather than [B, V] masks: this runs
        # every step, and the full-vocabulary comparisons cost more than the rule itself.
        neg_inf = float("-inf")
        text, stamps = logits[:, : self.tb], logits[:, self.tb :]
        if state.step == 0:
            text.fill_(neg_inf)  # the first token must be a timestamp
            if self.max_initial is not None:
                stamps[:, self.max_initial + 1 :] = neg_inf
        else:
            last_ts = state.last >= self.tb
            penult_ts = (state.penultimate >= self.tb) | (state.step < 2)
            pair_done = last_ts & penult_ts  # after a pair: text (or eot) must follow
            need_close = last_ts & ~penult_ts  # after text + ts: ts or eot
            stamps.masked_fill_(pair_done.unsqueeze(1), neg_inf)
            logits[:, : self.eot].masked_fill_(need_close.unsqueeze(1), neg_inf)
            # Non-decreasing timestamps: forbid [tb, floor) where floor is the last timestamp
            # (+1 unless it may be repeated to close the pair).
            floor = torch.where(need_close, state.last_timestamp, state.last_timestamp + 1) - self.tb
            floor = torch.where(state.last_timestamp >= 0, floor, torch.zeros_like(floor))
            index = torch.arange(stamps.shape[1], device=logits.device).unsqueeze(0)
            stamps.masked_fill_(index < floor.unsqueeze(1), neg_inf)
        # If timestamps as a whole are likelier than any text token, force a timestamp.
        logprobs = torch.log_softmax(logits, dim=-1)
        ts_mass = torch.logsumexp(logprobs[:, self.tb :], dim=-1)
        text_best = logprobs[:, : self.tb].max(dim=-1).values
        text.masked_fill_((ts_mass > text_best).unsqueeze(1), neg_inf)


def build_prompt(tokens: SpecialTokens, options: DecodingOptions, languages: Sequence[str]) -> Tensor:
    """Prompt ids ``[B, P]``: ``<|sot|>`` (+ language + task for multilingual) (+ ``<|notimestamps|>``)."""
    rows = []
    for lang in languages:
        row = [tokens.sot]
        if tokens.is_multilingual:
            row.append(tokens.languages[lang])
            row.append(tokens.translate if options.task == "translate" else tokens.transcribe)
        if options.without_timestamps:
            row.append(tokens.no_timestamps)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def compression_ratio(text: str) -> float:
    """gzip compression ratio of ``text``: > ~2.4 means a repetition loop."""
    raw = text.encode("utf-8")
    return len(raw) / max(1, len(zlib.compress(raw))) if raw else 0.0


def decode_batch(
    inference: Inference,
    tokens: SpecialTokens,
    options: DecodingOptions,
    *,
    n_rows: int,
    batch_size: int,
    temperatures: Sequence[float] | None = None,
    alignment: Tensor | None = None,
    shrink: Shrink | None = None,
    max_tokens: Sequence[int] | None = None,
) -> list[DecodingResult]:
    """Decode the batch that ``inference`` was just started on; return the first ``n_rows`` results.

    Rows ``n_rows..batch_size-1`` are padding: they run (fixed shapes) but start finished.
    ``temperatures`` gives a per-row temperature (0 = greedy); defaults to ``options.temperature``.
    Uses ``max_new_tokens + prompt length`` cache slots, which must fit the inference's cache.
    ``alignment``: the inference's attention record ``[T, B, A, S]``, filled while this runs
    (:class:`~batch_job.engine.graphs.BatchInference`); each result gets its rows.
    ``shrink``: after a step in which rows finished, the loop asks it for an inference holding
    only the unfinished rows (:data:`Shrink`; their attention goes on into ``alignment``) and
    steps that one from then on, so finished rows stop costing steps (a CPU step's time grows
    with its rows). Tokens are the same as without it up to the float rounding of a smaller batch.
    ``max_tokens``: per row (``n_rows`` of them), the tokens after which it stops as truncated, at
    most ``max_new_tokens`` (:func:`token_budget`: a looping row stops early, not at the cap).
    """
    device = torch.device("cpu")
    B = batch_size
    langs_in: list[str | None] = [options.language] * B  # None: detected per row

    # ---- step 0: <|startoftranscript|> -> language detection and no-speech probability
    sot = torch.full((B, 1), tokens.sot, dtype=torch.long)
    first_logits = inference.logits(sot, 0).to(device).float()
    probs = torch.softmax(first_logits, dim=-1)
    no_speech = probs[:, tokens.no_speech] if tokens.no_speech is not None else torch.zeros(B)
    languages_out = _pick_languages(first_logits, tokens, langs_in)

    prompt = build_prompt(tokens, options, languages_out)  # [B, P]
    P = prompt.shape[1]
    logits = first_logits
    for p in range(1, P):
        logits = inference.logits(prompt[:, p : p + 1], p).to(device).float()

    filters: list[LogitFilter] = [SuppressBlank(tokens.begin_suppress, first_step=0)]
    suppress = list(tokens.suppress)
    if not options.without_timestamps:
        suppress.append(tokens.no_timestamps)
    filters.insert(0, SuppressTokens(suppress))
    if not options.without_timestamps:
        max_initial = None
        if options.max_initial_timestamp is not None:
            max_initial = round(options.max_initial_timestamp / SECONDS_PER_TIMESTAMP)
        filters.append(ApplyTimestampRules(tokens, max_initial))

    row_temps = torch.tensor(list(temperatures) if temperatures is not None else [options.temperature] * n_rows, dtype=torch.float32)
    row_temps = torch.cat([row_temps, torch.zeros(B - n_rows)])
    generator = torch.Generator().manual_seed(options.seed) if bool((row_temps > 0).any()) else None
    # Per batch row, [B] / [B, steps]: a row that finished (or that ``shrink`` dropped) keeps
    # <|endoftext|> from then on. ``rows``: which batch rows the inference's rows are, in order.
    sum_logprob = torch.zeros(B)
    n_tokens = torch.zeros(B, dtype=torch.long)
    generated = torch.full((B, options.max_new_tokens), tokens.eot, dtype=torch.long)
    chosen_logprobs = torch.zeros(B, options.max_new_tokens)
    rows = torch.arange(B)
    temps = row_temps
    finished = rows >= n_rows
    budget = torch.full((B,), options.max_new_tokens, dtype=torch.long)
    if max_tokens is not None:
        budget[:n_rows] = torch.tensor(list(max_tokens), dtype=torch.long).clamp(1, options.max_new_tokens)
    capped = torch.zeros(B, dtype=torch.bool)  # per batch row: stopped by its budget
    minus_one = torch.full((B,), -1, dtype=torch.long)
    state = DecodeState(step=0, last=minus_one, penultimate=minus_one, last_timestamp=minus_one)
    steps = 0
    for step in range(options.max_new_tokens):
        state.step = step
        for f in filters:
            f.apply(logits, state)
        nxt = logits.argmax(dim=-1)
        if generator is not None:
            scaled = torch.softmax(logits / temps.clamp(min=1e-4).unsqueeze(1), dim=-1)
            sampled = torch.multinomial(scaled, 1, generator=generator).squeeze(1)
            nxt = torch.where(temps > 0, sampled, nxt)
        logprob = logits.gather(1, nxt.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
        active = ~finished
        sum_logprob.index_add_(0, rows, torch.where(active, logprob, torch.zeros_like(logprob)))
        n_tokens.index_add_(0, rows, active.long())
        nxt = torch.where(finished, torch.full_like(nxt, tokens.eot), nxt)
        generated[rows, step] = nxt
        chosen_logprobs[rows, step] = logprob
        steps = step + 1
        finished |= nxt == tokens.eot
        if max_tokens is not None:
            hit = ~finished & (budget[rows] <= step + 1)
            capped[rows] |= hit
            finished |= hit
        state.penultimate = state.last
        state.last = nxt
        state.last_timestamp = torch.where(nxt >= tokens.timestamp_begin, nxt, state.last_timestamp)
        if bool(finished.all()) or step == options.max_new_tokens - 1:
            break
        if shrink is not None and bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)  # [n] positions among the inference's rows
            smaller = shrink(keep)
            if smaller is not None:
                inference = smaller
                rows, nxt, temps, finished = rows[keep], nxt[keep], temps[keep], finished[keep]
                state.last, state.penultimate = state.last[keep], state.penultimate[keep]
                state.last_timestamp = state.last_timestamp[keep]
        logits = inference.logits(nxt.unsqueeze(1), P + step).to(device).float()

    generated, chosen_logprobs = generated[:, :steps], chosen_logprobs[:, :steps]  # [B, steps]
    results = []
    for r in range(n_rows):
        row = generated[r].tolist()
        ended = tokens.eot in row
        truncated = not ended or bool(capped[r])
        if ended:
            row = row[: row.index(tokens.eot)]
        attention = None
        if alignment is not None:  # the query at P - 1 + i chose token i; positions P - 1 .. P - 2 + steps ran
            chose_eot = 0 if truncated else 1
            queries = alignment[P - 1 : min(P - 1 + len(row) + chose_eot, P - 1 + steps), r]  # [n, A, S]
            attention = queries.transpose(0, 1).float().cpu().numpy()
        results.append(
            DecodingResult(
                tokens=tuple(row),
                language=languages_out[r],
                avg_logprob=float(sum_logprob[r] / max(1, int(n_tokens[r]))),
                no_speech_prob=float(no_speech[r]),
                temperature=float(row_temps[r]),
                truncated=truncated,
                token_logprobs=tuple(chosen_logprobs[r, : len(row)].tolist()),
                alignment=attention,
            )
        )
    return results


def token_budget(samples: int, max_new_tokens: int) -> int:
    """Tokens a window of ``samples`` (16 kHz) may take: :data:`~batch_job.constants.MAX_TOKENS_PER_SECOND`
    per second plus :data:`~batch_job.constants.MAX_TOKENS_BASE`, at most ``max_new_tokens``."""
    return min(max_new_tokens, MAX_TOKENS_BASE + math.ceil(MAX_TOKENS_PER_SECOND * samples / SAMPLE_RATE))


def _pick_languages(first_logits: Tensor, tokens: SpecialTokens, requested: Sequence[str | None]) -> list[str]:
    """Per-row language: the requested one, or the likeliest language token after ``<|sot|>``."""
    if not tokens.is_multilingual:
        return ["en"] * len(requested)
    codes = list(tokens.languages)
    ids = torch.tensor([tokens.languages[c] for c in codes])
    best = first_logits.index_select(1, ids).argmax(dim=-1).tolist()
    return [req if req is not None else codes[b] for req, b in zip(requested, best)]
