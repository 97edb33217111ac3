"""whisper-batch worker: audio in, Whisper transcripts out, on CPU, CUDA or Inferentia2."""

__version__ = "0.1.0"
