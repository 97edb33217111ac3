"""``manifest.json`` of a compiled-graphs directory: what was compiled, from what, with what.

Written by ``whisper-batch compile`` next to the graphs; read and checked at job start by
:func:`batch_job.engine.neuron.runtime.load_bundle` so that graphs compiled for another model,
another cache length, other shapes or another SDK are refused with a clear
:class:`~batch_job.errors.ModelError` instead of failing deep inside the Neuron runtime.

Layout (``format`` 2)::

    {
      "format": 2,
      "backend": "neuron" | "jit",          # jit = torch.jit.trace on CPU (tests, no Neuron)
      "model": {"id": "openai/whisper-large-v3-turbo", "checksum": "<sha256 of the weights>"},
      "dtype": "bfloat16",                  # weights, caches and encoder input; logits float32
      "compiler_args": ["--model-type=transformer", ...],
      "cpu_backend": true,
      "inline_weights_to_neff": false,
      "cache_len": 228,                     # static self-attention cache slots (prompt + tokens)
      "max_new_tokens": 224,
      "batch_sizes": [8],
      "alignment_heads": [[2, 3], ...],     # --word-timestamps: heads whose attention the step returns
      "graphs": {"8": {"encoder": {"file": "b8/encoder.pt", "inputs": {...}, "outputs": {...}},
                       "step": {"file": "b8/step.pt",
                                "inputs": {"tokens": int32 [8, 1], "position": int32 [1]},
                                "state": {"self_k": {"shape": [8, 20, 228, 64], "dtype": ..., "layers": 4}, ...},
                                "outputs": {"logits": float32 [8, V]          # + "alignment": float32 [8, A, 1500]
                                            }, "state_order": [...]}}},     #   with --word-timestamps
      "dims": {...}, "tokens": {...}, "mel": {...}, "tokenizer": {...},   # side data: no eager model at run time
      "versions": {"torch": "...", "torch-neuronx": "...", "neuronx-cc": "...",
                   "transformers": "...", "whisper-batch": "..."},
      "created": "2026-12-02T13:40:00Z"
    }

A step's ``inputs`` are recorded from the very tensors it was traced with and its ``state``
from the traced module's state tensors, so the manifest shows what the graph really takes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batch_job import __version__
from batch_job.engine.artifacts import MANIFEST_NAME, package_versions
from batch_job.errors import ModelError

FORMAT = 2

#: Packages whose versions are recorded, and must match at load time.
VERSIONED_PACKAGES = ("torch", "torch-neuronx", "neuronx-cc", "transformers", "whisper-batch")


def installed_versions() -> dict[str, str | None]:
    """Versions of :data:`VERSIONED_PACKAGES` as installed (whisper-batch from the source tree when not installed)."""
    versions = package_versions(VERSIONED_PACKAGES)
    versions["whisper-batch"] = versions.get("whisper-batch") or __version__
    return versions


def read_manifest(compiled_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and structurally validate ``compiled_dir/manifest.json``; :class:`ModelError` otherwise."""
    if not str(compiled_dir):
        raise ModelError(
            "device neuron needs compiled graphs: set WHISPER_BATCH_COMPILED_DIR to the output of "
            "'whisper-batch compile' (the image bakes them in)"
        )
    root = Path(compiled_dir)
    if not root.is_dir():
        raise ModelError(f"compiled graphs directory {root} does not exist: run 'whisper-batch compile --out {root}'")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ModelError(
            f"{path} is missing: {root} is not the output of a complete 'whisper-batch compile' "
            f"(the manifest is written last)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{path}: unknown manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r} (expected {FORMAT})")
    missing = [k for k in ("backend", "model", "dtype", "cache_len", "batch_sizes", "graphs", "versions", "dims", "tokens",
                           "mel", "tokenizer") if k not in manifest]
    if missing:
        raise ModelError(f"{path}: manifest lacks {', '.join(missing)}")
    for b in manifest["batch_sizes"]:
        graphs = manifest["graphs"].get(str(b))
        if not graphs or "encoder" not in graphs or "step" not in graphs:
            raise ModelError(f"{path}: batch size {b} has no encoder/step graphs")
    return manifest


def check_manifest(
    manifest: Mapping[str, Any],
    *,
    model_id: str | None = None,
    model_checksum: str | None = None,
    cache_len: int,
    batch_sizes: Sequence[int] | None = None,
    versions: Mapping[str, str | None] | None = None,
    shapes: Mapping[int, Mapping[str, Any]] | None = None,
) -> None:
    """Refuse graphs that do not fit the running engine, naming the first mismatch.

    * ``model_id``: the ``--model`` the job asks for (the graphs carry the compile-time weights);
    * ``model_checksum``: sha256 of the weights, when the caller has them (``None`` = not checked);
    * ``cache_len``: the engine's static cache length (from ``max_new_tokens``);
    * ``batch_sizes``: sizes the engine needs (``None`` = take whatever was compiled);
    * ``versions``: running package versions; every key given must equal the compile-time one
      (a NEFF is only guaranteed to load on the SDK that compiled it);
    * ``shapes``: ``{batch: {"encoder": {"inputs": ...}, "step": {...}}}`` expected per graph
      (see :func:`batch_job.engine.neuron.compile.graph_shapes`); compared for every given batch size.
    """
    model = manifest.get("model") or {}
    if model_id is not None and model.get("id") != model_id:
        raise ModelError(
            f"compiled graphs are for model {model.get('id')!r}, but the job asks for {model_id!r}: set "
            f"WHISPER_BATCH_MODEL to {model.get('id')!r} or recompile with 'whisper-batch compile --model {model_id}'"
        )
    compiled_for = model.get("checksum")
    if model_checksum is not None and compiled_for != model_checksum:
        raise ModelError(
            f"compiled graphs are for model {model.get('id')!r} with weights sha256 {str(compiled_for)[:12]}..., "
            f"but the loaded model's weights are {model_checksum[:12]}...: recompile with 'whisper-batch compile' "
            f"for this model"
        )
    if int(manifest.get("cache_len", -1)) != int(cache_len):
        raise ModelError(
            f"compiled graphs have a static cache of {manifest.get('cache_len')} slots, the engine needs {cache_len} "
            f"(max_new_tokens {manifest.get('max_new_tokens')} at compile time): set WHISPER_BATCH_MAX_NEW_TOKENS "
            f"to the compiled value or recompile with --max-tokens"
        )
    compiled_sizes = sorted(int(b) for b in manifest.get("batch_sizes", []))
    if batch_sizes is not None:
        missing = sorted(set(int(b) for b in batch_sizes) - set(compiled_sizes))
        if missing:
            raise ModelError(
                f"batch size(s) {missing} are not compiled (compiled: {compiled_sizes}): recompile with "
                f"--batch-size/--buckets or set WHISPER_BATCH_BATCH_SIZE to a compiled size"
            )
    if versions:
        recorded = manifest.get("versions") or {}
        for name, running in versions.items():
            if recorded.get(name) != running:
                raise ModelError(
                    f"compiled graphs were built with {name} {recorded.get(name) or 'absent'}, this environment has "
                    f"{running or 'none'}: recompile in this image (graphs must come from the same SDK and packages)"
                )
    if shapes:
        graphs = manifest.get("graphs") or {}
        for batch, expected in shapes.items():
            got = graphs.get(str(batch)) or {}
            for graph, spec in expected.items():
                have = got.get(graph) or {}
                for part in ("inputs", "state", "outputs", "state_order"):
                    if part not in spec:
                        continue
                    want, got_part = _norm(spec[part]), _norm(have.get(part)) or {}
                    if not isinstance(want, dict):
                        if want != got_part:
                            raise ModelError(
                                f"compiled {graph} graph for batch {batch} has {part} {got_part}, the engine needs "
                                f"{want}: recompile with 'whisper-batch compile'"
                            )
                        continue
                    for name in sorted(set(want) | set(got_part)):
                        if want.get(name) != got_part.get(name):
                            raise ModelError(
                                f"compiled {graph} graph for batch {batch} has {part} {name} {_desc(got_part.get(name))}, "
                                f"the engine needs {_desc(want.get(name))}: the graphs were compiled for another "
                                f"model or settings; recompile with 'whisper-batch compile'"
                            )


def _norm(value: Any) -> Any:
    """JSON round-trip form (tuples -> lists) so computed and stored shapes compare equal."""
    return json.loads(json.dumps(value)) if value is not None else None


def _desc(spec: Any) -> str:
    if not spec:
        return "nothing"
    return f"{spec.get('dtype', '?')}{list(spec.get('shape', []))}"
