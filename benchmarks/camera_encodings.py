"""Camera encodings compared on the demo data: eval loss and camera sensitivity, one tiny CPU run each.

    nice -n 10 python benchmarks/camera_encodings.py [--dir /tmp/recam_camera --scenes 16 --steps 400 --seed 0]

Writes a varying-focal demo dataset (`demo_data --varying_focal`: a lens per camera, dolly zooms and a
zoom) and its shards once, then trains configs/demo.py once per camera encoding with the same seed,
data order and steps, and prints, for the final weights on the held-out scenes (10 fixed pairs per
scene): the eval loss, the camera gap (loss with poses and lenses shuffled across the batch minus the
true loss) and the intrinsics gap (only the lenses shuffled; the official encoding does not read them).
"""

from __future__ import annotations

import argparse
import json
import os

from configs import demo
from data_pipeline import demo_data
from recam_jax import train
from recam_jax.models.camera_encoding import ENCODINGS

FRAMES, SIZE = 17, 64  # → latents (5, 8, 8, 16) through the demo VAE, as configs/demo.py expects
COLUMNS = ("eval_loss", "eval_loss_shuffled_cameras", "camera_gap", "eval_loss_shuffled_intrinsics", "intrinsics_gap")


def make_shards(directory: str, num_scenes: int) -> str:
    """The varying-focal demo shards under `directory`, written once."""
    raw, out = os.path.join(directory, "raw"), os.path.join(directory, "shards")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        demo_data.write_dataset(raw, num_scenes, FRAMES, SIZE, SIZE, varying_focal=True)
        demo_data.prepare_demo(raw, out, num_frames=FRAMES, height=SIZE, width=SIZE,
                               num_val_scenes=max(1, num_scenes // 4), scenes_per_shard=2)
    return out


def run(encoding: str, shards: str, workdir: str, steps: int, seed: int, eval_every: int) -> dict:
    """Trains one encoding (or reuses a finished run) and returns its final eval record."""
    config = demo.get_config()
    config.seed, config.steps, config.data.path = seed, steps, shards
    config.model.camera_encoding = encoding
    config.optimizer.decay_steps = steps - config.optimizer.warmup_steps
    config.data.eval_pairs_per_scene = 10  # every target camera of each held-out scene
    config.eval_every, config.checkpoint_every = eval_every or steps, steps
    train.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "eval_loss" in r and r["step"] == steps][-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/recam_camera", help="data and runs (reused when present)")
    parser.add_argument("--scenes", type=int, default=16, help="demo scenes (a quarter held out)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_every", type=int, default=0, help="also evaluate every N steps (metrics.jsonl)")
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=ENCODINGS)
    args = parser.parse_args(argv)
    shards = make_shards(args.dir, args.scenes)
    results = {e: run(e, shards, os.path.join(args.dir, f"{e}_seed{args.seed}_steps{args.steps}"), args.steps,
                      args.seed, args.eval_every) for e in args.encodings}
    print(f"\n{args.scenes} scenes, {args.steps} steps, seed {args.seed}")
    print("| encoding | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for encoding, record in results.items():
        print(f"| {encoding} | " + " | ".join(f"{record[c]:.5f}" if c in record else "—" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
