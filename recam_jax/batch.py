"""The training batch: the one interface between every data source and the train step.

A batch is a dict of arrays, channels-last like every JAX model here:

| key              | shape                              | dtype   | meaning                                      |
|------------------|------------------------------------|---------|----------------------------------------------|
| `target_latents` | (batch, frames, height, width, C)  | float32 | VAE latents of the camera to generate        |
| `source_latents` | (batch, frames, height, width, C)  | float32 | VAE latents of the conditioning camera       |
| `text_embeds`    | (batch, text_len, text_dim)        | float32 | umT5 output, zeros past `text_lengths`       |
| `text_lengths`   | (batch,)                           | int32   | real number of text tokens                   |
| `camera`         | (batch, frames, 12)                | float32 | target pose relative to the source's frame 0 |
| `intrinsics`     | (batch, frames, 8)                 | float32 | normalised fx, fy, cx, cy of target, source  |

`frames`, `height`, `width` are latent sizes (81 video frames -> 21; 480x832 -> 60x104). Intrinsics
are per latent frame: focal length in image widths and in image heights, principal point as fractions
of width and height (data_pipeline/cameras.py `normalised_intrinsics`); the official camera encoding
ignores them (recam_jax/models/camera_encoding.py). Sources
(synthetic, the grain loader) produce host numpy arrays of exactly this spec: on each process, the
rows of every global batch that its devices hold (`rows_of_global_batches`).
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np

CAMERA_DIM = 12  # a 3x4 camera-to-world matrix, flattened row-major
INTRINSICS_DIM = 8  # (fx, fy, cx, cy) of the target camera, then of the source camera


def batch_spec(
    batch_size: int,
    latent_shape: tuple[int, int, int, int],
    text_len: int,
    text_dim: int,
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a batch; `latent_shape` is (frames, height, width, channels)."""
    frames = latent_shape[0]
    return {
        "target_latents": jax.ShapeDtypeStruct((batch_size, *latent_shape), jnp.float32),
        "source_latents": jax.ShapeDtypeStruct((batch_size, *latent_shape), jnp.float32),
        "text_embeds": jax.ShapeDtypeStruct((batch_size, text_len, text_dim), jnp.float32),
        "text_lengths": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        "camera": jax.ShapeDtypeStruct((batch_size, frames, CAMERA_DIM), jnp.float32),
        "intrinsics": jax.ShapeDtypeStruct((batch_size, frames, INTRINSICS_DIM), jnp.float32),
    }


class _GlobalRow:
    """Local element j -> the global element at row rows[j % n] of global batch j // n (picklable)."""

    def __init__(self, elements: grain.MapDataset, global_batch_size: int, rows):
        self.elements, self.global_batch_size, self.rows = elements, global_batch_size, np.asarray(rows)

    def __call__(self, j: int):
        batch, k = divmod(int(j), len(self.rows))
        return self.elements[batch * self.global_batch_size + int(self.rows[k])]


def rows_of_global_batches(elements: grain.MapDataset, global_batch_size: int, rows) -> grain.MapDataset:
    """The elements one process loads: `rows` (sorted global row numbers) of each consecutive global
    batch of `elements`, in order; complete global batches only. Batching the result by len(rows)
    gives this process's part of every global batch, whatever the number of processes."""
    if not 0 < len(rows) <= global_batch_size:
        raise ValueError(f"{len(rows)} rows of a global batch of {global_batch_size}")
    count = len(elements) // global_batch_size * len(rows)
    return grain.MapDataset.range(count).map(_GlobalRow(elements, global_batch_size, rows))
