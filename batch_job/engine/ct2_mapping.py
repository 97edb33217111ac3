"""CTranslate2 Whisper -> transformers ``WhisperForConditionalGeneration``: weight names and configs.

CTranslate2 fuses attention projections (self-attention ``linear_0`` = [q; k; v] rows, cross
attention ``linear_0`` = q and ``linear_1`` = [k; v]), gives ``k`` an all-zero bias (transformers'
``k_proj`` has none) and aliases ``decoder/projection/weight`` to the token embedding (tied
``proj_out``). Every un-fused piece is a contiguous row block, so the import is a pure re-layout:
the state dict returned here holds views of the source arrays, written bit-exactly in their source
dtype (float16 for the packaged models).

The config files (``config.json``, ``generation_config.json``, ``preprocessor_config.json``) are
inferred from the weight shapes and the special token ids of the vocabulary
(:mod:`batch_job.engine.ct2_vocabulary`); nothing is assumed from the model's name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from batch_job.constants import (
    CHUNK_SECONDS,
    HOP_LENGTH,
    MULTILINGUAL_VOCAB_MIN,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
)
from batch_job.engine.ct2_vocabulary import VocabularySpecialIds
from batch_job.errors import ModelError

# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def ct2_to_transformers(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map CTranslate2 Whisper variables to ``WhisperForConditionalGeneration`` state-dict names.

    Un-fuses q/k/v (row blocks of ``[3*d_model, d_model]`` / ``[2*d_model, d_model]``), drops the
    key bias after checking it is all zeros, and omits ``proj_out.weight`` (tied to
    ``model.decoder.embed_tokens.weight``; verified identical). Returned arrays are views.
    """
    out: dict[str, np.ndarray] = {}
    _map_encoder(variables, out)
    _map_decoder(variables, out)
    projection = variables.get("decoder/projection/weight")
    if projection is not None and not np.array_equal(projection, variables["decoder/embeddings/weight"]):
        raise ModelError("decoder projection is not tied to the token embedding; unsupported model")
    return out


def _map_encoder(v: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    for conv in ("conv1", "conv2"):
        out[f"model.encoder.{conv}.weight"] = v[f"encoder/{conv}/weight"]
        out[f"model.encoder.{conv}.bias"] = v[f"encoder/{conv}/bias"]
    out["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    _layer_norm(v, "encoder/layer_norm", out, "model.encoder.layer_norm")
    for i in range(count_layers(v, "encoder")):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        _self_attention(v, f"{src}/self_attention", out, f"{dst}.self_attn")
        _layer_norm(v, f"{src}/self_attention/layer_norm", out, f"{dst}.self_attn_layer_norm")
        _ffn(v, f"{src}/ffn", out, dst)


def _map_decoder(v: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    out["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    out["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    _layer_norm(v, "decoder/layer_norm", out, "model.decoder.layer_norm")
    for i in range(count_layers(v, "decoder")):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _self_attention(v, f"{src}/self_attention", out, f"{dst}.self_attn")
        _layer_norm(v, f"{src}/self_attention/layer_norm", out, f"{dst}.self_attn_layer_norm")
        _cross_attention(v, f"{src}/attention", out, f"{dst}.encoder_attn")
        _layer_norm(v, f"{src}/attention/layer_norm", out, f"{dst}.encoder_attn_layer_norm")
        _ffn(v, f"{src}/ffn", out, dst)


def count_layers(v: dict[str, np.ndarray], stack: str) -> int:
    """How many layers ``stack`` (``"encoder"`` / ``"decoder"``) has; they must be numbered 0..N-1."""
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in v if (m := pattern.match(name))}
    if indices != set(range(len(indices))) or not indices:
        raise ModelError(f"CTranslate2 {stack} layers are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def _layer_norm(v: dict[str, np.ndarray], src: str, out: dict[str, np.ndarray], dst: str) -> None:
    out[f"{dst}.weight"] = v[f"{src}/gamma"]
    out[f"{dst}.bias"] = v[f"{src}/beta"]


def _ffn(v: dict[str, np.ndarray], src: str, out: dict[str, np.ndarray], dst: str) -> None:
    _layer_norm(v, f"{src}/layer_norm", out, f"{dst}.final_layer_norm")
    for k, fc in (("linear_0", "fc1"), ("linear_1", "fc2")):
        out[f"{dst}.{fc}.weight"] = v[f"{src}/{k}/weight"]
        out[f"{dst}.{fc}.bias"] = v[f"{src}/{k}/bias"]


def _self_attention(v: dict[str, np.ndarray], src: str, out: dict[str, np.ndarray], dst: str) -> None:
    """``linear_0``: fused ``[3*d, d]`` q/k/v; ``linear_1``: output projection ``[d, d]``."""
    _split_projection(v, f"{src}/linear_0", ("q_proj", "k_proj", "v_proj"), out, dst)
    out[f"{dst}.out_proj.weight"] = v[f"{src}/linear_1/weight"]
    out[f"{dst}.out_proj.bias"] = v[f"{src}/linear_1/bias"]


def _cross_attention(v: dict[str, np.ndarray], src: str, out: dict[str, np.ndarray], dst: str) -> None:
    """``linear_0``: q ``[d, d]``; ``linear_1``: fused ``[2*d, d]`` k/v; ``linear_2``: output."""
    _split_projection(v, f"{src}/linear_0", ("q_proj",), out, dst)
    _split_projection(v, f"{src}/linear_1", ("k_proj", "v_proj"), out, dst)
    out[f"{dst}.out_proj.weight"] = v[f"{src}/linear_2/weight"]
    out[f"{dst}.out_proj.bias"] = v[f"{src}/linear_2/bias"]


def _split_projection(
    v: dict[str, np.ndarray], src: str, names: Sequence[str], out: dict[str, np.ndarray], dst: str
) -> None:
    weight, bias = v[f"{src}/weight"], v[f"{src}/bias"]
    if weight.shape[0] % len(names) or bias.shape != weight.shape[:1]:
        raise ModelError(f"{src}: cannot split {weight.shape} into {len(names)} projections")
    rows = weight.shape[0] // len(names)
    for j, name in enumerate(names):
        out[f"{dst}.{name}.weight"] = weight[j * rows : (j + 1) * rows]
        piece = bias[j * rows : (j + 1) * rows]
        if name == "k_proj":
            if np.any(piece != 0):
                raise ModelError(f"{src}: key bias is not zero; transformers' k_proj has no bias")
        else:
            out[f"{dst}.{name}.bias"] = piece



# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


def whisper_config(variables: dict[str, np.ndarray], special: VocabularySpecialIds) -> dict:
    """``WhisperConfig`` fields inferred from the weight shapes and special tokens."""
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": int(vocab_size),
        "d_model": int(d_model),
        "num_mel_bins": int(variables["encoder/conv1/weight"].shape[1]),
        "encoder_layers": count_layers(variables, "encoder"),
        "decoder_layers": count_layers(variables, "decoder"),
        "encoder_attention_heads": int(variables["encoder/num_heads"]),
        "decoder_attention_heads": int(variables["decoder/num_heads"]),
        "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(variables["decoder/position_encodings/encodings"].shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "use_cache": True,
        "bos_token_id": special.eot,
        "eos_token_id": special.eot,
        "pad_token_id": special.eot,
        "decoder_start_token_id": special.sot,
        # Compute dtype for ``from_pretrained`` without ``dtype=`` (transformers 5 defaults to
        # "auto", which would otherwise pick the float16 *storage* dtype: slow/unsupported on CPU).
        "dtype": "float32",
    }


def generation_config(ct2_config: dict, special: VocabularySpecialIds, *, multilingual: bool, max_length: int) -> dict:
    """``GenerationConfig`` fields as openai/HF define them for Whisper.

    Suppression lists and alignment heads come from the CTranslate2 ``config.json`` (which took
    them from the HF generation config). English-only models get no ``lang_to_id``/``task_to_id``
    at all: transformers 5.23 runs language detection whenever ``lang_to_id`` exists and no
    language is passed.
    """
    config: dict = {
        "bos_token_id": special.eot,
        "eos_token_id": special.eot,
        "pad_token_id": special.eot,
        "decoder_start_token_id": special.sot,
        "no_timestamps_token_id": special.no_timestamps,
        "prev_sot_token_id": special.sot_prev,
        "max_initial_timestamp_index": 50,
        "max_length": max_length,
        "return_timestamps": False,
        "is_multilingual": multilingual,
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin", [220, special.eot])),
        "alignment_heads": [list(pair) for pair in ct2_config.get("alignment_heads", [])],
    }
    if multilingual:
        config["forced_decoder_ids"] = [[1, None], [2, special.transcribe]]
        config["lang_to_id"] = dict(special.languages)
        config["task_to_id"] = {"transcribe": special.transcribe, "translate": special.translate}
    else:
        config["forced_decoder_ids"] = [[1, special.no_timestamps]]
    return config


def is_multilingual_vocab(vocab_size: int) -> bool:
    """openai's rule (:data:`~batch_job.constants.MULTILINGUAL_VOCAB_MIN`)."""
    return vocab_size >= MULTILINGUAL_VOCAB_MIN


def feature_extractor_config(n_mels: int) -> dict:
    """``WhisperFeatureExtractor`` settings for ``n_mels`` mel bins (16 kHz, 30 s windows)."""
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": n_mels,
        "sampling_rate": SAMPLE_RATE,
        "hop_length": HOP_LENGTH,
        "chunk_length": CHUNK_SECONDS,
        "n_fft": N_FFT,
        "n_samples": N_SAMPLES,
        "nb_max_frames": N_FRAMES,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }

