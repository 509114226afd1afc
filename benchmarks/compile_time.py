"""Trace+lower and compile time of the trainer's real train step, blocks scanned vs unrolled.

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/compile_time.py --config configs/base.py --topology v5p-8

Each row AOT-compiles `train.lower_step` (the trainer's own step, shardings and donation) for the
devices of a TPU topology description, as `recam_jax.compile` does (libtpu on this host, nothing
allocated), with `model.scan_layers` set, and reports wall-clock seconds and per-chip memory.
"""

import time

import jax
from absl import app, flags
from flax import nnx

from recam_jax import compile as planner
from recam_jax import sharding, train

# --config (and its overrides) and --topology are the planner's flags (defined by importing it).


def benchmark(config, devices) -> dict:
    """Seconds to trace and lower, seconds to compile, and per-chip GiB of the config's train step."""
    mesh = train.make_mesh(config, devices)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules_for(config.sharding_rules)):
        start = time.perf_counter()
        lowered = train.lower_step(config, mesh)[0]
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
    return {"lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at,
            "memory_gib": planner.memory_bytes(compiled)["total"] / planner.GiB}


def main(argv) -> None:
    del argv
    config, topology = flags.FLAGS.config, flags.FLAGS.topology
    if config is None or topology is None:
        raise app.UsageError("--config and --topology are required")
    devices = planner.topology_devices(topology)
    print(f"{topology} ({len(devices)} × {devices[0].device_kind}), variant {config.model.variant}, "
          f"latents {tuple(config.data.latent_shape)}, batch {config.data.batch_size}, remat {config.model.remat}, "
          f"attention {config.model.attention}")
    print("| blocks | trace+lower s | compile s | total s | memory per chip GiB |\n|---|---|---|---|---|")
    totals = {}
    for scan_layers in (True, False):
        config.model.scan_layers = scan_layers
        r = benchmark(config, devices)
        name = "scanned" if scan_layers else "unrolled"
        totals[name] = r["lower_s"] + r["compile_s"]
        print(f"| {name} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | {totals[name]:.1f} | {r['memory_gib']:.2f} |",
              flush=True)
    print(f"\nscanned / unrolled total: {totals['scanned'] / totals['unrolled']:.3f}")


if __name__ == "__main__":
    app.run(main)
