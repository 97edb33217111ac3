"""Neuron path, everything up to the torch-neuronx boundary, on CPU.

* The exact modules handed to ``torch_neuronx.trace`` (:func:`build_graphs`) are traced with
  ``torch.jit.trace`` and run through the same decoding loop via ``StaticCacheInference`` and the
  runtime's step adapter: same tokens as the eager fp32 engine on real audio, batch sizes 1 and 4.
* ``whisper-batch compile --backend jit`` artifacts (torch.jit.save, manifest) load through
  ``load_compiled`` into ``Engine(device="neuron")`` and give the same tokens.
* Manifest round trip and each mismatch; compile without torch-neuronx; the Dockerfile.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re

import pytest

torch = pytest.importorskip("torch")

from conftest import REPO, shared_clip  # noqa: E402

from batch_job.errors import ModelError  # noqa: E402
from batch_job.neuron import manifest as mf  # noqa: E402
from batch_job.neuron.compile import COMPILER_ARGS, build_graphs, graph_shapes, parse_sizes, trace_jit  # noqa: E402
from batch_job.neuron.runtime import CompiledGraphs, configure_one_core, load_compiled  # noqa: E402

CLIPS = ("jfk.flac", "librispeech_61-70968-0000.flac", "ljspeech_LJ001-0001.flac", "pocketsphinx_goforward.wav")
MAX_TOKENS = 96  # plenty for these clips (<= 30 tokens each); keeps the cache small


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def neuron_env(monkeypatch):
    """No NEURON_RT_* in the environment, restored afterwards (load_compiled sets NEURON_RT_NUM_CORES)."""
    for name in ("NEURON_RT_NUM_CORES", "NEURON_RT_VISIBLE_CORES"):
        monkeypatch.setenv(name, "x")  # records the original state for teardown
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="module")
def loaded(model_cache_dir):
    from batch_job.models import load_model

    return load_model("tiny.en", cache_dir=str(model_cache_dir))


@pytest.fixture(scope="module")
def settings(model_cache_dir):
    from batch_job.settings import Settings

    # Eager reference = the fp32, un-quantized graphs (what Neuron compiles).
    return Settings(model="tiny.en", device="cpu", quantize_decoder=False, batch_size=4,
                    max_new_tokens=MAX_TOKENS, cache_dir=str(model_cache_dir), threads=2)


@pytest.fixture(scope="module")
def eager(loaded, settings):
    from batch_job.engine import Engine

    return Engine(loaded, settings, "cpu", 0.0)


@pytest.fixture(scope="module")
def rows():
    from batch_job.audio import load_audio

    return [load_audio(shared_clip(name)) for name in CLIPS]


@pytest.fixture(scope="module")
def options(eager):
    from batch_job.decoding import DecodingOptions

    return DecodingOptions(max_new_tokens=eager.max_new_tokens)


@pytest.fixture(scope="module")
def reference(eager, rows, options):
    """Eager tokens: each clip alone (bucket 1) and the four together (bucket 4)."""
    single = [eager.decode([r], options)[0][0].tokens for r in rows]
    batched = [res.tokens for res in eager.decode(rows, options)[0]]
    return {1: single, 4: batched}


def _decode_with(graphs: CompiledGraphs, eager, rows, options, batch: int):
    from batch_job.decoding import decode_batch
    from batch_job.inference import CacheShape, StaticCacheInference

    config = eager.loaded.model.config
    heads = config.decoder_attention_heads
    shape = CacheShape(config.decoder_layers, batch, heads, eager.cache_len, config.d_model // heads)
    inference = StaticCacheInference(graphs.encode, graphs.step, shape, device=torch.device("cpu"), dtype=torch.float32)
    with torch.inference_mode():
        inference.start(eager.log_mel(rows, batch))
        return decode_batch(inference, eager.tokens, options, n_rows=len(rows), batch_size=batch)


# --------------------------------------------------------------------------- traced graphs = eager
@pytest.mark.parametrize("batch", [1, 4])
def test_traced_wrappers_decode_like_eager(loaded, eager, rows, options, reference, batch):
    graphs = build_graphs(loaded, batch, eager.cache_len)
    # The step's cache is state, aliased to outputs 1 and 2 (what torch_neuronx.trace gets).
    assert graphs.aliases == {graphs.step.self_k: 1, graphs.step.self_v: 2}
    assert tuple(graphs.step.self_k.shape) == tuple(graphs.shapes["step"]["state"]["self_k"]["shape"])
    assert tuple(graphs.encoder_inputs[0].shape) == (batch, loaded.n_mels, 3000)
    encoder, step = trace_jit(graphs)
    compiled = CompiledGraphs(encoder, step, batch)
    if batch == 1:
        got = [_decode_with(compiled, eager, [r], options, 1)[0].tokens for r in rows]
    else:
        got = [res.tokens for res in _decode_with(compiled, eager, rows, options, 4)]
    assert got == reference[batch]
    assert all(len(t) > 3 for t in got)
    assert "fellow Americans" in eager.text(got[0])


def test_compile_jit_artifacts_run_in_engine(tmp_path, loaded, settings, rows, options, reference, neuron_env):
    """``compile --backend jit`` -> torch.jit.save + manifest -> Engine(device=neuron) -> same tokens."""
    from batch_job.engine import Engine
    from batch_job.neuron.compile import compile_model

    out = tmp_path / "graphs"
    manifest = compile_model(loaded, out, batch_sizes=[1, 4], max_new_tokens=MAX_TOKENS, backend="jit")
    assert (out / "manifest.json").is_file() and (out / "b4" / "step.pt").is_file()
    assert manifest["batch_sizes"] == [1, 4] and manifest["model"]["checksum"] == loaded.checksum
    engine = Engine(loaded, settings.replace(device="neuron", compiled_dir=str(out)), "neuron", 0.0)
    assert engine.buckets == (1, 4)
    import os

    assert os.environ["NEURON_RT_NUM_CORES"] == "1"  # load_compiled pins one core
    assert engine.decode([rows[0]], options)[0][0].tokens == reference[1][0]
    assert [r.tokens for r in engine.decode(rows, options)[0]] == reference[4]


# --------------------------------------------------------------------------- manifest
class _Config:
    decoder_layers = 4
    decoder_attention_heads = 6
    d_model = 384
    max_source_positions = 1500
    num_mel_bins = 80
    vocab_size = 51864
    max_target_positions = 448


def _manifest(**changes):
    sizes = [1, 4]
    base = {
        "format": mf.FORMAT,
        "backend": "neuron",
        "model": {"id": "tiny.en", "checksum": "a" * 64},
        "dtype": "float32",
        "compiler_args": list(COMPILER_ARGS),
        "cpu_backend": True,
        "inline_weights_to_neff": False,
        "cache_len": 228,
        "max_new_tokens": 224,
        "batch_sizes": sizes,
        "graphs": {str(b): graph_shapes(_Config, b, 228) for b in sizes},
        "versions": {"torch": "2.5.1", "torch-neuronx": "2.5.1.2.6.0", "neuronx-cc": "2.18.121.0",
                     "transformers": "5.23.0", "whisper-batch": "0.1.0"},
    }
    for b in sizes:
        base["graphs"][str(b)]["encoder"]["file"] = f"b{b}/encoder.pt"
        base["graphs"][str(b)]["step"]["file"] = f"b{b}/step.pt"
    base.update(changes)
    return base


def _check(manifest, **overrides):
    kwargs = dict(model_checksum="a" * 64, cache_len=228, batch_sizes=[1, 4], versions=dict(_manifest()["versions"]),
                  shapes={b: graph_shapes(_Config, b, 228) for b in (1, 4)})
    kwargs.update(overrides)
    mf.check_manifest(manifest, **kwargs)


def test_manifest_round_trip(tmp_path):
    written = _manifest()
    mf.write_manifest(tmp_path, written)
    read = mf.read_manifest(tmp_path)
    assert read == json.loads(json.dumps(written))
    _check(read)  # matches itself
    shapes = read["graphs"]["4"]
    assert shapes["encoder"]["inputs"]["mel"]["shape"] == [4, 80, 3000]
    assert shapes["step"]["state"]["self_k"]["shape"] == [4, 4, 6, 228, 64]
    assert shapes["step"]["aliases"] == {"self_k": 1, "self_v": 2}
    assert read["compiler_args"][:3] == ["--model-type=transformer", "--auto-cast=matmult", "--auto-cast-type=bf16"]


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"model_checksum": "b" * 64}, r"weights sha256 aaaaaaaaaaaa.*bbbbbbbbbbbb.*recompile"),
        ({"cache_len": 100}, r"static cache of 228 slots, the engine needs 100"),
        ({"batch_sizes": [8]}, r"batch size\(s\) \[8\] are not compiled \(compiled: \[1, 4\]\)"),
        ({"versions": {"torch-neuronx": "2.6.0.2.7.0"}}, r"torch-neuronx 2.5.1.2.6.0.*has 2.6.0.2.7.0"),
        ({"versions": {"neuronx-cc": None}}, r"neuronx-cc 2.18.121.0, this environment has none"),
        ({"versions": {"transformers": "5.24.0"}}, r"transformers 5.23.0"),
        ({"shapes": {4: graph_shapes(type("C", (_Config,), {"num_mel_bins": 128}), 4, 228)}},
         r"encoder graph for batch 4 has inputs mel float32\[4, 80, 3000\], the engine needs float32\[4, 128, 3000\]"),
    ],
    ids=["checksum", "cache_len", "batch_sizes", "torch_neuronx", "neuronx_cc_missing", "transformers", "shapes"],
)
def test_manifest_mismatch(overrides, pattern):
    with pytest.raises(ModelError, match=pattern) as info:
        _check(_manifest(), **overrides)
    assert info.value.reason == "model_error" and not info.value.retryable


def test_manifest_shape_mismatch_in_file():
    bad = _manifest()
    bad["graphs"] = copy.deepcopy(bad["graphs"])
    bad["graphs"]["1"]["step"]["state"]["self_k"]["shape"][3] = 448
    with pytest.raises(ModelError, match=r"step graph for batch 1 has state self_k float32\[4, 1, 6, 448, 64\], the engine needs float32\[4, 1, 6, 228, 64\]"):
        _check(bad)


def test_missing_dir_or_manifest(tmp_path):
    with pytest.raises(ModelError, match="WHISPER_BATCH_COMPILED_DIR"):
        mf.read_manifest("")
    with pytest.raises(ModelError, match="does not exist.*whisper-batch compile"):
        mf.read_manifest(tmp_path / "nope")
    with pytest.raises(ModelError, match="manifest.json is missing.*complete 'whisper-batch compile'"):
        mf.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match="cannot read"):
        mf.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99}), encoding="utf-8")
    with pytest.raises(ModelError, match="unknown manifest format 99"):
        mf.read_manifest(tmp_path)
    broken = _manifest()
    del broken["graphs"]["4"]
    mf.write_manifest(tmp_path, broken)
    with pytest.raises(ModelError, match="batch size 4 has no encoder/step graphs"):
        mf.read_manifest(tmp_path)


def test_load_compiled_refuses_before_touching_the_runtime(tmp_path, loaded, neuron_env):
    with pytest.raises(ModelError, match="does not exist"):
        load_compiled(str(tmp_path / "missing"), loaded, cache_len=228)
    m = _manifest()
    m["model"]["checksum"] = "0" * 64
    mf.write_manifest(tmp_path, m)
    with pytest.raises(ModelError, match="weights sha256 000000000000"):
        load_compiled(str(tmp_path), loaded, cache_len=228)


@pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None, reason="torch-neuronx is installed")
def test_load_compiled_neuron_without_torch_neuronx(tmp_path, loaded, neuron_env):
    from batch_job.neuron.runtime import running_versions

    config = loaded.model.config
    m = _manifest(graphs={str(b): graph_shapes(config, b, 228) for b in (1, 4)},
                  versions=running_versions("neuron"))
    m["model"]["checksum"] = loaded.checksum
    mf.write_manifest(tmp_path, m)
    with pytest.raises(ModelError, match=r"holds Neuron graphs but torch-neuronx is not installed.*pip.repos.neuron.amazonaws.com"):
        load_compiled(str(tmp_path), loaded, cache_len=228)


def test_configure_one_core(neuron_env):
    import os

    configure_one_core()
    assert os.environ["NEURON_RT_NUM_CORES"] == "1"
    neuron_env.delenv("NEURON_RT_NUM_CORES")
    neuron_env.setenv("NEURON_RT_VISIBLE_CORES", "1")
    configure_one_core()
    assert "NEURON_RT_NUM_CORES" not in os.environ


# --------------------------------------------------------------------------- CLI
@pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None, reason="torch-neuronx is installed")
def test_compile_without_torch_neuronx(tmp_path, capsys):
    from batch_job import exit_codes
    from batch_job.cli import main

    code = main(["compile", "--model", "tiny.en", "--batch-size", "1", "--max-tokens", "32", "--out", str(tmp_path / "g")])
    assert code == exit_codes.CONFIG_ERROR
    err = capsys.readouterr().err
    assert "torch-neuronx is not installed" in err and "https://pip.repos.neuron.amazonaws.com" in err
    assert "--backend jit" in err
    assert not (tmp_path / "g").exists()


def test_compile_cli_options():
    from batch_job.cli import build_parser

    args = build_parser().parse_args(["compile", "--model", "m", "--batch-size", "8", "--buckets", "1,4",
                                      "--max-tokens", "200", "--out", "/o", "--cpu-backend"])
    assert (args.model, args.batch_size, args.max_tokens, args.out, args.cpu_backend, args.backend) == \
        ("m", 8, 200, "/o", True, "neuron")
    assert parse_sizes(8, "1,4") == [1, 4, 8]
    assert parse_sizes(2, None) == [2]
    with pytest.raises(ValueError):
        parse_sizes(8, "0")


def test_neuron_imports_stay_lazy():
    import subprocess
    import sys

    code = ("import sys, batch_job.cli, batch_job.neuron.compile, batch_job.neuron.runtime, batch_job.neuron.manifest;"
            "batch_job.cli.build_parser();"
            "assert not [m for m in sys.modules if m.startswith(('torch_neuronx', 'neuronxcc', 'libneuronxla'))]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- Dockerfile
def _dockerfile() -> list[tuple[str, str]]:
    """``[(INSTRUCTION, args)]`` with continuations joined and comments dropped."""
    text = (REPO / "batch_job" / "Dockerfile").read_text(encoding="utf-8")
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        full = (buf + stripped).strip()
        buf = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile():
    steps = _dockerfile()
    kinds = [k for k, _ in steps]
    # Base image: AWS Neuron PyTorch inference image, pinned by tag (no latest, no bare name).
    base = next(rest for k, rest in steps if k == "FROM")
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] if "=" in rest else None for k, rest in steps if k == "ARG"}
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1)) or "", base.split()[0])
    assert image.startswith("public.ecr.aws/neuron/pytorch-inference-neuronx:"), image
    tag = image.rsplit(":", 1)[1]
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag) and "sdk" in tag
    # Build arguments with the defaults.
    assert args.get("MODEL") == "openai/whisper-large-v3"
    assert "BATCH_SIZE" in args and "MAX_TOKENS" in args
    runs = " ".join(rest for k, rest in steps if k == "RUN")
    # The package is installed, weights downloaded at BUILD time, graphs compiled at build time.
    assert re.search(r"pip install .*\.", runs)
    assert "fetch_model" in runs  # snapshot_download at build time, see test_fetch_model_downloads_hub_ids
    assert re.search(r"whisper-batch compile .*--cpu-backend", runs)
    assert "--out" in runs and "${MAX_TOKENS}" in runs and "${BATCH_SIZE}" in runs
    assert any(k == "COPY" for k in kinds)
    env = " ".join(rest for k, rest in steps if k == "ENV")
    for needed in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "WHISPER_BATCH_DEVICE=neuron",
                   "WHISPER_BATCH_COMPILED_DIR=", "WHISPER_BATCH_MODEL=", "WHISPER_BATCH_MAX_NEW_TOKENS="):
        assert needed in env, needed
    # Offline at run time must come AFTER the build-time download.
    download_at = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and "fetch_model" in rest)
    offline_at = next(i for i, (k, rest) in enumerate(steps) if k == "ENV" and "HF_HUB_OFFLINE=1" in rest)
    assert offline_at > download_at
    # Non-root user, set before the entrypoint.
    user = [rest for k, rest in steps if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert max(i for i, k in enumerate(kinds) if k == "USER") < kinds.index("ENTRYPOINT")
    # Graphs are compiled AFTER the weights are in, and before the user drops root.
    compile_at = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and "whisper-batch compile" in rest)
    assert download_at < compile_at < kinds.index("USER")
    # Entrypoint whisper-batch; the Batch job definition's command starts with run-job.
    entry = json.loads(next(rest for k, rest in steps if k == "ENTRYPOINT"))
    cmd = json.loads(next(rest for k, rest in steps if k == "CMD"))
    assert entry == ["whisper-batch"] and cmd[0] == "run-job"


def test_dockerignore_keeps_context_small():
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    for pattern in (".venv", ".git", "tests"):
        assert any(p.strip("/*") == pattern for p in ignore), pattern


def test_fetch_model_downloads_hub_ids(monkeypatch, tmp_path):
    import huggingface_hub

    import batch_job.models as models
    from batch_job.neuron.compile import HUB_PATTERNS, fetch_model

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or str(tmp_path))
    monkeypatch.setattr(models, "resolve_checkpoint", lambda name, cache: tmp_path / "ckpt")
    assert fetch_model("openai/whisper-large-v3", str(tmp_path)) == tmp_path / "ckpt"
    assert calls == [{"repo_id": "openai/whisper-large-v3", "allow_patterns": list(HUB_PATTERNS)}]
