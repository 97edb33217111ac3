"""The engine: a Whisper model's graphs for one device and the decoding loop over them.

Bottom to top: ``tokens`` / ``bundle`` (what an engine is made of) and ``graphs`` (the
fixed-shape modules); ``decoding`` (the one loop); ``runner`` (``Engine``, built from a bundle);
``models`` / ``convert_ct2`` (over ``ct2_model_bin``, ``ct2_vocabulary``, ``ct2_mapping``,
``checkpoint_files``) / ``adapters`` (checkpoints); ``artifacts``, ``graph_cache`` and
``neuron/`` (graphs on disk); ``loading`` on top, the one module where devices differ.
"""
