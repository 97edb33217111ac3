"""Neuron path, everything up to the torch-neuronx boundary, on CPU.

* Graph properties ``torch_neuronx.trace`` relies on: the step is pure (no parameter or state
  changes during a forward), its per-call inputs are tokens + position only (int32, <= 64 KiB at
  any batch size), its graph holds no ``-inf``; bf16 graphs keep layer norms and logits float32.
* The alias emulator (:class:`StatefulInference` with ``emulate_aliases``: after every step each
  aliased output is copied into its state, as the Neuron runtime does) decodes real audio to the
  same tokens as the eager engine, batch sizes 1 and 4; bf16 graphs' WER is within 0.5 pt of fp32.
* ``compile --backend jit`` artifacts load into ``Engine(device="neuron")`` with no eager model and
  give the same tokens; the manifest records the traced step's real inputs and states;
  ``compile --backend neuron`` hands ``torch_neuronx.trace`` exactly those modules and aliases.
* Load failures: the runtime refusing a graph exits 75 (retried), a missing device node or a
  mismatched manifest 78.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import REPO, reference_text, shared_clip  # noqa: E402

from batch_job import exit_codes  # noqa: E402
from batch_job.engine.artifacts import write_manifest  # noqa: E402
from batch_job.engine.graph_cache import ModelDims  # noqa: E402
from batch_job.engine.graphs import MASKED, STATE_KINDS, CacheShape, StatefulInference  # noqa: E402
from batch_job.engine.neuron import manifest as mf  # noqa: E402
from batch_job.engine.neuron.compile import (  # noqa: E402
    COMPILER_ARGS,
    build_graphs,
    compile_model,
    graph_shapes,
    parse_sizes,
    trace_jit,
)
from batch_job.engine.neuron.runtime import configure_one_core, load_bundle, step_states  # noqa: E402
from batch_job.errors import DeviceError, ModelError  # noqa: E402

CLIPS = ("jfk.flac", "librispeech_61-70968-0000.flac", "ljspeech_LJ001-0001.flac", "pocketsphinx_goforward.wav")
MAX_TOKENS = 96  # plenty for these clips (<= 30 tokens each); keeps the cache small
STEP_INPUT_BUDGET = 64 * 1024  # bytes sent host -> device per decoder step, at any batch size


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def neuron_env(monkeypatch):
    """No NEURON_RT_* in the environment, restored afterwards (load_bundle sets NEURON_RT_NUM_CORES)."""
    for name in ("NEURON_RT_NUM_CORES", "NEURON_RT_VISIBLE_CORES"):
        monkeypatch.setenv(name, "x")  # records the original state for teardown
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="module")
def loaded(model_cache_dir):
    from batch_job.engine.models import load_model

    return load_model("tiny.en", cache_dir=str(model_cache_dir))


@pytest.fixture(scope="module")
def settings(model_cache_dir):
    from batch_job.settings import Settings

    # Eager reference = the fp32, un-quantized graphs (what Neuron compiles, before bf16).
    return Settings(model="tiny.en", device="cpu", quantize_decoder=False, encoder_dtype="float32", batch_size=4,
                    max_new_tokens=MAX_TOKENS, cache_dir=str(model_cache_dir), threads=2)


@pytest.fixture(scope="module")
def eager(loaded, settings):
    from batch_job.engine.loading import model_bundle
    from batch_job.engine.runner import Engine

    return Engine(model_bundle(loaded, settings, "cpu"))


@pytest.fixture(scope="module")
def rows():
    from batch_job.audio import load_audio

    return [load_audio(shared_clip(name)) for name in CLIPS]


@pytest.fixture(scope="module")
def options(eager):
    from batch_job.engine.decoding import DecodingOptions

    return DecodingOptions(max_new_tokens=eager.max_new_tokens)


@pytest.fixture(scope="module")
def reference(eager, rows, options):
    """Eager tokens: each clip alone (bucket 1) and the four together (bucket 4)."""
    single = [eager.decode([r], options)[0][0].tokens for r in rows]
    batched = [res.tokens for res in eager.decode(rows, options)[0]]
    return {1: single, 4: batched}


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory, loaded):
    """``compile --backend jit`` output for batch sizes 1 and 4 (float32)."""
    out = tmp_path_factory.mktemp("compiled") / "graphs"
    compile_model(loaded, out, batch_sizes=[1, 4], max_new_tokens=MAX_TOKENS, backend="jit", dtype="float32")
    return out


def _emulated(graphs, eager, batch: int) -> StatefulInference:
    """The traced stateful graphs behind the alias emulator, as the engine would drive them."""
    encoder, step = trace_jit(graphs)
    dims = eager.dims
    shape = CacheShape(dims.layers, batch, dims.heads, eager.cache_len, dims.head_dim)
    states = step_states(step, 4 * dims.layers)
    return StatefulInference(encoder, step, states, shape, dtype=getattr(torch, graphs.dtype), emulate_aliases=True)


def _decode(inference, eager, rows, options, batch: int):
    from batch_job.engine.decoding import decode_batch

    with torch.inference_mode():
        inference.start(eager.log_mel(rows, batch))
        return decode_batch(inference, eager.tokens, options, n_rows=len(rows), batch_size=batch)


# --------------------------------------------------------------------------- graph properties
def _filled_states(step, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for state in step.states:
            state.copy_(torch.randn(state.shape, generator=gen).to(state.dtype))


def test_step_is_pure_and_returns_the_written_caches(loaded, eager):
    """No parameter or state changes during a forward; the self caches come back written at ``position`` only."""
    graphs = build_graphs(loaded, 2, eager.cache_len, "float32")
    step = graphs.step
    _filled_states(step)
    before = {name: t.detach().clone() for name, t in list(step.named_parameters()) + list(step.named_buffers())}
    position = 3
    with torch.no_grad():
        out = step(torch.tensor([[loaded.tokens.sot], [loaded.tokens.sot]], dtype=torch.int32), torch.tensor([position], dtype=torch.int32))
    after = dict(list(step.named_parameters()) + list(step.named_buffers()))
    assert before.keys() == after.keys() and len(before) > 4 * eager.dims.layers
    changed = [name for name, t in after.items() if not torch.equal(t, before[name])]
    assert changed == []
    L = eager.dims.layers
    assert len(out) == 1 + 4 * L and out[0].dtype == torch.float32
    for j, state in enumerate(step.states):
        new = out[j + 1]
        assert new.shape == state.shape and new.dtype == state.dtype
        kind = STATE_KINDS[j // L]
        if kind.startswith("self"):
            assert new.data_ptr() != state.data_ptr()  # a new tensor, not the state written in place
            slots = (new != state).any(dim=-1).any(dim=1).any(dim=0)  # which cache slots differ
            assert slots.nonzero().flatten().tolist() == [position]
        else:
            assert torch.equal(new, state)  # cross K/V pass through unchanged
    assert graphs.aliases == {state: j + 1 for j, state in enumerate(step.states)}


def test_cpu_step_writes_nothing_it_is_given(eager):
    """The CPU/CUDA step graph (caches as inputs) is pure too: the host writes the new key/value."""
    dims = eager.dims
    gen = torch.Generator().manual_seed(1)
    caches = [torch.randn(dims.layers, 2, dims.heads, n, dims.head_dim, generator=gen) for n in (eager.cache_len,) * 2 + (1500,) * 2]
    copies = [c.clone() for c in caches]
    from batch_job.engine.graphs import DecoderStepGraph, StackedCacheStep

    step = StackedCacheStep(DecoderStepGraph(eager.bundle.loaded.model)).eval()
    with torch.no_grad():
        logits, new_k, new_v = step(torch.full((2, 1), eager.tokens.sot, dtype=torch.int32), torch.tensor([5], dtype=torch.int32), *caches)
    assert all(torch.equal(a, b) for a, b in zip(caches, copies))
    assert new_k.shape == (dims.layers, 2, dims.heads, 1, dims.head_dim) and logits.shape == (2, dims.vocab_size)


def test_masked_attention_equals_writing_then_attending():
    """The prior/active split (no cache write) equals the textbook write-then-mask attention."""
    from batch_job.engine.graphs import _cached_attention

    gen = torch.Generator().manual_seed(2)
    B, H, T, Dh, pos = 2, 3, 7, 4, 4
    q, k, v = (torch.randn(B, H, 1, Dh, generator=gen) for _ in range(3))
    cache_k, cache_v = torch.randn(B, H, T, Dh, generator=gen), torch.randn(B, H, T, Dh, generator=gen)
    past = (torch.arange(T) < pos).view(1, 1, 1, T)
    got = _cached_attention(q, k, v, cache_k, cache_v, past)
    wk, wv = cache_k.clone(), cache_v.clone()
    wk[:, :, pos], wv[:, :, pos] = k[:, :, 0], v[:, :, 0]
    want = torch.nn.functional.scaled_dot_product_attention(q, wk[:, :, : pos + 1], wv[:, :, : pos + 1], scale=1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # position 0: only the token itself counts, whatever the stale slots hold
    got0 = _cached_attention(q, k, v, cache_k * 1e6, cache_v, torch.zeros(1, 1, 1, T, dtype=torch.bool))
    torch.testing.assert_close(got0, v)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_traced_graphs_take_tokens_and_position_only_and_hold_no_inf(loaded, eager, dtype):
    graphs = build_graphs(loaded, 2, eager.cache_len, dtype)
    tokens, position = graphs.step_inputs
    assert (tokens.dtype, tuple(tokens.shape), position.dtype, tuple(position.shape)) == (torch.int32, (2, 1), torch.int32, (1,))
    encoder, step = trace_jit(graphs)
    inputs = [i for i in step.graph.inputs()][1:]  # first is the module itself
    assert len(inputs) == 2  # tokens and position: every cache is module state
    for graph in (encoder, step):
        infinite = [line for line in str(graph.inlined_graph).splitlines() if re.search(r"(?<![\w.])-?inf(?![\w])", line)]
        assert infinite == []
    assert f"value={MASKED!r}" in str(step.inlined_graph) and MASKED == torch.finfo(torch.float32).min  # the finite mask
    states = step_states(step, 4 * eager.dims.layers)
    assert {s.dtype for s in states} == {getattr(torch, dtype)}


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_step_input_bytes_fit_the_budget_at_any_batch_size(batch):
    dims = ModelDims(layers=32, heads=20, d_model=1280, n_mels=128, vocab_size=51866, max_target_positions=448, cache_len=228)
    step = graph_shapes(dims, batch, 228, "bfloat16")["step"]
    size = {"int32": 4, "bfloat16": 2, "float32": 4}
    per_call = sum(size[spec["dtype"]] * int(torch.tensor(spec["shape"]).prod()) for spec in step["inputs"].values())
    assert set(step["inputs"]) == {"tokens", "position"}
    assert per_call <= STEP_INPUT_BUDGET
    cross_state = sum(size[step["state"][k]["dtype"]] * int(torch.tensor(step["state"][k]["shape"]).prod()) * 32
                      for k in ("cross_k", "cross_v"))
    assert cross_state > 1000 * per_call  # what used to be sent every step now stays on the device


def test_bf16_graphs_keep_norms_and_logits_float32(loaded, eager):
    from batch_job.engine.graphs import Float32LayerNorm

    graphs = build_graphs(loaded, 1, eager.cache_len, "bfloat16")
    norms = [m for m in graphs.step.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m, Float32LayerNorm) and m.weight.dtype == torch.float32 for m in norms)
    assert graphs.step.step.layers[0].fc1.weight.dtype == torch.bfloat16
    assert loaded.model.model.decoder.layers[0].fc1.weight.dtype == torch.float32  # the loaded model is not touched
    with torch.no_grad():
        assert graphs.step(*graphs.step_inputs)[0].dtype == torch.float32


# --------------------------------------------------------------------------- alias emulator = eager
@pytest.mark.parametrize("batch", [1, 4])
def test_alias_emulator_decodes_like_eager(loaded, eager, rows, options, reference, batch):
    graphs = build_graphs(loaded, batch, eager.cache_len, "float32")
    inference = _emulated(graphs, eager, batch)
    if batch == 1:
        got = [_decode(inference, eager, [r], options, 1)[0].tokens for r in rows]
    else:
        got = [res.tokens for res in _decode(inference, eager, rows, options, 4)]
    assert got == reference[batch]
    assert all(len(t) > 3 for t in got)
    assert "fellow Americans" in eager.text(got[0])


def test_without_alias_emulation_the_cache_never_fills(loaded, eager, rows, options, reference):
    """The emulator is what carries the cache between steps: without it the graphs decode differently."""
    graphs = build_graphs(loaded, 4, eager.cache_len, "float32")
    inference = _emulated(graphs, eager, 4)
    inference.emulate_aliases = False
    assert [res.tokens for res in _decode(inference, eager, rows, options, 4)] != reference[4]


def _wer(texts, names):
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    return jiwer.wer([norm(reference_text(n)) for n in names], [norm(t) for t in texts])


def test_bf16_graphs_wer_within_half_a_point_of_fp32(loaded, eager, rows, options):
    texts = {}
    for dtype in ("float32", "bfloat16"):
        inference = _emulated(build_graphs(loaded, 4, eager.cache_len, dtype), eager, 4)
        texts[dtype] = [eager.text(r.tokens) for r in _decode(inference, eager, rows, options, 4)]
    fp32, bf16 = _wer(texts["float32"], CLIPS), _wer(texts["bfloat16"], CLIPS)
    assert bf16 <= fp32 + 0.005, (fp32, bf16, texts)


# --------------------------------------------------------------------------- compiled artifacts -> engine
def test_manifest_records_the_traced_steps_real_inputs(compiled_dir, eager):
    manifest = mf.read_manifest(compiled_dir)
    step = manifest["graphs"]["4"]["step"]
    assert step["inputs"] == {"tokens": {"shape": [4, 1], "dtype": "int32"}, "position": {"shape": [1], "dtype": "int32"}}
    L, H, Dh = eager.dims.layers, eager.dims.heads, eager.dims.head_dim
    assert step["state"]["self_k"] == {"shape": [4, H, eager.cache_len, Dh], "dtype": "float32", "layers": L}
    assert step["state"]["cross_v"] == {"shape": [4, H, 1500, Dh], "dtype": "float32", "layers": L}
    assert step["state_order"] == list(STATE_KINDS)
    for b in (1, 4):  # what was recorded from the real tensors is what the engine computes
        recorded = {g: {k: v for k, v in e.items() if k != "file"} for g, e in manifest["graphs"][str(b)].items()}
        assert recorded == graph_shapes(eager.dims, b, eager.cache_len, "float32")
    assert manifest["dtype"] == "float32" and manifest["tokens"]["sot"] == eager.tokens.sot


def test_compiled_engine_builds_no_eager_model(compiled_dir, settings, rows, options, reference, neuron_env):
    """``load_engine`` on ``neuron``: graphs + side data only; transformers' model is never built."""
    import os

    import transformers

    from batch_job.engine.loading import load_engine

    def refuse(*args, **kwargs):
        raise AssertionError("an eager transformers model was built on the Neuron path")

    neuron_env.setattr(transformers.WhisperForConditionalGeneration, "from_pretrained", refuse)
    neuron_env.setattr("batch_job.engine.loading.resolve_device", lambda requested: "neuron")
    engine = load_engine(settings.replace(device="neuron", compiled_dir=str(compiled_dir)))
    assert engine.bundle.source == "compiled" and engine.bundle.loaded is None
    assert engine.buckets == (1, 4)
    assert os.environ["NEURON_RT_NUM_CORES"] == "1"  # load_bundle pins one core
    assert engine.decode([rows[0]], options)[0][0].tokens == reference[1][0]
    assert [r.tokens for r in engine.decode(rows, options)[0]] == reference[4]


def test_compiled_graphs_are_refused_for_another_model_or_cache(compiled_dir, settings, neuron_env):
    with pytest.raises(ModelError, match=r"compiled graphs are for model 'tiny.en', but the job asks for 'base'"):
        load_bundle(settings.replace(model="base", compiled_dir=str(compiled_dir)))
    with pytest.raises(ModelError, match=r"static cache of 100 slots, the engine needs 36"):
        load_bundle(settings.replace(max_new_tokens=32, compiled_dir=str(compiled_dir)))


# --------------------------------------------------------------------------- word timestamps
@pytest.fixture(scope="module")
def compiled_words_dir(tmp_path_factory, model_cache_dir):
    """``whisper-batch compile --backend jit --word-timestamps`` output for batch size 4 (float32)."""
    from batch_job.cli import main

    out = tmp_path_factory.mktemp("compiled-words") / "graphs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WHISPER_BATCH_CACHE_DIR", str(model_cache_dir))
        code = main(["compile", "--model", "tiny.en", "--batch-size", "4", "--max-tokens", str(MAX_TOKENS), "--out",
                     str(out), "--backend", "jit", "--dtype", "float32", "--word-timestamps"])
    assert code == 0
    return out


def _neuron_engine(settings, compiled: Path, neuron_env, **overrides):
    from batch_job.engine.loading import load_engine

    neuron_env.setattr("batch_job.engine.loading.resolve_device", lambda requested: "neuron")
    return load_engine(settings.replace(device="neuron", compiled_dir=str(compiled), **overrides))


def test_compiled_word_graphs_record_the_eager_attention(compiled_words_dir, loaded, settings, rows, options, neuron_env):
    """The compiled step's alignment output, through the stateful runtime, equals the CPU engine's."""
    from batch_job.engine.loading import model_bundle
    from batch_job.engine.runner import Engine

    manifest = json.loads((compiled_words_dir / "manifest.json").read_text())
    assert manifest["alignment_heads"] == [list(h) for h in loaded.alignment_heads]
    engine = _neuron_engine(settings, compiled_words_dir, neuron_env, word_timestamps=True)
    assert engine.bundle.alignment_heads == loaded.alignment_heads
    eager_words = Engine(model_bundle(loaded, settings.replace(word_timestamps=True), "cpu"))
    got, want = engine.decode(rows, options)[0], eager_words.decode(rows, options)[0]
    assert [r.tokens for r in got] == [r.tokens for r in want]
    for g, w in zip(got, want):
        assert g.alignment is not None and g.alignment.shape == w.alignment.shape
        np.testing.assert_allclose(g.alignment, w.alignment, atol=2e-3)


def test_word_graphs_serve_jobs_without_word_timestamps(compiled_words_dir, settings, rows, options, reference, neuron_env):
    engine = _neuron_engine(settings, compiled_words_dir, neuron_env)
    results = engine.decode(rows, options)[0]
    assert [r.tokens for r in results] == reference[4] and all(r.alignment is None for r in results)


def test_word_timestamps_need_graphs_compiled_with_them(compiled_dir, settings, neuron_env):
    with pytest.raises(ModelError, match="word timestamps need graphs compiled with --word-timestamps"):
        load_bundle(settings.replace(compiled_dir=str(compiled_dir), word_timestamps=True))


class _FakeNeuron(types.ModuleType):
    """A stand-in ``torch_neuronx``: records what ``trace`` is handed, jit-traces it, can refuse to load."""

    def __init__(self, move_error: Exception | None = None) -> None:
        super().__init__("torch_neuronx")
        self.calls: list[dict] = []
        self.moved: list = []
        self.move_error = move_error

    def trace(self, module, inputs, **kwargs):
        self.calls.append({"module": module, "inputs": inputs, **kwargs})
        return torch.jit.trace(module, inputs, check_trace=False)

    def move_trace_to_device(self, graph, core):
        if self.move_error is not None:
            raise self.move_error
        self.moved.append((graph, core))


def test_neuron_compile_traces_the_engines_modules_with_every_cache_aliased(tmp_path, loaded, eager, neuron_env):
    fake = _FakeNeuron()
    neuron_env.setitem(sys.modules, "torch_neuronx", fake)
    manifest = compile_model(loaded, tmp_path / "g", batch_sizes=[2], max_new_tokens=MAX_TOKENS, backend="neuron",
                             cpu_backend=True)
    from batch_job.engine.graphs import EncoderGraph, StatefulDecoderStep

    encoder_call, step_call = fake.calls
    assert isinstance(encoder_call["module"], EncoderGraph) and isinstance(step_call["module"], StatefulDecoderStep)
    step = step_call["module"]
    assert [t.dtype for t in step_call["inputs"]] == [torch.int32, torch.int32]
    assert step_call["input_output_aliases"] == {s: j + 1 for j, s in enumerate(step.states)}
    assert len(step_call["input_output_aliases"]) == 4 * eager.dims.layers
    assert "input_output_aliases" not in encoder_call
    for call in fake.calls:
        assert call["inline_weights_to_neff"] is False and call["cpu_backend"] is True
        assert call["compiler_args"] == list(COMPILER_ARGS)
    assert "--auto-cast=none" in COMPILER_ARGS and "--enable-saturate-infinity" in COMPILER_ARGS
    assert manifest["dtype"] == "bfloat16" and manifest["graphs"]["2"]["step"]["state"]["self_k"]["dtype"] == "bfloat16"


def _neuron_manifest(compiled_dir, tmp_path):
    """The jit artifacts relabelled as Neuron graphs of this environment (to drive the Neuron load branch)."""
    import shutil

    from batch_job.engine.neuron.runtime import running_versions

    out = tmp_path / "neuron-graphs"
    shutil.copytree(compiled_dir, out)
    manifest = mf.read_manifest(out)
    manifest.update(backend="neuron", versions=running_versions("neuron"))
    write_manifest(out, manifest)
    return out


def test_runtime_refusing_a_graph_is_retried(compiled_dir, tmp_path, settings, neuron_env):
    node = tmp_path / "neuron0"
    node.write_bytes(b"")
    neuron_env.setattr("batch_job.engine.neuron.runtime.DEVICE_GLOB", str(tmp_path / "neuron*"))
    fake = _FakeNeuron(move_error=RuntimeError("nrt_load: no free NeuronCore (NRT_RESOURCE)"))
    neuron_env.setitem(sys.modules, "torch_neuronx", fake)
    with pytest.raises(DeviceError, match=r"could not load encoder.pt onto a NeuronCore: nrt_load: no free NeuronCore") as info:
        load_bundle(settings.replace(compiled_dir=str(_neuron_manifest(compiled_dir, tmp_path))))
    assert exit_codes.for_error(info.value) == exit_codes.TRANSIENT == 75
    assert info.value.reason == "device_unavailable"


def test_missing_device_node_is_a_clear_config_error(compiled_dir, tmp_path, settings, neuron_env):
    neuron_env.setattr("batch_job.engine.neuron.runtime.DEVICE_GLOB", str(tmp_path / "no-such-neuron*"))
    neuron_env.setitem(sys.modules, "torch_neuronx", _FakeNeuron())
    with pytest.raises(ModelError, match=r"no Neuron device in this container \(/dev/neuron0 is absent\).*LinuxParameters.Devices") as info:
        load_bundle(settings.replace(compiled_dir=str(_neuron_manifest(compiled_dir, tmp_path))))
    assert exit_codes.for_error(info.value) == exit_codes.CONFIG_ERROR == 78


def test_neuron_load_moves_every_graph_to_core_zero(compiled_dir, tmp_path, settings, neuron_env):
    (tmp_path / "neuron0").write_bytes(b"")
    neuron_env.setattr("batch_job.engine.neuron.runtime.DEVICE_GLOB", str(tmp_path / "neuron*"))
    fake = _FakeNeuron()
    neuron_env.setitem(sys.modules, "torch_neuronx", fake)
    bundle = load_bundle(settings.replace(compiled_dir=str(_neuron_manifest(compiled_dir, tmp_path))))
    assert len(fake.moved) == 4 and {core for _, core in fake.moved} == {0}
    assert all(not g.emulate_aliases for g in bundle.graphs.values())  # on Neuron the runtime writes the states


# --------------------------------------------------------------------------- manifest
_DIMS = ModelDims(layers=4, heads=6, d_model=384, n_mels=80, vocab_size=51864, max_target_positions=448, cache_len=228)
_SIDE = {"dims": {}, "tokens": {}, "mel": {}, "tokenizer": {}}


def _manifest(**changes):
    sizes = [1, 4]
    base = {
        "format": mf.FORMAT,
        "backend": "neuron",
        "model": {"id": "tiny.en", "checksum": "a" * 64},
        "dtype": "bfloat16",
        "compiler_args": list(COMPILER_ARGS),
        "cpu_backend": True,
        "inline_weights_to_neff": False,
        "cache_len": 228,
        "max_new_tokens": 224,
        "batch_sizes": sizes,
        "graphs": {str(b): graph_shapes(_DIMS, b, 228) for b in sizes},
        "versions": {"torch": "2.9.0", "torch-neuronx": "2.9.0.2.15.32035", "neuronx-cc": "2.26.6360.0",
                     "transformers": "5.23.0", "whisper-batch": "0.1.0"},
        **_SIDE,
    }
    for b in sizes:
        base["graphs"][str(b)]["encoder"]["file"] = f"b{b}/encoder.pt"
        base["graphs"][str(b)]["step"]["file"] = f"b{b}/step.pt"
    base.update(changes)
    return base


def _check(manifest, **overrides):
    kwargs = dict(model_id="tiny.en", model_checksum="a" * 64, cache_len=228, batch_sizes=[1, 4],
                  versions=dict(_manifest()["versions"]), shapes={b: graph_shapes(_DIMS, b, 228) for b in (1, 4)})
    kwargs.update(overrides)
    mf.check_manifest(manifest, **kwargs)


def test_manifest_round_trip(tmp_path):
    written = _manifest()
    write_manifest(tmp_path, written)
    read = mf.read_manifest(tmp_path)
    assert read == json.loads(json.dumps(written))
    _check(read)  # matches itself
    shapes = read["graphs"]["4"]
    assert shapes["encoder"]["inputs"]["mel"] == {"shape": [4, 80, 3000], "dtype": "bfloat16"}
    assert shapes["step"]["inputs"]["tokens"] == {"shape": [4, 1], "dtype": "int32"}
    assert shapes["step"]["state"]["self_k"] == {"shape": [4, 6, 228, 64], "dtype": "bfloat16", "layers": 4}
    assert shapes["step"]["outputs"]["logits"]["dtype"] == "float32"


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"model_id": "base"}, r"compiled graphs are for model 'tiny.en', but the job asks for 'base'.*--model base"),
        ({"model_checksum": "b" * 64}, r"weights sha256 aaaaaaaaaaaa.*bbbbbbbbbbbb.*recompile"),
        ({"cache_len": 100}, r"static cache of 228 slots, the engine needs 100"),
        ({"batch_sizes": [8]}, r"batch size\(s\) \[8\] are not compiled \(compiled: \[1, 4\]\)"),
        ({"versions": {"torch-neuronx": "2.9.0.2.16.0"}}, r"torch-neuronx 2.9.0.2.15.32035.*has 2.9.0.2.16.0"),
        ({"versions": {"neuronx-cc": None}}, r"neuronx-cc 2.26.6360.0, this environment has none"),
        ({"versions": {"transformers": "5.24.0"}}, r"transformers 5.23.0"),
        ({"shapes": {4: graph_shapes(ModelDims(**{**_DIMS.__dict__, "n_mels": 128}), 4, 228)}},
         r"encoder graph for batch 4 has inputs mel bfloat16\[4, 80, 3000\], the engine needs bfloat16\[4, 128, 3000\]"),
        ({"shapes": {4: graph_shapes(_DIMS, 4, 228, "float32")}},
         r"encoder graph for batch 4 has inputs mel bfloat16\[4, 80, 3000\], the engine needs float32"),
    ],
    ids=["model", "checksum", "cache_len", "batch_sizes", "torch_neuronx", "neuronx_cc_missing", "transformers",
         "shapes", "dtype"],
)
def test_manifest_mismatch(overrides, pattern):
    with pytest.raises(ModelError, match=pattern) as info:
        _check(_manifest(), **overrides)
    assert info.value.reason == "model_error" and not info.value.retryable
    assert exit_codes.for_error(info.value) == exit_codes.CONFIG_ERROR


def test_manifest_shape_mismatch_in_file():
    bad = _manifest()
    bad["graphs"] = copy.deepcopy(bad["graphs"])
    bad["graphs"]["1"]["step"]["state"]["self_k"]["shape"][2] = 448
    with pytest.raises(ModelError, match=r"step graph for batch 1 has state self_k bfloat16\[1, 6, 448, 64\], the engine needs bfloat16\[1, 6, 228, 64\]"):
        _check(bad)
    old = _manifest()
    old["graphs"] = copy.deepcopy(old["graphs"])
    old["graphs"]["4"]["step"]["inputs"]["cross_k"] = {"shape": [4, 4, 6, 1500, 64], "dtype": "float32"}
    with pytest.raises(ModelError, match=r"step graph for batch 4 has inputs cross_k float32.*the engine needs nothing"):
        _check(old)


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
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1}), encoding="utf-8")
    with pytest.raises(ModelError, match=r"unknown manifest format 1 \(expected 2\)"):
        mf.read_manifest(tmp_path)
    broken = _manifest()
    del broken["graphs"]["4"]
    write_manifest(tmp_path, broken)
    with pytest.raises(ModelError, match="batch size 4 has no encoder/step graphs"):
        mf.read_manifest(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None, reason="torch-neuronx is installed")
def test_load_bundle_neuron_without_torch_neuronx(compiled_dir, tmp_path, settings, neuron_env):
    (tmp_path / "neuron0").write_bytes(b"")
    neuron_env.setattr("batch_job.engine.neuron.runtime.DEVICE_GLOB", str(tmp_path / "neuron*"))
    with pytest.raises(ModelError, match=r"holds Neuron graphs but torch-neuronx is not installed.*pip.repos.neuron.amazonaws.com"):
        load_bundle(settings.replace(compiled_dir=str(_neuron_manifest(compiled_dir, tmp_path))))


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
    assert (args.model, args.batch_size, args.max_tokens, args.out, args.cpu_backend, args.backend, args.dtype, args.plan) == \
        ("m", 8, 200, "/o", True, "neuron", "bfloat16", False)
    assert parse_sizes(8, "1,4") == [1, 4, 8]
    assert parse_sizes(2, None) == [2]
    with pytest.raises(ValueError):
        parse_sizes(8, "0")


@pytest.mark.parametrize("model, fits", [("openai/whisper-large-v3-turbo", True), ("openai/whisper-large-v3", True)])
def test_compile_plan_prints_the_memory_plan_without_weights(model, fits, tmp_path, capsys, monkeypatch):
    from batch_job.cli import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached: the plan comes from the known config
    code = main(["compile", "--plan", "--model", model, "--batch-size", "8", "--max-tokens", "224"])
    out = capsys.readouterr().out
    assert code == exit_codes.OK, out
    assert "DOES NOT FIT" not in out and "fits" in out
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


def test_compile_without_out_or_plan_is_a_usage_error(capsys):
    from batch_job.cli import main

    assert main(["compile", "--model", "tiny.en"]) == exit_codes.CONFIG_ERROR
    assert "--out DIR is required (or --plan)" in capsys.readouterr().err


def test_neuron_imports_stay_lazy():
    import subprocess

    code = ("import sys, batch_job.cli, batch_job.engine.neuron.compile, batch_job.engine.neuron.runtime, batch_job.engine.neuron.manifest;"
            "batch_job.cli.build_parser();"
            "assert not [m for m in sys.modules if m.startswith(('torch_neuronx', 'neuronxcc', 'libneuronxla'))]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_fetch_model_downloads_hub_ids(monkeypatch, tmp_path):
    import huggingface_hub

    import batch_job.engine.models as models
    from batch_job.engine.models import HUB_PATTERNS, fetch_model

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or str(tmp_path))
    monkeypatch.setattr(models, "resolve_checkpoint", lambda name, cache: tmp_path / "ckpt")
    assert fetch_model("openai/whisper-large-v3", str(tmp_path)) == tmp_path / "ckpt"
    assert calls == [{"repo_id": "openai/whisper-large-v3", "allow_patterns": list(HUB_PATTERNS)}]


def test_inf2_smoke_script_runs_end_to_end_on_the_jit_backend(tmp_path, capsys, neuron_env):
    """scripts/neuron_smoke.py is run once, by hand, on the first inf2 host: it must not be the thing that breaks."""
    import importlib.util as iu

    spec = iu.spec_from_file_location("neuron_smoke", REPO / "scripts" / "neuron_smoke.py")
    smoke = iu.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    code = smoke.main(["--backend", "jit", "--dtype", "float32", "--batch-sizes", "1", "--steps", "2",
                       "--check-steps", "2", "--max-tokens", "8", "--out", str(tmp_path / "g"),
                       "--audio-dir", str(shared_clip(CLIPS[0]).parent)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "top-1 agree True" in out and "x real time per core" in out and "OK: compiled graphs agree" in out
