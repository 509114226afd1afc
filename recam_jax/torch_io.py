"""Reading and writing PyTorch weight files safely, one tensor at a time.

Every converter (DiT, VAE) goes through this module so that they share one set of guarantees:
- a pickle (`.ckpt`, `.pth`) is read with `torch.load(weights_only=True)`: a checkpoint from the
  internet can never execute code here; anything beyond tensors is refused with a clear error;
- tensors are read lazily (safetensors `safe_open`, `torch.load(mmap=True)`), so converting a 14B
  checkpoint never needs twice its size in RAM;
- a missing or unexpected key or a wrong shape raises `CheckpointError` listing all of them, before
  anything is written.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Mapping

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


class LazyStateDict(Mapping):
    """A read-only `name -> np.ndarray` view of a weight file; each tensor is read when asked for."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]], read_fn):
        self.path = path
        self.shapes = shapes
        self._read = read_fn

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.shapes:
            raise KeyError(f"{key!r} is not in {self.path}")
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _open_safetensors_files(path: str, files: list[str]) -> LazyStateDict:
    from safetensors import safe_open

    shapes, owner = {}, {}  # tensor name -> shape, and the open file holding it
    for file in files:
        try:
            handle = safe_open(storage.local_copy_until_exit(file), framework="pt")  # safetensors maps local files
            names = list(handle.keys())
            for name in names:
                shapes[name] = tuple(handle.get_slice(name).get_shape())
                owner[name] = handle
            # Touch the last tensor: a truncated file fails here, not halfway through a conversion.
            if names:
                handle.get_slice(names[-1])[...]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    return LazyStateDict(path, shapes, lambda key: tensor_to_numpy(owner[key].get_tensor(key)))


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
        loaded = torch.load(storage.local_copy_until_exit(path), map_location="cpu", weights_only=True, mmap=True)
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
    return LazyStateDict(path, shapes, lambda key: tensor_to_numpy(loaded[key]))


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


def save_state_dict(arrays: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a state dict as `.safetensors` or as a `torch.save` pickle (`.ckpt`, `.pth`, ...)."""
    torch = _torch()
    tensors = {k: numpy_to_tensor(v) for k, v in arrays.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        _atomic_write(path, lambda tmp: save_file(tensors, tmp))
    elif path.endswith(PICKLE_SUFFIXES):
        _atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    else:
        raise CheckpointError(f"{path}: unknown output type (expected .safetensors or one of {PICKLE_SUFFIXES})")
