"""The Wan2.1 text-to-video DiT with ReCamMaster's per-block camera encoder and projector.

Same function as the official Wan / DiffSynth `WanModel` (and diffusers' `WanTransformer3DModel`),
channels-last. ReCamMaster feeds it [target ‖ source] latents concatenated on the frame axis and a
camera pose per latent frame; each block adds `cam_encoder(camera)` to the modulated input of
self-attention (same embedding on both halves) and applies `projector` to the attention output.
`camera_encoding` may add the lens (models/camera_encoding.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from recam_jax.batch import CAMERA_DIM
from recam_jax.models import camera_encoding
from recam_jax.models.attention import SplashBlocks, attention
from recam_jax.models.layers import (
    MLP, LayerNorm, RMSNorm, apply_rope, dense, gelu_tanh, rope_tables, sinusoidal_embedding)
from recam_jax.sharding import constrain, param_axes

QKV_NAMES = ("attn_q", "attn_k", "attn_v")  # checkpoint names of the normed q, k, v projections

# What a block's backward keeps from its forward (the rest is recomputed); "none" = no remat.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv": jax.checkpoint_policies.save_only_these_names(*QKV_NAMES),
    # Weight matmul outputs go to pinned host memory and come back for the backward (TPU, GPU; on
    # CPU host and device memory are one: it computes the same, with no saving).
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Shape and numerics of the DiT. Named sizes live in `VARIANTS`."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    camera: bool = True  # ReCamMaster's cam_encoder + projector in every block
    # What the camera path reads (models/camera_encoding.py): official, intrinsics, plucker.
    camera_encoding: str = "official"
    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # compute dtype; norms, RoPE, softmax statistics and modulation stay fp32
    remat: str = "none"  # one of REMAT_POLICIES: none, full, save_dots, save_qkv, offload
    # Blocks stacked on a `layers` axis and run by one lax.scan (traced and compiled once, not
    # num_layers times); False: a Python list of blocks, unrolled.
    scan_layers: bool = True
    attention: str = "xla"  # a backend of models/attention.py
    # Timesteps are rounded to this dtype before their sinusoidal features: the official ReCamMaster
    # code casts them to bfloat16 in training and inference (at 1000, bf16 steps are 4 apart).
    timestep_dtype: str = "float32"
    splash_blocks: SplashBlocks = SplashBlocks()  # tiles of the splash kernels (splash, ulysses_splash)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


VARIANTS = {
    # Runs in milliseconds on CPU; dim ≥ out_dim·prod(patch) = 64 so the head can fit any output.
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32),
    "small": dict(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=256, freq_dim=64),
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def dit_config(variant: str, **overrides) -> DiTConfig:
    """A named size ('tiny', 'small', '1.3B', '14B') with field overrides."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return DiTConfig(**{**VARIANTS[variant], **overrides})


def _modulation_init(key, shape, dtype):
    return jax.random.normal(key, shape, dtype) / np.sqrt(shape[-1])


def _identity_init(key, shape, dtype):
    del key
    return jnp.eye(*shape, dtype=dtype)


# Kernel init of the camera modules (biases are zero): ReCamMaster's official init for the first two,
# zeros for the encodings' extra modules, so the model starts as Wan.
CAMERA_INIT = {"cam_encoder": nnx.initializers.zeros, "projector": _identity_init,
               **{name: nnx.initializers.zeros for name, _ in camera_encoding.EXTRA_MODULES.values()}}


class Attention(nnx.Module):
    """q, k, v, o projections with RMSNorm over all heads on q and k (Wan's qk norm)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q = dense(cfg.dim, cfg.dim, ("embed", "heads"), **kw)
        self.k = dense(cfg.dim, cfg.dim, ("embed", "heads"), **kw)
        self.v = dense(cfg.dim, cfg.dim, ("embed", "heads"), **kw)
        self.o = dense(cfg.dim, cfg.dim, ("heads", "embed"), **kw)
        self.norm_q = RMSNorm(cfg.dim, "heads", eps=cfg.eps, param_dtype=cfg.param_dtype)
        self.norm_k = RMSNorm(cfg.dim, "heads", eps=cfg.eps, param_dtype=cfg.param_dtype)
        self.num_heads, self.backend, self.splash_blocks = cfg.num_heads, cfg.attention, cfg.splash_blocks

    def __call__(self, x: jax.Array, context: jax.Array | None = None, rope=None) -> jax.Array:
        """Self-attention (context None, with RoPE) or cross-attention to `context`."""
        kv_input = x if context is None else context
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, -1)
        q = split(checkpoint_name(self.norm_q(self.q(x)), "attn_q"))
        k = split(checkpoint_name(self.norm_k(self.k(kv_input)), "attn_k"))
        v = split(checkpoint_name(self.v(kv_input), "attn_v"))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, self.backend, cross=context is not None, splash_blocks=self.splash_blocks)
        return self.o(out.reshape(*out.shape[:-2], -1))


class DiTBlock(nnx.Module):
    """Self-attention (+ camera) → cross-attention to text → FFN, with adaLN-style modulation."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.modulation = nnx.Param(
            _modulation_init(rngs.params(), (1, 6, cfg.dim), cfg.param_dtype), **param_axes(None, None, "embed"))
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, affine=False, param_dtype=cfg.param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, affine=True, param_dtype=cfg.param_dtype)
        self.cross_attn = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, affine=False, param_dtype=cfg.param_dtype)
        self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.dim, gelu_tanh, **kw)
        if cfg.camera:  # ReCamMaster's official init: a no-op until trained
            self.cam_encoder = dense(CAMERA_DIM, cfg.dim, (None, "embed"), kernel_init=CAMERA_INIT["cam_encoder"], **kw)
            self.projector = dense(cfg.dim, cfg.dim, ("heads", "embed"), kernel_init=CAMERA_INIT["projector"], **kw)
        else:
            self.cam_encoder = self.projector = None
        # The camera encoding's extra module (zero init: a no-op until trained), or None.
        extra = lambda encoding, name, in_dim: (
            dense(in_dim, cfg.dim, (None, "embed"), kernel_init=CAMERA_INIT[name], **kw)
            if cfg.camera_encoding == encoding else None)
        self.intrinsics_encoder = extra("intrinsics", "intrinsics_encoder", camera_encoding.INTRINSICS_DIM)
        self.plucker_encoder = extra("plucker", "plucker_encoder", camera_encoding.PLUCKER_DIM)

    def __call__(self, x, context, t_mod, rope, camera, grid):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            self.modulation[...].astype(jnp.float32) + t_mod, 6, axis=1)
        attn_in = (self.norm1(x) * (1 + scale_msa) + shift_msa).astype(x.dtype)
        if camera is not None:
            attn_in = camera_encoding.add_camera(self, attn_in, camera, grid)
        attn_out = self.self_attn(attn_in, rope=rope)
        if self.projector is not None:
            attn_out = self.projector(attn_out)
        x = (x + attn_out * gate_msa).astype(x.dtype)
        x = x + self.cross_attn(self.norm3(x).astype(x.dtype), context=context)
        ffn_in = (self.norm2(x) * (1 + scale_mlp) + shift_mlp).astype(x.dtype)
        x = (x + self.ffn(ffn_in) * gate_mlp).astype(x.dtype)
        return constrain(x, ("act_batch", "act_length", "act_embed"))


def stacked_blocks(cfg: DiTConfig, rngs: nnx.Rngs) -> DiTBlock:
    """num_layers blocks as one DiTBlock whose parameters have a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return DiTBlock(cfg, rngs=rngs)

    return make(rngs)


class Head(nnx.Module):
    """Final modulated LayerNorm and projection to out_dim · prod(patch) per token."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.modulation = nnx.Param(
            _modulation_init(rngs.params(), (1, 2, cfg.dim), cfg.param_dtype), **param_axes(None, None, "embed"))
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, affine=False, param_dtype=cfg.param_dtype)
        self.head = dense(cfg.dim, cfg.out_dim * int(np.prod(cfg.patch_size)), ("embed", None),
                          dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x, t_emb):
        shift, scale = jnp.split(self.modulation[...].astype(jnp.float32) + t_emb[:, None, :], 2, axis=1)
        return self.head((self.norm(x) * (1 + scale) + shift).astype(x.dtype))


class WanDiT(nnx.Module):
    """latents (b, F, H, W, in_dim), timestep (b,), text (b, L, text_dim), camera (b, F/2, 12) or None,
    intrinsics (b, F/2, 8; read by the non-official camera encodings) → prediction (b, F, H, W, out_dim)
    in float32."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        if cfg.camera_encoding not in camera_encoding.ENCODINGS or (cfg.camera_encoding != "official" and not cfg.camera):
            raise ValueError(f"camera_encoding={cfg.camera_encoding!r} (camera={cfg.camera}): choose one of "
                             f"{camera_encoding.ENCODINGS}; the non-official ones need camera=True")
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.patch_embedding = nnx.Conv(
            cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, strides=cfg.patch_size, padding="VALID",
            kernel_metadata=param_axes(None, None, None, None, "embed"), bias_metadata=param_axes("embed"), **kw)
        self.text_embedding = MLP(cfg.text_dim, cfg.dim, cfg.dim, gelu_tanh, in_axis=None, **kw)
        # Timestep path in float32, as the official code runs it under fp32 autocast.
        self.time_embedding = MLP(cfg.freq_dim, cfg.dim, cfg.dim, jax.nn.silu, in_axis=None,
                                  dtype=jnp.float32, param_dtype=cfg.param_dtype, rngs=rngs)
        self.time_projection = dense(cfg.dim, 6 * cfg.dim, ("embed", "mlp"),
                                     dtype=jnp.float32, param_dtype=cfg.param_dtype, rngs=rngs)
        if cfg.scan_layers:
            self.blocks = stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([DiTBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.head = Head(cfg, rngs=rngs)

    def __call__(self, latents, timestep, text, camera=None, intrinsics=None):
        cfg = self.cfg
        grid = self._token_grid(latents.shape)
        if camera is not None and 2 * camera.shape[1] != grid[0]:
            raise ValueError(f"camera has {camera.shape[1]} frames; ReCamMaster takes one pose per target latent "
                             f"frame: half of the {grid[0]} [target ‖ source] latent frames")
        camera = camera_encoding.block_inputs(cfg.camera_encoding, camera, intrinsics, grid)
        t_emb = self.time_embedding(sinusoidal_embedding(timestep.astype(cfg.timestep_dtype), cfg.freq_dim))
        t_mod = self.time_projection(jax.nn.silu(t_emb)).reshape(-1, 6, cfg.dim)
        context = self.text_embedding(text.astype(cfg.dtype))
        x = self.patch_embedding(latents.astype(cfg.dtype))
        x = constrain(x.reshape(x.shape[0], -1, cfg.dim), ("act_batch", "act_length", "act_embed"))
        rope = tuple(jnp.asarray(t) for t in rope_tables(cfg.head_dim, grid))

        def run_block(block_def, block_state, x):
            return nnx.merge(block_def, block_state)(x, context, t_mod, rope, camera, grid)

        # jax.checkpoint of a pure function of the block's state: nnx.remat refuses a block whose
        # parameters come from two traces (trainable and frozen halves merged inside value_and_grad).
        if REMAT_POLICIES[cfg.remat] is not None:
            # Inside a scan, CSE cannot merge the recomputation across iterations: no barrier needed.
            run_block = jax.checkpoint(run_block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,),
                                       prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            block_def, stacked_state = nnx.split(self.blocks)
            x = jax.lax.scan(lambda x, block_state: (run_block(block_def, block_state, x), None), x, stacked_state)[0]
        else:
            for block in self.blocks:
                x = run_block(*nnx.split(block), x)
        return self._unpatchify(self.head(x, t_emb).astype(jnp.float32), grid)

    def _token_grid(self, shape) -> tuple[int, int, int]:
        """(frames, height, width) of the token grid; every latent axis must divide by the patch."""
        sizes = shape[1:4]
        if len(shape) != 5 or shape[-1] != self.cfg.in_dim or any(s % p for s, p in zip(sizes, self.cfg.patch_size)):
            raise ValueError(f"latents must be (batch, frames, height, width, {self.cfg.in_dim}) with frames, "
                             f"height, width divisible by the patch {self.cfg.patch_size}; got {tuple(shape)}")
        return tuple(s // p for s, p in zip(sizes, self.cfg.patch_size))

    def _unpatchify(self, tokens, grid):
        """(b, f·h·w, pt·ph·pw·c) → (b, f·pt, h·ph, w·pw, c); channels innermost as in Wan."""
        (f, h, w), (pt, ph, pw) = grid, self.cfg.patch_size
        x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(tokens.shape[0], f * pt, h * ph, w * pw, self.cfg.out_dim)
