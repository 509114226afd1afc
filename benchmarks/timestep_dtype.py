"""How much rounding the timesteps to bfloat16 (as the official ReCamMaster code does) changes sampling.

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/timestep_dtype.py [--variant small --latent 5,16,16]

A randomly initialised DiT (`dit_config(variant)`, seed 0), float32 compute so that only the
timesteps differ, samples the same noise, source, caption, negative caption and camera with the
official settings (50 steps, shift 5, guidance 5) twice: timesteps in float32 and rounded to bf16
(`DiTConfig.timestep_dtype`). Printed: the rounding itself over the σ grid, the relative L2
difference of one velocity at a few timesteps, and of the final latents; and for scale, the
difference bf16 compute makes (float32 timesteps both). Random weights, not Wan's: the figures show
the size of the effect on this architecture, not on the released model.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recam_jax import flow, sample
from recam_jax.models.dit import WanDiT, dit_config


def relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def dit(variant: str, dtype: str, timestep_dtype: str):
    graphdef, params = nnx.split(WanDiT(dit_config(variant, dtype=dtype, timestep_dtype=timestep_dtype),
                                        rngs=nnx.Rngs(0)))
    return sample.dit_function(graphdef, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--latent", default="4,8,8", help="frames,height,width of one half's latents")
    parser.add_argument("--text_len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args()

    cfg = dit_config(args.variant)
    frames, height, width = (int(n) for n in args.latent.split(","))
    keys = jax.random.split(jax.random.key(1), 5)
    noise, source = (jax.random.normal(k, (1, frames, height, width, cfg.in_dim)) for k in keys[:2])
    text, negative = (jax.random.normal(k, (1, args.text_len, cfg.text_dim)) for k in keys[2:4])
    camera = 0.1 * jax.random.normal(keys[4], (1, frames, 12))
    sigmas = flow.shifted_sigmas(args.steps, args.shift)
    timesteps = sigmas * flow.NUM_TRAIN_TIMESTEPS
    rounded = np.asarray(jnp.asarray(timesteps, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))

    print(f"{args.variant} DiT, random init, latents {frames}x{height}x{width} (+ source), text {args.text_len}, "
          f"{args.steps} steps, shift {args.shift:g}, guidance {args.guidance:g}\n")
    print("| timesteps rounded to bf16 | max abs change | steps changed |\n|---|---|---|")
    print(f"| the {args.steps}-step grid | {np.abs(rounded - timesteps).max():.3f} | "
          f"{int(np.sum(rounded != timesteps.astype(np.float32)))} of {args.steps} |\n")

    fp32, bf16 = dit(args.variant, "float32", "float32"), dit(args.variant, "float32", "bfloat16")
    velocity = jax.jit(lambda f, x, t: f(jnp.concatenate([x, source], 1), jnp.full((1,), t), text, camera))
    print("| timestep | relative L2 change of the velocity (bf16 timesteps vs float32) |\n|---|---|")
    for t in (999.0, 750.5, 500.3, 250.7, 50.2):
        print(f"| {t:g} | {relative(velocity(bf16, noise, t), velocity(fp32, noise, t)):.2e} |")

    run = lambda f: sample.euler_sample(f, noise, source, text, negative, camera, sigmas, args.guidance,
                                        step=sample.denoise_step)
    reference = run(fp32)
    bf16_compute = dit(args.variant, "bfloat16", "float32")
    print("\n| final latents, relative L2 difference from float32 timesteps and compute | value |\n|---|---|")
    print(f"| bf16 timesteps | {relative(run(bf16), reference):.2e} |")
    print(f"| bf16 compute (for scale) | {relative(run(bf16_compute), reference):.2e} |")


if __name__ == "__main__":
    main()
