"""Detecting a NeuronCore and loading compiled graphs at job start.

:func:`load_compiled` reads ``manifest.json``, checks it against the running engine (model
checksum, cache length, shapes, package versions), ``torch.jit.load``\\ s each graph and moves
it to the NeuronCore (``torch_neuronx.move_trace_to_device``: the weights are kept out of the
NEFF at compile time). It returns ``{batch_size: CompiledGraphs}`` whose ``.encode`` / ``.step``
plug into :class:`batch_job.inference.StaticCacheInference` unchanged.

torch-neuronx is imported only when a manifest says ``backend: neuron``.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)


def neuron_available() -> bool:
    """True when torch-neuronx is importable and a Neuron device node exists."""
    if importlib.util.find_spec("torch_neuronx") is None:
        return False
    return bool(glob.glob("/dev/neuron*"))


def configure_one_core() -> None:
    """One process = one NeuronCore (two jobs share an inf2 chip), unless the host pinned cores.

    Must run before the Neuron runtime initialises (first model load); :func:`load_compiled`
    calls it first thing.
    """
    if "NEURON_RT_VISIBLE_CORES" not in os.environ:
        os.environ.setdefault("NEURON_RT_NUM_CORES", "1")


class CompiledGraphs:
    """One batch size's compiled graphs, with the callables ``StaticCacheInference`` expects.

    ``encode(mel) -> (cross_k, cross_v)`` is the traced encoder. ``step`` adapts the traced
    :class:`~batch_job.neuron.compile.CachedDecoderStep` (``(tokens, position, cross_k, cross_v)``,
    cache held as aliased device state) to the engine's step signature ``(tokens, position,
    self_k, self_v, cross_k, cross_v) -> (logits, self_k, self_v)``: the host-side cache tensors
    are passed through untouched (the real cache lives in the graph) and the graph's cache
    outputs are dropped.
    """

    def __init__(self, encoder: Any, step: Any, batch_size: int) -> None:
        self.encoder = encoder
        self.step_graph = step
        self.batch_size = batch_size

    def encode(self, mel):
        return self.encoder(mel)

    def step(self, tokens, position, self_k, self_v, cross_k, cross_v):
        logits = self.step_graph(tokens, position, cross_k, cross_v)[0]
        return logits, self_k, self_v


def running_versions(backend: str) -> dict[str, str | None]:
    """The package versions a manifest must match: everything for ``neuron``; torch and us for ``jit``."""
    from batch_job import __version__
    from batch_job.neuron.manifest import VERSIONED_PACKAGES, package_versions

    versions = package_versions(VERSIONED_PACKAGES)
    versions["whisper-batch"] = versions.get("whisper-batch") or __version__
    if backend != "neuron":
        versions = {k: versions[k] for k in ("torch", "whisper-batch")}
    return versions


def load_compiled(compiled_dir: str, loaded, *, cache_len: int, batch_sizes=None) -> dict[int, CompiledGraphs]:
    """Load the compiled encoder/step graphs for every batch size in ``compiled_dir``'s manifest.

    Raises :class:`~batch_job.errors.ModelError` with the reason when the directory, the manifest
    or a graph is missing, when the manifest does not match ``loaded`` / ``cache_len`` / the
    installed packages, or when torch-neuronx is needed and absent.
    """
    import torch

    from batch_job.errors import ModelError
    from batch_job.neuron.compile import NEURON_HINT, graph_shapes
    from batch_job.neuron.manifest import check_manifest, read_manifest

    configure_one_core()
    manifest = read_manifest(compiled_dir)
    backend = manifest.get("backend")
    if backend not in ("neuron", "jit"):
        raise ModelError(f"{compiled_dir}: unknown backend {backend!r} in manifest.json")
    sizes = sorted(int(b) for b in manifest["batch_sizes"])
    config = loaded.model.config
    check_manifest(
        manifest,
        model_checksum=loaded.checksum,
        cache_len=cache_len,
        batch_sizes=batch_sizes,
        versions=running_versions(backend),
        shapes={b: graph_shapes(config, b, cache_len) for b in sizes},
    )
    move = None
    if backend == "neuron":  # pragma: no cover - needs inf2
        try:
            import torch_neuronx
        except ImportError as exc:
            raise ModelError(f"{compiled_dir} holds Neuron graphs but {NEURON_HINT}") from exc
        move = torch_neuronx.move_trace_to_device
    root = Path(compiled_dir)
    out: dict[int, CompiledGraphs] = {}
    for b in sizes:
        entry: Mapping[str, Any] = manifest["graphs"][str(b)]
        graphs = []
        for name in ("encoder", "step"):
            path = root / entry[name]["file"]
            if not path.is_file():
                raise ModelError(f"compiled {name} graph for batch {b} is missing: {path}")
            try:
                graph = torch.jit.load(str(path), map_location="cpu")
                if move is not None:  # pragma: no cover - needs inf2
                    move(graph, 0)  # core 0 of the cores this process sees (one, see configure_one_core)
            except Exception as exc:  # corrupt file, runtime refusal, out of device memory
                raise ModelError(f"cannot load compiled {name} graph {path}: {exc}") from exc
            graph.eval()
            graphs.append(graph)
        out[b] = CompiledGraphs(graphs[0], graphs[1], b)
    log.info("loaded %s graphs for batch sizes %s from %s", backend, sizes, compiled_dir)
    return out
