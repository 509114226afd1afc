"""Weight files without a model: every dtype through both formats, read back by torch and safetensors
themselves, and each refusal naming the file (seconds)."""

import errno
import json
import mmap
import os
import warnings
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from recam_jax import torch_io
from recam_jax.torch_io import CheckpointError


def every_dtype():
    rng = np.random.default_rng(0)
    tensors = {f"t.{np.dtype(dt).name}": (rng.standard_normal((2, 3)) * 50).astype(dt)
               for dt in torch_io.SAFETENSORS_DTYPES.values()}
    tensors["scalar"] = np.array(3.5, np.float32)
    tensors["bf16"] = rng.standard_normal(5).astype(ml_dtypes.bfloat16)
    return tensors


def assert_same(got, want):
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_every_dtype_round_trips_and_the_official_readers_agree(tmp_path, suffix):
    tensors, path = every_dtype(), str(tmp_path / f"w{suffix}")
    metadata = {"recam_jax": "x"} if suffix == ".safetensors" else None
    torch_io.save_state_dict(tensors, path, metadata)
    official = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    assert list(official) == list(tensors)  # the writer's order
    assert_same({k: torch_io.tensor_to_numpy(v) for k, v in official.items()}, tensors)
    opened = torch_io.open_state_dict(path)
    assert opened.shapes == {k: v.shape for k, v in tensors.items()}
    assert opened.dtypes == {k: v.dtype for k, v in tensors.items()}
    assert_same(dict(opened), tensors)
    assert opened.metadata == (metadata or {}) and len(opened) == len(tensors)
    with pytest.raises(KeyError, match=r"'nope' is not in .*w"):
        opened["nope"]


def test_safetensors_header_is_8_byte_aligned_and_written_without_metadata_when_none(tmp_path):
    path = str(tmp_path / "w.safetensors")
    torch_io.save_state_dict({"a": np.ones(3, np.float16)}, path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    assert size % 8 == 0 and header == {"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]}}


def test_refusals_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"w\.npz: unknown output type"):
        torch_io.save_state_dict({"a": np.ones(1)}, str(tmp_path / "w.npz"))
    with pytest.raises(ValueError, match=r"w\.ckpt: a PyTorch pickle of tensors has no place for metadata"):
        torch_io.save_state_dict({"a": np.ones(1)}, str(tmp_path / "w.ckpt"), {"k": "v"})
    assert not (tmp_path / "w.ckpt").exists()
    with pytest.raises(CheckpointError, match=r"absent\.ckpt: no such file"):
        torch_io.open_state_dict(str(tmp_path / "absent.ckpt"))
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"w\.npz: unknown weight file type"):
        torch_io.open_state_dict(str(tmp_path / "w.npz"))
    lying = torch_io.LazyTensor((2,), np.dtype(np.float32), lambda: np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"lying: declared \(2,\) float32, produced \(3,\) float32"):
        torch_io.save_state_dict({"lying": lying}, str(tmp_path / "l.safetensors"))


def test_a_folder_opens_its_one_weight_file_or_lists_what_it_found(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    opened = torch_io.open_state_dict(str(tmp_path))
    assert list(opened) == ["a"]
    with pytest.raises(KeyError, match=re.escape(str(tmp_path))):  # errors name the folder asked for
        opened["b"]
    save_file({"b": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match=r"expected one '\*.safetensors.index.json' or one '\*.safetensors'") as e:
        torch_io.open_state_dict(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "one.safetensors" in str(e.value) and "two.safetensors" in str(e.value)


def test_a_sharded_index_joins_its_shards_and_names_missing_ones(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    for path in (index, tmp_path):  # the index, or the folder holding it (a sharded release)
        opened = torch_io.open_state_dict(str(path))
        assert opened.shapes == {"a": (2,), "b": (3,)} and float(opened["a"][0]) == 1.0
        assert opened.path == str(index)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "c": "s3.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"index\.json: shard files listed in the index are missing: .*s3"):
        torch_io.open_state_dict(str(index))
    index.write_text(json.dumps({"weights": {}}))
    with pytest.raises(CheckpointError, match=r"index\.json: not a safetensors index with a 'weight_map'"):
        torch_io.open_state_dict(str(index))


@pytest.mark.parametrize("wrapper", ["state_dict", "module"])
def test_a_wrapped_state_dict_is_unwrapped(tmp_path, wrapper):
    torch.save({wrapper: {"a": torch.arange(3.0)}}, tmp_path / "w.pt")
    opened = torch_io.open_state_dict(str(tmp_path / "w.pt"))
    np.testing.assert_array_equal(opened["a"], [0.0, 1.0, 2.0])


def test_a_pickle_that_is_not_a_flat_dict_of_tensors_is_refused(tmp_path):
    torch.save({"a": torch.ones(1), "step": torch.ones(1), "nested": {"b": torch.ones(1)}}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w\.pt: expected a flat state dict of tensors"):
        torch_io.open_state_dict(str(tmp_path / "w.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable PyTorch checkpoint"):
        torch_io.open_state_dict(str(tmp_path / "junk.pt"))


def test_name_and_shape_check_lists_each_problem_and_caps_long_lists():
    expected = {f"k{i:02d}": (2,) for i in range(25)} | {"w": (3, 4)}
    found = {"w": (4, 3), "extra": (1,)}
    with pytest.raises(CheckpointError) as error:
        torch_io.check_names_and_shapes("ckpt.pt", expected, found)
    lines = str(error.value).splitlines()
    assert lines[0] == "ckpt.pt: the weights do not match the model."
    assert lines[1] == "  missing (25): " + ", ".join(f"k{i:02d}" for i in range(20)) + ", ... and 5 more"
    assert lines[2:] == ["  unexpected (1): extra", "  wrong shape (1): w: expected (3, 4), found (4, 3)"]
    torch_io.check_names_and_shapes("ckpt.pt", {"w": (3, 4)}, {"w": [3, 4]})  # a list shape is the same shape


@pytest.mark.parametrize("found", [{"w": (3, 4)}, {"w": (3, 4), "x": (1,), "extra": (1,)}, {"w": (4, 3), "x": (1,)}])
def test_any_one_kind_of_mismatch_alone_is_refused(found):
    """Only missing x; only an unexpected key; only a wrong shape."""
    expected = {"w": (3, 4), "x": (1,)}
    with pytest.raises(CheckpointError, match="the weights do not match the model"):
        torch_io.check_names_and_shapes("ckpt.pt", expected, found)


@pytest.mark.parametrize("count, tail", [(20, ""), (21, ", ... and 1 more")])
def test_the_listing_is_cut_after_twenty(count, tail):
    expected = {f"k{i:02d}": (1,) for i in range(count)}
    with pytest.raises(CheckpointError) as error:
        torch_io.check_names_and_shapes("ckpt.pt", expected, {})
    assert str(error.value).splitlines()[1] == f"  missing ({count}): " + ", ".join(
        f"k{i:02d}" for i in range(20)) + tail


class _NotATensor:
    """What a pickle may hold besides tensors: loading it would run this class's code."""


def test_a_pickle_holding_an_object_is_refused_unloaded(tmp_path):
    torch.save({"a": torch.ones(1), "obj": _NotATensor()}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w\.pt: refused: the pickle holds more than tensors, and loading it "
                                              r"could run arbitrary code\. .*accepted \(Weights only load failed"):
        torch_io.open_state_dict(str(tmp_path / "w.pt"))
    (tmp_path / "w.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    with pytest.raises(CheckpointError, match=r"w\.safetensors: not a readable safetensors file"):
        torch_io.open_state_dict(str(tmp_path / "w.safetensors"))


def test_the_pickle_archive_has_the_records_torch_save_writes_in_its_order(tmp_path):
    """torch.load reads archives without some records; other readers (and later torch versions) may not."""
    import zipfile

    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    torch_io.save_state_dict({"a": array}, str(tmp_path / "ours.ckpt"))
    torch.save({"a": torch.from_numpy(array)}, tmp_path / "theirs.ckpt")

    def records(path):  # name inside the archive's folder -> bytes, in the archive's order
        with zipfile.ZipFile(path) as archive:
            return [(name.split("/", 1)[1], archive.read(name)) for name in archive.namelist()]

    ours, theirs = records(tmp_path / "ours.ckpt"), records(tmp_path / "theirs.ckpt")
    assert [name for name, _ in ours] == [name for name, _ in theirs]
    small = (".format_version", ".storage_alignment", "byteorder", "version", "data/0")
    assert [r for r in ours if r[0] in small] == [r for r in theirs if r[0] in small]


def test_read_only_arrays_become_tensors_without_a_warning():
    array = np.arange(4, dtype=np.float32)
    array.flags.writeable = False  # as np.frombuffer or an mmap gives them
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when handed memory it may not write
        tensor = torch_io.numpy_to_tensor(array)
    np.testing.assert_array_equal(tensor.numpy(), array)


def test_a_lazy_view_of_a_file_tensor_knows_its_shape_and_dtype_and_reads_it(tmp_path):
    array = np.arange(6, dtype=np.float16).reshape(3, 2)
    torch_io.save_state_dict({"w": array}, str(tmp_path / "w.safetensors"))
    lazy = torch_io.open_state_dict(str(tmp_path / "w.safetensors")).lazy("w")
    assert lazy.shape == (3, 2) and lazy.dtype == np.float16
    np.testing.assert_array_equal(lazy.load(), array)


def test_membership_is_read_off_the_header(tmp_path):
    torch_io.save_state_dict({"w": np.zeros(2, np.float32)}, str(tmp_path / "w.safetensors"))
    opened = torch_io.open_state_dict(str(tmp_path / "w.safetensors"))
    opened._read = None  # a read would fail
    assert "w" in opened and "v" not in opened


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="madvise(MADV_DONTNEED) is Linux's")
def test_a_refused_page_release_is_an_error_with_its_errno_and_address():
    with pytest.raises(OSError) as err:
        torch_io._madvise(1, 4096, mmap.MADV_DONTNEED)  # not page-aligned: EINVAL
    assert err.value.errno == errno.EINVAL and err.value.strerror == "madvise(0x1, 4096)"


def resident_bytes_of(path) -> int:
    """Bytes of `path`'s mappings resident in this process (Linux /proc/self/smaps)."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if not fields[0].endswith(":"):  # a mapping's header: "lo-hi perms offset dev inode [path]"
                current = len(fields) == 6 and fields[5].strip() == str(path)
            elif current and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_tensors_read_leave_the_mapped_file_out_of_memory(tmp_path, suffix):
    # A mapped input's pages once read stay in the process until the end unless handed back: a
    # conversion would hold the whole input besides what it writes (benchmarks/convert_memory.py).
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal(2**18, np.float32) for i in range(8)}  # 8 MB
    path = tmp_path / f"w{suffix}"
    torch_io.save_state_dict(tensors, str(path))
    opened = torch_io.open_state_dict(str(path))
    assert_same(dict(opened), tensors)  # every tensor read, each an array of its own
    assert resident_bytes_of(path) < 2**20
    assert_same(dict(opened), tensors)  # read again from the file
