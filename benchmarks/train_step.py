"""Train-step time, examples/s and compile time of the real train step on the local devices.

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/train_step.py --config configs/tiny.py --variants tiny,small
    PYTHONPATH=. python benchmarks/train_step.py --config configs/base.py --variants 1.3B \
        --config.model.attention=cudnn --config.data.batch_size=1          # on a GPU with ≥ 80 GB

Each row compiles `train.compile_step` for the config with `model.variant` set, initialises the
state on its shardings, runs `--warmup` steps, then times `--steps` steps on one fixed synthetic
batch (data loading is not timed) and reports the median.
"""

import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from recam_jax import sharding, train

# --config and its --config.key=value overrides are the trainer's flag (defined by importing train).
_VARIANTS = flags.DEFINE_list("variants", ["tiny", "small"], "model.variant of each row.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps; the median is reported.")


def benchmark(config, warmup: int, steps: int) -> dict:
    """Compile seconds and the median step seconds of the config's train step on all local devices."""
    mesh = train.make_mesh(config)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules_for(config.sharding_rules)):
        start = time.perf_counter()
        compiled, _, _, shardings, data_sharding = train.compile_step(config, mesh)
        compile_seconds = time.perf_counter() - start
        state = jax.jit(train.init_fn(config), out_shardings=shardings)()
        batch = train.to_global(next(train.make_data_iterator(config, data_sharding)), data_sharding, config)
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return {"compile_s": compile_seconds, "step_s": float(np.median(times))}


def main(argv) -> None:
    del argv
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("--config is required")
    devices = jax.devices()
    print(f"{len(devices)} × {devices[0].device_kind}, batch {config.data.batch_size}, latents "
          f"{tuple(config.data.latent_shape)}, remat {config.model.remat}, attention {config.model.attention}, "
          f"median of {_STEPS.value} steps after {_WARMUP.value}")
    print("| variant | step s | examples/s | compile s |\n|---|---|---|---|")
    for variant in _VARIANTS.value:
        config.model.variant = variant
        result = benchmark(config, _WARMUP.value, _STEPS.value)
        print(f"| {variant} | {result['step_s']:.4f} | {config.data.batch_size / result['step_s']:.1f} | "
              f"{result['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
