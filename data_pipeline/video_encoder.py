"""The video encoder `prepare` uses (and the sampler's decoder): the Flax Wan2.1 VAE, jitted.

An encoder is a callable video (N, F, H, W, 3) float32 in [-1, 1] -> normalised latents
(N, 1 + (F - 1) / 4, H / 8, W / 8, channels), channels-last, with two attributes:
`latent_channels` and `identity` (written to the manifest so shards say what produced them).
Given several devices (a host's chips), one jitted encode splits each batch of videos over them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recam_jax import vae_convert
from recam_jax.models.vae import VAE_CONFIGS, WanVAE

SPATIAL_STRIDE = 8
TEMPORAL_STRIDE = 4


def latent_shape(num_frames: int, height: int, width: int, channels: int) -> tuple[int, int, int, int]:
    """(frames, height, width, channels) of the latents of one video, as the Wan VAE compresses it."""
    if (num_frames - 1) % TEMPORAL_STRIDE or height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
        raise ValueError(f"video {num_frames}x{height}x{width} must be (4k+1) frames of multiples of 8 pixels")
    return (1 + (num_frames - 1) // TEMPORAL_STRIDE, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE, channels)


class VideoVAE:
    """`WanVAE.encode` (posterior mean, normalised latents) as the call, and `decode`, under jit,
    numpy in and out. With `devices`, the weights are replicated on them and every encode call is
    data parallel: its videos are split over a one-axis mesh of those devices (padded to a multiple)."""

    def __init__(self, vae: WanVAE, identity: str, devices=None):
        self.latent_channels = vae.config.z_dim
        self.identity = identity
        self._videos = None  # the batch sharding over `devices`, when given
        if devices is not None:
            mesh = Mesh(np.array(devices), ("videos",))
            self._videos = NamedSharding(mesh, PartitionSpec("videos"))
            graph, state = nnx.split(vae)
            vae = nnx.merge(graph, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
        self._vae = vae
        self._encode = nnx.jit(lambda model, video: model.encode(video))
        self._decode = nnx.jit(lambda model, latents: model.decode(latents))
        self._decode_tiled = nnx.jit(lambda model, latents, tile: model.decode_tiled(latents, tile), static_argnums=2)

    def __call__(self, video: np.ndarray) -> np.ndarray:
        if self._videos is None:
            return np.asarray(self._encode(self._vae, jnp.asarray(video, jnp.float32)))
        count, shards = len(video), self._videos.mesh.size
        padded = np.concatenate([video, np.zeros((-count % shards, *video.shape[1:]), video.dtype)])
        return np.asarray(self._encode(self._vae, jax.device_put(padded.astype(np.float32), self._videos)))[:count]

    def decode(self, latents: np.ndarray, tile: tuple[int, int] | None = None) -> np.ndarray:
        """Video (N, F, H, W, 3) in [-1, 1] from normalised latents; with `tile` (height, width in
        latent pixels) in overlapping spatial tiles (`WanVAE.decode_tiled`): bounded memory at high resolution."""
        latents = jnp.asarray(latents, jnp.float32)
        return np.asarray(self._decode(self._vae, latents) if tile is None else
                          self._decode_tiled(self._vae, latents, tuple(tile)))


def make_video_encoder(name: str, vae_path: str | None = None, dtype: str = "float32", devices=None) -> VideoVAE:
    """`name` is a VAE config of `recam_jax.models.vae.VAE_CONFIGS`: 'wan2.1' with the weights at
    `vae_path` (Wan2.1_VAE.pth or diffusers), or 'demo' with random weights (demos and tests);
    `devices` (e.g. `jax.local_devices()`) makes encoding data parallel over them."""
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown video encoder {name!r}; choose one of {sorted(VAE_CONFIGS)}")
    vae = WanVAE(VAE_CONFIGS[name], rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))
    if vae_path:
        vae_convert.load_weights(vae, vae_path)
        return VideoVAE(vae, f"wan_vae({name}, {vae_path}, {dtype})", devices)
    if name != "demo":
        raise ValueError(f"video encoder {name!r} needs --vae_path to its weights; only 'demo' runs on random weights")
    return VideoVAE(vae, f"wan_vae(demo, random weights seed 0, {dtype})", devices)
