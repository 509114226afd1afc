"""Weight conversion: exact round trips, official key layout, safe loading, clear errors."""

import dataclasses
import os
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from recam_jax import convert, torch_io
from recam_jax.models.dit import WanDiT, dit_config


def trained_tiny_model(seed=0, scan_layers=True):
    """A tiny model whose camera weights are random (not at init), so round trips mean something."""
    model = WanDiT(dit_config("tiny", dtype="float32", scan_layers=scan_layers), rngs=nnx.Rngs(seed))
    for path, kernel in nnx.state(model, nnx.Param).flat_state():
        if path[-2] in ("cam_encoder", "projector") and path[-1] == "kernel":
            kernel[...] = jax.random.normal(jax.random.key(seed + 1), kernel.shape)
    return model


def params_of(model):
    return {path: np.asarray(v[...]) for path, v in nnx.state(model, nnx.Param).flat_state()}


def assert_bit_exact(a, b):
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
    state = torch.load(path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == diffsynth_recammaster_shapes(64, 128, 32, 32, 2)
    np.testing.assert_array_equal(state["blocks.1.self_attn.q.weight"].numpy(),
                                  block_param(model, 1, "self_attn", "q", "kernel").T)
    assert_bit_exact(model, convert.load_pytorch(path, num_heads=4, dtype="float32", scan_layers=scan_layers))


def test_diffusers_folder_round_trip_is_bit_exact(tmp_path):
    model = trained_tiny_model(seed=3)
    path = str(tmp_path / "transformer_diffusers")
    convert.save_pytorch(model, path)
    assert convert.detect_layout(torch_io.open_state_dict(path)) == "diffusers"
    assert_bit_exact(model, convert.load_pytorch(path, num_heads=4, dtype="float32"))


def test_base_wan_safetensors_gets_camera_modules_at_official_init(tmp_path):
    model = trained_tiny_model()
    path = str(tmp_path / "wan.safetensors")
    convert.save_pytorch(model, path)  # the wan layout has no camera modules
    restored = convert.load_pytorch(path, num_heads=4, dtype="float32")
    for n in range(restored.cfg.num_layers):
        np.testing.assert_array_equal(block_param(restored, n, "cam_encoder", "kernel"), 0)
        np.testing.assert_array_equal(block_param(restored, n, "projector", "kernel"), np.eye(64))
        np.testing.assert_array_equal(block_param(restored, n, "projector", "bias"), 0)


def test_sharded_safetensors_with_index(tmp_path):
    state = convert.export_weights(trained_tiny_model(), "wan")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        torch_io.save_state_dict({k: state[k] for k in keys}, str(tmp_path / file))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        f.write('{"weight_map": {%s}}' % ", ".join(f'"{k}": "{file}"' for file, ks in halves.items() for k in ks))
    restored = convert.load_pytorch(str(tmp_path), num_heads=4, dtype="float32")
    np.testing.assert_array_equal(block_param(restored, 1, "ffn", "fc2", "kernel"), state["blocks.1.ffn.2.weight"].T)


def test_bf16_export(tmp_path):
    path = str(tmp_path / "m.ckpt")
    convert.save_pytorch(trained_tiny_model(), path, dtype="bfloat16")
    assert {v.dtype for v in torch.load(path, weights_only=True).values()} == {torch.bfloat16}
    restored = convert.load_pytorch(path, num_heads=4, dtype="float32")
    assert restored.blocks.self_attn.q.kernel[...].dtype == np.float32


def test_orbax_round_trip_and_cli(tmp_path):
    model = trained_tiny_model()
    ckpt = str(tmp_path / "in.ckpt")
    convert.save_pytorch(model, ckpt)
    convert.main([ckpt, str(tmp_path / "params"), "--num-heads", "2"])
    convert.main([str(tmp_path / "params"), str(tmp_path / "out.ckpt")])
    original, again = torch.load(ckpt, weights_only=True), torch.load(str(tmp_path / "out.ckpt"), weights_only=True)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


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


def test_missing_block_lists_every_missing_key_and_writes_nothing(tmp_path):
    state = convert.export_weights(trained_tiny_model(), "recammaster")
    del state["blocks.1.self_attn.q.weight"], state["blocks.1.ffn.0.bias"]
    with pytest.raises(torch_io.CheckpointError, match=r"missing \(2\).*blocks\.1\.ffn\.0\.bias.*blocks\.1\.self_attn\.q\.weight"):
        convert.import_weights(state, dit_config("tiny"), source="broken.ckpt")


def test_wrong_shape_and_unexpected_keys_are_listed():
    state = convert.export_weights(trained_tiny_model(), "recammaster")
    state["blocks.0.ffn.0.weight"] = np.zeros((129, 64), np.float32)
    state["blocks.0.extra.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(torch_io.CheckpointError) as err:
        convert.import_weights(state, dit_config("tiny"), source="bad.ckpt")
    message = str(err.value)
    assert "bad.ckpt" in message and "blocks.0.extra.weight" in message
    assert re.search(r"blocks\.0\.ffn\.0\.weight: expected \(128, 64\), found \(129, 64\)", message)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = str(tmp_path / "wan.safetensors")
    convert.save_pytorch(trained_tiny_model(), path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(torch_io.CheckpointError, match="wan.safetensors"):
        convert.load_pytorch(path, num_heads=4)
    assert not os.path.exists(tmp_path / "out.ckpt")


class NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


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
