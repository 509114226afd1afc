"""Camera encodings: a no-op at init, wired to their inputs, Plücker geometry, and their weights on disk."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recam_jax import convert, evaluate, flow
from recam_jax.models import camera_encoding
from recam_jax.models.dit import WanDiT, dit_config

NEW_ENCODINGS = ("intrinsics", "plucker")


def model(encoding="official", scan_layers=True, seed=0):
    return WanDiT(dit_config("tiny", dtype="float32", scan_layers=scan_layers, camera_encoding=encoding),
                  rngs=nnx.Rngs(seed))


def inputs(seed=0, batch=2):
    """Latents of 2 + 2 frames on a 5×3 token grid (prime sizes), a trained-looking camera and lenses."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, 4, 10, 6, 16))
    camera = rng.standard_normal((batch, 2, 12))
    intrinsics = rng.uniform(0.4, 2.0, (batch, 2, 8))
    text = rng.standard_normal((batch, 5, 32))
    return [jnp.asarray(x, jnp.float32) for x in (latents, np.array([3.0, 700.0][:batch]), text, camera, intrinsics)]


def with_weights_of(encoding, reference, scan_layers=True):
    """A model of `encoding` holding `reference`'s weights (as a loaded checkpoint would): its extra
    module keeps its init."""
    loaded = model(encoding, scan_layers, seed=1)
    nnx.update(loaded, nnx.state(reference, nnx.Param))
    return loaded


def randomize(module, seed=2):
    for name in ("kernel", "bias"):
        variable = getattr(module, name)
        variable[...] = jax.random.normal(jax.random.key(seed), variable.shape)


def trained_camera(m):
    """The official camera encoder moved off its zero init (as after training)."""
    for block in ([m.blocks] if m.cfg.scan_layers else m.blocks):
        randomize(block.cam_encoder, seed=3)
    return m


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("encoding", NEW_ENCODINGS)
def test_new_encodings_at_init_compute_what_official_computes(encoding, scan_layers):
    official = trained_camera(model("official", scan_layers))
    latents, t, text, camera, intrinsics = inputs()
    expected = official(latents, t, text, camera)
    out = with_weights_of(encoding, official, scan_layers)(latents, t, text, camera, intrinsics)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("encoding", NEW_ENCODINGS)
def test_trained_encodings_read_the_lens_and_official_ignores_it(encoding):
    latents, t, text, camera, intrinsics = inputs()
    other_lens = intrinsics.at[:, :, 0].multiply(2.0)  # the target's focal length doubled
    official = model("official")
    np.testing.assert_array_equal(official(latents, t, text, camera, intrinsics),
                                  official(latents, t, text, camera, other_lens))
    trained = model(encoding)
    randomize(getattr(trained.blocks, camera_encoding.EXTRA_MODULES[encoding][0]))
    out, out_other = trained(latents, t, text, camera, intrinsics), trained(latents, t, text, camera, other_lens)
    assert float(jnp.max(jnp.abs(out - out_other))) > 1e-3


def test_plucker_rays_match_the_pinhole_geometry():
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    pose = np.concatenate([rotation, rng.standard_normal((3, 1))], axis=1)  # camera-to-source 3×4
    fx, fy, cx, cy = 0.8, 1.4, 0.45, 0.55
    h, w = 3, 5
    rays = np.asarray(camera_encoding.plucker_rays(jnp.asarray(pose.reshape(1, 1, 12), jnp.float32),
                                                   jnp.asarray([[[fx, fy, cx, cy, 1, 1, 0.5, 0.5]]], jnp.float32),
                                                   (h, w))).reshape(h, w, 6)
    for row in range(h):
        for col in range(w):
            pixel = ((col + 0.5) / w, (row + 0.5) / h)  # a token's centre, as fractions of width and height
            direction = rotation @ np.array([(pixel[0] - cx) / fx, (pixel[1] - cy) / fy, 1.0])
            direction /= np.linalg.norm(direction)
            np.testing.assert_allclose(rays[row, col], np.concatenate([direction, np.cross(pose[:, 3], direction)]),
                                       atol=1e-5)


def test_plucker_embedding_goes_to_the_target_half_only():
    _, _, _, camera, intrinsics = inputs()
    block = model("plucker", scan_layers=False).blocks[0]
    randomize(block.plucker_encoder)
    grid = (4, 5, 3)  # [target ‖ source] frames, token rows, token columns
    added = camera_encoding.add_camera(block, jnp.zeros((2, 4 * 5 * 3, 64)),
                                       camera_encoding.block_inputs("plucker", camera, intrinsics, grid), grid)
    target, source = added[:, : 2 * 15], added[:, 2 * 15:]
    assert float(jnp.min(jnp.abs(target))) > 0 and float(jnp.max(jnp.abs(source))) == 0.0  # cam_encoder is zero


@pytest.mark.parametrize("encoding", NEW_ENCODINGS)
def test_lens_encodings_need_the_intrinsics(encoding):
    latents, t, text, camera, _ = inputs()
    with pytest.raises(ValueError, match=f"camera_encoding='{encoding}' needs intrinsics"):
        model(encoding)(latents, t, text, camera)


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="camera_encoding='zoom'"):
        model("zoom")


@pytest.mark.parametrize("encoding", NEW_ENCODINGS)
def test_safetensors_keep_a_trained_encoding_and_ckpt_refuses_it(tmp_path, encoding):
    trained = model(encoding)
    module = camera_encoding.EXTRA_MODULES[encoding][0]
    randomize(getattr(trained.blocks, module))
    path = str(tmp_path / "model.safetensors")
    convert.save_pytorch(trained, path)
    restored = convert.load_any(path)  # no config given: the record says which encoding
    assert restored.cfg.camera_encoding == encoding
    for a, b in zip(jax.tree.leaves(nnx.state(trained, nnx.Param)), jax.tree.leaves(nnx.state(restored, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    assert f"blocks.1.{module}.weight" in convert.export_weights(trained)
    with pytest.raises(ValueError, match="official ReCamMaster .ckpt layout has no place"):
        convert.save_pytorch(trained, str(tmp_path / "model.ckpt"))
    assert not (tmp_path / "model.ckpt").exists()


@pytest.mark.parametrize("encoding", NEW_ENCODINGS)
def test_a_recammaster_checkpoint_loads_into_a_new_encoding_unchanged(tmp_path, encoding):
    official = trained_camera(model("official"))
    path = str(tmp_path / "recammaster.ckpt")
    convert.save_pytorch(official, path)
    loaded = convert.load_any(path, cfg=dataclasses.replace(official.cfg, camera_encoding=encoding))
    extra = getattr(loaded.blocks, camera_encoding.EXTRA_MODULES[encoding][0])
    assert not np.any(extra.kernel[...]) and not np.any(extra.bias[...])
    latents, t, text, camera, intrinsics = inputs()
    np.testing.assert_allclose(loaded(latents, t, text, camera, intrinsics), official(latents, t, text, camera),
                               atol=1e-6, rtol=0)


def test_camera_sensitivity_reports_the_lens_gap_of_a_lens_encoding():
    latents, _, text, camera, intrinsics = inputs(batch=2)
    batch = {"target_latents": latents[:, :2], "source_latents": latents[:, 2:], "text_embeds": text,
             "camera": camera, "intrinsics": intrinsics, "timestep_index": jnp.array([300, 800]),
             "noise_seed": jnp.array([0, 1])}
    at_init = evaluate.camera_sensitivity(model("intrinsics"), batch, flow.FlowConfig())
    assert float(at_init["intrinsics_gap"]) == 0.0
    trained = model("intrinsics")
    randomize(trained.blocks.intrinsics_encoder)
    metrics = evaluate.camera_sensitivity(trained, batch, flow.FlowConfig())
    assert abs(float(metrics["intrinsics_gap"])) > 1e-4
    assert "intrinsics_gap" not in evaluate.camera_sensitivity(model("official"), batch, flow.FlowConfig())
