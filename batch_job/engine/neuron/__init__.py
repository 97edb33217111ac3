"""Inferentia2 support: compile the engine's graphs (``whisper-batch compile``) and load them.

torch-neuronx / neuronx-cc come from the Neuron pip repository, not PyPI: every import of them
in this package is lazy, so the rest of ``batch_job`` imports everywhere.
"""
