"""CTranslate2's ``vocabulary.txt`` and ``tokenizer.json``: Whisper's special ids, the HF tokenizer files.

``vocabulary.txt`` (one token per line, line ``i`` = id ``i``) is what the weights index, so the
special tokens are located there (read, never assumed) and the packaged ``tokenizer.json`` is
checked against it before it is completed with the timestamp tokens it lacks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from batch_job.constants import LANGUAGE_TOKEN_PATTERN
from batch_job.errors import ModelError


def read_vocabulary(path: Path) -> list[str]:
    """The tokens of a ``vocabulary.txt``, one per line (a final newline adds no token)."""
    vocabulary = path.read_text(encoding="utf-8").split("\n")
    if vocabulary and vocabulary[-1] == "":
        vocabulary.pop()
    return vocabulary


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

