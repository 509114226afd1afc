"""Evaluation: the validation loss, and how much of it the camera input explains.

    python -m recam_jax.evaluate --params step20000.ckpt --data /path/to/shards [--batch_size 8]

Camera sensitivity: the loss with each example's true camera and with the cameras shuffled across
the batch (rolled by one, so every example gets another's trajectory), at the same noise and
timesteps. The gap is what the model gets from the camera: 0 when it ignores it (the camera
encoder at its zero init), positive once it follows the camera. The trainer logs the three
numbers at every eval (`eval_loss`, `eval_loss_shuffled_cameras`, `camera_gap`); a model whose
camera encoding reads the lens (intrinsics, plucker) also gets the loss with only the lenses
shuffled and its gap (`eval_loss_shuffled_intrinsics`, `intrinsics_gap`).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recam_jax import flow


def fixed_noise_loss(model, batch: dict, flow_cfg: flow.FlowConfig) -> jax.Array:
    """Validation loss at each example's fixed timestep and noise seed: comparable across runs."""
    keys = jax.vmap(jax.random.key)(batch["noise_seed"])
    grid = jnp.asarray(flow.shifted_sigmas(flow.NUM_TRAIN_TIMESTEPS, flow_cfg.shift), jnp.float32)
    return flow.flow_loss(model, keys, batch, flow_cfg, sigma=grid[batch["timestep_index"]])[0]


def camera_sensitivity(model, batch: dict, flow_cfg: flow.FlowConfig) -> dict[str, jax.Array]:
    """The fixed-noise loss with the true cameras and with the batch's cameras (poses and lenses) rolled
    by one, and the gap; for a model whose camera encoding reads the lens, also the loss and gap with
    only the intrinsics rolled (`intrinsics_gap`: what the focal inputs are worth)."""
    rolled = lambda *keys: {**batch, **{key: jnp.roll(batch[key], 1, axis=0) for key in keys}}
    true = fixed_noise_loss(model, batch, flow_cfg)
    shuffled = fixed_noise_loss(model, rolled("camera", *(["intrinsics"] if "intrinsics" in batch else [])), flow_cfg)
    metrics = {"eval_loss": true, "eval_loss_shuffled_cameras": shuffled, "camera_gap": shuffled - true}
    if model.cfg.camera_encoding != "official" and "intrinsics" in batch:
        lens_shuffled = fixed_noise_loss(model, rolled("intrinsics"), flow_cfg)
        metrics.update(eval_loss_shuffled_intrinsics=lens_shuffled, intrinsics_gap=lens_shuffled - true)
    return metrics


def mean_metrics(per_batch: list[dict]) -> dict[str, float]:
    """The mean of each metric over batches."""
    per_batch = jax.device_get(per_batch)
    return {name: float(np.mean([m[name] for m in per_batch])) for name in per_batch[0]}


def evaluate(model, batches, flow_cfg: flow.FlowConfig) -> dict[str, float]:
    """`camera_sensitivity` averaged over an iterable of numpy batches (jitted once)."""
    step = nnx.jit(lambda model, batch: camera_sensitivity(model, batch, flow_cfg))
    per_batch = [step(model, {k: jnp.asarray(v) for k, v in batch.items()}) for batch in batches]
    if not per_batch:
        raise ValueError("no eval batch: fewer held-out examples than --batch_size")
    return mean_metrics(per_batch)


def main(argv=None) -> None:
    from data_pipeline import loader
    from recam_jax import convert

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True, help="ReCamMaster/Wan PyTorch weights or a recam_jax params folder")
    parser.add_argument("--data", required=True, help="folder of prepared TFRecord shards (its val split)")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per batch (≥ 2: cameras are shuffled "
                                                                  "within a batch)")
    parser.add_argument("--pairs_per_scene", type=int, default=2, help="held-out (source, target) pairs per scene")
    parser.add_argument("--text_len", type=int, default=512)
    parser.add_argument("--shift", type=float, default=5.0, help="timestep shift of the training σ grid")
    parser.add_argument("--num_heads", type=int, default=None, help="DiT heads (default: dim / 128, as Wan)")
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error("--batch_size must be at least 2: the cameras are shuffled across the batch")

    model = convert.load_any(args.params, num_heads=args.num_heads)
    batches = loader.make_eval_iterator(args.data, batch_size=args.batch_size, text_len=args.text_len,
                                        pairs_per_scene=args.pairs_per_scene)
    metrics = evaluate(model, batches, flow.FlowConfig(shift=args.shift))
    for name, value in metrics.items():
        print(f"{name}: {value:.6g}")


if __name__ == "__main__":
    main()
