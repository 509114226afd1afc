"""How the camera reaches the DiT blocks: the official extrinsics encoding, plus intrinsics or Plücker rays.

Every encoding keeps ReCamMaster's per-block `cam_encoder` (relative 3×4 pose per latent frame) and
`projector`, so released checkpoints load unchanged. The two others add one zero-initialised Linear
per block, so at init they compute exactly what `official` computes:

- `official`: the released layout; the lens is not an input.
- `intrinsics`: `intrinsics_encoder` maps the per-frame normalised intrinsics of the target and the
  source (`INTRINSICS_DIM` numbers, recam_jax/batch.py) to an embedding added with the pose embedding to
  every token of that latent frame, in both halves (as the pose embedding is).
- `plucker`: `plucker_encoder` maps each target token's Plücker ray (direction, moment), in the
  source camera's frame and through the target's intrinsics at the latent token grid, to an
  embedding added to that token of the target half: per-token geometry, which carries the lens by
  construction. The source half gets none (its own camera path is not an input).

Normalised intrinsics (fx, fy, cx, cy): focal length in image widths and in image heights, and the
principal point as fractions of the width and height (0.5 = centre); camera axes are OpenCV's
(x right, y down, z forward), as the relative poses' are (data_pipeline/cameras.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recam_jax.batch import INTRINSICS_DIM

ENCODINGS = ("official", "intrinsics", "plucker")
PLUCKER_DIM = 6  # ray direction (3) and moment origin × direction (3), per token
# The extra per-block module of each encoding and its input width.
EXTRA_MODULES = {"intrinsics": ("intrinsics_encoder", INTRINSICS_DIM), "plucker": ("plucker_encoder", PLUCKER_DIM)}


def plucker_rays(camera: jax.Array, intrinsics: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """(b, F, 12) relative target poses and (b, F, 8) intrinsics → (b, F·h·w, 6) rays through the
    centres of an h×w token grid, in the source's frame-0 camera coordinates, in float32."""
    h, w = grid_hw
    pose = camera.astype(jnp.float32).reshape(*camera.shape[:2], 3, 4)
    fx, fy, cx, cy = (intrinsics[..., k, None, None].astype(jnp.float32) for k in range(4))  # (b, F, 1, 1)
    v, u = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing="ij")
    local = jnp.stack([(u - cx) / fx, (v - cy) / fy, jnp.ones_like(u - cx)], axis=-1)  # (b, F, h, w, 3)
    direction = jnp.einsum("bfij,bfhwj->bfhwi", pose[..., :3], local)
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    origin = jnp.broadcast_to(pose[:, :, None, None, :, 3], direction.shape)
    rays = jnp.concatenate([direction, jnp.cross(origin, direction)], axis=-1)
    return rays.reshape(camera.shape[0], -1, PLUCKER_DIM)


def block_inputs(encoding: str, camera: jax.Array | None, intrinsics: jax.Array | None,
                 grid: tuple[int, int, int]) -> dict | None:
    """What every block's camera path reads, computed once per forward: {"pose", "intrinsics"} or
    {"pose", "plucker"}; None without a camera. The non-official encodings need the intrinsics."""
    if camera is None:
        return None
    if encoding == "official":
        return {"pose": camera}
    if intrinsics is None or intrinsics.shape != (*camera.shape[:2], INTRINSICS_DIM):
        got = None if intrinsics is None else tuple(intrinsics.shape)
        raise ValueError(f"camera_encoding={encoding!r} needs intrinsics of shape {(*camera.shape[:2], INTRINSICS_DIM)} "
                         f"(normalised fx, fy, cx, cy of target and source per latent frame); got {got}")
    if encoding == "intrinsics":
        return {"pose": camera, "intrinsics": intrinsics}
    return {"pose": camera, "plucker": plucker_rays(camera, intrinsics, grid[1:])}


def add_camera(block: nnx.Module, tokens: jax.Array, inputs: dict, grid: tuple[int, int, int]) -> jax.Array:
    """`tokens` (b, 2·F·h·w, dim) of [target ‖ source] plus the block's camera embeddings."""
    batch, cam_frames = inputs["pose"].shape[:2]
    emb = block.cam_encoder(inputs["pose"].astype(tokens.dtype))  # (b, F, dim)
    if "intrinsics" in inputs:
        emb = emb + block.intrinsics_encoder(inputs["intrinsics"].astype(tokens.dtype))
    by_frame = tokens.reshape(batch, 2, cam_frames, grid[1] * grid[2], -1) + emb[:, None, :, None, :]
    if "plucker" in inputs:
        per_token = block.plucker_encoder(inputs["plucker"].astype(tokens.dtype))  # (b, F·h·w, dim)
        by_frame = by_frame.at[:, 0].add(per_token.reshape(by_frame.shape[0], cam_frames, -1, by_frame.shape[-1]))
    return by_frame.reshape(tokens.shape)
