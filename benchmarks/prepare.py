"""prepare's throughput: decode (ffmpeg workers) and encode (VAE over the local devices) rates, and the
projected time to prepare all of MultiCamVideo on a given number of hosts x chips.

    PYTHONPATH=. python benchmarks/prepare.py --hosts=16 --chips_per_host=4      # on a TPU VM: full size
    PYTHONPATH=. python benchmarks/prepare.py --workers=2 --encode_frames=9 --encode_height=240 \\
        --encode_width=416 --batch=2 --hosts=16 --chips_per_host=4               # the CPU figures in docs/data.md

Decoding is prepare's own `video.read_frames` (ffmpeg decode + cover-resize + crop to 81x480x832) of
a real clip (default: the 1280x720 ReCamMaster example), one per worker thread at a time. Encoding is
prepare's data-parallel encoder (`make_video_encoder(..., devices=jax.local_devices())`) with the
Wan2.1 architecture on random weights (speed does not depend on the weights). When the encode size is
smaller than the decode size (a CPU), the full-size rate is extrapolated in proportion to frames x
pixels, and the table says so. prepare overlaps the two, so a host runs at the slower of them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

import jax
import numpy as np
from flax import nnx

from data_pipeline import multicam, video, video_encoder
from recam_jax.models.vae import VAE_CONFIGS, WanVAE

SCENES = 13_600  # MultiCamVideo: 13.6K scenes of 10 videos
EXAMPLE = "../shared/fixtures/recammaster_examples/videos/4.mp4"


def decode_rate(path: str, workers: int, videos: int, frames: int, height: int, width: int) -> float:
    """Videos per second decoded by `workers` threads running prepare's ffmpeg decode."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        list(pool.map(lambda _: video.read_frames(path, frames, height, width), range(videos)))
        return videos / (time.perf_counter() - start)


def encode_rate(batch: int, frames: int, height: int, width: int, repeats: int) -> float:
    """Videos per second of prepare's encoder (Wan2.1, random weights) data parallel over the local devices."""
    vae = WanVAE(VAE_CONFIGS["wan2.1"], rngs=nnx.Rngs(0))
    encode = video_encoder.VideoVAE(vae, "wan2.1, random weights", devices=jax.local_devices())
    videos = np.random.default_rng(0).uniform(-1, 1, (batch, frames, height, width, 3)).astype(np.float32)
    encode(videos)  # compiles
    start = time.perf_counter()
    for _ in range(repeats):
        encode(videos)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=EXAMPLE, help="a real clip to decode")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--workers", type=int, default=16, help="decode threads (prepare --decode_workers)")
    parser.add_argument("--encode_frames", type=int, help="default: --frames")
    parser.add_argument("--encode_height", type=int, help="default: --height")
    parser.add_argument("--encode_width", type=int, help="default: --width")
    parser.add_argument("--batch", type=int, default=10, help="videos per encoder call (prepare --encode_batch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hosts", type=int, default=1)
    parser.add_argument("--chips_per_host", type=int, help="default: this host's device count")
    args = parser.parse_args()
    frames, height, width = args.frames, args.height, args.width
    enc = (args.encode_frames or frames, args.encode_height or height, args.encode_width or width)
    devices = jax.local_devices()
    chips = args.chips_per_host or len(devices)

    one = decode_rate(args.video, 1, 2, frames, height, width)
    many = decode_rate(args.video, args.workers, 2 * args.workers, frames, height, width)
    measured = encode_rate(args.batch, *enc, args.repeats)
    full_size = measured * (enc[0] * enc[1] * enc[2]) / (frames * height * width)
    per_host_encode = full_size / len(devices) * chips

    print(f"devices: {len(devices)} x {devices[0].device_kind}; decode source {args.video}")
    print("| stage | size | workers / devices | videos/s |")
    print("|---|---|---|---|")
    print(f"| decode (ffmpeg) | {frames}x{height}x{width} | 1 thread | {one:.2f} |")
    print(f"| decode (ffmpeg) | {frames}x{height}x{width} | {args.workers} threads | {many:.2f} |")
    size = f"{frames}x{height}x{width}"
    print(f"| encode (Wan2.1 VAE) | {enc[0]}x{enc[1]}x{enc[2]} | {len(devices)} devices | {measured:.3f} |")
    if enc != (frames, height, width):
        print(f"| encode, extrapolated by frames x pixels | {size} | {len(devices)} devices | {full_size:.4f} |")
    print(f"| encode per host, {chips} chips (per-device rate x chips) | {size} | {chips} | {per_host_encode:.4f} |")
    per_host = min(many, per_host_encode)
    hours = SCENES * multicam.NUM_CAMERAS / (per_host * args.hosts) / 3600
    bound = "decode" if many < per_host_encode else "encode"
    print(f"\nprojected: {SCENES} scenes ({SCENES * multicam.NUM_CAMERAS} videos) on {args.hosts} hosts x {chips} "
          f"chips: {hours:.1f} h ({bound}-bound at {per_host:.3f} videos/s per host)")


if __name__ == "__main__":
    main()
