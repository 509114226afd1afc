"""Camera encodings compared on the demo data: eval loss and camera sensitivity, one tiny CPU run each.

    nice -n 10 python benchmarks/camera_encodings.py [--dir /tmp/recam_camera --lenses varying --scenes 16
                                                      --steps 400 --eval_every 0 --seed 0]

Writes a demo dataset whose lenses vary (`demo_data --lenses`: `varying`, a lens per camera with dolly
zooms and a zoom; or `zoom_rig`, ten lenses on one path per scene, so a target differs from its source by
the lens alone) and its shards once, then trains configs/demo.py once per camera encoding with the same
seed, data order and steps, and prints, for the weights at each evaluation on the held-out scenes (10
fixed pairs per scene): the eval loss, the camera gap (loss with poses and lenses shuffled across the
batch minus the true loss) and the intrinsics gap (only the lenses shuffled; the official encoding does
not read them), each gap with its standard error over the held-out examples.
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
COLUMNS = ("eval_loss", "camera_gap", "camera_gap_stderr", "intrinsics_gap", "intrinsics_gap_stderr")


def make_shards(directory: str, num_scenes: int, lenses: str) -> str:
    """The demo shards with these lenses under `directory`, written once."""
    raw, out = os.path.join(directory, lenses, "raw"), os.path.join(directory, lenses, "shards")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        demo_data.write_dataset(raw, num_scenes, FRAMES, SIZE, SIZE, lenses=lenses)
        demo_data.prepare_demo(raw, out, num_frames=FRAMES, height=SIZE, width=SIZE,
                               num_val_scenes=max(1, num_scenes // 4), scenes_per_shard=2)
    return out


def run(encoding: str, shards: str, workdir: str, steps: int, seed: int, eval_every: int, variant: str) -> list[dict]:
    """Trains one encoding (or reuses a finished run) and returns its eval records, one per evaluation."""
    config = demo.get_config()
    config.seed, config.steps, config.data.path, config.model.variant = seed, steps, shards, variant
    config.model.camera_encoding = encoding
    config.optimizer.decay_steps = steps - config.optimizer.warmup_steps
    config.data.eval_pairs_per_scene = 10  # every target camera of each held-out scene
    config.eval_every, config.checkpoint_every = eval_every or steps, steps
    train.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = {r["step"]: r for r in map(json.loads, f) if "eval_loss" in r}  # a resumed run's last word
    return [evals[step] for step in sorted(evals)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/recam_camera", help="data and runs (reused when present)")
    parser.add_argument("--lenses", default="varying", choices=("varying", "zoom_rig"), help="the demo's lenses")
    parser.add_argument("--scenes", type=int, default=16, help="demo scenes (a quarter held out)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default="tiny", choices=("tiny", "small"), help="DiT size (configs/demo.py: tiny)")
    parser.add_argument("--eval_every", type=int, default=0, help="also evaluate every N steps")
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=ENCODINGS)
    args = parser.parse_args(argv)
    shards = make_shards(args.dir, args.scenes, args.lenses)
    results = {e: run(e, shards, os.path.join(args.dir, args.lenses, f"{e}_{args.variant}_seed{args.seed}_steps{args.steps}"),
                      args.steps, args.seed, args.eval_every, args.variant) for e in args.encodings}
    print(f"\n{args.lenses} lenses, {args.scenes} scenes, {args.variant} DiT, {args.steps} steps, seed {args.seed}")
    print("| encoding | step | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for encoding, records in results.items():
        for record in records:
            print(f"| {encoding} | {record['step']} | "
                  + " | ".join(f"{record[c]:.5f}" if c in record else "—" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
