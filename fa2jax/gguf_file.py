"""`GGUFFile`: the key-value metadata and tensor table of a GGUF file, its tensor bytes memory-mapped.

The container format (ggml's docs/gguf.md, versions 2 and 3, little-endian): the magic "GGUF", a
uint32 version, uint64 tensor and key counts, the key-value pairs (a string key, a uint32 value
type, the value; arrays are an element type, a uint64 count and the elements), then per tensor its
name, uint32 dimension count, uint64 dimensions (innermost first), uint32 ggml type and uint64
offset into the data section, which starts at the next multiple of `general.alignment` (32).

Why not `gguf.GGUFReader`: it turns every string of the vocabulary into its own numpy view, which
takes 7-14 s for SmolLM2's 98k tokens and merges on our 2-core CPU (this parser: well under a
second). The `gguf` package still does what needs its knowledge: the ggml type table
(`GGML_QUANT_SIZES`) and dequantisation (`gguf.quants.dequantize`, numpy, no torch).
"""
from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# GGUF value type -> (struct code, numpy dtype) of its scalars; 8 is a string, 9 an array.
_SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
            5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64),
            11: ("q", np.int64), 12: ("d", np.float64)}
_STRING, _ARRAY = 8, 9


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'fa2jax[gguf,tokenizers]'") from e
    return gguf


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy (row-major) order: GGUF's dimensions reversed
    raw: np.ndarray  # the stored bytes, uint8 [*shape[:-1], bytes per row], memory-mapped

    def dequantize(self) -> np.ndarray:
        """The values as float32 [*shape], by `gguf.quants.dequantize`."""
        try:
            values = _gguf().quants.dequantize(self.raw, self.qtype)
        except NotImplementedError as e:
            raise ValueError(f"cannot dequantise tensor {self.name!r} of ggml type {self.qtype.name}: {e}") from e
        return np.asarray(values, np.float32).reshape(self.shape)


class GGUFFile:
    """A GGUF file's metadata (`.metadata`: key -> Python value) and tensors (`.tensors`: name -> GGUFTensor)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"no GGUF file at {str(self.path)!r}")
        self._buffer = np.memmap(self.path, np.uint8, mode="r") if self.path.stat().st_size else np.zeros(0, np.uint8)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(self.path)!r} is not a readable GGUF file: {e}") from e

    # ---------------------------------------------------------------------------------- parsing

    def _unpack(self, code: str):
        (value,) = struct.unpack_from("<" + code, self._buffer, self._pos)
        self._pos += struct.calcsize(code)
        return value

    def _string(self) -> str:
        n = self._unpack("Q")
        if self._pos + n > len(self._buffer):
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        text = bytes(self._buffer[self._pos:self._pos + n]).decode("utf-8")
        self._pos += n
        return text

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("I"), self._unpack("Q")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item not in _SCALARS:
                raise ValueError(f"unsupported GGUF array element type {item}")
            dtype = np.dtype(_SCALARS[item][1]).newbyteorder("<")
            values = np.frombuffer(self._buffer, dtype, count, self._pos)
            self._pos += count * dtype.itemsize
            return values.tolist()
        if kind not in _SCALARS:
            raise ValueError(f"unsupported GGUF value type {kind}")
        return self._unpack(_SCALARS[kind][0])

    def _parse(self) -> None:
        gguf = _gguf()
        if bytes(self._buffer[:4]) != _MAGIC:
            raise ValueError(f"the file starts with {bytes(self._buffer[:4])!r}, not {_MAGIC!r}")
        self._pos = 4
        version = self._unpack("I")
        if version not in _VERSIONS:
            raise ValueError(f"GGUF {version=} is not read; versions {_VERSIONS} are (little-endian)")
        num_tensors, num_keys = self._unpack("Q"), self._unpack("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_keys):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("I"))
        infos = []
        for _ in range(num_tensors):
            name = self._string()
            dims = [self._unpack("Q") for _ in range(self._unpack("I"))]
            infos.append((name, dims, gguf.GGMLQuantizationType(self._unpack("I")), self._unpack("Q")))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, qtype, offset in infos:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise ValueError(f"tensor {name!r}: rows of {dims[0]} values do not split into blocks of {block}")
            row_bytes = dims[0] // block * type_size
            shape = tuple(reversed(dims))
            start = data_start + offset
            nbytes = row_bytes * int(np.prod(shape[:-1], dtype=np.int64))
            if start + nbytes > len(self._buffer):
                raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
            raw = self._buffer[start:start + nbytes].reshape(*shape[:-1], row_bytes)
            self.tensors[name] = GGUFTensor(name, qtype, shape, raw)
