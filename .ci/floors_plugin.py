"""pytest plugin for .ci/floors.sh: leave out the tests that need the real model stack.

The floors venv has no torch by default (the S3-facing tests use stand-in transcribers), so
tests that request a real-model fixture are deselected here instead of failing on ``import torch``.
"""

MODEL_FIXTURES = frozenset({"real_transcriber", "tiny_words_transcriber", "tiny_transcriber", "tiny_engine_fp32", "tiny_model",
                            "shared_rows_transcriber"})


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (drop if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
