"""The files of a cached checkpoint directory: weights, their checksum record, atomic publication.

Shared by everything that writes a checkpoint into the model cache (the CTranslate2 conversion in
:mod:`batch_job.engine.convert_ct2`, the LoRA merge in :mod:`batch_job.engine.adapters`) and by
:mod:`batch_job.engine.models`, which reads the checksum back: a cache directory appears complete
or not at all (:func:`publish_dir`), and the weights' sha256 is computed once and kept next to
them (:func:`write_checksum_file`), stale as soon as the file's size or mtime changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from batch_job.fsutil import atomic_write_text

WEIGHTS_NAME = "model.safetensors"

_SAFETENSORS_DTYPES = {"<f4": "F32", "|i1": "I8", "<i2": "I16", "<i4": "I32", "<f2": "F16", "<u2": "BF16"}
_HASH_CHUNK = 8 * 1024 * 1024


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
