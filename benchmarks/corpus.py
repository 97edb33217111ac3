"""The benchmarks' shared corpus: the real clips of ../shared/audio, the corpora built from them, and scoring.

* :func:`read_manifest`: the clips (``WHISPER_BATCH_SHARED_AUDIO`` overrides the folder);
* :func:`build_long_file` / :func:`build_odd_corpus`: the 11-minute file and the odd-formats
  corpus, written once into the cache dir (content-addressed names);
* :func:`ct2_dir_for`: the CTranslate2 directory faster-whisper loads (same weights as ours);
* :func:`error_rates`: pooled WER/CER, Whisper's normalizers; :func:`machine_info`: what a table
  records about the machine.

Every benchmark imports these from here, so each measures the same audio and scores it the same way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_AUDIO = Path(os.environ.get("WHISPER_BATCH_SHARED_AUDIO", REPO.parent / "shared" / "audio"))
CER_LANGUAGES = frozenset({"ja", "zh", "yue"})
LONG_GAP_SECONDS = 1.0
SAMPLE_RATE = 16000


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from batch_job.settings import usable_cores

    usable = usable_cores()
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "ctranslate2": _version("ctranslate2"),
        "transformers": _version("transformers"),
        "faster-whisper": _version("faster-whisper"),
        "loadavg_start": list(os.getloadavg()),
    }


def read_manifest(audio_dir: Path) -> list[dict]:
    rows = []
    for line in (audio_dir / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            row["path"] = str(audio_dir / row["audio"])
            rows.append(row)
    return rows


def ct2_dir_for(model: str, hf_dir: Path, cache_dir: Path, explicit: str | None) -> Path:
    """The CTranslate2 directory faster-whisper loads: the packaged dir, or parts joined once into the cache."""
    if explicit:
        return Path(explicit)
    from batch_job.engine.models import PACKAGED_MODELS, packaged_source_files

    if model not in PACKAGED_MODELS:
        raise SystemExit(f"--model {model!r} is not packaged: pass --ct2-dir for the faster-whisper systems")
    files = packaged_source_files(PACKAGED_MODELS[model])
    if len(files) == 1 and files[0].name == "model.bin":
        return files[0].parent
    # Split model.bin: concatenate once into <cache>/<hf-dir-name>-ct2/ (name is content-addressed).
    out = cache_dir / f"{hf_dir.name}-ct2"
    expected = sum(f.stat().st_size for f in files)
    if (out / "model.bin").is_file() and (out / "model.bin").stat().st_size == expected and (out / "config.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=cache_dir))
    with open(tmp / "model.bin", "wb") as dst:
        for f in files:
            with open(f, "rb") as src:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    for side in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json", "preprocessor_config.json"):
        if (files[0].parent / side).is_file():
            (tmp / side).write_bytes((files[0].parent / side).read_bytes())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def build_long_file(clips: list[dict], cache_dir: Path) -> dict:
    """Concatenate ``clips`` (1 s of silence between) into one cached 16 kHz FLAC; its manifest row."""
    import numpy as np
    import soundfile as sf

    key = hashlib.sha256(
        json.dumps([[c["audio"], os.path.getsize(c["path"])] for c in clips] + [LONG_GAP_SECONDS]).encode()
    ).hexdigest()[:12]
    out_dir = cache_dir / "bench-audio"
    out = out_dir / f"long-{len(clips)}clips-{key}.flac"
    if not out.is_file():
        from batch_job.audio import load_audio

        out_dir.mkdir(parents=True, exist_ok=True)
        gap = np.zeros(int(LONG_GAP_SECONDS * SAMPLE_RATE), np.float32)
        parts = []
        for i, c in enumerate(clips):
            if i:
                parts.append(gap)
            parts.append(load_audio(c["path"]))
        audio = np.clip(np.concatenate(parts), -1.0, 1.0)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.flac")
        sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        os.replace(tmp, out)
    seconds = sf.info(str(out)).duration
    return {
        "audio": out.name,
        "path": str(out),
        "text": " ".join(c["text"] for c in clips),
        "language": "en",
        "seconds": seconds,
    }


# The odd-formats corpus: (name, sample rate, channels, soundfile format, subtype, suffix). Every
# English clip becomes one of these in turn, so each format holds a fifth of the voices.
ODD_FORMATS = (
    ("wav-8k-u8", 8000, 1, "WAV", "PCM_U8", ".wav"),        # telephone band, 8-bit unsigned
    ("wav-48k-6ch", 48000, 6, "WAV", "PCM_16", ".wav"),     # 5.1: speech in C, quieter in L/R/surround
    ("flac-44k-stereo", 44100, 2, "FLAC", "PCM_24", ".flac"),  # L/R at different levels
    ("mp3-22k", 22050, 1, "MP3", "MPEG_LAYER_III", ".mp3"),
    ("ogg-32k-stereo", 32000, 2, "OGG", "VORBIS", ".ogg"),
)
_CHANNEL_GAINS = {1: (1.0,), 2: (0.9, 0.5), 6: (0.5, 0.5, 1.0, 0.0, 0.3, 0.3)}


def build_odd_corpus(clips: list[dict], cache_dir: Path) -> list[dict]:
    """Each clip re-encoded (from its 16 kHz decode) into one of :data:`ODD_FORMATS`, round robin,
    cached under ``<cache>/bench-audio/odd-<key>/``; manifest rows with a ``format`` field."""
    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    key = hashlib.sha256(json.dumps([[c["audio"], os.path.getsize(c["path"])] for c in clips]
                                    + [list(map(list, ODD_FORMATS))]).encode()).hexdigest()[:12]
    out_dir = cache_dir / "bench-audio" / f"odd-{len(clips)}clips-{key}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    audio_lib = None
    for i, c in enumerate(clips):
        name, rate, channels, fmt, subtype, suffix = ODD_FORMATS[i % len(ODD_FORMATS)]
        out = out_dir / f"{Path(c['audio']).stem}.{name}{suffix}"
        if not out.is_file():
            if audio_lib is None:
                from batch_job import audio as audio_lib
            mono = audio_lib.load_audio(c["path"])
            from math import gcd

            g = gcd(rate, SAMPLE_RATE)
            resampled = resample_poly(mono, rate // g, SAMPLE_RATE // g).astype(np.float32)
            gains = np.asarray(_CHANNEL_GAINS[channels], np.float32)
            data = np.clip(resampled[:, None] * gains[None, :], -1.0, 1.0)
            tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{suffix}")
            sf.write(tmp, data if channels > 1 else data[:, 0], rate, format=fmt, subtype=subtype)
            os.replace(tmp, out)
        rows.append({**c, "audio": out.name, "path": str(out), "format": name})
    return rows


def error_rates(rows: list[dict], multilingual: bool) -> dict[str, Any]:
    """Pooled WER/CER over the set: {'en': {...}, 'other': {...}, 'cjk': {...}}."""
    import jiwer
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    english, basic = EnglishTextNormalizer(), BasicTextNormalizer()
    groups: dict[str, tuple[list[str], list[str]]] = {"en": ([], []), "other": ([], []), "cjk": ([], [])}
    for r in rows:
        lang = r["language"]
        if lang == "en":
            key, ref, hyp = "en", english(r["text"]), english(r["hyp"])
        elif lang in CER_LANGUAGES:
            key = "cjk"
            ref, hyp = re.sub(r"\s+", "", basic(r["text"])), re.sub(r"\s+", "", basic(r["hyp"]))
        else:
            key, ref, hyp = "other", basic(r["text"]), basic(r["hyp"])
        if not ref.strip():
            continue
        groups[key][0].append(ref)
        groups[key][1].append(hyp)
    out: dict[str, Any] = {}
    for key, (refs, hyps) in groups.items():
        if not refs:
            continue
        rate = jiwer.cer(refs, hyps) if key == "cjk" else jiwer.wer(refs, hyps)
        out[key] = {"rate": rate, "files": len(refs), "metric": "CER" if key == "cjk" else "WER"}
    return out
