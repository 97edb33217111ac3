"""Audio in: any file → 16 kHz mono float32, decoded in blocks with bounded memory.

WAV/FLAC/OGG/MP3 (and the other containers libsndfile knows) are decoded with
:mod:`soundfile` block by block; each block is down-mixed to mono and resampled with a
streaming :class:`soxr.ResampleStream` straight into one preallocated output array, so the
peak memory is the output (4 bytes per output sample, 230 MB per hour) plus a few blocks.

Everything else (m4a, mp4, aac, webm, ... and whatever libsndfile rejects) goes through an
``ffmpeg`` subprocess that writes f32le 16 kHz mono to a pipe, read straight into the output
array. Without ``ffmpeg`` on ``PATH`` those files give :class:`UnsupportedFormatError`.

Failures are specific :mod:`batch_job.errors` classes whose message names the file and the cause:
:class:`EmptyAudioError` (no samples), :class:`CorruptAudioError` (a supported format whose bytes
do not decode), :class:`UnsupportedFormatError`, :class:`TooLongError` (checked from the header
before decoding where the header has a length, and again while decoding).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import soundfile as sf
import soxr

from batch_job.constants import SAMPLE_RATE  # re-exported: load_audio's output rate
from batch_job.errors import (
    AudioError,
    CorruptAudioError,
    EmptyAudioError,
    TooLongError,
    UnsupportedFormatError,
)

log = logging.getLogger(__name__)


BLOCK_SECONDS = 1.0
"""Source audio decoded per block. Small blocks bound memory and lose little on a truncated tail."""

RESAMPLE_QUALITY = "HQ"
"""soxr quality for the streaming resampler."""

TRUNCATION_TOLERANCE_SECONDS = 0.1
"""A file holding less audio than its header promises by more than this is reported truncated."""

#: Extensions that libsndfile cannot read: go straight to ffmpeg.
FFMPEG_ONLY_SUFFIXES = frozenset(
    {".m4a", ".mp4", ".m4b", ".aac", ".webm", ".mkv", ".mka", ".mov", ".wma", ".amr", ".3gp", ".ac3", ".avi"}
)
#: Extensions of formats libsndfile decodes: a decode failure there means a corrupt file.
SOUNDFILE_SUFFIXES = frozenset({".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".w64", ".rf64", ".caf", ".au"})

_FFMPEG_HINT = "install ffmpeg or convert to WAV/FLAC/MP3"
_PIPE_CHUNK_BYTES = 1 << 20
_DEFAULT_FFMPEG_CAPACITY_S = 600.0


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class AudioWarning:
    """Something wrong with a file that still decoded: ``code`` is stable snake_case."""

    code: str
    message: str


@dataclass(frozen=True)
class DecodedAudio:
    """:func:`decode_audio`'s result: ``samples`` (float32, shape ``(n,)``, 16 kHz) and warnings."""

    samples: np.ndarray
    warnings: tuple[AudioWarning, ...] = ()


def load_audio(path: str | os.PathLike[str], *, max_seconds: float | None = None) -> np.ndarray:
    """Decode ``path`` to mono float32 samples at :data:`SAMPLE_RATE` (16 kHz).

    Args:
        path: a local audio file (any container libsndfile or, when on PATH, ffmpeg can read).
        max_seconds: longest duration accepted, in seconds; ``None`` = no limit.

    Returns:
        1-D ``float32`` array of shape ``(n_samples,)`` at 16 kHz, ``n_samples > 0``. Any channel
        count is averaged to mono; any sample rate / bit depth is converted. Samples are finite.
        A truncated file yields what decodes before the damage.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        EmptyAudioError: the file is empty or decodes to zero samples.
        CorruptAudioError: a supported format whose bytes do not decode.
        UnsupportedFormatError: a format we cannot decode (e.g. ``.m4a`` without ffmpeg).
        TooLongError: longer than ``max_seconds`` (from the header before decoding when it has one).
    """
    return decode_audio(path, max_seconds=max_seconds).samples


def decode_audio(path: str | os.PathLike[str], *, max_seconds: float | None = None) -> DecodedAudio:
    """:func:`load_audio`, also saying what was wrong with a file that still decoded.

    Warnings: ``truncated_audio`` when the file holds less audio than its header promises (a
    cut-off upload or copy): what is there is decoded and transcribed, and the caller can say so.
    """
    p = Path(path)
    size = p.stat().st_size  # FileNotFoundError for a missing file is a caller bug, not bad audio
    if size == 0:
        raise EmptyAudioError(f"{p.name}: file is empty (0 bytes)")
    suffix = p.suffix.lower()
    if suffix not in FFMPEG_ONLY_SUFFIXES:
        try:
            info = _open_soundfile(p)
        except _NotSoundfile as exc:
            if _ffmpeg() is None:
                raise _classify_unreadable(p, exc.cause) from None
        else:
            with info as snd:
                return _decode_soundfile(p, snd, max_seconds)
    return DecodedAudio(_decode_ffmpeg(p, max_seconds))


# --------------------------------------------------------------------------- soundfile path


class _NotSoundfile(Exception):
    """libsndfile could not open the file; ``cause`` is its message."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def _open_soundfile(p: Path) -> sf.SoundFile:
    try:
        snd = sf.SoundFile(str(p))
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as exc:
        raise _NotSoundfile(_libsndfile_cause(exc)) from None
    if snd.samplerate <= 0 or snd.channels <= 0:
        snd.close()
        raise _NotSoundfile(f"invalid header (rate {snd.samplerate} Hz, {snd.channels} channels)")
    return snd


def _decode_soundfile(p: Path, snd: sf.SoundFile, max_seconds: float | None) -> DecodedAudio:
    """Block-decode an open SoundFile into a preallocated 16 kHz mono buffer."""
    rate = int(snd.samplerate)
    frames = int(snd.frames) if snd.frames and snd.frames > 0 else 0
    # libsndfile clamps a WAV's length to what the file holds; the header's own promise is
    # read separately so that a cut-off file can be reported.
    promised = (_wav_data_frames(p) if snd.format in ("WAV", "WAVEX") else None) or frames
    if frames == 0 and snd.format in ("WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF"):
        raise EmptyAudioError(f"{p.name}: {snd.format} file has a header but no audio frames")
    _check_too_long(p, frames / rate, max_seconds, from_header=True)
    limit = _max_output_samples(max_seconds)
    capacity = _output_len(frames, rate) + SAMPLE_RATE // 10 if frames else SAMPLE_RATE * 60
    if limit is not None:
        capacity = min(capacity, limit + 1)
    out = _Output(capacity, limit=limit, on_limit=lambda: _too_long_while_decoding(p, max_seconds))
    resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)
    block = max(1024, int(rate * BLOCK_SECONDS))
    buf = np.empty((block, snd.channels), dtype=np.float32)
    decoded_frames = 0
    stopped: str | None = None
    while True:
        try:
            got = snd.read(block, dtype="float32", always_2d=True, out=buf)
        except (sf.SoundFileError, RuntimeError) as exc:
            if decoded_frames == 0:
                raise CorruptAudioError(f"{p.name}: cannot decode {snd.format} audio ({_libsndfile_cause(exc)})") from None
            stopped = _libsndfile_cause(exc)
            log.warning("%s: decoding stopped after %.2f s: %s", p.name, decoded_frames / rate, stopped)
            break
        n = len(got)
        if n == 0:
            break
        decoded_frames += n
        mono = _downmix(got)
        out.append(resampler.resample_chunk(mono) if resampler is not None else mono)
    if resampler is not None:
        out.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    samples = _finish(p, out)
    warnings = ()
    if stopped is not None or promised - decoded_frames > TRUNCATION_TOLERANCE_SECONDS * rate:
        why = f" ({stopped})" if stopped else ""
        warnings = (AudioWarning("truncated_audio", (
            f"{p.name}: the {snd.format} header promises {promised / rate:.2f} s of audio but the file "
            f"holds {decoded_frames / rate:.2f} s{why}; transcribed the audio that is there")),)
    return DecodedAudio(samples, warnings)


def _wav_data_frames(p: Path) -> int | None:
    """Frames a RIFF/WAVE header's ``data`` chunk declares, or ``None`` (no header, streamed size)."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return None
    order = "<" if head[:4] == b"RIFF" else ">"
    pos, block_align = 12, 0
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], struct.unpack(order + "I", head[pos + 4:pos + 8])[0]
        body = pos + 8
        if chunk == b"fmt " and body + 14 <= len(head):
            block_align = struct.unpack(order + "H", head[body + 12:body + 14])[0]
        elif chunk == b"data":
            # 0 and 0xFFFFFFFF are what streaming writers put before they know the length.
            return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
        pos = body + size + (size & 1)
    return None


def _downmix(block: np.ndarray) -> np.ndarray:
    """(frames, channels) float32 → (frames,) float32 mean over channels, NaN/inf zeroed, in [-1, 1]."""
    mono = block[:, 0].copy() if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
    np.nan_to_num(mono, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(mono, -1.0, 1.0, out=mono)
    return mono


def _output_len(frames: int, rate: int) -> int:
    return int(math.ceil(frames * SAMPLE_RATE / rate))


# --------------------------------------------------------------------------- ffmpeg path


def _ffmpeg() -> str | None:
    return shutil.which("ffmpeg")


def _decode_ffmpeg(p: Path, max_seconds: float | None) -> np.ndarray:
    """Decode with an ffmpeg subprocess writing f32le 16 kHz mono on stdout."""
    exe = _ffmpeg()
    if exe is None:
        raise UnsupportedFormatError(
            f"{p.name}: {p.suffix.lower() or 'this format'} needs ffmpeg, which is not on PATH; {_FFMPEG_HINT}"
        )
    duration = _ffprobe_duration(p)
    if duration is not None:
        _check_too_long(p, duration, max_seconds, from_header=True)
    limit = _max_output_samples(max_seconds)
    capacity = int((duration or _DEFAULT_FFMPEG_CAPACITY_S) * SAMPLE_RATE * 1.01) + SAMPLE_RATE
    if limit is not None:
        capacity = min(capacity, limit + 1)
    cmd = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(p),
           "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "-"]  # fmt: skip
    out = _Output(capacity, limit=limit, on_limit=lambda: _too_long_while_decoding(p, max_seconds))
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        try:
            _read_f32_pipe(proc.stdout, out)
        except AudioError:
            proc.kill()
            raise
        finally:
            proc.stdout.close()
            rc = proc.wait()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace").strip()
    if rc != 0:
        cause = stderr.splitlines()[-1] if stderr else f"exit code {rc}"
        if out.n == 0:
            raise _classify_ffmpeg_failure(p, cause)
        log.warning("%s: ffmpeg stopped after %.2f s: %s", p.name, out.n / SAMPLE_RATE, cause)
    return _finish(p, out)


def _read_f32_pipe(pipe: IO[bytes], out: _Output) -> None:
    """Read little-endian float32 samples from ``pipe`` into ``out`` until EOF."""
    carry = b""
    while True:
        chunk = pipe.read(_PIPE_CHUNK_BYTES)
        if not chunk:
            return
        if carry:
            chunk = carry + chunk
        usable = len(chunk) - len(chunk) % 4
        carry = chunk[usable:]
        if usable:
            samples = np.frombuffer(chunk, dtype="<f4", count=usable // 4).astype(np.float32, copy=True)
            np.nan_to_num(samples, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
            np.clip(samples, -1.0, 1.0, out=samples)
            out.append(samples)


def _ffprobe_duration(p: Path) -> float | None:
    exe = shutil.which("ffprobe")
    if exe is None:
        return None
    cmd = [exe, "-v", "error", "-show_entries", "format=duration", "-of", "json", str(p)]
    try:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
        value = float(json.loads(res.stdout or b"{}").get("format", {}).get("duration"))
    except (OSError, subprocess.SubprocessError, ValueError, TypeError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _classify_ffmpeg_failure(p: Path, cause: str) -> AudioError:
    lowered = cause.lower()
    if "invalid data" in lowered or "could not find codec" in lowered or "unknown" in lowered:
        if p.suffix.lower() in SOUNDFILE_SUFFIXES | FFMPEG_ONLY_SUFFIXES:
            return CorruptAudioError(f"{p.name}: cannot decode audio ({cause})")
        return UnsupportedFormatError(f"{p.name}: not a recognised audio format ({cause})")
    if "does not contain any stream" in lowered or "output file #0 does not contain" in lowered:
        return UnsupportedFormatError(f"{p.name}: no audio stream that ffmpeg can decode ({cause})")
    return CorruptAudioError(f"{p.name}: ffmpeg cannot decode the file ({cause})")


# --------------------------------------------------------------------------- shared helpers


class _Output:
    """A growable float32 buffer preallocated to the expected length; grows only if the header lied."""

    def __init__(self, capacity: int, *, limit: int | None, on_limit: Callable[[], None]) -> None:
        self.buf = np.empty(max(1, capacity), dtype=np.float32)
        self.n = 0
        self.limit = limit
        self.on_limit = on_limit

    def append(self, samples: np.ndarray) -> None:
        k = len(samples)
        if k == 0:
            return
        end = self.n + k
        if self.limit is not None and end > self.limit:
            self.on_limit()
        if end > len(self.buf):
            grow = max(end, int(len(self.buf) * 1.25) + SAMPLE_RATE)
            if self.limit is not None:
                grow = min(grow, self.limit + 1)
            self.buf.resize(grow, refcheck=False)
        self.buf[self.n : end] = samples
        self.n = end

    def result(self) -> np.ndarray:
        """The decoded samples; the slack is released in place (realloc), never copied."""
        if self.n != len(self.buf):
            self.buf.resize(self.n, refcheck=False)
        return self.buf


def _finish(p: Path, out: _Output) -> np.ndarray:
    if out.n == 0:
        raise EmptyAudioError(f"{p.name}: file decodes to zero audio samples")
    return out.result()


def _max_output_samples(max_seconds: float | None) -> int | None:
    """Output samples allowed while decoding: ``max_seconds`` plus 50 ms of resampler slack."""
    if max_seconds is None:
        return None
    return int(max_seconds * SAMPLE_RATE) + SAMPLE_RATE // 20


def _check_too_long(p: Path, seconds: float, max_seconds: float | None, *, from_header: bool) -> None:
    if max_seconds is not None and seconds > max_seconds:
        where = "per its header" if from_header else "decoded"
        raise TooLongError(f"{p.name}: audio is {seconds:.1f} s ({where}), longer than the {max_seconds:.1f} s limit")


def _too_long_while_decoding(p: Path, max_seconds: float | None) -> None:
    raise TooLongError(f"{p.name}: audio is longer than the {max_seconds:.1f} s limit (found while decoding)")


def _libsndfile_cause(exc: BaseException) -> str:
    """libsndfile's message without its misleading 'Error opening ...: ' prefix."""
    text = str(exc).strip()
    if ": " in text and text.startswith("Error"):
        text = text.split(": ", 1)[1]
    if "does not exist" in text or "not a regular file" in text:
        text = "format not recognised"
    return text.splitlines()[0] if text else type(exc).__name__


_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"RIFF", 0, "WAV"),
    (b"RF64", 0, "WAV"),
    (b"fLaC", 0, "FLAC"),
    (b"OggS", 0, "OGG"),
    (b"ID3", 0, "MP3"),
    (b"FORM", 0, "AIFF"),
)
_FFMPEG_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"ftyp", 4, "MP4/M4A"),
    (b"\x1a\x45\xdf\xa3", 0, "WebM/Matroska"),
    (b"\x30\x26\xb2\x75", 0, "ASF/WMA"),
    (b"#!AMR", 0, "AMR"),
)


def _sniff(p: Path) -> tuple[str | None, str | None]:
    """(soundfile format, ffmpeg-only container) recognised from the first bytes, if any."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return None, None
    sndfmt = next((name for magic, off, name in _MAGIC if head[off : off + len(magic)] == magic), None)
    ffmt = next((name for magic, off, name in _FFMPEG_MAGIC if head[off : off + len(magic)] == magic), None)
    return sndfmt, ffmt


def _classify_unreadable(p: Path, cause: str) -> AudioError:
    """The error for a file libsndfile cannot open when ffmpeg is not available."""
    sndfmt, ffmt = _sniff(p)
    suffix = p.suffix.lower()
    if ffmt is not None:
        return UnsupportedFormatError(
            f"{p.name}: {ffmt} audio needs ffmpeg, which is not on PATH; {_FFMPEG_HINT}"
        )
    if sndfmt is not None:
        return CorruptAudioError(f"{p.name}: looks like {sndfmt} but cannot be decoded ({cause})")
    if suffix in SOUNDFILE_SUFFIXES:
        return CorruptAudioError(f"{p.name}: not a valid {suffix[1:].upper()} file ({cause})")
    what = suffix or "this file"
    return UnsupportedFormatError(
        f"{p.name}: {what} is not a format libsndfile reads ({cause}) and ffmpeg is not on PATH; {_FFMPEG_HINT}"
    )
