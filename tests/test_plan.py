"""batch_job.engine.neuron.plan: exact parameter counts against real models, the large-v3/turbo budgets
against the Batch job definition and the per-core HBM limit, and the config lookup."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from batch_job.engine import models
from batch_job.engine.neuron import plan as mp
from batch_job.errors import ModelError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "cloudformation" / "template.yaml"
DOCKERFILE = REPO / "batch_job" / "Dockerfile"
PROMPT_SLOTS = 4  # <|sot|> <|lang|> <|task|> <|notimestamps|>

# Independent cross-check: total parameters of the published hub checkpoints (safetensors totals,
# tied proj_out not stored), as listed on the model pages.
HUB_PARAMETERS = {"openai/whisper-large-v3": 1_543_490_560, "openai/whisper-large-v3-turbo": 808_878_080}


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that accepts CloudFormation short tags (!Ref, !Sub, ...) and ignores their meaning."""


_CfnLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _job_memory_mib() -> int:
    """The one MEMORY value every AWS::Batch::JobDefinition in the template asks for."""
    resources = yaml.load(TEMPLATE.read_text(encoding="utf-8"), Loader=_CfnLoader)["Resources"]
    values = {
        int(req["Value"])
        for res in resources.values()
        if res.get("Type") == "AWS::Batch::JobDefinition"
        for req in res["Properties"]["ContainerProperties"]["ResourceRequirements"]
        if req["Type"] == "MEMORY"
    }
    assert len(values) == 1, values
    return values.pop()


def _image_default(arg: str) -> str:
    match = re.search(rf"^ARG {arg}=(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"no ARG {arg}= in {DOCKERFILE}"
    return match.group(1)


IMAGE_BATCH = int(_image_default("BATCH_SIZE"))
IMAGE_CACHE_LEN = int(_image_default("MAX_TOKENS")) + PROMPT_SLOTS


def _packaged_or_skip(name: str) -> None:
    try:
        models.packaged_source_files(models.PACKAGED_MODELS[name])
    except ModelError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------------------- parameter counts
def test_import_is_cheap():
    code = "import sys, batch_job.engine.neuron.plan; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def _numel(params) -> int:
    """Sum of numel over distinct tensors (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_parameter_counts_are_exact_for_real_models(name, model_cache_dir):
    _packaged_or_skip(name)
    loaded = models.load_model(name, cache_dir=model_cache_dir)
    model = loaded.model
    encoder, decoder = model.model.encoder, model.model.decoder
    cross = [p for layer in decoder.layers for m in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj)
             for p in m.parameters()]
    assert all(layer.encoder_attn.k_proj.bias is None for layer in decoder.layers)
    assert model.proj_out.weight is decoder.embed_tokens.weight  # tied: counted once below
    cross_ids = {id(p) for p in cross}
    encoder_graph = _numel([*encoder.parameters(), *cross])
    step_graph = _numel([p for p in [*decoder.parameters(), *model.proj_out.parameters()] if id(p) not in cross_ids])
    assert encoder_graph + step_graph == _numel(model.parameters())

    dims = mp.dims_for_model(name, cache_dir=model_cache_dir)
    assert dims == mp.WhisperDims.from_config(model.config.to_dict())
    assert dims == mp.WhisperDims(**mp.KNOWN_CONFIGS[name])
    assert mp.parameter_counts(dims) == (encoder_graph, step_graph)


@pytest.mark.parametrize("hub_id", sorted(HUB_PARAMETERS))
def test_known_large_configs_match_the_published_parameter_totals(hub_id):
    assert sum(mp.parameter_counts(mp.WhisperDims(**mp.KNOWN_CONFIGS[hub_id]))) == HUB_PARAMETERS[hub_id]


def test_turbo_is_large_v3_with_four_decoder_layers():
    large, turbo = (mp.KNOWN_CONFIGS[k] for k in ("openai/whisper-large-v3", "openai/whisper-large-v3-turbo"))
    assert {k for k in large if large[k] != turbo[k]} == {"decoder_layers"}
    shape = (turbo["decoder_layers"], large["num_mel_bins"], large["vocab_size"], large["d_model"])
    assert shape == (4, 128, 51866, 1280)


# ---------------------------------------------------------------------------- budgets
def test_host_limit_constant_is_the_job_definitions_memory():
    assert mp.HOST_BYTES_PER_JOB_LIMIT == _job_memory_mib() * 2**20


@pytest.mark.parametrize("name", ["large-v3", "large-v3-turbo"])
def test_image_default_fits_a_neuron_core_and_the_job_memory(name):
    assert (IMAGE_BATCH, IMAGE_CACHE_LEN) == (8, 228)
    p = mp.plan(mp.dims_for_model(name), [IMAGE_BATCH], IMAGE_CACHE_LEN, "bfloat16")
    assert p.device_total <= mp.DEVICE_BYTES_PER_CORE_LIMIT == 13 * 2**30, mp.format_plan(p)
    assert p.host_peak <= _job_memory_mib() * 2**20, mp.format_plan(p)
    assert p.fits == {"device": True, "host": True}
    assert "DOES NOT FIT" not in mp.format_plan(p)


def test_float32_large_v3_does_not_fit_a_neuron_core():
    dims = mp.dims_for_model("openai/whisper-large-v3")
    bf16 = mp.plan(dims, [IMAGE_BATCH], IMAGE_CACHE_LEN, "bfloat16")
    fp32 = mp.plan(dims, [IMAGE_BATCH], IMAGE_CACHE_LEN, "float32")
    assert fp32.device_total > mp.DEVICE_BYTES_PER_CORE_LIMIT > bf16.device_total
    assert not fp32.fits["device"]
    assert "DOES NOT FIT" in mp.format_plan(fp32).split("device per NeuronCore")[1].splitlines()[0]


def test_each_bucket_carries_its_own_weights():
    dims = mp.dims_for_model("turbo")
    one, two = mp.plan(dims, [8], 228), mp.plan(dims, [1, 8], 228)
    enc_weights, step_weights = (g.weights for g in one.graphs)
    extra = two.device_total - one.device_total
    assert [(g.batch_size, g.graph) for g in two.graphs] == [(1, "encoder"), (1, "step"), (8, "encoder"), (8, "step")]
    assert extra >= enc_weights + step_weights


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("dtype,nbytes", [("bfloat16", 2), ("float32", 4)])
@pytest.mark.parametrize("name", ["openai/whisper-large-v3", "openai/whisper-large-v3-turbo", "tiny.en"])
def test_state_inputs_and_outputs_are_the_listed_shapes(name, dtype, nbytes):
    cfg = mp.KNOWN_CONFIGS[name]
    L, H, S, V, M = (cfg[k] for k in ("decoder_layers", "decoder_attention_heads", "max_source_positions",
                                       "vocab_size", "num_mel_bins"))
    Dh, T = cfg["d_model"] // H, 228
    p = mp.plan(mp.WhisperDims(**cfg), [1, 8, 16], T, dtype)
    for g in p.graphs:
        B = g.batch_size
        state = {}
        for i in range(L):
            state[f"self_k.{i}"] = state[f"self_v.{i}"] = (B, H, T, Dh)
            state[f"cross_k.{i}"] = state[f"cross_v.{i}"] = (B, H, S, Dh)
        state_bytes = sum(b * h * t * dh for b, h, t, dh in state.values()) * nbytes
        if g.graph == "step":
            assert g.state == state_bytes
            assert g.inputs == (B * 1 + 1) * 4 <= 64 * 1024  # tokens [B,1] + position [1], int32
            assert g.outputs == B * V * 4  # logits float32; aliased state outputs are free
        else:
            assert g.state == 0
            assert g.inputs == B * M * 3000 * nbytes
            assert g.outputs == 2 * L * B * H * S * Dh * nbytes  # cross_k, cross_v [L, B, H, S, Dh]
        assert g.total == g.weights + g.state + g.inputs + g.outputs + g.scratch
        assert 0 < g.scratch
    assert p.device_total == sum(g.total for g in p.graphs)


def test_weights_keep_layer_norms_in_float32():
    dims = mp.dims_for_model("tiny.en")
    enc, step = mp.parameter_counts(dims)
    d, Le, Ld = dims.d_model, dims.encoder_layers, dims.decoder_layers
    ln_enc, ln_step = 2 * d * (2 * Le + 1), 2 * d * (3 * Ld + 1)
    bf16 = mp.plan(dims, [1], 8, "bf16")
    assert [g.weights for g in bf16.graphs] == [(enc - ln_enc) * 2 + ln_enc * 4, (step - ln_step) * 2 + ln_step * 4]
    assert [g.weights for g in mp.plan(dims, [1], 8, "fp32").graphs] == [enc * 4, step * 4]


def test_host_peak_is_baseline_plus_the_larger_of_load_and_run():
    dims = mp.dims_for_model("large-v3")
    p = mp.plan(dims, [8], 228)
    encoder, step = p.graphs
    assert p.host.load_peak == max(encoder.weights, step.weights + step.state)
    assert p.host.run_peak >= encoder.outputs + 8 * dims.num_mel_bins * 3000 * 4
    assert p.host_peak == mp.HOST_BASELINE_BYTES + max(p.host.load_peak, p.host.run_peak)


def test_plan_rejects_bad_arguments():
    dims = mp.dims_for_model("tiny.en")
    for kwargs in ({"batch_sizes": []}, {"batch_sizes": [0]}, {"cache_len": 449}, {"dtype": "int8"}):
        args = {"dims": dims, "batch_sizes": [1], "cache_len": 228, **kwargs}
        with pytest.raises(ValueError):
            mp.plan(**args)


def test_format_plan_names_rows_limits_and_verdicts():
    text = mp.format_plan(mp.plan(mp.dims_for_model("turbo"), [1, 8], 228))
    assert re.search(r"^\s+8 encoder\s", text, re.MULTILINE) and re.search(r"^\s+1 step\s", text, re.MULTILINE)
    assert "13.00 GiB" in text and "7.00 GiB" in text and text.count("fits (") == 2
    assert "estimate" in text


# ---------------------------------------------------------------------------- config lookup
@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("name,hub_id", [("openai/whisper-large-v3", "openai/whisper-large-v3"),
                                         ("large-v3", "openai/whisper-large-v3"),
                                         ("large-v3-turbo", "openai/whisper-large-v3-turbo"),
                                         ("turbo", "openai/whisper-large-v3-turbo"),
                                         ("openai/whisper-large-v3-turbo", "openai/whisper-large-v3-turbo")])
def test_uncached_hub_ids_fall_back_to_known_configs(empty_hub_cache, name, hub_id):
    with pytest.raises(ModelError):
        models.resolve_checkpoint(hub_id, empty_hub_cache)  # really not cached
    assert mp.dims_for_model(name) == mp.WhisperDims(**mp.KNOWN_CONFIGS[hub_id])


def test_cached_hub_id_is_read_from_its_config(empty_hub_cache):
    cfg = dict(mp.KNOWN_CONFIGS["openai/whisper-large-v3"], decoder_layers=2, model_type="whisper")
    repo = empty_hub_cache / "models--openai--whisper-large-v3"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("a" * 40) / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40, encoding="utf-8")
    assert mp.dims_for_model("openai/whisper-large-v3").decoder_layers == 2


def test_directory_config_is_read(tmp_path):
    cfg = dict(mp.KNOWN_CONFIGS["openai/whisper-large-v3-turbo"], decoder_layers=2, torch_dtype="float16")
    (tmp_path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    dims = mp.dims_for_model(str(tmp_path))
    assert dims.decoder_layers == 2 and dims.head_dim == 64 and dims.num_mel_bins == 128


def test_directory_without_config_and_unknown_names_are_model_errors(tmp_path, empty_hub_cache):
    with pytest.raises(ModelError, match="config.json"):
        mp.dims_for_model(str(tmp_path))
    with pytest.raises(ModelError, match="known configs"):
        mp.dims_for_model("someone/not-a-whisper")
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 1280}), encoding="utf-8")
    with pytest.raises(ModelError, match="lacks"):
        mp.dims_for_model(str(tmp_path))


def test_packaged_names_need_no_conversion_without_a_cache_dir():
    assert mp.dims_for_model("base") == mp.WhisperDims(**mp.KNOWN_CONFIGS["base"])
