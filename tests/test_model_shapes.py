"""Other Whisper shapes through the same loop: distil-whisper (2 decoder layers) and large-v3-turbo
(128 mel bins, a decoder much shallower than its encoder), as small random-weight checkpoints
with the real multilingual tokenizer: their weights cannot be downloaded here, their shapes can."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from batch_job.engine.decoding import DecodingOptions  # noqa: E402
from batch_job.settings import Settings  # noqa: E402
from tests.conftest import load_clip  # noqa: E402

SHAPES = {
    # name: (num_mel_bins, encoder_layers, decoder_layers)
    "distil-like": (80, 4, 2),
    "turbo-like": (128, 4, 1),
}
MAX_TOKENS = 12


def checkpoint(tmp_path_factory, model_cache_dir, name: str):
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    from batch_job.engine.models import resolve_checkpoint

    base = resolve_checkpoint("base", model_cache_dir)
    source = WhisperConfig.from_pretrained(base)
    n_mels, enc_layers, dec_layers = SHAPES[name]
    config = WhisperConfig(
        vocab_size=source.vocab_size, num_mel_bins=n_mels, d_model=64, encoder_layers=enc_layers,
        decoder_layers=dec_layers, encoder_attention_heads=2, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id,
        decoder_start_token_id=source.decoder_start_token_id,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(base)
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out)
    WhisperTokenizerFast.from_pretrained(base).save_pretrained(out)
    WhisperFeatureExtractor.from_pretrained(base, feature_size=n_mels).save_pretrained(out)
    return out


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_decodes_and_round_trips_through_the_graph_cache(name, tmp_path_factory, model_cache_dir, tmp_path):
    from batch_job.engine.loading import load_engine
    from batch_job.transcribe import Transcriber

    path = checkpoint(tmp_path_factory, model_cache_dir, name)
    n_mels, _, dec_layers = SHAPES[name]
    settings = Settings(model=str(path), cache_dir=str(tmp_path), device="cpu", batch_size=2,
                        max_new_tokens=MAX_TOKENS, threads=1)
    cold = load_engine(settings)
    assert cold.bundle.source == "model" and cold.bundle.dims.layers == dec_layers
    audio = [load_clip("jfk.flac", seconds=5), load_clip("librispeech_61-70968-0000.flac", seconds=8)]
    mel = cold.log_mel(audio, 2)
    assert tuple(mel.shape) == (2, n_mels, 3000)
    options = DecodingOptions(max_new_tokens=MAX_TOKENS, language="en")
    first, _ = cold.decode(audio, options)
    assert len(first) == 2 and all(len(r.tokens) <= MAX_TOKENS for r in first)

    warm = load_engine(settings)  # saved by the cold load: graphs and side data from the cache
    assert warm.bundle.source == "cache" and warm.bundle.dims.layers == dec_layers
    again, _ = warm.decode(audio, options)
    assert [r.tokens for r in again] == [r.tokens for r in first]

    joined = np.concatenate(audio)
    transcript = Transcriber(warm, settings).transcribe(joined, language="en")
    assert transcript.duration == pytest.approx(len(joined) / 16000, abs=0.01)  # random weights: any text
