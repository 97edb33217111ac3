"""Whisper's fixed numbers, in one place (as openai/whisper's ``audio.py`` keeps them).

Every Whisper checkpoint shares them: 16 kHz audio, 30 s encoder windows of 3000 mel frames
(10 ms hop), 1500 encoder positions after the stride-2 convolution, timestamp tokens 20 ms apart.
Light on purpose (no imports): the audio front end, the graphs, the decoding loop, the Neuron
compiler and the conversion all read them from here.
"""

SAMPLE_RATE = 16000
"""Hz: what the feature extractor expects."""
N_FFT = 400
"""STFT window (25 ms)."""
HOP_LENGTH = 160
"""STFT hop (10 ms): one mel frame."""
CHUNK_SECONDS = 30
"""Whisper's fixed input length: no encoder window holds more audio than this."""
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
"""480000 samples in one window."""
N_FRAMES = N_SAMPLES // HOP_LENGTH
"""3000 mel frames in one window: the encoder's fixed input length."""
N_AUDIO_CTX = N_FRAMES // 2
"""1500 encoder output positions (after the stride-2 convolution)."""
SECONDS_PER_TIMESTAMP = 0.02
"""Resolution of the timestamp tokens ``<|0.00|>`` .. ``<|30.00|>``."""
JOIN_SLACK_SECONDS = 0.5
"""A decoded segment of a joined window (distant stretches of one file in one row) that overlaps
two of its parts by more than this each ran across the join: it is not kept, and what it covered
is decoded again (a timestamp straying less than this across a join is only noise)."""
MAX_TOKENS_PER_SECOND = 16
MAX_TOKENS_BASE = 32
"""A window stops after ``MAX_TOKENS_BASE + MAX_TOKENS_PER_SECOND x its seconds`` tokens (at most
``max_new_tokens``): speech takes 3-5 tokens a second in English and up to ~12 in languages
written in many tokens per character, so only a repetition loop gets there; it stops there, not at
the cap (224), and the guards retry it as they would at the cap (a 5 s window looping at
temperature 0 took 204 steps). Windows of 12 s and more keep the full cap."""
PROMPT_SLOTS = 4
"""Decoder prompt tokens at most: ``<|sot|> <|lang|> <|task|>`` (+ ``<|notimestamps|>``)."""
LANGUAGE_TOKEN_PATTERN = r"^<\|[a-z]{2,3}\|>$"
"""A language token (``<|en|>``, ``<|yue|>``); they lie strictly between ``<|sot|>`` and ``<|translate|>``."""
NO_SPACE_LANGUAGES = frozenset({"ja", "zh", "yue", "th", "lo", "my"})
"""Languages written without spaces between words: segments join with "" and words split at
Unicode boundaries (openai's list)."""
MULTILINGUAL_VOCAB_MIN = 51865
"""openai's rule: English-only vocabularies have 51864 entries, multilingual ones at least 51865."""


def static_cache_len(max_target_positions: int, max_new_tokens: int) -> int:
    """Static self-attention cache slots: the prompt + ``max_new_tokens``, capped by the model's positions."""
    return min(int(max_target_positions), int(max_new_tokens) + PROMPT_SLOTS)
