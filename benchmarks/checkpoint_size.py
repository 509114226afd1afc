"""Bytes a run writes per step checkpoint and once, with the frozen parameters held as float32 in every
checkpoint (before) and in the compute dtype written once per run (`model.frozen_in_compute_dtype`).

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/checkpoint_size.py --config configs/base.py

Shape arithmetic on the config's train state (`jax.eval_shape` of the trainer's own init: nothing
is allocated), so the 1.3B recipe is measured on any host. The bytes are the arrays' own; orbax
may compress them a little on disk. The data iterator's position (a few hundred bytes) is left out.
"""

import jax
import numpy as np
from absl import app, flags

from recam_jax import train

# --config and its --config.key=value overrides are the trainer's flag (defined by importing train).


def gigabytes(tree) -> float:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 1e9


def sizes(config, frozen_in_compute_dtype: bool) -> dict:
    """GB per part of the train state, per step checkpoint and written once per run."""
    config = config.copy_and_resolve_references()
    config.model.frozen_in_compute_dtype = frozen_in_compute_dtype
    state = jax.eval_shape(train.init_fn(config))
    parts = {name: gigabytes(getattr(state, name)) for name in ("trainable", "frozen", "opt_state", "ema")}
    every = sum(parts.values()) - parts["frozen"] * frozen_in_compute_dtype
    return {**parts, "per_checkpoint": every, "once": parts["frozen"] * frozen_in_compute_dtype}


def main(argv) -> None:
    del argv
    config = flags.FLAGS.config
    kept = config.keep_last
    print(f"variant {config.model.variant}, trainable {config.trainable}, param_dtype {config.model.param_dtype}, "
          f"compute dtype {config.model.dtype}, keep_last {kept}")
    print(f"| frozen parameters | trainable GB | frozen GB | optimizer GB | EMA GB | per step checkpoint GB "
          f"| written once GB | run folder with {kept} checkpoints GB |")
    print("|---|---|---|---|---|---|---|---|")
    for label, flag in (("float32, in every checkpoint (before)", False),
                        (f"{config.model.dtype}, once per run (after)", True)):
        s = sizes(config, flag)
        print(f"| {label} | {s['trainable']:.2f} | {s['frozen']:.2f} | {s['opt_state']:.2f} | {s['ema']:.2f} | "
              f"{s['per_checkpoint']:.2f} | {s['once']:.2f} | {kept * s['per_checkpoint'] + s['once']:.2f} |")


if __name__ == "__main__":
    app.run(main)
