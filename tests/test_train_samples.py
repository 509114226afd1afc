"""Samples while training: the held-out scenes' inputs, and the render of a model that reads the lens."""

import types

import jax
import numpy as np
from flax import nnx

from recam_jax import synthetic, train, train_samples
from recam_jax.models.dit import WanDiT
from tests.conftest import tiny_config
from tests.test_camera_encoding import randomize


def samples_of(config, eval_batch):
    """`TrainingSamples` on one device, and a state of the config's model with a trained extra camera module."""
    model = WanDiT(train.model_config(config), rngs=nnx.Rngs(0))
    if config.model.camera_encoding == "plucker":
        randomize(model.blocks.plucker_encoder)
    graphdef, trainable, frozen = train.split_model(model, config.trainable)
    mesh = train.make_mesh(config, jax.devices()[:1])
    return train_samples.TrainingSamples(config, mesh, graphdef, eval_batch), types.SimpleNamespace(
        trainable=trainable, frozen=frozen)


def eval_batch(config, rows=2):
    """Held-out synthetic examples, as the first eval batch holds them (intrinsics included)."""
    example = synthetic.SyntheticExample(0, tuple(config.data.latent_shape), config.data.text_len, config.data.text_dim)
    return {k: np.stack([example(i)[k] for i in range(rows)]) for k in (*train_samples.SCENE_KEYS, "intrinsics")}


def test_a_plucker_model_s_samples_render_through_the_eval_batch_s_lens():
    config = tiny_config(**{"model.camera_encoding": "plucker", "sample.scenes": 1, "sample.steps": 2})
    batch = eval_batch(config)
    zoomed = {**batch, "intrinsics": batch["intrinsics"] * np.array([2, 2, 1, 1, 1, 1, 1, 1], np.float32)}
    renders = []
    for scenes in (batch, zoomed):
        samples, state = samples_of(config, scenes)
        renders.append(samples.render(state))
    assert renders[0].shape == (1, *config.data.latent_shape) and np.isfinite(renders[0]).all()
    assert np.abs(renders[0] - renders[1]).max() > 1e-3  # the target's lens reached the model


def test_a_cropped_sample_gets_the_lens_of_its_crop():
    """Focal lengths are in image widths and heights: a crop of 2 of 8 latent pixels across and 4 of 8
    down sees 4 and 2 times as far in those units; the principal point stays central."""
    config = tiny_config(**{"sample.crop": (4, 2)})  # of 8×8 latents
    batch = eval_batch(config)
    lens = np.asarray(samples_of(config, batch)[0].inputs["intrinsics"])
    full = batch["intrinsics"][:len(lens)]
    np.testing.assert_allclose(lens[..., [0, 4]], 4 * full[..., [0, 4]], rtol=1e-6)
    np.testing.assert_allclose(lens[..., [1, 5]], 2 * full[..., [1, 5]], rtol=1e-6)
    np.testing.assert_array_equal(lens[..., [2, 3, 6, 7]], 0.5)
