"""Evaluation: the validation loss, how much of it the camera input explains, and camera accuracy.

    python -m recam_jax.evaluate --params step20000.ckpt --data /path/to/shards [--batch_size 8]
    python -m recam_jax.evaluate --camera_accuracy --video render.mp4 --trajectory arc_right [--focal_px 560]

Camera sensitivity: the loss with each example's true camera and with the cameras shuffled across
the batch (rolled by one, so every example gets another's trajectory), at the same noise and
timesteps. The gap is what the model gets from the camera: 0 when it ignores it (the camera
encoder at its zero init), positive once it follows the camera. The trainer logs them at
every eval (`eval_loss`, `eval_loss_shuffled_cameras`, `camera_gap` and the gap's standard error over
the examples, `camera_gap_stderr`); a model whose camera encoding reads the lens (intrinsics,
plucker) also gets the loss with only the lenses shuffled and its gap (`eval_loss_shuffled_intrinsics`,
`intrinsics_gap`, `intrinsics_gap_stderr`). The CLI weighs the loss over timesteps as the trainer's
default does (`--loss_weighting bsmntw`), so it prints the eval_loss a run logged for the same weights.

Camera accuracy (`--camera_accuracy`): RotErr and TransErr of a video's camera, estimated by COLMAP,
against the trajectory it was asked for (recam_jax/camera_accuracy.py); exit status 1 when COLMAP
cannot reconstruct the video.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recam_jax import flow


def fixed_noise_loss(model, batch: dict, flow_cfg: flow.FlowConfig) -> jax.Array:
    """Validation loss of each example at its fixed timestep and noise seed: comparable across runs."""
    keys = jax.vmap(jax.random.key)(batch["noise_seed"])
    grid = jnp.asarray(flow.shifted_sigmas(flow.NUM_TRAIN_TIMESTEPS, flow_cfg.shift), jnp.float32)
    return flow.flow_loss(model, keys, batch, flow_cfg, sigma=grid[batch["timestep_index"]])[1]["per_example"]


def camera_sensitivity(model, batch: dict, flow_cfg: flow.FlowConfig) -> dict[str, jax.Array]:
    """The fixed-noise loss with the true cameras and with the batch's cameras (poses and lenses) rolled
    by one, and the gap; for a model whose camera encoding reads the lens, also the loss and gap with
    only the intrinsics rolled (`intrinsics_gap`: what the focal inputs are worth). Means over the
    examples weighted by `eval_weight` (0 for rows that only pad the last batch of an eval pass; all 1
    when absent), `eval_examples`, the weights' sum, and each gap's mean square over the examples
    (`*_gap_sq`), from which `mean_metrics` gives the gap's standard error."""
    weight = batch.get("eval_weight", jnp.ones(len(batch["camera"]), jnp.float32))
    mean = lambda losses: jnp.sum(weight * losses) / jnp.sum(weight)
    rolled = lambda *keys: {**batch, **{key: jnp.roll(batch[key], 1, axis=0) for key in keys}}
    true = fixed_noise_loss(model, batch, flow_cfg)
    shuffled = fixed_noise_loss(model, rolled("camera", *(["intrinsics"] if "intrinsics" in batch else [])), flow_cfg)
    metrics = {"eval_loss": mean(true), "eval_loss_shuffled_cameras": mean(shuffled),
               "camera_gap": mean(shuffled - true), "camera_gap_sq": mean((shuffled - true) ** 2),
               "eval_examples": jnp.sum(weight)}
    if model.cfg.camera_encoding != "official" and "intrinsics" in batch:
        lens_shuffled = fixed_noise_loss(model, rolled("intrinsics"), flow_cfg)
        metrics.update(eval_loss_shuffled_intrinsics=mean(lens_shuffled), intrinsics_gap=mean(lens_shuffled - true),
                       intrinsics_gap_sq=mean((lens_shuffled - true) ** 2))
    return metrics


def mean_metrics(per_batch: list[dict]) -> dict[str, float]:
    """The mean of each metric over the examples of all batches (batch means weighted by `eval_examples`);
    each gap's mean square becomes its standard error over the n examples (`*_gap_stderr`,
    sqrt((mean(gap²) − mean(gap)²) / (n − 1))): a gap of a few standard errors is more than noise."""
    per_batch = jax.device_get(per_batch)
    counts = np.array([m["eval_examples"] for m in per_batch], np.float64)
    means = {name: float(np.dot(counts, [m[name] for m in per_batch]) / counts.sum())
             for name in per_batch[0] if name != "eval_examples"}
    for gap in [name for name in means if name.endswith("_gap")]:
        variance = max(means.pop(gap + "_sq") - means[gap] ** 2, 0.0)
        means[gap + "_stderr"] = float(np.sqrt(variance / max(counts.sum() - 1, 1)))
    return means


def evaluate(model, batches, flow_cfg: flow.FlowConfig) -> dict[str, float]:
    """`camera_sensitivity` averaged over an iterable of numpy batches (jitted once)."""
    step = nnx.jit(lambda model, batch: camera_sensitivity(model, batch, flow_cfg))
    per_batch = [step(model, {k: jnp.asarray(v) for k, v in batch.items()}) for batch in batches]
    if not per_batch:
        raise ValueError("no eval batch: fewer held-out examples than --batch_size")
    return mean_metrics(per_batch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", help="ReCamMaster/Wan PyTorch weights or a recam_jax params folder")
    parser.add_argument("--data", help="folder of prepared TFRecord shards (its val split)")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per batch (≥ 2: cameras are shuffled "
                                                                  "within a batch)")
    parser.add_argument("--pairs_per_scene", type=int, default=2, help="held-out (source, target) pairs per scene")
    parser.add_argument("--text_len", type=int, default=512)
    parser.add_argument("--shift", type=float, default=None, help="timestep shift of the training σ grid (default: "
                                                                  "the weights' recorded training shift, else 5)")
    parser.add_argument("--loss_weighting", choices=flow.LOSS_WEIGHTINGS, default="bsmntw",
                        help="loss weighting over timesteps: the run's flow.loss_weighting reproduces its logged "
                             "eval_loss (default: configs/base.py's)")
    parser.add_argument("--timestep_dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype timesteps are rounded to (default: the one the weights were trained with)")
    parser.add_argument("--num_heads", type=int, default=None, help="DiT heads (default: dim / 128, as Wan)")
    accuracy = parser.add_argument_group("camera accuracy (--camera_accuracy)")
    accuracy.add_argument("--camera_accuracy", action="store_true", help="RotErr / TransErr of --video against "
                                                                         "--trajectory instead of the eval loss")
    accuracy.add_argument("--video", help="the video whose camera is measured (e.g. a sample.py render)")
    accuracy.add_argument("--trajectory", help="the requested camera path: preset, spec (pan:30+dolly:1) or camera JSON")
    accuracy.add_argument("--camera", type=int, default=1, help="which camXX of a trajectory JSON")
    accuracy.add_argument("--focal_px", type=float, default=None, help="the video's focal length in pixels, if known "
                                                                       "(default: COLMAP estimates it)")
    accuracy.add_argument("--frame_stride", type=int, default=1, help="measure every n-th frame (4: one per latent "
                                                                      "frame, 4x faster)")
    accuracy.add_argument("--colmap_dir", help="an empty folder to keep COLMAP's frames, database and model in")
    args = parser.parse_args(argv)
    if args.camera_accuracy:
        if not _camera_accuracy(parser, args):
            raise SystemExit(1)
        return
    if args.params is None or args.data is None:
        parser.error("--params and --data are required (or --camera_accuracy with --video and --trajectory)")
    if args.batch_size < 2:
        parser.error("--batch_size must be at least 2: the cameras are shuffled across the batch")

    from data_pipeline import loader
    from recam_jax import convert, sample

    timestep_dtype = sample.sampling_timestep_dtype(args.timestep_dtype, args.params)
    model = convert.load_any(args.params, num_heads=args.num_heads, timestep_dtype=timestep_dtype)
    batches = loader.make_eval_iterator(args.data, batch_size=args.batch_size, text_len=args.text_len,
                                        pairs_per_scene=args.pairs_per_scene)
    flow_cfg = flow.FlowConfig(shift=sample.sampling_shift(args.shift, args.params), loss_weighting=args.loss_weighting)
    metrics = evaluate(model, batches, flow_cfg)
    for name, value in metrics.items():
        print(f"{name}: {value:.6g}")


def _camera_accuracy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Prints the video's camera accuracy; False when COLMAP could not reconstruct the video."""
    import pycolmap

    from data_pipeline import cameras
    from recam_jax import camera_accuracy, trajectory

    pycolmap.logging.minloglevel = pycolmap.logging.WARNING  # not COLMAP's hundreds of INFO lines per video
    if args.video is None or args.trajectory is None:
        parser.error("--camera_accuracy needs --video and --trajectory")
    if args.frame_stride < 1:
        parser.error(f"--frame_stride must be at least 1, got {args.frame_stride}")
    try:
        frames = camera_accuracy.read_frames(args.video)
        requested = cameras.c2w_from_unreal(trajectory.load(args.trajectory, args.camera, len(frames)))
        result = camera_accuracy.camera_accuracy(frames[:: args.frame_stride], requested[:: args.frame_stride],
                                                 args.focal_px, args.colmap_dir)
    except ValueError as e:  # an unreadable video, a bad trajectory, a --colmap_dir in use
        parser.error(str(e))
    print(result.report())
    return result.failure is None


if __name__ == "__main__":
    main()
