"""The Flax Wan2.1 VAE against diffusers' PyTorch `AutoencoderKLWan` (tiny, random weights, float32)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from flax import nnx

from recam_jax import sharding, vae_convert
from recam_jax.models.vae import VAE_CONFIGS, VAEConfig, WanVAE, blend_tiles
from recam_jax.torch_io import CheckpointError, open_state_dict, save_state_dict

TINY = VAE_CONFIGS["tiny"]


@pytest.fixture(autouse=True, scope="module")
def highest_precision():
    """float32 matmuls and convolutions on CPU, so parity is measured, not XLA's default precision."""
    with jax.default_matmul_precision("highest"):
        yield


def diffusers_vae(cfg: VAEConfig, seed=0) -> AutoencoderKLWan:
    """A random diffusers VAE of `cfg`, norm scales randomised too (they start at one)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                           num_res_blocks=cfg.num_res_blocks, attn_scales=[],
                           temperal_downsample=list(cfg.temporal_downsample),
                           latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std)).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
    return vae


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vae") / "tiny_diffusers.safetensors")
    save_state_dict({k: v.numpy() for k, v in diffusers_vae(TINY).state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def ref():
    return diffusers_vae(TINY)


@pytest.fixture(scope="module")
def model(weights_file):
    vae = WanVAE(TINY, rngs=nnx.Rngs(1))
    assert vae_convert.load_weights(vae, weights_file) == "diffusers"
    return vae


def to_torch(x):  # channels-last → PyTorch's (batch, channels, frames, height, width)
    return torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3)


def from_torch(t):
    return t.permute(0, 2, 3, 4, 1).numpy()


def rel_err(out, ref):
    return float(np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref))


def video(frames, h=24, w=40, batch=1, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (batch, frames, h, w, 3)).astype(np.float32)


encode_moments = nnx.jit(lambda m, x: m.encode_moments(x))
encode_one_shot = nnx.jit(lambda m, x: m.encode_moments(x, chunked=False))
decode_raw = nnx.jit(lambda m, z: m.decode_raw(z))
decode_one_shot = nnx.jit(lambda m, z: m.decode_raw(z, chunked=False))


@pytest.mark.parametrize("frames,batch", [(1, 1), (5, 2), (13, 1)])
def test_encode_mean_matches_diffusers(model, ref, frames, batch):
    x = video(frames, batch=batch)
    with torch.no_grad():
        expected = from_torch(ref.encode(to_torch(x)).latent_dist.mean)
    mean, _ = encode_moments(model, x)
    assert mean.shape == (batch, 1 + (frames - 1) // 4, 3, 5, TINY.z_dim)
    assert rel_err(mean, expected) <= 1e-5


@pytest.mark.parametrize("latent_frames", [1, 4])
def test_decode_matches_diffusers(model, ref, latent_frames):
    z = 0.5 * np.random.RandomState(1).randn(1, latent_frames, 3, 5, TINY.z_dim).astype(np.float32)
    with torch.no_grad():
        expected = from_torch(ref.decode(to_torch(z)).sample)
    out = decode_raw(model, z)
    assert out.shape == (1, 1 + 4 * (latent_frames - 1), 24, 40, 3)
    assert np.mean(np.abs(expected) < 1) > 0.5, "the clamp to [-1, 1] should not hide most of the output"
    assert rel_err(out, expected) <= 1e-5


def test_normalised_latents_follow_the_wan_pipeline(model, ref):
    """encode → (mean - latents_mean) / latents_std; decode undoes it, as the Wan pipelines do outside diffusers."""
    x = video(5)
    mean_c, std_c = np.float32(TINY.latents_mean), np.float32(TINY.latents_std)
    with torch.no_grad():
        expected = (from_torch(ref.encode(to_torch(x)).latent_dist.mean) - mean_c) / std_c
        latents = nnx.jit(lambda m, x: m.encode(x))(model, x)
        assert rel_err(latents, expected) <= 1e-5
        expected_video = from_torch(ref.decode(to_torch(np.asarray(latents) * std_c + mean_c)).sample)
    assert rel_err(nnx.jit(lambda m, z: m.decode(z))(model, latents), expected_video) <= 1e-5


def test_sampling_uses_the_posterior_spread(model):
    x = video(5)
    mean = nnx.jit(lambda m, x: m.encode(x))(model, x)
    a, b = (nnx.jit(lambda m, x, k: m.encode(x, k))(model, x, jax.random.key(s)) for s in (0, 1))
    assert not np.allclose(a, mean) and not np.allclose(a, b)
    assert np.allclose(nnx.jit(lambda m, x, k: m.encode(x, k))(model, x, jax.random.key(0)), a)


def test_chunked_equals_one_shot(model):
    x = video(9, seed=3)
    assert rel_err(encode_moments(model, x)[0], np.asarray(encode_one_shot(model, x)[0])) <= 1e-5
    z = np.random.RandomState(4).randn(1, 3, 3, 5, TINY.z_dim).astype(np.float32)
    assert rel_err(decode_raw(model, z), np.asarray(decode_one_shot(model, z))) <= 1e-5


def test_tile_blending_reassembles_a_local_function():
    """With a pixel-local fn, blended overlapping tiles must give back exactly the untiled output."""
    x = jnp.asarray(np.random.RandomState(5).randn(2, 3, 11, 14, 4).astype(np.float32))
    upsample = lambda t: jnp.repeat(jnp.repeat(t, 8, axis=2), 8, axis=3) * 2.0  # noqa: E731
    tiled = blend_tiles(upsample, x, tile=(4, 6), overlap=(2, 3), in_scale=1, out_scale=8)
    np.testing.assert_allclose(tiled, upsample(x), rtol=1e-6, atol=1e-6)


def test_tiled_decode_near_untiled(model):
    z = np.random.RandomState(2).randn(1, 2, 10, 14, TINY.z_dim).astype(np.float32)
    full = nnx.jit(lambda m, z: m.decode(z))(model, z)
    one_tile = nnx.jit(lambda m, z: m.decode_tiled(z, (10, 14), (4, 4)))(model, z)
    assert rel_err(one_tile, np.asarray(full)) <= 1e-6
    # Tiles see zeros past their edges and attend only within themselves: an approximation. Bound
    # measured on this random tiny model (0.11); trained weights are smoother.
    tiled = nnx.jit(lambda m, z: m.decode_tiled(z, (8, 10), (4, 4)))(model, z)
    assert rel_err(tiled, np.asarray(full)) <= 0.15


@pytest.mark.parametrize("shape", [(1, 8, 24, 40, 3), (1, 5, 20, 40, 3), (1, 5, 24, 40, 4), (5, 24, 40, 3)])
def test_bad_video_shape_is_named(model, shape):
    with pytest.raises(ValueError, match=r"video shape \(" + ", ".join(map(str, shape))):
        model.encode(jnp.zeros(shape))


def test_bad_latent_shape_is_named(model):
    with pytest.raises(ValueError, match=r"latent shape \(1, 2, 3, 5, 16\)"):
        model.decode(jnp.zeros((1, 2, 3, 5, 16)))


# Wan2.1's block layout (the one diffusers' own official-key converter hard-codes), at a small width.
WAN21_BLOCKS = VAEConfig(base_dim=4, z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)


# Wan2.1's block layout (the one diffusers' own official-key converter hard-codes), at a small width.
WAN21_BLOCKS = VAEConfig(base_dim=4, z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)


def assert_file_is_state_dict_of(path, reference, layout):
    """The file, read by diffusers' rules (its own converter for the official layout), is exactly `reference`'s state dict."""
    written = {k: torch.from_numpy(np.asarray(v)) for k, v in open_state_dict(path).items()}
    if layout == "original":
        written = convert_wan_vae_to_diffusers(written)
    expected = reference.state_dict()
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key


def test_saved_diffusers_file_is_the_diffusers_models_state_dict(model, ref, tmp_path):
    """`model` holds `ref`'s weights (its loading is checked by the parity tests above)."""
    path = str(tmp_path / "out.safetensors")
    vae_convert.save_weights(model, path, "diffusers")
    assert_file_is_state_dict_of(path, ref, "diffusers")


def test_saved_official_file_is_what_diffusers_converts_back(tmp_path):
    reference = diffusers_vae(WAN21_BLOCKS, seed=4)
    source = str(tmp_path / "in.safetensors")
    save_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, source)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(WAN21_BLOCKS, rngs=nnx.Rngs(0))))
    vae = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state))  # eager init takes minutes
    vae_convert.load_weights(vae, source)
    path = str(tmp_path / "Wan2.1_VAE.pth")
    vae_convert.save_weights(vae, path, "original")
    assert_file_is_state_dict_of(path, reference, "original")


def test_original_layout_import_gives_the_same_model(model, tmp_path):
    path = str(tmp_path / "Wan2.1_VAE.pth")
    vae_convert.save_weights(model, path, "original")
    assert "encoder.downsamples.0.residual.0.gamma" in open_state_dict(path)
    imported = WanVAE(TINY, rngs=nnx.Rngs(3))
    assert vae_convert.load_weights(imported, path) == "original"
    x = video(5)
    np.testing.assert_array_equal(encode_moments(imported, x)[0], encode_moments(model, x)[0])


def test_original_keys_match_diffusers_converter():
    """Our diffusers → official mapping, inverted by diffusers' own converter, must be the identity.

    diffusers' converter hard-codes Wan2.1's block layout (2 residual blocks, dim_mult 1, 2, 4, 4)."""
    abstract = nnx.eval_shape(lambda: WanVAE(WAN21_BLOCKS, rngs=nnx.Rngs(0)))
    original = vae_convert.torch_names(abstract, "original")
    back = convert_wan_vae_to_diffusers({k: vae_convert.diffusers_key(p) for k, p in original.items()})
    assert back == {k: k for k in back} and len(back) == len(original)


def test_convert_cli_between_layouts(weights_file, tmp_path):
    out = str(tmp_path / "wan.pth")
    vae_convert.main([weights_file, out, "--config", "tiny"])
    diffusers_sd = open_state_dict(weights_file)
    assert open_state_dict(out)["encoder.conv1.weight"].tobytes() == diffusers_sd["encoder.conv_in.weight"].tobytes()


def assert_refused(source, target, *fragments):
    with pytest.raises(CheckpointError) as err:
        vae_convert.main([source, target, "--config", "tiny"])
    for fragment in fragments:
        assert fragment in str(err.value)
    assert not os.path.exists(target)


def test_truncated_file_is_refused(weights_file, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    data = open(weights_file, "rb").read()
    bad.write_bytes(data[: len(data) // 2])
    assert_refused(str(bad), str(tmp_path / "out.pth"), str(bad))


def test_missing_and_misshaped_keys_are_listed(weights_file, tmp_path):
    sd = dict(open_state_dict(weights_file))
    del sd["decoder.conv_in.bias"]
    sd["encoder.conv_out.weight"] = sd["encoder.conv_out.weight"][:4]
    bad = str(tmp_path / "bad.safetensors")
    save_state_dict(sd, bad)
    assert_refused(bad, str(tmp_path / "out.pth"), bad, "missing (1): decoder.conv_in.bias",
                   "encoder.conv_out.weight: expected (8, 16, 3, 3, 3), found (4, 16, 3, 3, 3)")


def test_unknown_file_layout_is_refused(tmp_path):
    bad = str(tmp_path / "other.safetensors")
    save_state_dict({"foo.weight": np.zeros(2, np.float32)}, bad)
    assert_refused(bad, str(tmp_path / "out.pth"), bad, "encoder.conv_in.weight")


def test_vae_parameters_have_rules_for_every_logical_axis():
    model = nnx.eval_shape(lambda: WanVAE(VAE_CONFIGS["tiny"], rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh({"data": -1})
    shardings = sharding.param_shardings(nnx.state(model, nnx.Param), mesh)  # raises on an unknown name
    assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
