"""VAE speed on this machine, and the full-size encode/decode compiled ahead of time for a TPU chip.

    PYTHONPATH=. python benchmarks/vae.py             # encode/decode frames/s on CPU, small shapes, a table
    PYTHONPATH=. python benchmarks/vae.py --tpu-aot   # Wan2.1 81x480x832 encode and decode for one v5p chip:
                                                      # per-chip bytes from XLA's memory analysis (needs libtpu)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recam_jax.models.vae import VAE_CONFIGS, WanVAE

V5P_HBM_BYTES = 95 * 2**30


def time_call(fn, *args, repeats=3):
    """Best wall time of `fn(*args)` after one compiling call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def cpu_table(config_name: str, shapes, dtype):
    """Frames per second of encode and decode (jitted, batch 1) for each (frames, height, width)."""
    model = WanVAE(VAE_CONFIGS[config_name], rngs=nnx.Rngs(0), dtype=dtype)
    encode = nnx.jit(lambda m, x: m.encode(x))
    decode = nnx.jit(lambda m, z: m.decode(z))
    print(f"config={config_name} dtype={jnp.dtype(dtype).name} device={jax.devices()[0].device_kind}")
    print(f"| {'frames x H x W':>16} | {'encode s':>9} | {'encode frames/s':>15} | {'decode s':>9} | {'decode frames/s':>15} |")
    print(f"|{'-' * 18}|{'-' * 11}|{'-' * 17}|{'-' * 11}|{'-' * 17}|")
    for frames, h, w in shapes:
        x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, frames, h, w, 3)), jnp.float32)
        t_enc = time_call(encode, model, x)
        z = encode(model, x)
        t_dec = time_call(decode, model, z)
        print(f"| {f'{frames}x{h}x{w}':>16} | {t_enc:9.3f} | {frames / t_enc:15.1f} | {t_dec:9.3f} | {frames / t_dec:15.1f} |")


def tpu_aot(topology: str, frames: int, height: int, width: int, dtype):
    """Compiles Wan2.1 encode and decode for one chip of `topology`; prints XLA's per-chip memory."""
    from jax.experimental import topologies

    # One chip per host, so a single-chip topology such as v5p:1x1x1 is accepted.
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                           chips_per_host_bounds=[1, 1, 1]).devices
    mesh = Mesh(np.array(devices[:1]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    cfg = VAE_CONFIGS["wan2.1"]
    abstract = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, params = nnx.split(abstract)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params)
    s = cfg.spatial_factor
    latent_frames = 1 + (frames - 1) // cfg.temporal_factor
    inputs = {
        "encode": jax.ShapeDtypeStruct((1, frames, height, width, 3), jnp.float32, sharding=replicated),
        "decode": jax.ShapeDtypeStruct((1, latent_frames, height // s, width // s, cfg.z_dim), jnp.float32,
                                       sharding=replicated),
    }
    print(f"topology={topology} chip={devices[0].device_kind} video=1x{frames}x{height}x{width} "
          f"compute={jnp.dtype(dtype).name} params=float32")
    print(f"| {'fn':>6} | {'args GiB':>8} | {'outputs GiB':>11} | {'temps GiB':>9} | {'peak GiB':>8} | {'of 95 GiB HBM':>13} | {'compile s':>9} |")
    print(f"|{'-' * 8}|{'-' * 10}|{'-' * 13}|{'-' * 11}|{'-' * 10}|{'-' * 15}|{'-' * 11}|")
    for name, spec in inputs.items():
        fn = jax.jit(lambda p, x, name=name: getattr(nnx.merge(graphdef, p), name)(x))
        start = time.perf_counter()
        mem = fn.lower(params, spec).compile().memory_analysis()
        seconds = time.perf_counter() - start
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        gib = lambda b: b / 2**30  # noqa: E731
        print(f"| {name:>6} | {gib(mem.argument_size_in_bytes):8.2f} | {gib(mem.output_size_in_bytes):11.2f} | "
              f"{gib(mem.temp_size_in_bytes):9.2f} | {gib(peak):8.2f} | {100 * peak / V5P_HBM_BYTES:12.1f}% | {seconds:9.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu-aot", action="store_true", help="AOT-compile the full-size VAE for a TPU chip")
    parser.add_argument("--topology", default="v5p:1x1x1")
    parser.add_argument("--config", default="tiny", choices=sorted(VAE_CONFIGS), help="for the CPU table")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 for TPU)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    args = parser.parse_args()
    if args.tpu_aot:
        tpu_aot(args.topology, args.frames, args.height, args.width, jnp.dtype(args.dtype or "bfloat16"))
    else:
        cpu_table(args.config, [(5, 64, 64), (17, 64, 64), (17, 128, 224)], jnp.dtype(args.dtype or "float32"))


if __name__ == "__main__":
    main()
