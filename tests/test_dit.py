"""The Flax DiT is the same function as diffusers' WanTransformer3DModel (+ ReCamMaster's camera math)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from flax import nnx

from recam_jax import convert
from recam_jax.models.dit import QKV_NAMES, WanDiT, dit_config

HEADS, HEAD_DIM, TEXT_DIM = 2, 24, 20  # head_dim 24 splits into 8/8/8 RoPE parts
TOLERANCE = 1e-5  # relative L2 error in float32


def tiny_diffusers(seed=0, layers=2):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=16,
        out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=72, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64).eval()


def numpy_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def to_flax(state, **overrides):
    cfg = convert.infer_config({k: v.shape for k, v in state.items()}, num_heads=HEADS, dtype="float32", **overrides)
    return convert.import_weights(state, cfg)


def random_inputs(seed, frames, height, width, batch=3, text_len=7):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, frames, height, width, 16)).astype(np.float32)
    timesteps = np.array([1.0, 417.25, 999.0][:batch], np.float32)
    text = rng.standard_normal((batch, text_len, TEXT_DIM)).astype(np.float32)
    return latents, timesteps, text


def torch_forward(model, latents, timesteps, text):
    with torch.no_grad():
        out = model(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timesteps),
                    torch.from_numpy(text), return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


def relative_error(out, ref):
    return float(np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("grid", [(3, 6, 10), (2, 8, 4)])
def test_matches_diffusers_on_random_weights(grid, scan_layers):
    reference = tiny_diffusers()
    model = to_flax(numpy_state(reference), scan_layers=scan_layers)
    latents, timesteps, text = random_inputs(1, *grid)
    out = model(jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(text))
    assert relative_error(out, torch_forward(reference, latents, timesteps, text)) <= TOLERANCE


def camera_reference(model, cam_encoders, projectors, latents, timesteps, text, camera):
    """ReCamMaster's block math on top of diffusers, written independently with torch hooks."""
    b, f2, h, w, _ = latents.shape
    tokens_per_frame = (h // 2) * (w // 2)
    camera = torch.from_numpy(camera)
    handles = []
    for block, cam_encoder, projector in zip(model.blocks, cam_encoders, projectors):
        emb = cam_encoder(camera).repeat(1, 2, 1)  # same embedding on target and source halves
        emb = emb.unsqueeze(2).expand(-1, -1, tokens_per_frame, -1).reshape(b, f2 * tokens_per_frame, -1)
        handles.append(block.attn1.register_forward_pre_hook(
            lambda mod, args, emb=emb: (args[0] + emb, *args[1:])))
        handles.append(block.attn1.register_forward_hook(lambda mod, args, out, p=projector: p(out)))
    try:
        return torch_forward(model, latents, timesteps, text)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_camera_path_matches_reference_with_trained_weights(scan_layers):
    reference = tiny_diffusers(seed=1)
    dim = HEADS * HEAD_DIM
    torch.manual_seed(2)
    cam_encoders = [torch.nn.Linear(12, dim) for _ in reference.blocks]
    projectors = [torch.nn.Linear(dim, dim) for _ in reference.blocks]
    state = numpy_state(reference)
    for i, (enc, proj) in enumerate(zip(cam_encoders, projectors)):
        state.update({f"blocks.{i}.cam_encoder.{k}": v.detach().numpy() for k, v in enc.state_dict().items()})
        state.update({f"blocks.{i}.projector.{k}": v.detach().numpy() for k, v in proj.state_dict().items()})
    model = to_flax(state, scan_layers=scan_layers)
    latents, timesteps, text = random_inputs(3, 6, 6, 10)  # 3 target + 3 source latent frames
    camera = np.random.default_rng(4).standard_normal((3, 3, 12)).astype(np.float32)
    out = model(jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(text), jnp.asarray(camera))
    with torch.no_grad():
        ref = camera_reference(reference, cam_encoders, projectors, latents, timesteps, text, camera)
    assert relative_error(out, ref) <= TOLERANCE
    assert relative_error(out, torch_forward(reference, latents, timesteps, text)) > 1e-2  # the camera matters


def test_camera_modules_at_init_are_a_no_op():
    reference = tiny_diffusers(seed=5)
    model = to_flax(numpy_state(reference))  # no camera weights: official init
    latents, timesteps, text = random_inputs(6, 4, 4, 6)
    camera = np.random.default_rng(7).standard_normal((3, 2, 12)).astype(np.float32)
    with_camera = model(jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(text), jnp.asarray(camera))
    np.testing.assert_allclose(with_camera, model(jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(text)),
                               rtol=1e-6, atol=1e-6)
    assert relative_error(with_camera, torch_forward(reference, latents, timesteps, text)) <= TOLERANCE


def param_counts(variant):
    """(all parameters, camera-module parameters) of a named size, from shapes only (nnx.eval_shape)."""
    model = nnx.eval_shape(lambda: WanDiT(dit_config(variant), rngs=nnx.Rngs(0)))
    sizes = {path: int(np.prod(v.shape)) for path, v in nnx.state(model, nnx.Param).flat_state()}
    camera = sum(n for path, n in sizes.items() if "cam_encoder" in path or "projector" in path)
    return sum(sizes.values()), camera


def test_parameter_counts_without_allocation():
    total, camera = param_counts("1.3B")
    assert total - camera == 1_418_996_800  # Wan2.1-T2V-1.3B as released
    dim, layers = 1536, 30
    assert camera == layers * (12 * dim + dim + dim * dim + dim)  # Linear(12, dim) + Linear(dim, dim)
    total, camera = param_counts("14B")
    assert total - camera == 14_288_491_584


def test_rejects_latents_not_divisible_by_patch():
    model = WanDiT(dit_config("tiny", dtype="float32"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by the patch"):
        model(jnp.zeros((1, 2, 5, 6, 16)), jnp.zeros((1,)), jnp.zeros((1, 3, 32)))


@pytest.mark.parametrize("camera_frames", [1, 4])
def test_camera_must_have_half_the_latent_frames(camera_frames):
    """The official block repeats the camera embedding exactly twice (target ‖ source): 4 latent frames, 2 poses."""
    model = WanDiT(dit_config("tiny", dtype="float32"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=rf"camera has {camera_frames} frames.*half of the 4"):
        model(jnp.zeros((1, 4, 4, 4, 16)), jnp.zeros((1,)), jnp.zeros((1, 3, 32)), jnp.zeros((1, camera_frames, 12)))


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("remat", ["full", "save_dots", "save_qkv", "offload"])
def test_remat_and_bf16_compute_keep_the_function(remat, scan_layers):
    cfg = dit_config("tiny", dtype="float32", scan_layers=scan_layers)
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    latents = jax.random.normal(jax.random.key(0), (2, 4, 4, 6, 16))
    args = (latents, jnp.array([3.0, 700.0]), jax.random.normal(jax.random.key(1), (2, 5, 32)),
            jax.random.normal(jax.random.key(2), (2, 2, 12)))

    def loss(m):
        return jnp.mean(m(*args) ** 2)

    loss_and_grads = nnx.jit(nnx.value_and_grad(loss))  # retraced for the new cfg (part of the graph)
    base_loss, base_grads = loss_and_grads(model)
    model.cfg = dataclasses.replace(cfg, remat=remat)
    remat_loss, remat_grads = loss_and_grads(model)
    np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(base_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    bf16_model = WanDiT(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))  # same fp32 params
    assert relative_error(bf16_model(*args), np.asarray(model(*args))) < 3e-2


def saved_residuals(cfg, capsys) -> list[str]:
    """The lines of jax's residual report for the backward of the DiT's output sum."""
    graphdef, state = nnx.split(WanDiT(cfg, rngs=nnx.Rngs(0)))
    args = (jnp.zeros((1, 2, 4, 4, 16)), jnp.zeros((1,)), jnp.zeros((1, 3, 32)), jnp.zeros((1, 1, 12)))
    jax.ad_checkpoint.print_saved_residuals(lambda s: jnp.sum(nnx.merge(graphdef, s)(*args)), state)
    return capsys.readouterr().out.splitlines()


def test_save_qkv_keeps_exactly_the_q_k_v_projections(capsys):
    lines = saved_residuals(dit_config("tiny", dtype="float32", remat="save_qkv", scan_layers=False), capsys)
    named = [line for line in lines if " named " in line]
    # 2 blocks × (self- and cross-attention) × (q, k, v)
    assert len(named) == 12 and all(any(f"'{n}'" in line for n in QKV_NAMES) for line in named)


def test_save_qkv_under_scan_keeps_the_q_k_v_projections_and_the_block_input(capsys):
    # A scan's residuals carry no names: each is stacked over the layers (2 here) and, tokens (8) or
    # text (3) long, has the width 64 of a projection or of the block input the scan carries.
    lines = saved_residuals(dit_config("tiny", dtype="float32", remat="save_qkv"), capsys)
    stacked = sorted(line.split()[0] for line in lines if "output of scan" in line)
    assert stacked == ["f32[2,1,3,64]"] * 2 + ["f32[2,1,8,64]"] * 5  # cross k, v; q ×2, self k, v, input
    full = saved_residuals(dit_config("tiny", dtype="float32", remat="full"), capsys)
    assert [line.split()[0] for line in full if "output of scan" in line] == ["f32[2,1,8,64]"]  # the input only


def test_timesteps_are_rounded_to_the_timestep_dtype():
    """bf16 holds 996 and 1000 but nothing between: 996.4 and 997.6 both round to 996, as in the official code."""
    rng = np.random.default_rng(8)
    latents = jnp.asarray(rng.standard_normal((1, 2, 4, 4, 16)), jnp.float32).repeat(2, axis=0)
    text = jnp.asarray(rng.standard_normal((1, 7, 32)), jnp.float32).repeat(2, axis=0)  # tiny's text_dim
    timesteps = jnp.array([996.4, 997.6], jnp.float32)
    for timestep_dtype, rounded in (("bfloat16", True), ("float32", False)):
        model = WanDiT(dit_config("tiny", dtype="float32", timestep_dtype=timestep_dtype), rngs=nnx.Rngs(0))
        out = np.asarray(model(latents, timesteps, text))
        assert np.array_equal(out[0], out[1]) == rounded
