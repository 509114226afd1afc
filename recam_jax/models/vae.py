"""The Wan2.1 causal 3D VAE in Flax NNX, channels-last.

Video is (batch, frames, height, width, 3) in [-1, 1]; latents are (batch, latent_frames,
height / 8, width / 8, z_dim). Frame 0 is compressed alone and every further 4 frames become one
latent frame: 81 frames -> 21 latent frames.

Every layer that looks back in time has the signature `layer(x, cache) -> (y, cache)`. `cache` is
None for the chunk that starts a clip (the past is zeros, and the time resamplers treat frame 0
specially); otherwise it holds what the layer kept from the previous chunk (the last frames of
its input). Layers that do not look back in time return None. Running a whole clip at once and
running it chunk by chunk with the cache threaded through give the same result; the chunked path
(`jax.lax.scan` over chunks) keeps memory independent of the clip length, as the original does.

Parameter names follow diffusers' `AutoencoderKLWan`, so conversion is a rename plus a transpose
(see `recam_jax.vae_convert`). Only Wan2.1's layout is built: attention in the middle blocks only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recam_jax.sharding import param_axes

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture and latent statistics of a Wan2.1-style VAE."""

    # Channels of the first encoder level; level i has base_dim * dim_mult[i].
    base_dim: int = 96
    # Latent channels.
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    # Residual blocks per encoder level (the decoder has one more).
    num_res_blocks: int = 2
    # Whether each encoder downsampling also halves time; the decoder mirrors it.
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    # Per-channel statistics: normalised latents are (mean_of_posterior - latents_mean) / latents_std.
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAEConfig: temporal_downsample {self.temporal_downsample} needs one entry per "
                             f"downsampling ({len(self.dim_mult) - 1})")
        if not len(self.latents_mean) == len(self.latents_std) == self.z_dim:
            raise ValueError(f"VAEConfig: latents_mean/latents_std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


VAE_CONFIGS = {
    "wan2.1": VAEConfig(),
    # For tests and the compile tool: the tiny diffusers model of TOOLCHAIN.md, non-trivial statistics.
    "tiny": VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                      latents_mean=(0.1, -0.2, 0.3, -0.4), latents_std=(0.5, 1.5, 2.0, 0.8)),
    # The README demo's encoder: tiny and fast on CPU, with the DiT's 16 latent channels (random weights).
    "demo": VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                      latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16),
}


def _conv(in_ch, out_ch, kernel, *, rngs, dtype, strides=1, padding="VALID") -> nnx.Conv:
    """A convolution whose kernel (*window, in, out) carries logical axis names."""
    return nnx.Conv(
        in_ch, out_ch, kernel, strides=strides, padding=padding, dtype=dtype, rngs=rngs,
        kernel_metadata=param_axes(*(None,) * len(kernel), "conv_in", "conv_out"),
        bias_metadata=param_axes("conv_out"),
    )


def run_cached(layers, x, cache):
    """Applies `layer(x, cache) -> (x, cache)` layers in order; returns the output and their caches."""
    cache = [None] * len(layers) if cache is None else cache
    new_cache = []
    for layer, layer_cache in zip(layers, cache, strict=True):
        x, layer_cache = layer(x, layer_cache)
        new_cache.append(layer_cache)
    return x, new_cache


class CausalConv3d(nnx.Conv):
    """A 3D convolution padded only on the past side in time: output frame t sees frames <= t."""

    def __init__(self, in_ch, out_ch, kernel=(3, 3, 3), *, rngs, dtype):
        space_pad = [(k // 2, k // 2) for k in kernel[1:]]
        super().__init__(
            in_ch, out_ch, kernel, padding=[(0, 0), *space_pad], dtype=dtype, rngs=rngs,
            kernel_metadata=param_axes(None, None, None, "conv_in", "conv_out"), bias_metadata=param_axes("conv_out"),
        )
        self.past = kernel[0] - 1

    def __call__(self, x, cache):
        if self.past == 0:
            return super().__call__(x), None
        if cache is None:
            cache = jnp.zeros((x.shape[0], self.past, *x.shape[2:]), x.dtype)
        x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        return super().__call__(x), x[:, -self.past:]


class RMSNorm(nnx.Module):
    """Wan's channel norm: x / ||x|| * sqrt(C) * gamma over the channel axis, in float32."""

    def __init__(self, dim):
        self.gamma = nnx.Param(jnp.ones((dim,), jnp.float32), **param_axes("conv_out"))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        norm = jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), 1e-12)  # F.normalize's eps
        return (x32 / norm * math.sqrt(x.shape[-1]) * self.gamma[...]).astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm → SiLU → causal conv, twice, plus a (1x1x1-projected when widening) shortcut."""

    def __init__(self, in_dim, out_dim, *, rngs, dtype):
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, rngs=rngs, dtype=dtype)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, rngs=rngs, dtype=dtype)
        self.conv_shortcut = (CausalConv3d(in_dim, out_dim, (1, 1, 1), rngs=rngs, dtype=dtype)
                              if in_dim != out_dim else None)

    def __call__(self, x, cache):
        cache1, cache2 = (None, None) if cache is None else cache
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x, None)[0]
        h, cache1 = self.conv1(jax.nn.silu(self.norm1(x)), cache1)
        h, cache2 = self.conv2(jax.nn.silu(self.norm2(h)), cache2)
        return h + shortcut, (cache1, cache2)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim, *, rngs, dtype):
        self.norm = RMSNorm(dim)
        self.to_qkv = _conv(dim, 3 * dim, (1, 1), rngs=rngs, dtype=dtype)
        self.proj = _conv(dim, dim, (1, 1), rngs=rngs, dtype=dtype)

    def __call__(self, x, cache):
        b, t, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c), 3, axis=-1)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("nqk,nkc->nqc", weights, v).reshape(b, t, h, w, c)
        return x + self.proj(out), None


class MidBlock(nnx.Module):
    """Residual block → attention → residual block, at the lowest resolution."""

    def __init__(self, dim, *, rngs, dtype):
        self.resnets = nnx.List([ResidualBlock(dim, dim, rngs=rngs, dtype=dtype) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, rngs=rngs, dtype=dtype)])

    def __call__(self, x, cache):
        return run_cached([self.resnets[0], self.attentions[0], self.resnets[1]], x, cache)


class Downsample(nnx.Module):
    """Halves height and width (pad right/bottom, 3x3 stride-2 conv) and, if temporal, time."""

    def __init__(self, dim, temporal, *, rngs, dtype):
        self.resample_conv = _conv(dim, dim, (3, 3), strides=2, padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype)
        self.time_conv = _conv(dim, dim, (3, 1, 1), strides=(2, 1, 1), rngs=rngs, dtype=dtype) if temporal else None

    def __call__(self, x, cache):
        x = self.resample_conv(x)
        if self.time_conv is None:
            return x, None
        if cache is None:  # a clip's frame 0 stays alone; 3-frame windows with stride 2 start at it
            head, window = x[:, :1], x
        else:  # later windows start at the previous chunk's last frame
            head, window = x[:, :0], jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        y = self.time_conv(window) if window.shape[1] >= 3 else window[:, :0]
        return jnp.concatenate([head, y], axis=1), x[:, -1:]


class Upsample(nnx.Module):
    """If temporal, doubles time (frame 0 excepted); then doubles height and width (nearest, 3x3 conv to C/2)."""

    def __init__(self, dim, temporal, *, rngs, dtype):
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), rngs=rngs, dtype=dtype) if temporal else None
        self.resample_conv = _conv(dim, dim // 2, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs, dtype=dtype)

    def __call__(self, x, cache):
        if self.time_conv is not None:
            x, cache = self._double_time(x, cache)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return self.resample_conv(x), cache

    def _double_time(self, x, cache):
        """Frame 0 of a clip passes through; a causal conv over the later frames makes two frames of each."""
        head = x[:, :0]
        if cache is None:
            head, x = x[:, :1], x[:, 1:]
            cache = jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype)
        if x.shape[1] == 0:
            return head, cache
        y, cache = self.time_conv(x, cache)
        b, t, h, w, c2 = y.shape  # channels are (2, C): the earlier then the later frame
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
        return jnp.concatenate([head, y], axis=1), cache


class Encoder(nnx.Module):
    """Video → 2 * z_dim posterior moments, 8x smaller in space and 4x in time (frame 0 alone)."""

    def __init__(self, cfg: VAEConfig, *, rngs, dtype):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(3, dims[0], rngs=rngs, dtype=dtype)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, rngs=rngs, dtype=dtype))
                in_dim = out_dim
            if level < len(cfg.temporal_downsample):
                blocks.append(Downsample(out_dim, cfg.temporal_downsample[level], rngs=rngs, dtype=dtype))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], rngs=rngs, dtype=dtype)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x, cache):
        body_cache, head_cache = (None, None) if cache is None else cache
        x, body_cache = run_cached([self.conv_in, *self.down_blocks, self.mid_block], x, body_cache)
        x, head_cache = self.conv_out(jax.nn.silu(self.norm_out(x)), head_cache)
        return x, (body_cache, head_cache)


class UpBlock(nnx.Module):
    """num_res_blocks + 1 residual blocks, then an optional upsampler."""

    def __init__(self, in_dim, out_dim, num_res_blocks, upsample: bool, temporal: bool, *, rngs, dtype):
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(i, o, rngs=rngs, dtype=dtype) for i, o in zip(dims[:-1], dims[1:])])
        self.upsamplers = nnx.List([Upsample(out_dim, temporal, rngs=rngs, dtype=dtype)] if upsample else [])

    def __call__(self, x, cache):
        return run_cached([*self.resnets, *self.upsamplers], x, cache)


class Decoder(nnx.Module):
    """z_dim latents → video: the encoder mirrored; each upsampler halves the channels."""

    def __init__(self, cfg: VAEConfig, *, rngs, dtype):
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(dims[0], rngs=rngs, dtype=dtype)
        self.up_blocks = nnx.List([
            UpBlock(in_dim if i == 0 else in_dim // 2, out_dim, cfg.num_res_blocks, i < len(temporal_upsample),
                    i < len(temporal_upsample) and temporal_upsample[i], rngs=rngs, dtype=dtype)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))
        ])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 3, rngs=rngs, dtype=dtype)

    def __call__(self, x, cache):
        body_cache, head_cache = (None, None) if cache is None else cache
        x, body_cache = run_cached([self.conv_in, self.mid_block, *self.up_blocks], x, body_cache)
        x, head_cache = self.conv_out(jax.nn.silu(self.norm_out(x)), head_cache)
        return x, (body_cache, head_cache)


def run_in_chunks(layer, x, chunk: int):
    """`layer(x, cache)` on frame 0, then on chunks of `chunk` frames in a `lax.scan` carrying the cache.

    The compiled program and its memory do not grow with the number of frames.
    """
    y, cache = layer(x[:, :1], None)
    rest = x[:, 1:]
    if rest.shape[1] == 0:
        return y
    b, t = rest.shape[:2]
    chunks = rest.reshape(b, t // chunk, chunk, *rest.shape[2:]).swapaxes(0, 1)

    def step(cache, chunk_x):
        out, cache = layer(chunk_x, cache)
        return cache, out

    _, ys = jax.lax.scan(step, cache, chunks)
    return jnp.concatenate([y, ys.swapaxes(0, 1).reshape(b, -1, *ys.shape[3:])], axis=1)


class WanVAE(nnx.Module):
    """The Wan2.1 VAE: `encode` video → normalised latents, `decode` back; `*_raw` skip the normalisation."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype  # compute dtype; parameters stay float32
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, (1, 1, 1), rngs=rngs, dtype=dtype)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, (1, 1, 1), rngs=rngs, dtype=dtype)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype)

    def encode(self, video: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Normalised latents: the posterior mean, or a sample from it when `key` is given."""
        mean, logvar = self.encode_moments(video)
        if key is not None:
            mean = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(key, mean.shape)
        return (mean - jnp.asarray(self.config.latents_mean)) / jnp.asarray(self.config.latents_std)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Video in [-1, 1] from normalised latents."""
        self._check_latents(latents.shape)
        z = latents * jnp.asarray(self.config.latents_std) + jnp.asarray(self.config.latents_mean)
        return self.decode_raw(z)

    def encode_moments(self, video: jax.Array, chunked: bool = True) -> tuple[jax.Array, jax.Array]:
        """Unnormalised posterior (mean, logvar) in float32; `chunked=False` runs the clip in one go."""
        self._check_video(video.shape)
        x = video.astype(self.dtype)
        if chunked:
            h = run_in_chunks(self.encoder, x, self.config.temporal_factor)
        else:
            h = self.encoder(x, None)[0]
        mean, logvar = jnp.split(self.quant_conv(h, None)[0].astype(jnp.float32), 2, axis=-1)
        return mean, logvar

    def decode_raw(self, z: jax.Array, chunked: bool = True) -> jax.Array:
        """Video in [-1, 1] (float32) from unnormalised latents, one latent frame per chunk."""
        self._check_latents(z.shape)
        x = self.post_quant_conv(z.astype(self.dtype), None)[0]
        x = run_in_chunks(self.decoder, x, 1) if chunked else self.decoder(x, None)[0]
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)

    def encode_tiled(self, video: jax.Array, tile=(32, 32), overlap=(8, 8)) -> jax.Array:
        """`encode` on overlapping spatial tiles (sizes in latent pixels), blended: bounded memory at high resolution."""
        self._check_video(video.shape)
        return blend_tiles(self.encode, video, tile, overlap, self.config.spatial_factor, 1)

    def decode_tiled(self, latents: jax.Array, tile=(32, 32), overlap=(8, 8)) -> jax.Array:
        """`decode` on overlapping spatial tiles (sizes in latent pixels), blended: bounded memory at high resolution."""
        self._check_latents(latents.shape)
        return blend_tiles(self.decode, latents, tile, overlap, 1, self.config.spatial_factor)

    def _check_video(self, shape):
        t, s = self.config.temporal_factor, self.config.spatial_factor
        if len(shape) != 5 or shape[-1] != 3 or (shape[1] - 1) % t or shape[2] % s or shape[3] % s:
            raise ValueError(f"WanVAE.encode: video shape {tuple(shape)} is not (batch, 1 + {t}k frames, "
                             f"height and width divisible by {s}, 3)")

    def _check_latents(self, shape):
        if len(shape) != 5 or shape[-1] != self.config.z_dim:
            raise ValueError(f"WanVAE.decode: latent shape {tuple(shape)} is not "
                             f"(batch, frames, height, width, {self.config.z_dim})")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of length `tile` covering [0, size), neighbours sharing at least `overlap`."""
    if size <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile={tile})")
    count = math.ceil((size - tile) / (tile - overlap)) + 1
    return [min(i * (tile - overlap), size - tile) for i in range(count)]


def _edge_ramp(length: int, overlap: int, first: bool, last: bool) -> np.ndarray:
    """1D blend weight of a tile: rises linearly over `overlap` at each edge shared with a neighbour."""
    weight = np.ones(length, np.float32)
    ramp = np.arange(1, overlap + 1, dtype=np.float32) / (overlap + 1)
    if overlap and not first:
        weight[:overlap] = ramp
    if overlap and not last:
        weight[-overlap:] = np.minimum(weight[-overlap:], ramp[::-1])
    return weight


def blend_tiles(fn, x, tile, overlap, in_scale: int, out_scale: int):
    """`fn` on overlapping spatial tiles of `x` (one compiled `fn`, run tile after tile with `lax.map`),
    outputs blended by linear ramps in the overlaps. Tile sizes and overlaps are in latent pixels;
    `in_scale`/`out_scale` are the input/output pixels per latent pixel."""
    h, w = x.shape[2] // in_scale, x.shape[3] // in_scale
    th, tw = min(tile[0], h), min(tile[1], w)
    grid = [(y, x0) for y in tile_starts(h, th, overlap[0]) for x0 in tile_starts(w, tw, overlap[1])]

    def run_tile(start):
        part = jax.lax.dynamic_slice_in_dim(x, start[0] * in_scale, th * in_scale, axis=2)
        return fn(jax.lax.dynamic_slice_in_dim(part, start[1] * in_scale, tw * in_scale, axis=3))

    tiles = jax.lax.map(run_tile, jnp.asarray(grid))
    out = jnp.zeros((*tiles.shape[1:3], h * out_scale, w * out_scale, tiles.shape[-1]), tiles.dtype)
    total = np.zeros((h * out_scale, w * out_scale), np.float32)
    for (y, x0), part in zip(grid, tiles):
        wy = _edge_ramp(th * out_scale, overlap[0] * out_scale, y == 0, y + th == h)
        wx = _edge_ramp(tw * out_scale, overlap[1] * out_scale, x0 == 0, x0 + tw == w)
        rows, cols = slice(y * out_scale, (y + th) * out_scale), slice(x0 * out_scale, (x0 + tw) * out_scale)
        out = out.at[:, :, rows, cols].add(part * np.outer(wy, wx)[..., None])
        total[rows, cols] += np.outer(wy, wx)
    return out / total[..., None]
