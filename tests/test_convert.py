"""Weight conversion: exact round trips, official key layout, model records, safe loading, clear errors."""

import dataclasses
import json
import os
import re
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from recam_jax import convert, torch_io
from recam_jax.models.dit import dit_config


def trained_tiny_model(seed=0, variant="tiny", scan_layers=True, **config):
    """A model whose every tensor is random with its own key: blocks differ from each other and camera
    weights and biases are far from their init, so a swapped or dropped tensor cannot go unseen."""
    cfg = dit_config(variant, dtype="float32", scan_layers=scan_layers, **config)
    model = convert.abstract_model(cfg)  # eager init is slow
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    for _, variable in state.flat_state():
        variable.set_value(jnp.asarray(rng.standard_normal(variable.shape, np.float32)))
    nnx.update(model, state)
    return model


def params_of(model):
    return {path: np.asarray(v[...]) for path, v in nnx.state(model, nnx.Param).flat_state()}


def assert_bit_exact(a, b):
    assert a.cfg == b.cfg
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path].dtype == pb[path].dtype and np.array_equal(pa[path], pb[path]), path


def block_param(model, n, *path):
    """Block n's parameter in either layout: its own entry (unrolled) or row n of the stacked one."""
    flat = params_of(model)
    return flat[("blocks", *path)][n] if model.cfg.scan_layers else flat[("blocks", n, *path)]


def diffsynth_recammaster_shapes(dim, ffn, text_dim, freq_dim, layers, in_dim=16, out_dim=16, patch=(1, 2, 2)):
    """Keys and shapes of DiffSynth's WanModel plus ReCamMaster's camera modules, written out by hand
    from the official module definitions (independent of convert.weight_table)."""
    shapes = {
        "patch_embedding.weight": (dim, in_dim, *patch), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (out_dim * int(np.prod(patch)), dim), "head.head.bias": (out_dim * int(np.prod(patch)),),
        "head.modulation": (1, 2, dim),
    }
    for i in range(layers):
        b = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                shapes[f"{b}.{attn}.{p}.weight"], shapes[f"{b}.{attn}.{p}.bias"] = (dim, dim), (dim,)
            shapes[f"{b}.{attn}.norm_q.weight"] = shapes[f"{b}.{attn}.norm_k.weight"] = (dim,)
        shapes.update({f"{b}.norm3.weight": (dim,), f"{b}.norm3.bias": (dim,), f"{b}.ffn.0.weight": (ffn, dim),
                       f"{b}.ffn.0.bias": (ffn,), f"{b}.ffn.2.weight": (dim, ffn), f"{b}.ffn.2.bias": (dim,),
                       f"{b}.modulation": (1, 6, dim), f"{b}.cam_encoder.weight": (dim, 12),
                       f"{b}.cam_encoder.bias": (dim,), f"{b}.projector.weight": (dim, dim), f"{b}.projector.bias": (dim,)})
    return shapes


@pytest.mark.parametrize("scan_layers", [True, False])
def test_recammaster_ckpt_round_trip_is_bit_exact_with_official_keys(tmp_path, scan_layers):
    model = trained_tiny_model(scan_layers=scan_layers)
    path = str(tmp_path / "step20000.ckpt")
    convert.save_pytorch(model, path)
    state = torch.load(path, weights_only=True, mmap=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == diffsynth_recammaster_shapes(64, 128, 32, 32, 2)
    np.testing.assert_array_equal(state["blocks.1.self_attn.q.weight"].numpy(),
                                  block_param(model, 1, "self_attn", "q", "kernel").T)
    assert_bit_exact(model, convert.load_pytorch(path, dtype="float32", scan_layers=scan_layers))


def test_the_fixture_catches_a_block_swap_and_a_camera_bias_swap():
    model = trained_tiny_model()
    for first, second in (("blocks.0.self_attn.q.weight", "blocks.1.self_attn.q.weight"),
                          ("blocks.0.cam_encoder.bias", "blocks.1.cam_encoder.bias"),
                          ("blocks.0.cam_encoder.bias", "blocks.0.projector.bias")):
        state = convert.export_weights(model)
        state[first], state[second] = state[second], state[first]
        with pytest.raises(AssertionError):
            assert_bit_exact(model, convert.import_weights(state, model.cfg))


@pytest.mark.parametrize("name", ["m.safetensors", "transformer_diffusers", "params_orbax"])
def test_every_format_round_trips_bit_exact_with_camera_modules(tmp_path, name):
    model = trained_tiny_model(seed=3)
    path = str(tmp_path / name)
    (convert.save_orbax if name.endswith("orbax") else convert.save_pytorch)(model, path)
    restored = convert.load_any(path, dtype="float32")
    assert_bit_exact(model, restored)
    assert not np.allclose(block_param(restored, 1, "cam_encoder", "bias"), 0)  # trained camera modules kept


def test_plain_wan_weights_get_camera_modules_at_official_init(tmp_path):
    state = {k: v for k, v in convert.export_weights(trained_tiny_model()).items()
             if "cam_encoder" not in k and "projector" not in k}
    path = str(tmp_path / "wan.safetensors")
    torch_io.save_state_dict(state, path)
    restored = convert.load_pytorch(path, num_heads=4, dtype="float32")
    for n in range(restored.cfg.num_layers):
        np.testing.assert_array_equal(block_param(restored, n, "cam_encoder", "kernel"), 0)
        np.testing.assert_array_equal(block_param(restored, n, "cam_encoder", "bias"), 0)
        np.testing.assert_array_equal(block_param(restored, n, "projector", "kernel"), np.eye(64))
        np.testing.assert_array_equal(block_param(restored, n, "projector", "bias"), 0)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
    torch_io.save_state_dict(bf16, str(tmp_path / "wan_bf16.safetensors"))
    convert.main([str(tmp_path / "wan_bf16.safetensors"), str(tmp_path / "out.safetensors"), "--num_heads", "4"])
    out = torch_io.open_state_dict(str(tmp_path / "out.safetensors"))  # streamed: the added modules too
    assert set(out.dtypes.values()) == {np.dtype(ml_dtypes.bfloat16)}  # in the checkpoint's dtype
    assert out.shapes["blocks.1.cam_encoder.weight"] == out["blocks.1.cam_encoder.weight"].shape == (64, 12)
    np.testing.assert_array_equal(out["blocks.1.projector.weight"], np.eye(64, dtype=ml_dtypes.bfloat16))


def write_wan_release_folder(model, folder):
    """A folder laid out as Wan2.1-T2V-14B ships: sharded safetensors, their index, Wan's config.json."""
    state = convert.export_weights(model)
    names = sorted(state)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    os.makedirs(folder)
    for file, keys in shards.items():
        torch_io.save_state_dict({k: state[k] for k in keys}, os.path.join(folder, file))
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: file for file, keys in shards.items() for k in keys}}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "WanModel", "dim": 64, "num_heads": 4}, f)


def test_sharded_release_folder_loads_and_converts(tmp_path):
    model = trained_tiny_model()
    folder = str(tmp_path / "Wan2.1-T2V-tiny")
    write_wan_release_folder(model, folder)
    assert_bit_exact(model, convert.load_any(folder, num_heads=4, dtype="float32"))
    convert.main([folder, str(tmp_path / "out.ckpt"), "--num_heads", "4"])
    assert_bit_exact(model, convert.load_pytorch(str(tmp_path / "out.ckpt"), dtype="float32"))


def test_pytorch_folders_and_index_files_are_told_from_orbax_folders(tmp_path):
    model = trained_tiny_model()
    folder = str(tmp_path / "Wan2.1-T2V-tiny")
    write_wan_release_folder(model, folder)
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    assert_bit_exact(model, convert.load_any(index, num_heads=4, dtype="float32"))  # the index itself
    single = tmp_path / "single"
    single.mkdir()
    torch_io.save_state_dict(convert.export_weights(model), str(single / "model.safetensors"))
    assert_bit_exact(model, convert.load_any(str(single), num_heads=4, dtype="float32"))  # one file, no index
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(folder, name))
    with pytest.raises(torch_io.CheckpointError, match="shard files listed in the index are missing"):
        convert.load_any(folder, num_heads=4)  # an index whose shards are lost: named, not "no params folder"
    (tmp_path / "empty").mkdir()
    with pytest.raises(torch_io.CheckpointError) as err:
        convert.load_any(str(tmp_path / "empty"))
    assert str(err.value) == (
        f"{tmp_path / 'empty'}: not a recam_jax params folder (no recam_jax.json) nor a PyTorch checkpoint "
        "(no .safetensors, *.safetensors.index.json or .ckpt/.pth/.pt/.bin)")


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_exports_reload_as_the_same_model_without_flags(tmp_path, variant):
    """dim / 128 heads was a guess: tiny (64) and small (256) have 4 heads, not 1 and 2."""
    model = trained_tiny_model(variant=variant)
    path = str(tmp_path / "m.ckpt")
    convert.save_pytorch(model, path, shift=3.0)
    record = convert.read_model_record(path)
    assert record["dit"]["num_heads"] == 4 and record["flow_shift"] == 3.0
    assert_bit_exact(model, convert.load_any(path, dtype="float32"))
    convert.main([path, str(tmp_path / "params")])
    convert.main([str(tmp_path / "params"), str(tmp_path / "again.safetensors")])
    assert convert.read_model_record(str(tmp_path / "again.safetensors")) == record
    assert_bit_exact(model, convert.load_any(str(tmp_path / "again.safetensors"), dtype="float32"))


def test_weights_without_a_record_must_be_an_official_size_or_given_heads(tmp_path):
    official = {k: v for k, v in diffsynth_recammaster_shapes(1536, 8960, 4096, 256, 30).items()}
    assert convert.infer_config(official).num_heads == 12  # Wan2.1-T2V-1.3B
    assert convert.infer_config(diffsynth_recammaster_shapes(5120, 13824, 4096, 256, 40)).num_heads == 40
    path = str(tmp_path / "m.ckpt")
    torch_io.save_state_dict(convert.export_weights(trained_tiny_model()), path)  # no record
    with pytest.raises(torch_io.CheckpointError, match=r"m\.ckpt.*no official Wan2.1 size.*--num_heads"):
        convert.load_pytorch(path)
    assert convert.load_pytorch(path, num_heads=4).cfg.num_heads == 4


def test_a_config_contradicting_the_record_is_refused(tmp_path):
    path = str(tmp_path / "m.ckpt")
    convert.save_pytorch(trained_tiny_model(), path)
    with pytest.raises(torch_io.CheckpointError, match=r"m\.ckpt.*num_heads: the record says 4, asked for 2"):
        convert.load_pytorch(path, num_heads=2)
    with pytest.raises(torch_io.CheckpointError, match=r"m\.ckpt.*num_heads: the record says 4, asked for 2"):
        convert.load_any(path, cfg=dit_config("tiny", num_heads=2))
    state = {**convert.export_weights(trained_tiny_model()), "blocks.0.extra.weight": np.zeros(1, np.float32)}
    torch_io.save_state_dict(state, str(tmp_path / "extra.ckpt"))  # no record: only the tensors can disagree
    with pytest.raises(torch_io.CheckpointError, match=r"extra\.ckpt: the weights do not match(.|\n)*blocks\.0\.extra"):
        convert.load_any(str(tmp_path / "extra.ckpt"), cfg=dit_config("tiny"))


def test_conversion_keeps_the_input_dtype(tmp_path):
    model = trained_tiny_model()
    path = str(tmp_path / "m.ckpt")
    convert.save_pytorch(model, path, dtype="bfloat16")
    convert.main([path, str(tmp_path / "params")])
    convert.main([str(tmp_path / "params"), str(tmp_path / "out.safetensors")])
    out = torch_io.open_state_dict(str(tmp_path / "out.safetensors"))
    assert set(out.dtypes.values()) == {np.dtype(ml_dtypes.bfloat16)}
    assert all(np.array_equal(out[k], v) for k, v in torch_io.open_state_dict(path).items())
    convert.main([path, str(tmp_path / "fp32.ckpt"), "--dtype", "float32"])
    assert {v.dtype for v in torch.load(str(tmp_path / "fp32.ckpt"), weights_only=True).values()} == {torch.float32}
    loaded = convert.load_any(path, dtype="float32")  # loading casts to the model's parameter dtype
    assert {array.dtype for array in params_of(loaded).values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize("saved_scanned", [True, False])
def test_orbax_params_load_into_either_block_layout(tmp_path, saved_scanned):
    model = trained_tiny_model(scan_layers=saved_scanned)
    convert.save_orbax(model, str(tmp_path / "params"))
    for scan_layers in (True, False):
        loaded = convert.load_orbax(str(tmp_path / "params"), dataclasses.replace(model.cfg, scan_layers=scan_layers))
        assert loaded.cfg.scan_layers == scan_layers
        for n in range(model.cfg.num_layers):
            for path in (("self_attn", "q", "kernel"), ("cam_encoder", "kernel"), ("modulation",)):
                np.testing.assert_array_equal(block_param(loaded, n, *path), block_param(model, n, *path))
        assert_bit_exact(model, convert.with_block_layout(loaded, saved_scanned))


@pytest.mark.parametrize("saved_scanned", [True, False])
def test_orbax_folders_convert_one_tensor_at_a_time(tmp_path, monkeypatch, saved_scanned):
    """A folder saved from a scanned model was restored with all its blocks together (each stacked
    array whole): every read is now one tensor, of one block's shape where the blocks are stacked,
    and each tensor is read once (in either layout)."""
    model = trained_tiny_model(scan_layers=saved_scanned)
    convert.save_orbax(model, str(tmp_path / "params"))
    read_shapes, reader = [], convert._stored_array_reader

    def spy(params_dir):
        read = reader(params_dir)

        def recorded(*where):
            array = read(*where)
            read_shapes.append(array.shape)
            return array
        return recorded

    monkeypatch.setattr(convert, "_stored_array_reader", spy)
    convert.main([str(tmp_path / "params"), str(tmp_path / "out.ckpt")])
    per_block = convert.with_block_layout(model, scan_layers=False)
    assert sorted(read_shapes) == sorted(array.shape for array in params_of(per_block).values())
    assert_bit_exact(per_block, convert.load_pytorch(str(tmp_path / "out.ckpt"), dtype="float32", scan_layers=False))


def test_a_one_block_model_saved_per_block_is_read_as_saved(tmp_path):
    """A folder's layout is told by its entries: per block ("blocks", 0, ...) or stacked ("blocks", ...)."""
    for scan_layers in (False, True):
        model = trained_tiny_model(scan_layers=scan_layers, num_layers=1)
        folder = str(tmp_path / f"scanned_{scan_layers}")
        convert.save_orbax(model, folder)
        assert convert._is_scanned(convert.stored_param_shapes(os.path.join(folder, "params"))) == scan_layers
        assert_bit_exact(model, convert.load_orbax(folder, dtype="float32", scan_layers=scan_layers))


def test_a_scanned_orbax_folder_converts_to_the_same_file_as_a_per_block_one(tmp_path):
    model = trained_tiny_model(scan_layers=True)
    for name, scan_layers in (("scanned", True), ("per_block", False)):
        convert.save_orbax(convert.with_block_layout(model, scan_layers), str(tmp_path / name))
        convert.main([str(tmp_path / name), str(tmp_path / f"{name}.safetensors")])
    scanned, per_block = (torch_io.open_state_dict(str(tmp_path / f"{name}.safetensors")) for name in ("scanned", "per_block"))
    assert list(scanned) == list(per_block)
    assert all(scanned.dtypes[k] == per_block.dtypes[k] and np.array_equal(scanned[k], per_block[k]) for k in per_block)


def test_orbax_folders_are_written_a_batch_of_tensors_at_a_time(tmp_path, monkeypatch):
    """A cast into orbax held every cast copy until the save ended: tensors are now loaded a batch
    at a time, each batch written before the next is loaded (loaded bytes counted by weakref finalizers)."""
    model = trained_tiny_model()
    monkeypatch.setattr(convert, "ORBAX_WRITE_BATCH_BYTES", 64 * 64 * 4, raising=False)  # one 64×64 fp32 tensor
    alive, most = [0], [0]

    def tracked(array):
        def load():
            copy = array.copy()
            alive[0] += copy.nbytes
            most[0] = max(most[0], alive[0])
            weakref.finalize(copy, lambda n=copy.nbytes: alive.__setitem__(0, alive[0] - n))
            return copy
        return torch_io.LazyTensor(array.shape, array.dtype, load)

    state = convert.export_weights(model)
    convert._save_orbax_tensors({name: tracked(array) for name, array in state.items()}, model.cfg,
                                str(tmp_path / "params"), shift=None)
    assert most[0] <= max(convert.ORBAX_WRITE_BATCH_BYTES, *(array.nbytes for array in state.values()))
    assert_bit_exact(model, convert.load_orbax(str(tmp_path / "params"), dtype="float32"))


def test_orbax_folders_are_written_in_small_data_files(tmp_path, monkeypatch):
    """OCDBT holds each data file being written in memory: a conversion into orbax writes files of
    about `ORBAX_DATA_FILE_BYTES` (orbax's default put a whole batch of tensors in one file)."""
    model = trained_tiny_model()
    monkeypatch.setattr(convert, "ORBAX_DATA_FILE_BYTES", 64 * 64 * 4)  # the tensors weigh 629 kB
    state = convert.export_weights(model)
    convert._save_orbax_tensors({k: torch_io.LazyTensor.of(v) for k, v in state.items()}, model.cfg,
                                str(tmp_path / "params"), shift=None)
    data_files = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "params") if root.endswith("/d")
                  for f in files]
    largest_tensor = max(array.nbytes for array in state.values())
    assert len(data_files) > 10 and max(map(os.path.getsize, data_files)) <= 2 * largest_tensor
    assert_bit_exact(model, convert.load_orbax(str(tmp_path / "params"), dtype="float32"))


def test_batches_are_consecutive_and_within_the_budget_but_for_a_larger_size_alone():
    assert convert._batches([3, 3, 5, 1, 1], 6) == [[0, 1], [2, 3], [4]]
    assert convert._batches([1, 10, 1], 6) == [[0], [1], [2]]
    assert convert._batches([], 6) == []


@pytest.mark.parametrize("source_dtype,dtype", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_a_cast_into_orbax_gives_the_tensors_of_a_cast_into_a_file(tmp_path, source_dtype, dtype):
    source = str(tmp_path / "m.ckpt")
    convert.save_pytorch(trained_tiny_model(), source, dtype=source_dtype)
    convert.main([source, str(tmp_path / "params"), "--dtype", dtype])
    convert.main([source, str(tmp_path / "cast.ckpt"), "--dtype", dtype])
    convert.main([str(tmp_path / "params"), str(tmp_path / "back.ckpt")])
    cast, back = (torch_io.open_state_dict(str(tmp_path / name)) for name in ("cast.ckpt", "back.ckpt"))
    assert set(back.dtypes.values()) == {np.dtype(jnp.dtype(dtype))}
    assert list(back) == list(cast) and all(np.array_equal(back[k], cast[k]) for k in cast)


def test_missing_block_lists_every_missing_key_and_writes_nothing(tmp_path):
    state = convert.export_weights(trained_tiny_model())
    del state["blocks.1.self_attn.q.weight"], state["blocks.1.ffn.0.bias"]
    with pytest.raises(torch_io.CheckpointError, match=r"missing \(2\).*blocks\.1\.ffn\.0\.bias.*blocks\.1\.self_attn\.q\.weight"):
        convert.import_weights(state, dit_config("tiny"), source="broken.ckpt")


@pytest.mark.parametrize("held", ["cam_encoder", "projector"])
def test_recammasters_two_camera_modules_come_together(held):
    """A checkpoint with one of them lost the other: refused, not completed with the other at its init."""
    dropped = {"cam_encoder": "projector", "projector": "cam_encoder"}[held]
    state = {k: v for k, v in convert.export_weights(trained_tiny_model()).items() if f".{dropped}." not in k}
    with pytest.raises(torch_io.CheckpointError, match=rf"part\.ckpt(.|\n)*missing \(4\): blocks\.0\.{dropped}\.bias"):
        convert.import_weights(state, dit_config("tiny"), source="part.ckpt")


@pytest.mark.parametrize("encoding", ["intrinsics", "plucker"])
def test_an_encodings_module_is_imported_beside_recammasters_two(encoding):
    model = trained_tiny_model(camera_encoding=encoding)
    assert_bit_exact(model, convert.import_weights(convert.export_weights(model), model.cfg, source="m.safetensors"))
    with pytest.raises(ValueError, match="unknown layout 'wan'"):
        convert.export_weights(model, layout="wan")


def test_opening_a_checkpoint_reads_no_tensor_until_it_is_loaded(tmp_path, monkeypatch):
    path = str(tmp_path / "m.safetensors")
    convert.save_pytorch(trained_tiny_model(), path)
    open_state_dict, reads = torch_io.open_state_dict, []

    def counting_reads(*args):
        state_dict = open_state_dict(*args)
        read = state_dict._read
        state_dict._read = lambda key: reads.append(key) or read(key)
        return state_dict
    monkeypatch.setattr(torch_io, "open_state_dict", counting_reads)
    _, tensors, _ = convert.open_pytorch(path)
    assert reads == []
    tensors["blocks.1.projector.weight"].load()
    assert reads == ["blocks.1.projector.weight"]


def test_wrong_shape_and_unexpected_keys_are_listed():
    state = convert.export_weights(trained_tiny_model())
    state["blocks.0.ffn.0.weight"] = np.zeros((129, 64), np.float32)
    state["blocks.0.extra.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(torch_io.CheckpointError) as err:
        convert.import_weights(state, dit_config("tiny"), source="bad.ckpt")
    message = str(err.value)
    assert "bad.ckpt" in message and "blocks.0.extra.weight" in message
    assert re.search(r"blocks\.0\.ffn\.0\.weight: expected \(128, 64\), found \(129, 64\)", message)
    with pytest.raises(torch_io.CheckpointError, match="^checkpoint: the weights do not match"):  # no source named
        convert.import_weights(state, dit_config("tiny"))


@pytest.mark.parametrize("name,shape", [("patch_embedding.weight", (65, 16, 1, 2, 2)), ("blocks.0.ffn.0.weight", (129, 64))])
def test_a_wrong_tensor_the_size_is_read_from_is_the_one_reported(tmp_path, name, shape):
    state = convert.export_weights(trained_tiny_model())
    state[name] = np.zeros(shape, np.float32)
    path = str(tmp_path / "bad.safetensors")
    torch_io.save_state_dict(state, path)
    with pytest.raises(torch_io.CheckpointError, match=r"wrong shape \(1\): " + re.escape(name) + ": expected"):
        convert.load_pytorch(path, num_heads=4)


def test_truncated_safetensors_is_a_clear_error_and_nothing_is_written(tmp_path):
    path = str(tmp_path / "wan.safetensors")
    convert.save_pytorch(trained_tiny_model(), path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(torch_io.CheckpointError, match="wan.safetensors"):
        convert.main([path, str(tmp_path / "out.ckpt")])
    assert sorted(os.listdir(tmp_path)) == ["wan.safetensors"]


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_files_are_written_one_tensor_at_a_time(tmp_path, suffix):
    """At most the tensor being written and the one before it are alive (counted by weakref finalizers)."""
    alive, most = [0], [0]

    def load(i):
        array = np.full((64, 64), i, np.float32)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(array, lambda: alive.__setitem__(0, alive[0] - 1))
        return array

    tensors = {f"t{i}": torch_io.LazyTensor((64, 64), np.dtype(np.float32), lambda i=i: load(i)) for i in range(20)}
    path = str(tmp_path / f"m{suffix}")
    torch_io.save_state_dict(tensors, path)
    assert most[0] <= 2
    reference = str(tmp_path / "torch_save.ckpt")
    torch.save({f"t{i}": torch.full((64, 64), float(i)) for i in range(20)}, reference)
    written, expected = torch_io.open_state_dict(path), torch_io.open_state_dict(reference)
    assert sorted(written) == sorted(expected) and all(np.array_equal(written[k], expected[k]) for k in expected)


class NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_an_output_folder_named_diffusers_is_written_as_a_diffusers_model(tmp_path):
    model = trained_tiny_model()
    path, out = str(tmp_path / "m.ckpt"), str(tmp_path / "transformer_diffusers")
    convert.save_pytorch(model, path)
    convert.main([path, out])
    assert sorted(os.listdir(out)) == sorted(["config.json", convert.DIFFUSERS_WEIGHTS, convert.RECORD_FILE])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == convert.diffusers_config(model.cfg)
    assert convert.detect_layout(torch_io.open_state_dict(out).shapes) == "diffusers"
    assert_bit_exact(model, convert.load_any(out, dtype="float32"))


def test_the_ckpt_layout_refuses_a_non_official_encoding_naming_the_formats_that_keep_it(tmp_path):
    path = str(tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match=re.escape(path) + r": .*no place for the camera_encoding='plucker' modules.*"
                                         r"\.safetensors file, a diffusers folder or a recam_jax params folder"):
        convert.save_pytorch(trained_tiny_model(camera_encoding="plucker"), path)
    assert not os.listdir(tmp_path)


def test_pickle_with_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.ckpt")
    torch.save({"patch_embedding.weight": torch.zeros(1), "payload": NotATensor()}, path)
    with pytest.raises(torch_io.CheckpointError, match="refused"):
        torch_io.open_state_dict(path)


def test_not_a_dit_checkpoint(tmp_path):
    path = str(tmp_path / "other.safetensors")
    torch_io.save_state_dict({"encoder.conv1.weight": np.zeros((2, 2), np.float32)}, path)
    with pytest.raises(torch_io.CheckpointError, match="not a Wan2.1 DiT checkpoint"):
        convert.load_pytorch(path)


def test_the_timestep_dtype_is_recorded_and_carried_through_conversions(tmp_path):
    model = trained_tiny_model()
    model.cfg = dataclasses.replace(model.cfg, timestep_dtype="bfloat16")
    path = str(tmp_path / "m.ckpt")
    convert.save_pytorch(model, path)
    assert convert.read_model_record(path)["timestep_dtype"] == "bfloat16"
    convert.main([path, str(tmp_path / "params")])
    assert convert.read_model_record(str(tmp_path / "params"))["timestep_dtype"] == "bfloat16"
    os.remove(path + convert.RECORD_SUFFIX)  # as the official releases: no record, trained on bf16 timesteps
    convert.main([path, str(tmp_path / "official.safetensors"), "--num_heads", "4"])
    assert convert.read_model_record(str(tmp_path / "official.safetensors"))["timestep_dtype"] == "bfloat16"


def test_a_scanned_model_is_saved_one_block_per_chunk(tmp_path):
    """tensorstore decodes whole chunks: a stacked weight in one chunk was decoded whole for each
    block's row (a scanned folder converted 3× slower than a per-block one)."""
    model = trained_tiny_model(scan_layers=True)
    convert.save_orbax(model, str(tmp_path / "m"))
    open_array = convert._stored_arrays(str(tmp_path / "m" / "params"))
    for path, array in params_of(model).items():
        chunk = open_array(path).chunk_layout.read_chunk.shape
        assert chunk == ((1, *array.shape[1:]) if path[0] == "blocks" else array.shape), path
    assert_bit_exact(model, convert.load_orbax(str(tmp_path / "m"), dtype="float32"))


def test_weights_go_to_the_device_unless_kept_on_host(tmp_path):
    """`on_host` is how the trainer loads a model too large for one device (it places the numpy weights
    shard by shard): in memory and from orbax it must give numpy arrays, and device arrays without it."""
    model = trained_tiny_model()
    state = convert.export_weights(model)
    convert.save_orbax(model, str(tmp_path / "params"))
    convert.save_pytorch(model, str(tmp_path / "m.ckpt"))
    loads = {"import_weights": lambda **kw: convert.import_weights(state, model.cfg, **kw),
             "load_orbax": lambda **kw: convert.load_orbax(str(tmp_path / "params"), dtype="float32", **kw),
             "load_any orbax": lambda **kw: convert.load_any(str(tmp_path / "params"), dtype="float32", **kw),
             "load_pytorch": lambda **kw: convert.load_pytorch(str(tmp_path / "m.ckpt"), dtype="float32", **kw),
             "load_any .ckpt": lambda **kw: convert.load_any(str(tmp_path / "m.ckpt"), dtype="float32", **kw)}
    for name, load in loads.items():
        on_device, on_host = load(), load(on_host=True)
        assert {type(v[...]) for _, v in nnx.state(on_host, nnx.Param).flat_state()} == {np.ndarray}, name
        assert all(isinstance(v[...], jax.Array) for _, v in nnx.state(on_device, nnx.Param).flat_state()), name
        assert_bit_exact(model, on_device)
        assert_bit_exact(model, on_host)
        exported = convert.export_weights(on_host)  # numpy weights export as they are
        assert all(np.array_equal(exported[k], v) for k, v in state.items()), name


def test_export_weights_casts_to_the_dtype_asked_for():
    model = trained_tiny_model()
    as_stored, bf16 = convert.export_weights(model), convert.export_weights(model, dtype="bfloat16")
    assert {v.dtype for v in bf16.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert all(np.array_equal(bf16[k], v.astype(ml_dtypes.bfloat16)) for k, v in as_stored.items())


def test_an_orbax_folder_records_the_shift_and_refuses_a_config_contradicting_it(tmp_path):
    path = str(tmp_path / "params")
    convert.save_orbax(trained_tiny_model(), path, shift=3.0)
    assert convert.read_model_record(path)["flow_shift"] == 3.0
    with pytest.raises(torch_io.CheckpointError, match=re.escape(path) + ".*num_heads: the record says 4, asked for 2"):
        convert.load_any(path, cfg=dit_config("tiny", num_heads=2))


def test_the_dit_holds_no_variable_but_its_params():
    """The converter reads and writes `nnx.state(model, nnx.Param)`: nothing else may hold weights."""
    for encoding in ("official", "intrinsics", "plucker"):
        model = convert.abstract_model(dit_config("tiny", camera_encoding=encoding))
        assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(model, nnx.Param)), encoding


def test_an_orbax_folder_of_zarr3_arrays_converts_too(tmp_path):
    """Newer orbax writes zarr3 arrays by default: the tensor reader takes the format from the folder."""
    import orbax.checkpoint as ocp

    model, folder = trained_tiny_model(), str(tmp_path / "params_orbax")
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True)) as checkpointer:
        checkpointer.save(os.path.join(folder, "params"), args=ocp.args.PyTreeSave(nnx.state(model, nnx.Param)))
    convert._write_record(convert.model_record(model.cfg), os.path.join(folder, convert.RECORD_FILE))
    assert convert._saved_tree(os.path.join(folder, "params")).use_zarr3
    convert.convert(folder, str(tmp_path / "m.ckpt"))
    assert_bit_exact(model, convert.load_pytorch(str(tmp_path / "m.ckpt"), dtype="float32"))


def test_the_command_line_shows_the_module_doc_and_each_arguments_help_and_names_what_it_wrote(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit):
        convert.main(["--help"])
    usage = capsys.readouterr().out
    assert convert.__doc__.strip() in usage  # the layouts' list and the usage line as written, not re-flowed
    for help_line in (r"^  input +\S.{10,}$", r"^  output +\S.{10,}$", r"--num-heads NUM_HEADS\n {24}\S.{10,}$",
                      r"^  --dtype DTYPE +\S.{10,}$"):
        assert re.search(help_line, usage, re.M), help_line
    path, out = str(tmp_path / "m.ckpt"), str(tmp_path / "params")
    convert.save_pytorch(trained_tiny_model(), path)
    convert.main([path, out, "--num-heads", "4"])
    assert capsys.readouterr().out == f"wrote {out}\n"


# --- Model records and the config read off the shapes: pure functions, no model built (each test
# kills mutants of the mutation run in docs/testing.md) -------------------------------------------

TINY_SHAPES = diffsynth_recammaster_shapes(64, 128, 32, 32, 2)


def tiny_record(**dit):
    return convert.model_record(dit_config("tiny", **dit), shift=5.0)


def test_a_record_parses_with_the_defaults_of_older_records_and_drops_run_choices():
    record = tiny_record()
    dit = {k: v for k, v in record["dit"].items() if k != "camera_encoding"}
    text = json.dumps({"dit": {**dit, "dtype": "bfloat16"}, "flow_shift": 3.0})  # before encodings and timestep dtypes
    assert convert._parse_record(text, "old.json") == {
        "dit": {**dit, "camera_encoding": "official", "patch_size": (1, 2, 2)}, "flow_shift": 3.0, "timestep_dtype": None}
    plucker = tiny_record(camera_encoding="plucker", timestep_dtype="bfloat16")
    parsed = convert._parse_record(json.dumps(plucker), "new.json")
    assert parsed["dit"]["camera_encoding"] == "plucker" and parsed["timestep_dtype"] == "bfloat16"


@pytest.mark.parametrize("text", ["{not json", json.dumps({"flow_shift": 1.0}), json.dumps({"dit": [1, 2]}),
                                  json.dumps({"dit": {"dim": 64}, "flow_shift": 1.0}),
                                  json.dumps({"dit": convert.model_record(dit_config("tiny"))["dit"]})])


def test_a_bad_record_is_refused_naming_its_source(text):
    with pytest.raises(torch_io.CheckpointError, match=r"^weights/m\.json: not a recam_jax model record \(missing or bad"):
        convert._parse_record(text, "weights/m.json")


def test_the_trained_timestep_dtype_defaults_by_the_age_of_the_record():
    assert convert.trained_timestep_dtype(None) == "bfloat16"  # official releases
    assert convert.trained_timestep_dtype({"timestep_dtype": None}) == "float32"  # recam_jax before the field
    assert convert.trained_timestep_dtype({"timestep_dtype": "bfloat16"}) == "bfloat16"


def test_check_record_lists_every_contradiction_but_official_weights_fit_any_encoding():
    record = convert._parse_record(json.dumps(tiny_record()), "m.json")
    convert.check_record(dit_config("tiny"), record, "m.ckpt")
    convert.check_record(dit_config("tiny", dtype="float32", scan_layers=False), record, "m.ckpt")  # run choices
    convert.check_record(dit_config("tiny", camera_encoding="plucker"), record, "m.ckpt")
    convert.check_record(dit_config("tiny", num_heads=2), None, "m.ckpt")
    plucker = convert._parse_record(json.dumps(tiny_record(camera_encoding="plucker")), "m.json")
    with pytest.raises(torch_io.CheckpointError,
                       match=r"^m\.ckpt: the weights were saved as a different model; camera_encoding: the record "
                             r"says plucker, the config official$"):
        convert.check_record(dit_config("tiny"), plucker, "m.ckpt", other="the config")
    with pytest.raises(torch_io.CheckpointError, match=r"different model; num_heads: the record says 4, asked for 2; "
                                                       r"patch_size: the record says \(1, 2, 2\), asked for \(1, 1, 1\)$"):
        convert.check_record(dit_config("tiny", num_heads=2, patch_size=(1, 1, 1)), record, "m.ckpt")


def diffusers_shapes(shapes, cfg):
    return {w.diffusers: shapes[w.wan] for w in convert.weight_table(cfg) if w.wan in shapes}


def test_infer_config_reads_both_layouts_the_record_and_the_overrides():
    tiny = dit_config("tiny")
    assert convert.detect_layout(TINY_SHAPES) == "recammaster"
    assert convert.infer_config(TINY_SHAPES, num_heads=4) == tiny
    assert convert.infer_config(diffusers_shapes(TINY_SHAPES, tiny), num_heads=4) == tiny
    record = convert._parse_record(json.dumps(tiny_record(num_heads=8)), "m.json")
    assert convert.infer_config(TINY_SHAPES, record=record) == dit_config("tiny", num_heads=8)
    assert convert.infer_config(TINY_SHAPES, record=record, dtype="float32", scan_layers=False) == dit_config(
        "tiny", num_heads=8, dtype="float32", scan_layers=False)
    with pytest.raises(torch_io.CheckpointError, match=r"^checkpoint: dim 64 does not split into 5 heads$"):
        convert.infer_config(TINY_SHAPES, num_heads=5)
    with pytest.raises(torch_io.CheckpointError, match=r"^m\.ckpt: cannot read the model size"):
        convert.infer_config({"time_projection.1.weight": (384, 64)}, source="m.ckpt")
    with pytest.raises(torch_io.CheckpointError, match=r"^m\.ckpt: .*num_heads: the record says 8, asked for 2$"):
        convert.infer_config(TINY_SHAPES, num_heads=2, record=record, source="m.ckpt")
    with pytest.raises(torch_io.CheckpointError, match=r"^m\.ckpt: .*ffn_dim: the record says 256, the tensor shapes say 128"):
        convert.infer_config(TINY_SHAPES, record=convert._parse_record(json.dumps(tiny_record(ffn_dim=256)), "r"),
                             source="m.ckpt")


@pytest.mark.parametrize("encoding", ["intrinsics", "plucker"])
def test_infer_config_finds_the_camera_encoding_in_either_layout(encoding):
    cfg = dit_config("tiny", camera_encoding=encoding)
    module, width = convert.camera_encoding.EXTRA_MODULES[encoding]
    shapes = {**TINY_SHAPES, **{f"blocks.{i}.{module}.weight": (64, width) for i in range(2)},
              **{f"blocks.{i}.{module}.bias": (64,) for i in range(2)}}
    assert convert.infer_config(shapes, num_heads=4) == cfg
    assert convert.infer_config(diffusers_shapes(shapes, cfg), num_heads=4) == cfg


def test_read_model_record_beside_a_file_in_a_header_in_a_folder_and_from_legacy_folders(tmp_path):
    record = tiny_record(camera_encoding="plucker")
    parsed = convert._parse_record(json.dumps(record), "r")
    ckpt = str(tmp_path / "m.ckpt")
    with open(ckpt, "wb") as f:
        f.write(b"not a pickle")  # only the record is read, never the weights
    assert convert.read_model_record(ckpt) is None
    with open(ckpt + convert.RECORD_SUFFIX, "w") as f:
        f.write("{")
    with pytest.raises(torch_io.CheckpointError, match=r"^\S*m\.ckpt\.recam_jax\.json: not a recam_jax"):
        convert.read_model_record(ckpt)
    with open(ckpt + convert.RECORD_SUFFIX, "w") as f:
        json.dump(record, f)
    assert convert.read_model_record(ckpt) == parsed
    header = str(tmp_path / "m.safetensors")
    torch_io.save_state_dict({"x": np.zeros(1, np.float32)}, header, {convert.RECORD_KEY: json.dumps(record)})
    assert convert.read_model_record(header) == parsed
    torch_io.save_state_dict({"x": np.zeros(1, np.float32)}, header, {convert.RECORD_KEY: "{"})
    with pytest.raises(torch_io.CheckpointError, match=r"m\.safetensors \(header metadata 'recam_jax'\): not a recam_jax"):
        convert.read_model_record(header)
    folder = tmp_path / "params"
    folder.mkdir()
    assert convert.read_model_record(str(folder)) is None
    (folder / convert.LEGACY_CONFIG_FILE).write_text(json.dumps({"dim": 64}))
    with pytest.raises(torch_io.CheckpointError, match=r"^\S*params/dit_config\.json: not a recam_jax"):
        convert.read_model_record(str(folder))
    (folder / convert.LEGACY_CONFIG_FILE).write_text(json.dumps({**record["dit"], "camera_encoding": "official"}))
    legacy = convert.read_model_record(str(folder) + "/")
    assert legacy == {"dit": {**parsed["dit"], "camera_encoding": "official"}, "flow_shift": None, "timestep_dtype": None}
    (folder / convert.RECORD_FILE).write_text(json.dumps(record))  # the record wins over the legacy file
    assert convert.read_model_record(str(folder)) == parsed


def test_diffusers_names_and_shapes_are_those_of_diffusers_own_model():
    """Our diffusers layout against a tiny `WanTransformer3DModel` built from our `diffusers_config`:
    every name and shape (the values' layouts are checked by tests/test_dit.py's forward passes)."""
    from diffusers import WanTransformer3DModel

    cfg = dit_config("tiny", camera=False)
    config = convert.diffusers_config(cfg)
    assert config.pop("_class_name") == "WanTransformer3DModel"
    reference = WanTransformer3DModel(**config)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert convert.detect_layout(state) == "diffusers"
    assert convert.infer_config({k: v.shape for k, v in state.items()}, num_heads=4, camera=False) == cfg
    tensors = convert.pytorch_tensors(state, cfg, "diffusers")  # refuses any missing, unexpected or wrong-shaped name
    assert set(tensors) == {w.wan for w in convert.weight_table(cfg)}
    for w in convert.weight_table(cfg):
        np.testing.assert_array_equal(tensors[w.wan].load(), state[w.diffusers])


def test_the_diffusers_config_is_the_released_one():
    """transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, less the fields diffusers defaults."""
    released = {"_class_name": "WanTransformer3DModel", "attention_head_dim": 128, "cross_attn_norm": True,
                "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "in_channels": 16, "num_attention_heads": 12,
                "num_layers": 30, "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads",
                "text_dim": 4096}
    assert convert.diffusers_config(dit_config("1.3B")) == released


def test_a_tie_is_refused_naming_each_blocks_own_tensor_in_either_layout():
    """Block 1's three ffn tensors say 256, block 0's 128: a tie, each reading under its block's own name."""
    shapes = {**TINY_SHAPES, "blocks.1.ffn.0.weight": (256, 64), "blocks.1.ffn.0.bias": (256,),
              "blocks.1.ffn.2.weight": (64, 256)}
    with pytest.raises(torch_io.CheckpointError, match=r"^m: the tensors disagree on ffn_dim: blocks\.0\.ffn\.0\.weight says "
                                                       r"128, .*blocks\.1\.ffn\.0\.weight says 256, "):
        convert.infer_config(shapes, num_heads=4, source="m")
    with pytest.raises(torch_io.CheckpointError, match=r"blocks\.0\.ffn\.net\.0\.proj\.weight says 128, .*"
                                                       r"blocks\.1\.ffn\.net\.0\.proj\.weight says 256, "):
        convert.infer_config(diffusers_shapes(shapes, dit_config("tiny")), num_heads=4)


def test_names_of_neither_layout_are_refused_naming_what_each_layout_needs():
    with pytest.raises(torch_io.CheckpointError, match=r"^not a Wan2\.1 DiT checkpoint: found neither 'time_projection\.1\."
                                                       r"weight' \(Wan/ReCamMaster layout\) nor 'condition_embedder\."
                                                       r"time_proj\.weight' \(diffusers layout\)$"):
        convert.detect_layout({"encoder.conv1.weight": (2, 2)})


def test_weights_of_no_official_size_without_a_record_are_refused_showing_their_size():
    expected = ("checkpoint: the number of attention heads is not in the weights, and they have no model record "
                "('recam_jax' in a .safetensors header, FILE.recam_jax.json beside a file, recam_jax.json in a folder). "
                "Their size (dim=64, ffn_dim=128, num_layers=2, in_dim=16, out_dim=16, text_dim=32, freq_dim=32, "
                "patch_size=(1, 2, 2)) is no official Wan2.1 size (1.3B, 14B): pass the head count, --num_heads N "
                "(recam_jax.convert, recam_jax.sample) or num_heads=N.")
    with pytest.raises(torch_io.CheckpointError, match=f"^{re.escape(expected)}$"):
        convert.infer_config(TINY_SHAPES)


def test_a_size_none_of_whose_tensors_is_present_is_refused_naming_it():
    shapes = {k: v for k, v in TINY_SHAPES.items() if k != "text_embedding.0.weight"}
    with pytest.raises(torch_io.CheckpointError, match=r"^m: cannot read text_dim from the tensor shapes: none of its "
                                                       r"tensors is present$"):
        convert.infer_config(shapes, num_heads=4, source="m")


def test_the_model_size_needs_a_5d_patch_embedding_and_blocks_and_skips_tensors_of_too_few_axes():
    without_blocks = {k: v for k, v in TINY_SHAPES.items() if not k.startswith("blocks.")}
    with pytest.raises(torch_io.CheckpointError, match=r"^m: cannot read the model size: expected a 5-d 'patch_embedding\."
                                                       r"weight' and 'blocks\.N\.\*' tensors, found patch_embedding\.weight "
                                                       r"\(64, 16, 1, 2, 2\), 0 blocks$"):
        convert.infer_config(without_blocks, num_heads=4, source="m")
    # A 1-d tensor where a 2-d one reads a size on its axis 1: outvoted (the shape check reports it).
    assert convert.infer_config({**TINY_SHAPES, "text_embedding.2.weight": (64,)}, num_heads=4) == dit_config("tiny")
