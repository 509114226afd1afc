"""A synthetic data source with exactly the batch structure of the real loader (`batch.py`).

Each example is a smooth random latent field seen by a source camera and, shifted in proportion to
a camera translation, by the target camera: learnable structure, so losses fall and the camera
input matters. Built as a grain MapDataset like the real loader, so its iterator state is saved
and restored by the trainer's checkpoints in the same way.
"""

from __future__ import annotations

import grain
import numpy as np

from data_pipeline.cameras import normalised_intrinsics
from data_pipeline.loader import padded_to_batches
from data_pipeline.multicam import SENSOR_SIZE_MM
from recam_jax.batch import CAMERA_DIM, rows_of_global_batches

NOMINAL_FOCAL_MM = 24.0  # every synthetic camera's lens (the intrinsics input is the same for all)


class SyntheticExample:
    """Example `index` of a synthetic dataset: a pure function of (seed, index)."""

    def __init__(self, seed: int, latent_shape: tuple[int, int, int, int], text_len: int, text_dim: int):
        self.seed, self.latent_shape, self.text_len, self.text_dim = seed, latent_shape, text_len, text_dim

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        frames, height, width, channels = self.latent_shape
        coarse = rng.standard_normal((frames, max(height // 4, 1), max(width // 4, 1), channels))
        field = np.kron(coarse, np.ones((1, 4, 4, 1)))[:, :height, :width]
        field = np.pad(field, ((0, 0), (0, height - field.shape[1]), (0, width - field.shape[2]), (0, 0)), "edge")
        velocity = rng.integers(-1, 2, size=2)  # latent pixels per frame, the target camera's translation
        target = np.stack([np.roll(field[f], tuple(velocity * f), axis=(0, 1)) for f in range(frames)])
        camera = np.tile(np.eye(3, 4), (frames, 1, 1))
        camera[:, :2, 3] = velocity[None, :] * np.arange(frames)[:, None]
        length = int(rng.integers(1, self.text_len + 1))
        text = np.zeros((self.text_len, self.text_dim), np.float32)
        text[:length] = rng.standard_normal((length, self.text_dim))
        lens = normalised_intrinsics(np.full(frames, NOMINAL_FOCAL_MM), SENSOR_SIZE_MM, width / height)
        return {
            "target_latents": target.astype(np.float32),
            "source_latents": field.astype(np.float32),
            "text_embeds": text,
            "text_lengths": np.int32(length),
            "camera": camera.reshape(frames, CAMERA_DIM).astype(np.float32),
            "intrinsics": np.concatenate([lens, lens], axis=-1),  # target, source
        }


def with_eval_draws(index: int, example: dict) -> dict:
    """Fixes an eval example's timestep (index into the 1000-step grid) and noise seed."""
    return {**example, "timestep_index": np.int32(index * 389 % 1000), "noise_seed": np.int32(index)}


def synthetic_dataset(
    *,
    num_examples: int,
    batch_size: int,
    latent_shape: tuple[int, int, int, int],
    text_len: int,
    text_dim: int,
    seed: int,
    for_eval: bool = False,
    rows=None,
) -> grain.IterDataset:
    """Rows `rows` (default: all) of each global batch of `batch_size`: endless and reshuffled every
    epoch for training; for evaluation one pass over held-out examples (another seed) with fixed
    timesteps and noise seeds, the last batch completed with `eval_weight` 0 rows (as the real
    loader's, `padded_to_batches`): every held-out example counts once.

    Every process walks the same global order and builds only its rows of each global batch, so a
    global batch holds the same examples whatever the number of processes (runs reproduce across
    topologies).
    """
    if for_eval:
        held_out = SyntheticExample(seed + 10_000, tuple(latent_shape), text_len, text_dim)
        order = grain.MapDataset.source(padded_to_batches([{"index": i} for i in range(num_examples)], batch_size))

        def make(element: dict) -> dict:
            index = element["index"]
            return {**with_eval_draws(index, held_out(index)), "eval_weight": element["eval_weight"]}
    else:
        example = SyntheticExample(seed, tuple(latent_shape), text_len, text_dim)
        order = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(None)

        def make(index) -> dict:
            return example(int(index))
    rows = np.arange(batch_size) if rows is None else rows
    mine = rows_of_global_batches(order, batch_size, rows).map(make)
    return mine.batch(len(rows), drop_remainder=True, batch_fn=_stack).to_iter_dataset()


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}
