"""Sampling: the source video's scene re-rendered along a new camera trajectory, in JAX.

    python -m recam_jax.sample --params step20000.ckpt --video in.mp4 --caption "a man talks ..." \
        --trajectory camera_extrinsics.json --camera 1 --text_encoder_dir /models/umt5-xxl \
        --vae wan2.1 --vae_path /models/Wan2.1_VAE.pth --out out.mp4

Euler steps over the same shifted σ grid training draws from (`flow.shifted_sigmas`, one `shift`
for both), classifier-free guidance against a negative caption, as the official inference does.
The camera input follows the official inference: the target trajectory relative to its own
first frame (the source camera is taken to start there).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recam_jax import convert, flow, trajectory


def euler_sample(apply_fn, noise, source, text, negative_text, camera, sigmas, guidance: float):
    """Integrates dx/dσ = v from σ = sigmas[0] to 0; the model sees [x ‖ source] and predicts v on x.

    `apply_fn(latents, timesteps, text, camera)`; `guidance` 1 skips the negative pass.
    """
    frames = noise.shape[1]
    timesteps = lambda sigma: jnp.full((noise.shape[0],), sigma * flow.NUM_TRAIN_TIMESTEPS, jnp.float32)

    def velocity(x, sigma, caption):
        latents = jnp.concatenate([x, source], axis=1)
        return apply_fn(latents, timesteps(sigma), caption, camera)[:, :frames].astype(jnp.float32)

    def step(x, sigma_pair):
        sigma, sigma_next = sigma_pair
        v = velocity(x, sigma, text)
        if guidance != 1.0:
            v_negative = velocity(x, sigma, negative_text)
            v = v_negative + guidance * (v - v_negative)
        return x + (sigma_next - sigma) * v, None

    sigmas = jnp.asarray(sigmas, jnp.float32)
    x, _ = jax.lax.scan(step, noise.astype(jnp.float32), (sigmas, jnp.append(sigmas[1:], 0.0)))
    return x


@functools.partial(jax.jit, static_argnums=(0, 8))
def sample_with_params(graphdef, params, noise, source, text, negative_text, camera, sigmas, guidance: float):
    """`euler_sample` of the DiT `nnx.merge(graphdef, params)`, jitted with the weights as arguments."""
    apply_fn = lambda *inputs: nnx.merge(graphdef, params)(*inputs)
    return euler_sample(apply_fn, noise, source, text, negative_text, camera, sigmas, guidance)


def main(argv=None) -> None:
    from data_pipeline import cameras, text_encoder, video, video_encoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True, help="ReCamMaster/Wan PyTorch weights or a recam_jax params folder")
    parser.add_argument("--video", required=True, help="source video")
    parser.add_argument("--caption", required=True)
    parser.add_argument("--negative_caption", default="")
    parser.add_argument("--trajectory", required=True,
                        help="a camera JSON (MultiCamVideo format), a preset (pan_right, ..., arc_right) or a spec "
                             "like 'pan:30+dolly:1' (see recam_jax/trajectory.py)")
    parser.add_argument("--camera", type=int, default=1, help="which camXX of a trajectory JSON to follow")
    parser.add_argument("--text_encoder_dir", required=True)
    parser.add_argument("--vae", default="wan2.1", help="VAE config: wan2.1 (needs --vae_path) or demo")
    parser.add_argument("--vae_path", default=None)
    parser.add_argument("--out", required=True, help="output .mp4")
    parser.add_argument("--num_frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--text_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_heads", type=int, default=None,
                        help="DiT heads, only for weights with no model record that are no official Wan2.1 size")
    args = parser.parse_args(argv)

    camera = cameras.inference_camera(trajectory.load(args.trajectory, args.camera, args.num_frames))[None]
    vae = video_encoder.make_video_encoder(args.vae, args.vae_path)
    source = vae(video.read_video(args.video, args.num_frames, args.height, args.width)[None])
    encode_text = text_encoder.TextEncoder(args.text_encoder_dir, args.text_len)
    text, negative = (text_encoder.pad_text(encode_text(c), args.text_len)[0][None]
                      for c in (args.caption, args.negative_caption))

    graphdef, params = nnx.split(convert.load_any(args.params, num_heads=args.num_heads, dtype="bfloat16"))
    noise = jax.random.normal(jax.random.key(args.seed), source.shape, jnp.float32)
    latents = sample_with_params(graphdef, params, noise, source, text, negative, camera,
                                 flow.shifted_sigmas(args.steps, args.shift), args.guidance)
    frames = vae.decode(np.asarray(latents))[0]
    video.write_video(args.out, np.round((frames + 1) * 127.5).clip(0, 255).astype(np.uint8))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
