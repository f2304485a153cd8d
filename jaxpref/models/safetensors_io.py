"""The safetensors file format, read and written one tensor at a time.

``safetensors``' own readers memory-map the file: pages of a mapping that have been read count in the
process's RSS for as long as it stays open, which for a sharded checkpoint read variable by variable is
the whole checkpoint a second time; its writers build a whole file in memory. Here a tensor is read into
a fresh (page-aligned) array with ordinary file reads, and a file is written header first, then one
tensor at a time. The format (8-byte header length, JSON header, little-endian data) is safetensors'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxpref.errors import ModelError

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors dtype names (little-endian data) <-> numpy dtypes.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_SAFETENSORS_NAMES = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit
_IO_CHUNK = 1 << 30  # one read()/write() call moves at most ~2 GiB on Linux
# On CPU, jax.device_put(..., may_alias=True) adopts a host array this aligned instead of copying it.
_HOST_ALIGN = 4096


@dataclasses.dataclass(frozen=True)
class _TensorEntry:
    """Where one tensor's bytes lie in a safetensors file."""

    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(file: str) -> dict[str, _TensorEntry]:
    """Tensor name -> entry for one safetensors file (reads only the header)."""
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= _MAX_HEADER_BYTES:
            raise ModelError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ModelError(f"{file}: not a safetensors file (header is not JSON: {e})") from e
        if not isinstance(header, dict):
            raise ModelError(f"{file}: not a safetensors file (header is not a JSON object)")
        size = os.fstat(f.fileno()).st_size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ModelError(f"{file}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        shape = tuple(int(d) for d in info["shape"])
        start, end = (8 + n + int(o) for o in info["data_offsets"])
        if end - start != math.prod(shape) * dtype.itemsize or not 8 + n <= start <= end <= size:
            raise ModelError(f"{file}: tensor {name} has data offsets that do not fit its shape or the file")
        entries[name] = _TensorEntry(file, dtype, shape, start, end)
    return entries


class SafetensorsReader:
    """Lazy tensor-by-tensor access to a single-file or sharded (indexed) safetensors checkpoint.

    ``get`` reads one tensor into a fresh (page-aligned, see ``host_buffer``) numpy array with ordinary
    file reads: nothing is memory-mapped, so a tensor's memory is freed with the array and no file pages
    accumulate in the RSS.
    """

    def __init__(self, files: dict[str, str]):
        self._files = files  # tensor name -> file
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self._entries: dict[str, dict[str, _TensorEntry]] = {}  # file -> its header

    @classmethod
    def for_file(cls, file: str) -> SafetensorsReader:
        entries = read_safetensors_header(file)
        reader = cls(dict.fromkeys(entries, file))
        reader._entries[file] = entries
        return reader

    @classmethod
    def for_checkpoint(cls, path: str) -> SafetensorsReader:
        """Reader over ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""
        index_path = os.path.join(path, SAFETENSORS_INDEX)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            return cls({k: os.path.join(path, v) for k, v in weight_map.items()})
        if os.path.isfile(os.path.join(path, SAFETENSORS_NAME)):
            return cls.for_file(os.path.join(path, SAFETENSORS_NAME))
        raise ModelError(
            f"{path}: no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX} (only safetensors checkpoints load; "
            "convert .bin files with transformers' save_pretrained)"
        )

    def keys(self) -> set[str]:
        return set(self._files)

    def entry(self, name: str) -> _TensorEntry:
        """The dtype, shape and file location of tensor ``name`` (parses its file's header once)."""
        file = self._files[name]
        if file not in self._entries:
            self._entries[file] = read_safetensors_header(file)
        if name not in self._entries[file]:
            raise ModelError(f"{file}: no tensor {name} (the index lists it in this file)")
        return self._entries[file][name]

    def get(self, name: str) -> np.ndarray:
        e = self.entry(name)
        if e.file not in self._handles:
            handle = open(e.file, "rb", buffering=0)  # noqa: SIM115 (closed by __exit__)
            self._handles[e.file] = self._stack.enter_context(handle)
        f = self._handles[e.file]
        out = host_buffer(e.shape, e.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        f.seek(e.start)
        done = 0
        while done < len(buf):
            n = f.readinto(buf[done : done + _IO_CHUNK])
            if not n:
                raise ModelError(f"{e.file}: file ends inside tensor {name}")
            done += n
        return out

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def host_buffer(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised host array with page-aligned data: on CPU ``jax.device_put(a, may_alias=True)``
    uses it in place (numpy's own large arrays are 16-byte aligned, and JAX copies those)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _HOST_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _HOST_ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def safetensors_header(
    tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]], metadata: dict[str, str] | None = None
) -> bytes:
    """The header (length + JSON, padded to 8 bytes) of a safetensors file holding ``tensors`` in order."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dt in tensors:
        if dt not in _SAFETENSORS_NAMES:
            raise ModelError(f"tensor {name}: dtype {dt} has no safetensors name")
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[dt],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_safetensors(
    tensors: Sequence[tuple[str, tuple[int, ...], Any, Any]], out_dir: str, *, base: str, max_shard_size: int
) -> None:
    """Write (name, shape, dtype, fetch) tensors as ``{base}.safetensors`` or shards plus an index.

    Each shard's header is written first (names, shapes and dtypes are known up front), then each
    tensor is fetched (``fetch()`` returns the numpy array), written and dropped: at most one tensor
    sits in host memory, whatever ``max_shard_size``. Only process 0 writes (all processes fetch, in
    the same order, which may gather across hosts).
    """
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dt, _) in enumerate(tensors):
        nbytes = math.prod(shape) * np.dtype(dt).itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    weight_map, total = {}, 0
    for s, idx in enumerate(shards):
        fname = f"{base}.safetensors" if len(shards) == 1 else f"{base}-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        # Widest dtypes first, as safetensors lays files out: every tensor's data stays aligned.
        idx = sorted(idx, key=lambda i: -np.dtype(tensors[i][2]).itemsize)
        entries = [(tensors[i][0], tuple(tensors[i][1]), np.dtype(tensors[i][2])) for i in idx]
        with open(os.path.join(out_dir, fname), "wb") if writer else contextlib.nullcontext() as f:
            if writer:
                f.write(safetensors_header(entries, {"format": "pt"}))
            for i, (name, shape, dt) in zip(idx, entries):
                array = np.asarray(tensors[i][3](), dtype=dt, order="C")  # copies to convert or to lay out a transpose
                if array.shape != shape:
                    raise ModelError(f"tensor {name}: fetched shape {array.shape}, expected {shape}")
                if writer:
                    data = memoryview(array.reshape(-1).view(np.uint8))
                    for start in range(0, len(data), _IO_CHUNK):
                        f.write(data[start : start + _IO_CHUNK])
                total += array.nbytes
                weight_map[name] = fname
                del array
    if writer and len(shards) > 1:
        with open(os.path.join(out_dir, f"{base}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
