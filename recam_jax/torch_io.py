"""Reading and writing PyTorch weight files safely, one tensor at a time.

Every converter (DiT, VAE) goes through this module so that they share one set of guarantees:
- a pickle (`.ckpt`, `.pth`) is read with `torch.load(weights_only=True)`: a checkpoint from the
  internet can never execute code here; anything beyond tensors is refused with a clear error;
- tensors are read lazily (safetensors `safe_open`, `torch.load(mmap=True)` map the file) and
  written one at a time (`save_state_dict` takes `LazyTensor`s: shapes and dtypes first, bytes when
  written); a tensor read is copied out of the mapping and the mapping's pages handed back
  (`_MappedFile`), so a file-to-file conversion holds about one tensor at a time, not the input;
- a missing or unexpected key or a wrong shape raises `CheckpointError` listing all of them, before
  anything is written.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import io
import json
import mmap
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from recam_jax import storage

PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")


class CheckpointError(ValueError):
    """A weight file that cannot be used as asked: names the file and what is wrong."""


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "Reading or writing PyTorch weights needs torch: pip install -e '.[torch]'"
        ) from e
    return torch


def tensor_to_numpy(tensor) -> np.ndarray:
    """A torch tensor as a numpy array of the same dtype (bfloat16 through ml_dtypes)."""
    torch = _torch()
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def numpy_to_tensor(array: np.ndarray):
    """A numpy array as a torch tensor of the same dtype (bfloat16 through ml_dtypes)."""
    torch = _torch()
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch tensors must own writable memory
        array = array.copy()
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


# safetensors' dtype names (https://github.com/huggingface/safetensors, format.md).
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor known by shape and dtype whose bytes are produced only when written (`load()`)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @classmethod
    def of(cls, array: np.ndarray) -> "LazyTensor":
        return cls(tuple(array.shape), np.dtype(array.dtype), lambda: array)


class LazyStateDict(Mapping):
    """A read-only `name -> np.ndarray` view of a weight file; each tensor is read when asked for.

    `shapes` and `dtypes` are known without reading; `metadata` is the safetensors header's
    `__metadata__` (empty for pickles)."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype], read_fn,
                 metadata: Mapping[str, str] | None = None):
        self.path = path
        self.shapes = shapes
        self.dtypes = dtypes
        self.metadata = dict(metadata or {})
        self._read = read_fn

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.shapes:
            raise KeyError(f"{key!r} is not in {self.path}")
        return self._read(key)

    def __contains__(self, key) -> bool:  # Mapping's would read the tensor
        return key in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def lazy(self, key: str) -> LazyTensor:
        return LazyTensor(self.shapes[key], self.dtypes[key], lambda: self[key])


class _MappedFile:
    """Where this process maps a weight file (Linux: /proc/self/maps), to copy tensors out of it and
    hand their pages back.

    A file mapped by safetensors or `torch.load(mmap=True)` keeps every page read resident in the
    process (it counts in its RSS) until the mapping is closed, at the end: a conversion would hold
    the whole input besides what it writes. `copy` copies a tensor out and drops its pages from the
    mapping (`madvise(MADV_DONTNEED)`: the pages are clean copies of the file, read again from it if
    touched again). Only addresses inside the file's own mappings are released, never other
    memory; elsewhere than Linux nothing is released."""

    def __init__(self, path: str):
        self.ranges = storage.mapped_ranges(path)

    def copy(self, tensor) -> np.ndarray:
        """The tensor as a numpy array of its own, its storage's pages handed back."""
        array = np.array(tensor_to_numpy(tensor))
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        page = mmap.PAGESIZE
        for lo, hi in self.ranges:  # mappings start and end on page boundaries
            first, last = max(lo, start - start % page), min(hi, end + (-end % page))
            if first < last:
                _madvise(first, last - first, mmap.MADV_DONTNEED)
        return array


def _madvise(address: int, length: int, advice: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) != 0:
        raise OSError(ctypes.get_errno(), f"madvise({address:#x}, {length})")


def _open_safetensors_files(path: str, files: list[str]) -> LazyStateDict:
    from safetensors import safe_open

    shapes, dtypes, owner, metadata = {}, {}, {}, {}  # per tensor: shape, dtype, (open file, its mapping)
    for file in files:
        try:
            local = storage.local_copy_until_exit(file)
            handle = safe_open(local, framework="pt")  # safetensors maps local files
            mapped = _MappedFile(local)
            names = list(handle.keys())
            metadata.update(handle.metadata() or {})
            for name in names:
                tensor_slice = handle.get_slice(name)
                shapes[name] = tuple(tensor_slice.get_shape())
                dtypes[name] = np.dtype(SAFETENSORS_DTYPES[tensor_slice.get_dtype()])
                owner[name] = handle, mapped
            # Touch the last tensor: a truncated file fails here, not halfway through a conversion.
            if names:
                mapped.copy(handle.get_tensor(names[-1]))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    return LazyStateDict(path, shapes, dtypes, lambda key: owner[key][1].copy(owner[key][0].get_tensor(key)), metadata)


def _open_safetensors_index(index_path: str) -> LazyStateDict:
    try:
        weight_map = storage.read_json(index_path)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from e
    folder = storage.parent(index_path)
    files = sorted({storage.join(folder, name) for name in weight_map.values()})
    missing = [f for f in files if not storage.exists(f)]
    if missing:
        raise CheckpointError(f"{index_path}: shard files listed in the index are missing: {missing}")
    return _open_safetensors_files(index_path, files)


def _open_pickle(path: str) -> LazyStateDict:
    torch = _torch()
    try:
        local = storage.local_copy_until_exit(path)
        loaded = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the pickle holds more than tensors, and loading it could run "
            f"arbitrary code. Only plain state dicts are accepted ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    # Some trainers wrap the state dict: {"state_dict": {...}} or {"module": {...}}.
    for wrapper in ("state_dict", "module"):
        if isinstance(loaded, dict) and set(loaded) == {wrapper}:
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    shapes = {k: tuple(v.shape) for k, v in loaded.items()}
    dtypes = {k: tensor_to_numpy(v[:0] if v.ndim else v).dtype for k, v in loaded.items()}
    mapped = _MappedFile(local)
    return LazyStateDict(path, shapes, dtypes, lambda key: mapped.copy(loaded[key]))


def open_state_dict(path: str) -> LazyStateDict:
    """Opens `.safetensors`, a sharded `*.safetensors.index.json` (or a folder holding one), or a
    PyTorch pickle of tensors, as a lazy `name -> np.ndarray` mapping."""
    path = os.fspath(path)
    if storage.isdir(path):
        indexes = [f for f in storage.listdir(path) if f.endswith(".safetensors.index.json")]
        singles = [f for f in storage.listdir(path) if f.endswith(".safetensors")]
        if len(indexes) == 1:
            return _open_safetensors_index(storage.join(path, indexes[0]))
        if len(singles) == 1:
            return _open_safetensors_files(path, [storage.join(path, singles[0])])
        raise CheckpointError(
            f"{path}: expected one '*.safetensors.index.json' or one '*.safetensors' in the folder, "
            f"found indexes={indexes} files={singles}"
        )
    if not storage.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".index.json"):
        return _open_safetensors_index(path)
    if path.endswith(".safetensors"):
        return _open_safetensors_files(path, [path])
    if path.endswith(PICKLE_SUFFIXES):
        return _open_pickle(path)
    raise CheckpointError(f"{path}: unknown weight file type (expected .safetensors, "
                          f"*.safetensors.index.json, or one of {PICKLE_SUFFIXES})")


def check_names_and_shapes(
    source: str,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
) -> None:
    """Raises one `CheckpointError` listing every missing key, unexpected key and shape mismatch."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = sorted(
        f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
        for k in set(expected) & set(found)
        if tuple(expected[k]) != tuple(found[k])
    )
    if missing or unexpected or wrong_shape:
        lines = [f"{source}: the weights do not match the model."]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))


def _atomic_write(path: str, write_fn) -> None:
    """Writes through a temporary local file, published whole at `path` (local or gs://)."""
    with storage.local_output(path) as tmp:
        write_fn(tmp)


def save_state_dict(tensors: Mapping[str, np.ndarray | LazyTensor], path: str,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Writes a state dict as `.safetensors` (with `metadata` in its header) or as a `torch.load`-able
    pickle (`.ckpt`, `.pth`, ...), atomically, loading and writing one tensor at a time."""
    tensors = {k: v if isinstance(v, LazyTensor) else LazyTensor.of(np.asarray(v)) for k, v in tensors.items()}
    if path.endswith(".safetensors"):
        _atomic_write(path, lambda tmp: _write_safetensors(tensors, tmp, metadata or {}))
    elif path.endswith(PICKLE_SUFFIXES):
        if metadata:
            raise ValueError(f"{path}: a PyTorch pickle of tensors has no place for metadata")
        _atomic_write(path, lambda tmp: _write_torch_zip(tensors, tmp))
    else:
        raise CheckpointError(f"{path}: unknown output type (expected .safetensors or one of {PICKLE_SUFFIXES})")


def _checked(name: str, tensor: LazyTensor) -> np.ndarray:
    """The tensor's bytes, C-contiguous, refusing a `load()` that disagrees with the declared header."""
    array = np.require(tensor.load(), requirements="C")
    if tuple(array.shape) != tuple(tensor.shape) or array.dtype != tensor.dtype:
        raise ValueError(f"{name}: declared {tensor.shape} {tensor.dtype}, produced {array.shape} {array.dtype}")
    return array


def _write_safetensors(tensors: Mapping[str, LazyTensor], path: str, metadata: Mapping[str, str]) -> None:
    """The safetensors format: u64 header size, JSON header (names, dtypes, shapes, byte ranges), data."""
    names_of = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": dict(metadata)} if metadata else {}, 0
    for name, tensor in tensors.items():
        size = int(np.prod(tensor.shape)) * np.dtype(tensor.dtype).itemsize
        header[name] = {"dtype": names_of[np.dtype(tensor.dtype)], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with storage.open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, tensor in tensors.items():
            f.write(_checked(name, tensor).reshape(-1).view(np.uint8).data)


class _StorageRef:
    """One tensor's storage in the pickle: `torch.load` reads its bytes from the record data/<key>."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as `torch.save` pickles a contiguous tensor, without holding its data."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(int(n) for n in shape)

    def __reduce__(self):
        torch = _torch()
        stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


def _write_torch_zip(tensors: Mapping[str, LazyTensor], path: str) -> None:
    """`torch.save` of a flat dict of tensors, the same records in the same order (data.pkl, version
    records, data/0, data/1, ...), but each tensor's bytes produced and written one at a time."""
    torch = _torch()
    storage_names = torch.storage._dtype_to_storage_type_map()
    torch_dtype = {np.dtype(dt): numpy_to_tensor(np.zeros(0, dt)).dtype for dt in SAFETENSORS_DTYPES.values()}
    refs = {name: _TensorRef(_StorageRef(str(i), np.dtype(t.dtype), int(np.prod(t.shape))), t.shape)
            for i, (name, t) in enumerate(tensors.items())}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                storage_type = getattr(torch, storage_names[torch_dtype[obj.dtype]])
                return ("storage", storage_type, obj.key, "cpu", obj.numel)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(refs)
    with torch.serialization._open_zipfile_writer(path) as writer:
        writer.write_record("data.pkl", buffer.getvalue(), len(buffer.getvalue()))
        for record, value in ((".format_version", "1"), (".storage_alignment", str(torch.serialization._get_storage_alignment())),
                              ("byteorder", sys.byteorder)):
            writer.write_record(record, value, len(value))
        for name, tensor in tensors.items():
            storage = numpy_to_tensor(_checked(name, tensor)).untyped_storage()
            writer.write_record(f"data/{refs[name].storage.key}", storage, storage.nbytes())
