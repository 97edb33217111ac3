"""Loading compiled graphs at job start: the engine's bundle on a NeuronCore, no eager model.

:func:`load_bundle` reads ``manifest.json`` (written by ``whisper-batch compile``), checks it
against the running settings (model, cache length, shapes, dtype, package versions), loads the
side data saved next to the graphs (special tokens, dims, mel filters, tokenizer) and then
each bucket's graphs: ``torch.jit.load`` and, for Neuron, ``torch_neuronx.move_trace_to_device``
(the weights are kept out of the NEFF at compile time). Nothing from transformers is imported
and no eager model is built: on inf2 the compiled graphs are the model.

Failures are split by what a retry can do:

* manifest, shape, dtype, model and version mismatches, missing files, a container without a
  Neuron device node -> :class:`~batch_job.errors.ModelError` (exit 78, never retried): this
  image or job definition is wrong;
* the Neuron runtime refusing to load or place a graph (no free NeuronCore, driver hiccup,
  device memory) -> :class:`~batch_job.errors.DeviceError` (exit 75, retried).

torch-neuronx is imported only when a manifest says ``backend: neuron``.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch_job.errors import DeviceError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from batch_job.engine.bundle import ModelBundle
    from batch_job.settings import Settings

log = logging.getLogger(__name__)

DEVICE_GLOB = "/dev/neuron*"


def neuron_available() -> bool:
    """True when torch-neuronx is importable and a Neuron device node exists."""
    if importlib.util.find_spec("torch_neuronx") is None:
        return False
    return bool(glob.glob(DEVICE_GLOB))


def configure_one_core() -> None:
    """One process = one NeuronCore (two jobs share an inf2 chip), unless the host pinned cores.

    Must run before the Neuron runtime initialises (first graph load); :func:`load_bundle`
    calls it first thing. The image also sets ``NEURON_RT_NUM_CORES=1``.
    """
    if "NEURON_RT_VISIBLE_CORES" not in os.environ:
        os.environ.setdefault("NEURON_RT_NUM_CORES", "1")


def check_device_node() -> str:
    """The first Neuron device node, readable and writable by this process; ModelError otherwise."""
    nodes = sorted(glob.glob(DEVICE_GLOB))
    if not nodes:
        raise ModelError(
            "no Neuron device in this container (/dev/neuron0 is absent): run on inf2 with the job "
            "definition's LinuxParameters.Devices mapping /dev/neuron0, or use --device cpu"
        )
    node = nodes[0]
    if not os.access(node, os.R_OK | os.W_OK):
        raise ModelError(
            f"{node} exists but cannot be opened for reading and writing by uid {os.getuid()}: the container "
            f"user needs access to the device (check the device mapping's permissions)"
        )
    return node


def running_versions(backend: str) -> dict[str, str | None]:
    """The package versions a manifest must match: everything for ``neuron``; torch and us for ``jit``."""
    from batch_job.engine.neuron.manifest import installed_versions

    versions = installed_versions()
    if backend != "neuron":
        versions = {k: versions[k] for k in ("torch", "whisper-batch")}
    return versions


def load_bundle(settings: Settings, *, batch_sizes: Sequence[int] | None = None) -> ModelBundle:
    """The engine's :class:`~batch_job.engine.bundle.ModelBundle` from ``settings.compiled_dir``.

    Checks the manifest against ``settings`` (model, ``max_new_tokens`` -> cache length) and the
    installed packages before touching the device; see the module docstring for the errors.
    """
    import torch

    from batch_job.constants import static_cache_len
    from batch_job.engine.artifacts import read_side_data
    from batch_job.engine.bundle import ModelBundle, StatefulGraphs
    from batch_job.engine.neuron.compile import NEURON_HINT, graph_shapes
    from batch_job.engine.neuron.manifest import check_manifest, read_manifest

    configure_one_core()
    root = Path(settings.compiled_dir) if settings.compiled_dir else None
    manifest = read_manifest(settings.compiled_dir)
    backend = manifest.get("backend")
    if backend not in ("neuron", "jit"):
        raise ModelError(f"{root}: unknown backend {backend!r} in manifest.json")
    try:
        tokens, dims, mel, text, heads = read_side_data(root, manifest)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{root}: the side data next to the graphs is unusable ({exc}); recompile") from exc
    cache_len = static_cache_len(dims.max_target_positions, settings.max_new_tokens)
    dtype = manifest["dtype"]
    sizes = sorted(int(b) for b in manifest["batch_sizes"])
    if settings.word_timestamps and not heads:
        raise ModelError(f"{root}: word timestamps need graphs compiled with --word-timestamps; recompile, "
                         "or turn word timestamps off")
    check_manifest(
        manifest,
        model_id=settings.model,
        cache_len=cache_len,
        batch_sizes=batch_sizes,
        versions=running_versions(backend),
        shapes={b: graph_shapes(dims, b, cache_len, dtype, len(heads)) for b in sizes},
    )
    move: Callable | None = None
    if backend == "neuron":  # pragma: no cover - needs torch-neuronx and inf2
        check_device_node()
        try:
            import torch_neuronx
        except ImportError as exc:
            raise ModelError(f"{root} holds Neuron graphs but {NEURON_HINT}") from exc
        move = torch_neuronx.move_trace_to_device
    torch_dtype = getattr(torch, dtype)
    graphs = {}
    for b in sizes:
        entry: Mapping[str, Any] = manifest["graphs"][str(b)]
        encoder = _load_graph(root / entry["encoder"]["file"], move)
        step = _load_graph(root / entry["step"]["file"], move)
        states = tuple(step_states(step, 4 * dims.layers, root / entry["step"]["file"]))
        graphs[b] = StatefulGraphs(encoder, step, states, torch_dtype, emulate_aliases=backend != "neuron")
    log.info("loaded %s graphs (%s) for batch sizes %s from %s", backend, dtype, sizes, root)
    model = manifest["model"]
    return ModelBundle(name=model["id"], checksum=model["checksum"], device="neuron", tokens=tokens, dims=dims,
                       text=text, mel=mel, graphs=graphs, source="compiled", cache_path=root,
                       alignment_heads=heads if settings.word_timestamps else ())


def _load_graph(path: Path, move: Callable | None) -> Any:
    """``torch.jit.load`` one graph (and move it to the NeuronCore); errors split as the module says."""
    import torch

    if not path.is_file():
        raise ModelError(f"compiled graph {path} is missing: recompile with 'whisper-batch compile'")
    if move is None:
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
            raise ModelError(f"cannot load compiled graph {path}: {exc}") from exc
    try:  # pragma: no cover - needs inf2
        graph = torch.jit.load(str(path), map_location="cpu")
        move(graph, 0)  # core 0 of the cores this process sees (one, see configure_one_core)
        return graph.eval()
    except Exception as exc:  # noqa: BLE001 - the runtime's refusals are all RuntimeErrors
        # The manifest, files and versions were checked above, so what fails here is the runtime
        # placing the graph: a busy or missing NeuronCore, device memory, the driver. Retry.
        raise DeviceError(f"the Neuron runtime could not load {path.name} onto a NeuronCore: {exc}") from exc


def step_states(step: Any, expected: int, path: Path | str = "the step graph") -> list:
    """A traced step's ``expected`` state tensors in order (``step.states.0`` ...), jit or Neuron alike."""
    try:
        params = dict(step.states.named_parameters())
        states = [params[str(j)] for j in range(expected)]
    except (AttributeError, KeyError) as exc:
        raise ModelError(f"compiled step graph {path} does not hold the {expected} cache states the engine needs") from exc
    return states
