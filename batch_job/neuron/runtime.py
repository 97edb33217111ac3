"""Detecting a NeuronCore and loading compiled graphs at job start."""

from __future__ import annotations

import glob
import importlib.util
import os


def neuron_available() -> bool:
    """True when torch-neuronx is importable and a Neuron device node exists."""
    if importlib.util.find_spec("torch_neuronx") is None:
        return False
    return bool(glob.glob("/dev/neuron*"))


def configure_one_core() -> None:
    """One process = one NeuronCore (two jobs share an inf2 chip), unless the host pinned cores."""
    if "NEURON_RT_VISIBLE_CORES" not in os.environ:
        os.environ.setdefault("NEURON_RT_NUM_CORES", "1")


def load_compiled(compiled_dir: str, loaded, *, cache_len: int):  # pragma: no cover - needs inf2
    """Load the compiled encoder/step graphs for every batch size in ``compiled_dir``'s manifest."""
    from batch_job.errors import ModelError

    raise ModelError(
        f"no compiled Neuron graphs could be loaded from {compiled_dir!r}: run 'whisper-batch compile' first"
    )
