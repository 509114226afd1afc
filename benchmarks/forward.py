"""DiT forward time and compile time, printed as a table.

    python benchmarks/forward.py                       # tiny and small on this machine's devices
    python benchmarks/forward.py --variant 1.3B --frames 21 --height 60 --width 104 --attention cudnn

Shapes are one half's latents; the model sees [target ‖ source], twice the frames. Times are the
median of --repeats calls after one warm-up call, with block_until_ready.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from flax import nnx

from recam_jax.models.dit import WanDiT, dit_config

DEFAULT_CASES = (("tiny", 4, 8, 8), ("small", 5, 16, 16))


def measure(variant: str, frames: int, height: int, width: int, batch: int, dtype: str, attention: str,
            repeats: int, text_len: int) -> dict:
    cfg = dit_config(variant, dtype=dtype, attention=attention)
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    keys = jax.random.split(jax.random.key(0), 4)
    latents = jax.random.normal(keys[0], (batch, 2 * frames, height, width, cfg.in_dim))
    timestep = jax.random.uniform(keys[1], (batch,)) * 1000
    text = jax.random.normal(keys[2], (batch, text_len, cfg.text_dim))
    camera = jax.random.normal(keys[3], (batch, frames, 12))
    forward = jax.jit(lambda p, *args: nnx.merge(graphdef, p)(*args))

    start = time.perf_counter()
    compiled = forward.lower(params, latents, timestep, text, camera).compile()
    compile_s = time.perf_counter() - start
    compiled(params, latents, timestep, text, camera).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(params, latents, timestep, text, camera).block_until_ready()
        times.append(time.perf_counter() - start)
    tokens = 2 * frames * height * width // 4
    return {"variant": variant, "latents": f"{batch}x(2x{frames})x{height}x{width}", "tokens": tokens,
            "compile_s": compile_s, "forward_ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", help="one DiT size (default: tiny and small)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--height", type=int, default=8)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attention", default="xla")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cases = ((args.variant, args.frames, args.height, args.width),) if args.variant else DEFAULT_CASES
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, dtype {args.dtype}, "
          f"attention {args.attention}, text {args.text_len} tokens")
    print("| variant | latents (b×(2f)×h×w) | tokens | compile s | forward ms |")
    print("|---|---|---|---|---|")
    for variant, frames, height, width in cases:
        row = measure(variant, frames, height, width, args.batch, args.dtype, args.attention, args.repeats,
                      args.text_len)
        print(f"| {row['variant']} | {row['latents']} | {row['tokens']} | {row['compile_s']:.2f} | "
              f"{row['forward_ms']:.1f} |")


if __name__ == "__main__":
    main()
