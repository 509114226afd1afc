"""recam_jax/storage.py: local folders and gs:// (a fake-gcs-server on loopback) by the same code,
and no module reaching a user's path around it."""

import ast
import json
import os
import pathlib

import numpy as np
import orbax.checkpoint as ocp
import pytest

from recam_jax import checkpoint, storage
from recam_jax.metrics import MetricWriter
from tests.conftest import REPO

# What may touch a path only through recam_jax/storage.py.
FILE_FUNCTIONS = {"open", "makedirs", "listdir", "replace", "rename", "remove", "unlink", "scandir", "stat",
                  "pread", "mkdir", "rmdir", "walk"}
FILE_MODULES = {"tempfile", "shutil", "pathlib", "glob"}


def path_handling(source: str) -> list[str]:
    """Uses of os.path, builtin open, os file functions or file modules in a module's code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" and (
                node.attr == "path" or node.attr in FILE_FUNCTIONS):
            found.append(f"line {node.lineno}: os.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            found.append(f"line {node.lineno}: open(...)")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"line {node.lineno}: import {n}" for n in names if n and n.split(".")[0] in FILE_MODULES]
    return sorted(found, key=lambda where: int(where.split()[1].rstrip(":")))


def test_every_path_goes_through_the_storage_module():
    offenders = {}
    for package in ("recam_jax", "data_pipeline"):
        for file in sorted(pathlib.Path(REPO, package).rglob("*.py")):
            if file.name != "storage.py":
                found = path_handling(file.read_text())
                if found:
                    offenders[str(file.relative_to(REPO))] = found
    assert not offenders, f"paths handled around recam_jax/storage.py: {offenders}"


def test_the_check_sees_each_kind_of_path_handling():
    source = "import os, shutil\nos.path.join('a')\nopen('f')\nos.makedirs('d')\nstorage.open('f')\n"
    assert path_handling(source) == ["line 1: import shutil", "line 2: os.path", "line 3: open(...)",
                                     "line 4: os.makedirs"]


@pytest.fixture(params=["local", "gcs"])
def folder(request, tmp_path):
    """A fresh folder: local, or a prefix in the emulator's bucket."""
    if request.param == "local":
        return str(tmp_path)
    return f"{request.getfixturevalue('gcs_bucket')}/{request.node.originalname}"


def test_files_round_trip_with_ranged_reads_and_listing(folder):
    path = storage.join(folder, "sub", "data.bin")
    with storage.atomic_open(path) as f:
        f.write(bytes(range(100)))
    assert storage.exists(path) and storage.isfile(path) and storage.isdir(storage.join(folder, "sub"))
    assert storage.size(path) == 100 and storage.read_range(path, 10, 13) == bytes([10, 11, 12])
    storage.write_json(storage.join(folder, "sub", "a.json"), {"x": 1})
    assert storage.listdir(storage.join(folder, "sub")) == ["a.json", "data.bin"]
    assert storage.read_json(storage.join(folder, "sub", "a.json")) == {"x": 1}


def test_a_write_that_fails_leaves_nothing_at_the_path(folder):
    path = storage.join(folder, "shard.tfrecord")
    with pytest.raises(RuntimeError), storage.atomic_open(path) as f:
        f.write(b"half a shard")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), storage.atomic_open(path, "w") as f:
        f.write("half a text")
        raise RuntimeError("killed")
    assert not storage.exists(path)
    if not storage.is_remote(folder):
        assert os.listdir(folder) == []  # nor a temporary file


def test_local_output_and_local_copy_carry_files_both_ways(folder):
    path = storage.join(folder, "weights.npy")
    with storage.local_output(path) as local:
        np.save(local, np.arange(5))  # a library that writes local files
    with storage.local_copy(path) as local:
        np.testing.assert_array_equal(np.load(local), np.arange(5))


def test_metric_log_keeps_earlier_lines_across_restarts(folder):
    for step in (1, 2):
        writer = MetricWriter(folder)
        writer.write(step, {"loss": float(step)})
        writer.close()
    with storage.open(storage.join(folder, "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    assert storage.listdir(storage.join(folder, "tensorboard"))  # the event files


def test_checkpoints_go_to_the_bucket_not_a_local_folder_named_gs(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = f"{gcs_bucket}/run"
    manager = checkpoint.make_manager(workdir, every=1, keep_last=1, keep_every=0)
    manager.save(1, args=ocp.args.StandardSave({"w": np.arange(3.0)}))
    manager.wait_until_finished()
    assert storage.exists(storage.join(workdir, "checkpoints", "1")) and not os.listdir(tmp_path)
    restored = manager.restore(1, args=ocp.args.StandardRestore({"w": np.zeros(3)}))
    np.testing.assert_array_equal(restored["w"], np.arange(3.0))


def test_a_local_folder_for_local_only_libraries(tmp_path):
    with storage.local_folder() as scratch:
        assert os.path.isdir(scratch)
    assert not os.path.exists(scratch)  # a temporary folder is removed afterwards
    with storage.local_folder(str(tmp_path / "kept")) as folder:
        pathlib.Path(folder, "f").write_text("x")
    assert (tmp_path / "kept" / "f").read_text() == "x"  # a given folder is kept
    with pytest.raises(ValueError, match="gs://bucket/colmap: must be a local folder"):
        with storage.local_folder("gs://bucket/colmap"):
            pass


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="mappings are listed in Linux's /proc/self/maps")
def test_mapped_ranges_are_a_files_own_mappings_also_through_a_link(tmp_path):
    # torch_io hands back the pages of these ranges only: a wrong range would drop other memory,
    # an empty one (the file read as empty) would keep the whole input resident.
    import mmap

    (tmp_path / "weights").write_bytes(bytes(3 * mmap.PAGESIZE))
    (tmp_path / "link").symlink_to(tmp_path / "weights")
    (tmp_path / "other").write_bytes(bytes(mmap.PAGESIZE))
    with open(tmp_path / "weights", "rb") as f, open(tmp_path / "other", "rb") as g:
        weights = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        other = mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ)
        weights_at = np.frombuffer(weights, np.uint8).ctypes.data
        other_at = np.frombuffer(other, np.uint8).ctypes.data
        assert storage.mapped_ranges(str(tmp_path / "link")) == [(weights_at, weights_at + 3 * mmap.PAGESIZE)]
        assert storage.mapped_ranges(str(tmp_path / "other")) == [(other_at, other_at + mmap.PAGESIZE)]
        assert storage.mapped_ranges(str(tmp_path / "missing")) == []
