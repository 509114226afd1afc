"""Every user-given path goes through here: a local path or a `gs://` URL, by the same code.

Files are reached through fsspec (gcsfs for `gs://`, with the GCS client's usual credentials);
checkpoints through orbax, which reaches `gs://` itself (tensorstore). Object stores have no
rename and no append, so the few operations that need them are defined here once:

- `atomic_open`: a reader sees the whole file or none of it (local: a hidden temporary name
  renamed when complete; object store: an object exists only once its upload is complete).
- `AppendLog`: a growing log file (local: appended; object store: the object rewritten at flush).
- `local_copy` / `local_output`: for the libraries that only take local file names (ffmpeg,
  safetensors, torch.load with mmap, transformers), a local copy of a remote file, or a local
  file uploaded when written. Local paths pass straight through.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import io
import json
import os
import posixpath
import shutil
import tempfile

import fsspec


def is_remote(path) -> bool:
    """Whether `path` is a URL (gs://...) rather than a local path."""
    return "://" in os.fspath(path)


def _fs(path):
    """(filesystem, path inside it). Listings are never cached: other hosts write the same bucket."""
    return fsspec.core.url_to_fs(os.fspath(path), use_listings_cache=False)


def join(base, *names: str) -> str:
    return posixpath.join(os.fspath(base), *names)


def parent(path) -> str:
    return posixpath.dirname(os.fspath(path).rstrip("/"))


def basename(path) -> str:
    return posixpath.basename(os.fspath(path).rstrip("/"))


def absolute(path) -> str:
    """A URL as it is; a local path made absolute (orbax needs absolute paths)."""
    return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def exists(path) -> bool:
    fs, inner = _fs(path)
    return fs.exists(inner)


def isdir(path) -> bool:
    fs, inner = _fs(path)
    return fs.isdir(inner)


def isfile(path) -> bool:
    fs, inner = _fs(path)
    return fs.isfile(inner)


def size(path) -> int:
    fs, inner = _fs(path)
    return fs.size(inner)


def listdir(path) -> list[str]:
    """The sorted names (not paths) in a folder."""
    fs, inner = _fs(path)
    return sorted(basename(entry) for entry in fs.ls(inner, detail=False) if basename(entry))


def file_sizes(folder) -> dict[str, int]:
    """Size of every file below `folder`, by its path relative to it: one recursive listing (on an
    object store a few paged requests for a whole dataset, instead of one per folder)."""
    fs, inner = _fs(folder)
    prefix = inner.rstrip("/") + "/"
    return {name[len(prefix):]: info["size"] for name, info in fs.find(inner, detail=True).items()
            if name.startswith(prefix) and info["type"] == "file"}


def remove(path) -> None:
    fs, inner = _fs(path)
    fs.rm_file(inner)


def makedirs(path) -> None:
    """Creates a local folder; a no-op on object stores, where folders are only name prefixes."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def open(path, mode: str = "r", **kwargs):  # noqa: A001 (the one place files are opened)
    """A file object (text or binary by `mode`); writing to a local path creates its folder."""
    if "r" not in mode:
        makedirs(parent(path) or ".")
    fs, inner = _fs(path)
    return fs.open(inner, mode, **kwargs)


def read_range(path, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: one ranged read, safe to call from many threads at once."""
    fs, inner = _fs(path)
    return fs.cat_file(inner, start=start, end=end)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, value) -> None:
    """JSON that readers see whole or not at all."""
    with atomic_open(path, "w") as f:
        json.dump(value, f, indent=1)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """A file for writing that appears at `path` only when the block exits without an exception."""
    if not is_remote(path):
        with _local_temporary(path) as tmp, builtins.open(tmp, mode) as file:
            yield file
        return
    fs, inner = _fs(path)
    upload = fs.open(inner, "wb")
    file = upload if "b" in mode else io.TextIOWrapper(upload, encoding="utf-8")
    try:
        yield file
    except BaseException:
        upload.discard()  # cancels an upload in progress
        upload.closed = True  # and keeps the file's finaliser from committing what was written
        raise
    file.close()


@contextlib.contextmanager
def _local_temporary(path):
    """A hidden temporary name next to local `path`, synced and renamed to it if the block succeeds."""
    makedirs(parent(path) or ".")
    tmp = join(parent(path), f".tmp-{os.getpid()}-{basename(path)}")  # keeps the extension (ffmpeg)
    try:
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        os.fsync(descriptor)  # the data is on disk before the name says the file is complete
        os.close(descriptor)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class AppendLog:
    """A binary file that only grows and survives restarts (new bytes follow the old ones), for
    logs: metrics.jsonl, TensorBoard event files.

    Object stores cannot append: there the bytes are kept in memory and the object is rewritten
    whole at every `flush`, which suits small logs and leaves the object complete at any moment.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._file = None
        if is_remote(self.path):
            self._data = bytearray(read_bytes(self.path) if exists(self.path) else b"")
        else:
            self._file = open(self.path, "ab")

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
        else:
            self._data += data

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            return
        with open(self.path, "wb") as f:
            f.write(bytes(self._data))

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def local_copy(path):
    """A local path with the contents of `path` (a file or a folder) for the block: `path` itself
    if local, else a temporary download removed afterwards."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="recam_jax-") as folder:
        yield _download(path, folder)


def local_copy_until_exit(path) -> str:
    """As `local_copy`, for files read lazily after the call returns (weights read on demand):
    a download lives until the process exits."""
    if not is_remote(path):
        return os.fspath(path)
    folder = tempfile.mkdtemp(prefix="recam_jax-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return _download(path, folder)


def mapped_ranges(local_path: str) -> list[tuple[int, int]]:
    """The address ranges [lo, hi) at which this process maps the local file `local_path`
    (Linux: /proc/self/maps); empty where that is not known."""
    local_path = os.path.realpath(local_path)
    try:
        with builtins.open("/proc/self/maps") as f:  # fsspec reads it as empty (size 0)
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:  # "lo-hi perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == local_path:
            lo, hi = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _download(path, folder: str) -> str:
    fs, inner = _fs(path)
    local = os.path.join(folder, basename(path))
    if fs.isdir(inner):
        fs.get(inner, local, recursive=True)
    else:
        fs.get_file(inner, local)  # a file name is not a glob pattern
    return local


@contextlib.contextmanager
def local_folder(path=None):
    """A local folder for the block, for libraries that work only in local folders (COLMAP): `path`
    itself (created) if given, else a temporary folder removed afterwards. `path` must be local."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="recam_jax-") as folder:
            yield folder
        return
    if is_remote(path):
        raise ValueError(f"{path}: must be a local folder (the library writing there cannot write to a bucket)")
    makedirs(path)
    yield os.fspath(path)


@contextlib.contextmanager
def local_output(path):
    """A local file name to write to; its contents appear at `path` (whole) when the block exits
    without an exception. For libraries that write only to local file names."""
    path = os.fspath(path)
    if not is_remote(path):
        with _local_temporary(path) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="recam_jax-") as folder:
        local = os.path.join(folder, basename(path))
        yield local
        fs, inner = _fs(path)
        fs.put_file(local, inner)
