"""The video-encoder interface `prepare` needs, and a plumbing stand-in until the Flax Wan VAE lands.

An encoder is any callable video (N, F, H, W, 3) float32 in [-1, 1] -> normalised latents
(N, 1 + (F - 1) / 4, H / 8, W / 8, channels), channels-last, with two attributes: `latent_channels`
and `identity` (a string written to the manifest so shards say what produced them).

`PatchProjectionStandIn` has the Wan VAE's shapes (first frame alone, then groups of 4 frames;
8x8 pixels per latent) and is a fixed random linear projection: it lets the pipeline, the tests
and the demo run before the real VAE exists. It is NOT a VAE; its latents carry no learned meaning.
To use the real VAE, return it from `make_video_encoder` (one line).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SPATIAL_STRIDE = 8
TEMPORAL_STRIDE = 4


def latent_shape(num_frames: int, height: int, width: int, channels: int) -> tuple[int, int, int, int]:
    """(frames, height, width, channels) of the latents of one video, as the Wan VAE compresses it."""
    if (num_frames - 1) % TEMPORAL_STRIDE or height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
        raise ValueError(f"video {num_frames}x{height}x{width} must be (4k+1) frames of multiples of 8 pixels")
    return (1 + (num_frames - 1) // TEMPORAL_STRIDE, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE, channels)


def _patchify(video: jax.Array, frames_per_patch: int) -> jax.Array:
    """(N, F, H, W, 3) -> (N, F / t, H / 8, W / 8, t * 8 * 8 * 3) non-overlapping space-time patches."""
    n, f, h, w, c = video.shape
    s = SPATIAL_STRIDE
    patches = video.reshape(n, f // frames_per_patch, frames_per_patch, h // s, s, w // s, s, c)
    return patches.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(n, f // frames_per_patch, h // s, w // s, -1)


class PatchProjectionStandIn:
    """Stand-in for the Wan VAE encoder: a fixed random projection of 8x8(x4) patches to latents."""

    def __init__(self, latent_channels: int = 16, seed: int = 0):
        self.latent_channels = latent_channels
        self.identity = f"patch_projection_stand_in(channels={latent_channels}, seed={seed})"
        first_key, rest_key = jax.random.split(jax.random.key(seed))
        patch = SPATIAL_STRIDE * SPATIAL_STRIDE * 3
        self._first = jax.random.normal(first_key, (patch, latent_channels)) / np.sqrt(patch)
        self._rest = jax.random.normal(rest_key, (TEMPORAL_STRIDE * patch, latent_channels)) / np.sqrt(TEMPORAL_STRIDE * patch)
        self._encode = jax.jit(self._project)

    def _project(self, video: jax.Array) -> jax.Array:
        first = _patchify(video[:, :1], 1) @ self._first
        rest = _patchify(video[:, 1:], TEMPORAL_STRIDE) @ self._rest
        return jnp.concatenate([first, rest], axis=1)

    def __call__(self, video: np.ndarray) -> np.ndarray:
        return np.asarray(self._encode(jnp.asarray(video, jnp.float32)))


def make_video_encoder(name: str, latent_channels: int = 16):
    """The encoder `prepare` uses, by name: "stand_in" until the Flax Wan VAE is wired in here."""
    if name == "stand_in":
        return PatchProjectionStandIn(latent_channels)
    raise ValueError(f"unknown video encoder {name!r}: the Flax Wan VAE is not wired in yet; use 'stand_in'")
