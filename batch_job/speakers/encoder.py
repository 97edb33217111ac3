"""The GE2E voice encoder whose weights ship in the ``resemblyzer`` wheel, run on the engine's torch.

``resemblyzer`` is a dependency of the ``speakers`` extra for its ``pretrained.pt`` (17 MB) only:
the file is found with :func:`importlib.util.find_spec`, the package is never imported (its
import pulls librosa and webrtcvad), and the state dict is loaded with ``weights_only=True``
into :class:`VoiceEncoder`, a module of ours with the same layers. The front end is
resemblyzer's, re-done in torch: a 40-band Slaney mel power spectrogram (not log) of 25 ms Hann
windows every 10 ms at 16 kHz (librosa's ``melspectrogram`` defaults: centred frames,
zero-padded), computed on the encoder's device. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from batch_job.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# --------------------------------------------------------------------------- constants
WEIGHTS_PACKAGE = "resemblyzer"
WEIGHTS_FILE = "pretrained.pt"
SAMPLE_RATE = 16000
MEL_N_FFT = 400
"""25 ms windows."""
MEL_HOP = 160
"""10 ms hop: one frame."""
MEL_BANDS = 40
HIDDEN = 256
EMBEDDING = 256
LAYERS = 3
PARTIAL_FRAMES = 160
"""Frames in one partial utterance (1.6 s): what the encoder was trained on."""
TARGET_DBFS = -30.0
"""resemblyzer's volume normalisation target (raised only, never lowered)."""


def weights_path() -> Path:
    """``pretrained.pt`` inside the installed ``resemblyzer`` package (not imported).

    Raises :class:`ConfigError` when the ``speakers`` extra is not installed.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / WEIGHTS_FILE
        if path.is_file():
            return path
    raise ConfigError(
        "speaker labels need the voice encoder weights of the 'speakers' extra: pip install 'whisper-batch[speakers]'"
    )


def slaney_mel_filters(sample_rate: int = SAMPLE_RATE, n_fft: int = MEL_N_FFT, n_mels: int = MEL_BANDS) -> np.ndarray:
    """Slaney-style mel filterbank ``[n_mels, n_fft // 2 + 1]`` float32, area-normalised
    (librosa's ``filters.mel`` defaults: fmin 0, fmax sr/2, ``htk=False``, ``norm='slaney'``)."""
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        hz = np.asarray(hz, dtype=np.float64)
        return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, hz / f_sp)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)

    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)


def normalize_volume(audio: np.ndarray, speech: np.ndarray) -> np.ndarray:
    """``audio`` scaled so that its ``speech`` samples (bool mask) reach -30 dBFS RMS; never made quieter."""
    voiced = audio[speech] if speech.any() else audio
    rms = float(np.sqrt(np.mean(np.square(voiced, dtype=np.float64)))) if len(voiced) else 0.0
    if rms <= 0.0:
        return audio
    gain_db = TARGET_DBFS - 20.0 * np.log10(rms)
    return audio if gain_db <= 0 else (audio * np.float32(10.0 ** (gain_db / 20.0))).astype(np.float32)


def _build_module():
    import torch
    from torch import nn

    class VoiceEncoder(nn.Module):
        """GE2E speaker encoder: ``mels [N, T, 40] -> embeddings [N, 256]``, ReLU'd and L2-normalised."""

        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(MEL_BANDS, HIDDEN, LAYERS, batch_first=True)
            self.linear = nn.Linear(HIDDEN, EMBEDDING)

        def forward(self, mels: torch.Tensor) -> torch.Tensor:
            _, (hidden, _) = self.lstm(mels)
            raw = torch.relu(self.linear(hidden[-1]))
            return raw / torch.linalg.vector_norm(raw, dim=1, keepdim=True).clamp_min(1e-8)

    return VoiceEncoder


class SpeakerEncoder:
    """The loaded encoder and its mel front end on one torch device (``cpu`` or ``cuda``)."""

    def __init__(self, module: torch.nn.Module, filters: torch.Tensor, device: torch.device) -> None:
        self.module = module
        self.filters = filters
        self.device = device

    @classmethod
    def load(cls, device: str = "cpu") -> SpeakerEncoder:
        """Load ``pretrained.pt`` on ``device`` (``neuron`` runs the small encoder on the host CPU)."""
        import torch

        path = weights_path()
        torch_device = torch.device("cuda" if device == "cuda" else "cpu")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in checkpoint["model_state"].items() if k.startswith(("lstm.", "linear."))}
            module = _build_module()()
            module.load_state_dict(state, strict=True)
        except (OSError, KeyError, RuntimeError) as exc:
            raise ModelError(f"voice encoder weights {path} could not be loaded: {exc}") from None
        module.eval().to(torch_device)
        filters = torch.from_numpy(slaney_mel_filters()).to(torch_device)
        return cls(module, filters, torch_device)

    def mel(self, audio: np.ndarray) -> torch.Tensor:
        """Mel power spectrogram ``[..., T, 40]`` float32 of ``audio`` ``[..., samples]`` (16 kHz mono),
        ``T = samples // 160 + 1``."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).to(self.device)
        window = torch.hann_window(MEL_N_FFT, device=self.device)
        spec = torch.stft(x, MEL_N_FFT, MEL_HOP, window=window, center=True, pad_mode="constant", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # [..., 201, T]
        return (self.filters @ power).transpose(-1, -2).contiguous()

    def embed(self, partials: np.ndarray, *, batch: int = 256) -> np.ndarray:
        """Embeddings ``[N, 256]`` float32 (unit length) of ``partials`` ``[N, 25600]``: 1.6 s of 16 kHz
        audio each, ``batch`` at a time through the mel front end and the LSTM."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, partials.shape[0], batch):
                mels = self.mel(partials[i : i + batch])[:, :PARTIAL_FRAMES]
                out.append(self.module(mels).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, EMBEDDING), np.float32)
