"""The CTranslate2 -> transformers import reproduces the packaged models token for token.

Reference: ``ctranslate2.models.Whisper(<package dir>).generate`` run live on the same log-mel
features with the same prompt (greedy, float32). No expected token ids are hard-coded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_clip

from batch_job.engine import models
from batch_job.engine.ct2_model_bin import read_ct2_model
from batch_job.engine.loaded_model import LoadedModel

torch = pytest.importorskip("torch")
ctranslate2 = pytest.importorskip("ctranslate2")
sf = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


def _packaged_or_skip(name: str) -> list[Path]:
    try:
        return models.packaged_source_files(models.PACKAGED_MODELS[name])
    except Exception as exc:  # ModelError: package not installed
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tiny_en(model_cache_dir: Path) -> LoadedModel:
    _packaged_or_skip("tiny.en")
    return models.load_model("tiny.en", cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def base(model_cache_dir: Path) -> LoadedModel:
    _packaged_or_skip("base")
    return models.load_model("base", cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def ct2_tiny_en() -> ctranslate2.models.Whisper:
    files = _packaged_or_skip("tiny.en")
    return ctranslate2.models.Whisper(str(files[0].parent), device="cpu", compute_type="float32", intra_threads=1)


@pytest.fixture(scope="session")
def ct2_base(tmp_path_factory) -> ctranslate2.models.Whisper:
    """CTranslate2 needs one ``model.bin``: concatenate the two parts (streamed) into a temp dir."""
    parts = _packaged_or_skip("base")
    directory = tmp_path_factory.mktemp("ct2-base")
    with open(directory / "model.bin", "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 8 << 20)
    for side in ("config.json", "vocabulary.txt", "tokenizer.json"):
        (directory / side).symlink_to(parts[0].parent / side)
    return ctranslate2.models.Whisper(str(directory), device="cpu", compute_type="float32", intra_threads=1)


def _features(loaded: LoadedModel, clip: str, seconds: float = 30.0) -> np.ndarray:
    """Log-mel features ``[1, n_mels, 3000]`` float32 of the first ``seconds`` of a shared clip."""
    audio, rate = sf.read(shared_clip(clip), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != 16000:
        audio = soxr.resample(audio, rate, 16000)
    audio = np.ascontiguousarray(audio[: int(seconds * 16000)], dtype=np.float32)
    feats = loaded.feature_extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    assert feats.shape == (1, loaded.n_mels, 3000)
    return feats.astype(np.float32)


@pytest.fixture(scope="session")
def encoded_clips() -> dict:
    """Session memo: (model name, clip) -> (features, HF encoder output, CT2 encoder output)."""
    return {}


def _encode(memo: dict, loaded: LoadedModel, ct2_model, clip: str):
    """Features ``[1, n_mels, 3000]`` of ``clip`` encoded once per model by both engines:
    transformers ``[1, 1500, d_model]`` tensor and CTranslate2 ``StorageView`` of the same shape."""
    key = (loaded.name, clip)
    if key not in memo:
        features = _features(loaded, clip)
        with torch.inference_mode():
            hf_encoded = loaded.model.model.encoder(torch.from_numpy(features)).last_hidden_state
        ct2_encoded = ct2_model.encode(ctranslate2.StorageView.from_array(features), to_cpu=True)
        memo[key] = (features, hf_encoded, ct2_encoded)
    return memo[key]


def _hf_greedy(loaded: LoadedModel, encoded: torch.Tensor, prompt: list[int], timestamps: bool) -> list[int]:
    """Greedy decoding with the transformers model and HF's Whisper logits processors.

    ``encoded``: encoder output ``[1, 1500, d_model]``. Returns generated ids without prompt and
    without EOT (CTranslate2's convention). Applies, like CTranslate2/openai: suppress_tokens,
    blank/EOT suppression at the first step and, with timestamps, the timestamp rules.
    """
    from transformers.generation.logits_process import (
        SuppressTokensAtBeginLogitsProcessor,
        SuppressTokensLogitsProcessor,
        WhisperTimeStampLogitsProcessor,
    )

    gen = loaded.model.generation_config
    processors = [
        SuppressTokensLogitsProcessor(gen.suppress_tokens),
        SuppressTokensAtBeginLogitsProcessor(gen.begin_suppress_tokens, len(prompt)),
    ]
    if timestamps:
        processors.append(WhisperTimeStampLogitsProcessor(gen, begin_index=len(prompt)))
    max_total = loaded.model.config.max_target_positions
    with torch.inference_mode():
        ids = torch.tensor([prompt], dtype=torch.long)
        step_input, past = ids, None
        while ids.shape[1] < max_total:
            out = loaded.model(
                encoder_outputs=(encoded,), decoder_input_ids=step_input, past_key_values=past, use_cache=True
            )
            past = out.past_key_values
            scores = out.logits[:, -1, :].float()  # [1, vocab]
            for processor in processors:
                scores = processor(ids, scores)
            next_id = scores.argmax(dim=-1, keepdim=True)  # [1, 1]
            ids = torch.cat([ids, next_id], dim=1)
            if int(next_id) == loaded.tokens.eot:
                break
            step_input = next_id
    generated = ids[0, len(prompt) :].tolist()
    return generated[:-1] if generated and generated[-1] == loaded.tokens.eot else generated


def _ct2_greedy(model: ctranslate2.models.Whisper, encoded, prompt: list[int]) -> list[int]:
    """CTranslate2 greedy ids (no prompt, no EOT) from its encoder output or from features."""
    if isinstance(encoded, np.ndarray):
        encoded = ctranslate2.StorageView.from_array(encoded)
    result = model.generate(encoded, [prompt], beam_size=1, max_length=448)
    return list(result[0].sequences_ids[0])


def decoder_prompt(loaded, language: str | None, *, timestamps: bool = False) -> list[int]:
    """The engine's own prompt (decoding.build_prompt) for one row: what the CT2 reference is given."""
    from batch_job.engine.decoding import DecodingOptions, build_prompt

    options = DecodingOptions(language=language, without_timestamps=not timestamps)
    return build_prompt(loaded.tokens, options, [language or "en"])[0].tolist()


def _assert_same_tokens(memo, loaded, ct2_model, clip: str, language: str | None) -> None:
    """Full greedy sequences equal, without and with timestamps."""
    _, hf_encoded, ct2_encoded = _encode(memo, loaded, ct2_model, clip)
    for timestamps in (False, True):
        prompt = decoder_prompt(loaded, language, timestamps=timestamps)
        expected = _ct2_greedy(ct2_model, ct2_encoded, prompt)
        got = _hf_greedy(loaded, hf_encoded, prompt, timestamps)
        assert len(expected) > 5, "reference decoded (almost) nothing; bad clip?"
        first_diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        assert got == expected, (
            f"{clip} timestamps={timestamps}: first difference at {first_diff}\n"
            f"hf : {loaded.tokenizer.decode(got, decode_with_timestamps=True)}\n"
            f"ct2: {loaded.tokenizer.decode(expected, decode_with_timestamps=True)}"
        )
        if timestamps:
            assert sum(t >= loaded.tokens.timestamp_begin for t in expected) >= 2
        else:
            assert all(t < loaded.tokens.eot for t in expected)


# ------------------------------------------------------------------------------------------------
# token-for-token equality with CTranslate2
# ------------------------------------------------------------------------------------------------

TINY_EN_CLIPS = ["jfk.flac", "librispeech_61-70968-0000.flac", "ljspeech_LJ001-0001.flac"]
BASE_CLIPS = [("jfk.flac", "en"), ("picovoice_test_de.wav", "de"), ("librivox_capitan_veneno_es.mp3", "es")]


@pytest.mark.parametrize("clip", TINY_EN_CLIPS)
def test_tiny_en_matches_ctranslate2(tiny_en, ct2_tiny_en, encoded_clips, clip):
    _assert_same_tokens(encoded_clips, tiny_en, ct2_tiny_en, clip, None)


@pytest.mark.parametrize("clip,language", BASE_CLIPS)
def test_base_matches_ctranslate2(base, ct2_base, encoded_clips, clip, language):
    _assert_same_tokens(encoded_clips, base, ct2_base, clip, language)


def test_hf_generate_uses_generation_config(tiny_en, base, ct2_tiny_en, ct2_base, encoded_clips):
    """``model.generate`` (no timestamps) builds the right prompt from generation_config alone:
    tiny.en does not run language detection, base honours ``language``."""
    cases = ((tiny_en, ct2_tiny_en, "jfk.flac", None), (base, ct2_base, "picovoice_test_de.wav", "de"))
    for loaded, ct2_model, clip, language in cases:
        features, _, ct2_encoded = _encode(encoded_clips, loaded, ct2_model, clip)
        expected = _ct2_greedy(ct2_model, ct2_encoded, decoder_prompt(loaded, language))
        kwargs = {"language": language, "task": "transcribe"} if language else {}
        with torch.inference_mode():
            out = loaded.model.generate(torch.from_numpy(features), return_timestamps=False, **kwargs)
        got = [t for t in out[0].tolist() if t != loaded.tokens.eot]
        assert got == expected


# ------------------------------------------------------------------------------------------------
# weights, configs, tokenizer
# ------------------------------------------------------------------------------------------------


def test_weights_are_bit_exact(tiny_en):
    """Every transformers parameter equals its (un-fused) CTranslate2 source; proj_out is tied."""
    source = read_ct2_model(_packaged_or_skip("tiny.en")).variables
    state = tiny_en.model.state_dict()
    d = tiny_en.model.config.d_model
    fused = source["decoder/layer_0/self_attention/linear_0/weight"]  # [3d, d]: q; k; v
    for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        np.testing.assert_array_equal(
            state[f"model.decoder.layers.0.self_attn.{proj}.weight"].numpy(),
            fused[j * d : (j + 1) * d].astype(np.float32),
        )
    cross_kv = source["decoder/layer_0/attention/linear_1/weight"]  # [2d, d]: k; v
    np.testing.assert_array_equal(
        state["model.decoder.layers.0.encoder_attn.v_proj.weight"].numpy(), cross_kv[d:].astype(np.float32)
    )
    assert tiny_en.model.proj_out.weight.data_ptr() == tiny_en.model.model.decoder.embed_tokens.weight.data_ptr()
    assert "model.decoder.layers.0.self_attn.k_proj.bias" not in state


def test_checkpoint_loads_without_missing_or_unexpected_keys(tiny_en):
    from transformers import WhisperForConditionalGeneration

    _, info = WhisperForConditionalGeneration.from_pretrained(tiny_en.path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_config_inferred_from_shapes(tiny_en, base):
    for loaded, layers, d_model, vocab in ((tiny_en, 4, 384, 51864), (base, 6, 512, 51865)):
        cfg = loaded.model.config
        assert (cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.vocab_size) == (layers, layers, d_model, vocab)
        assert cfg.encoder_attention_heads == cfg.decoder_attention_heads == d_model // 64
        assert (cfg.num_mel_bins, cfg.max_source_positions, cfg.max_target_positions) == (80, 1500, 448)
        assert loaded.feature_extractor.feature_size == cfg.num_mel_bins == loaded.n_mels


def test_special_ids_english_only_are_one_lower(tiny_en, base):
    for field in ("sot", "eot", "transcribe", "translate", "no_timestamps", "timestamp_begin", "no_speech"):
        assert getattr(tiny_en.tokens, field) == getattr(base.tokens, field) - 1, field
    assert tiny_en.tokenizer.convert_ids_to_tokens(tiny_en.tokens.no_speech) in ("<|nospeech|>", "<|nocaptions|>")
    assert not tiny_en.tokens.is_multilingual and base.tokens.is_multilingual
    assert tiny_en.tokens.languages == {}
    assert base.tokens.languages["en"] == base.tokens.sot + 1 and len(base.tokens.languages) == 99
    assert base.tokenizer.convert_tokens_to_ids("<|de|>") == base.tokens.languages["de"]


def test_generation_config_english_only_has_no_lang_to_id(tiny_en, base):
    raw = json.loads((tiny_en.path / "generation_config.json").read_text())
    assert "lang_to_id" not in raw and "task_to_id" not in raw and raw["is_multilingual"] is False
    assert not hasattr(tiny_en.model.generation_config, "lang_to_id")
    for loaded in (tiny_en, base):
        gen = loaded.model.generation_config
        assert gen.decoder_start_token_id == loaded.tokens.sot
        assert gen.eos_token_id == loaded.tokens.eot
        assert gen.no_timestamps_token_id == loaded.tokens.no_timestamps
        assert loaded.tokens.eot in gen.begin_suppress_tokens and 220 in gen.begin_suppress_tokens
        assert loaded.tokens.sot in gen.suppress_tokens and loaded.tokens.no_speech in gen.suppress_tokens
    assert base.model.generation_config.task_to_id == {"transcribe": base.tokens.transcribe, "translate": base.tokens.translate}


def test_tokenizer_has_timestamp_tokens(tiny_en, base):
    for loaded in (tiny_en, base):
        tok = loaded.tokenizer
        assert tok.convert_tokens_to_ids("<|0.00|>") == loaded.tokens.timestamp_begin
        assert tok.convert_tokens_to_ids("<|30.00|>") == loaded.tokens.timestamp_begin + 1500
        assert len(tok) == loaded.model.config.vocab_size
        text_ids = tok.encode(" Ask not.", add_special_tokens=False)
        ids = [loaded.tokens.timestamp_begin, *text_ids, loaded.tokens.timestamp_begin + 75]
        assert tok.decode(ids, decode_with_timestamps=True) == "<|0.00|> Ask not.<|1.50|>"
        assert tok.decode(ids, skip_special_tokens=True) == " Ask not."
        offsets = tok.decode(ids, output_offsets=True)["offsets"]
        assert offsets == [{"text": " Ask not.", "timestamp": (0.0, 1.5)}]


def test_processor_loads(tiny_en):
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_en.path)
    assert processor.tokenizer.convert_tokens_to_ids("<|30.00|>") == tiny_en.tokens.timestamp_begin + 1500
    assert processor.feature_extractor.feature_size == tiny_en.n_mels


def test_reader_streams_parts_and_rejects_bad_input(tmp_path):
    """Arbitrary split points read the same as one file; truncation, trailing bytes and a
    non-zero key bias are errors, not silently wrong checkpoints."""
    from batch_job.engine.ct2_mapping import ct2_to_transformers
    from batch_job.errors import ModelError

    data = _packaged_or_skip("tiny.en")[0].read_bytes()
    (tmp_path / "model.bin.part1").write_bytes(data[:12_345])
    (tmp_path / "model.bin.part2").write_bytes(data[12_345:])
    split = read_ct2_model([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]).variables
    whole = read_ct2_model(_packaged_or_skip("tiny.en")).variables
    assert split.keys() == whole.keys()
    assert all(np.array_equal(split[k], whole[k]) for k in whole)

    (tmp_path / "truncated.bin").write_bytes(data[:-10])
    with pytest.raises(ModelError, match="truncated"):
        read_ct2_model([tmp_path / "truncated.bin"])
    (tmp_path / "trailing.bin").write_bytes(data + b"\0")
    with pytest.raises(ModelError, match="trailing"):
        read_ct2_model([tmp_path / "trailing.bin"])

    name = "decoder/layer_0/attention/linear_1/bias"  # cross-attention [k; v] bias
    bad = dict(whole)
    bad[name] = whole[name].copy()
    bad[name][0] = 1.0
    with pytest.raises(ModelError, match="key bias"):
        ct2_to_transformers(bad)
