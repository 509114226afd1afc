"""Sampling: the Euler integrator lands on the data under the exact velocity; the CLI runs end to end."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import demo_data, video
from recam_jax import convert, flow, sample
from recam_jax.models.dit import WanDiT, dit_config


def test_euler_with_the_exact_velocity_reaches_the_data():
    keys = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(keys[0], (2, 3, 4, 4, 16))
    source = jax.random.normal(keys[1], (2, 3, 4, 4, 16))

    def exact_velocity(latents, timesteps, text, camera):
        """v = ε − x0 for the ε that explains x_σ on the target half; wrong unless the source half is `source`."""
        x, src = latents[:, :3], latents[:, 3:]
        sigma = timesteps[:, None, None, None, None] / flow.NUM_TRAIN_TIMESTEPS
        wrong_source = jnp.any(src != source).astype(jnp.float32)
        return jnp.concatenate([(x - x0) / sigma + wrong_source, jnp.zeros_like(src)], axis=1)

    sigmas = flow.shifted_sigmas(12, shift=5.0)
    noise = jax.random.normal(keys[2], x0.shape)
    out = sample.euler_sample(exact_velocity, noise, source, None, None, None, sigmas, guidance=1.0)
    np.testing.assert_allclose(out, x0, atol=1e-4)


def test_guidance_extrapolates_from_the_negative_caption():
    def constant_velocity(latents, timesteps, text, camera):
        return jnp.broadcast_to(text, latents.shape)

    noise = jnp.zeros((1, 2, 2, 2, 16))
    args = (noise, noise, jnp.ones(()), jnp.zeros(()), None, np.array([1.0]))
    # One step from σ = 1 to 0 moves x by −v: v = 0 + g·(1 − 0) = g.
    np.testing.assert_allclose(sample.euler_sample(constant_velocity, *args, guidance=3.0), -3.0)
    np.testing.assert_allclose(sample.euler_sample(constant_velocity, *args, guidance=1.0), -1.0)


def test_cli_renders_a_video_along_a_trajectory(tmp_path):
    root = str(tmp_path)
    demo_data.write_dataset(root, num_scenes=1, num_frames=9, height=32, width=32)
    scene = os.path.join(root, "train", "f18_aperture10", "scene1")
    demo_data.write_tiny_umt5(os.path.join(root, "umt5"), demo_data.WORDS)
    params = str(tmp_path / "tiny.ckpt")
    convert.save_pytorch(WanDiT(dit_config("tiny"), rngs=nnx.Rngs(0)), params)
    out = str(tmp_path / "out.mp4")
    sample.main(["--params", params, "--video", os.path.join(scene, "videos", "cam01.mp4"),
                 "--caption", "a ball", "--trajectory", os.path.join(scene, "cameras", "camera_extrinsics.json"),
                 "--camera", "3", "--text_encoder_dir", os.path.join(root, "umt5"), "--vae", "demo",
                 "--out", out, "--num_frames", "9", "--height", "32", "--width", "32", "--text_len", "16",
                 "--steps", "3"])
    frames = video.read_video(out, 9, 32, 32)
    assert frames.shape == (9, 32, 32, 3) and np.isfinite(frames).all()
