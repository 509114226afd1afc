"""Loader throughput at full-size shapes: examples/s, MB/s and bytes read vs used, as a table.

    python benchmarks/loader.py [--scenes=16 --text_len=512 --batch_size=4 --batches=24 --dir=/tmp/recam_bench]

Writes synthetic shards of full-resolution records (latents 21x60x104x16 bf16 per camera, captions
of `--text_len` x 4096 bf16 tokens; random bytes, since only sizes matter), then times
`make_train_iterator` per configuration, after evicting the shards from the page cache
(posix_fadvise DONTNEED) so reads come from the local disk.
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from data_pipeline import loader, multicam, schema, shards, tfrecord
from data_pipeline.schema import Shapes
from recam_jax import storage

flags.DEFINE_string("dir", "/tmp/recam_bench", "where to write the synthetic shards")
flags.DEFINE_integer("scenes", 16, "scenes to write (11 records, ~46 MB each)")
flags.DEFINE_integer("text_len", 512, "caption tokens stored per scene (Wan's maximum)")
flags.DEFINE_integer("batch_size", 4, "examples per batch")
flags.DEFINE_integer("batches", 24, "batches timed per configuration (after 2 warm-up batches)")
FLAGS = flags.FLAGS

SHAPES = Shapes(latent_shape=(21, 60, 104, 16), video_frames=81, text_dim=4096, max_text_len=512)


def write_shards(directory: str, num_scenes: int, text_len: int) -> None:
    """Synthetic full-size shards (4 scenes each) and their manifest, unless already there."""
    if os.path.exists(os.path.join(directory, shards.MANIFEST)):
        return
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((len(multicam.CAMERAS), *SHAPES.latent_shape), np.float32)
    extrinsics = np.broadcast_to(np.eye(4), (SHAPES.video_frames, 4, 4))
    text = rng.standard_normal((text_len, SHAPES.text_dim), np.float32)
    names = []
    for first in range(0, num_scenes, 4):
        names.append(shards.shard_name("train", len(names)))
        scene_ids = []
        with storage.atomic_open(os.path.join(directory, names[-1])) as file:
            writer = tfrecord.Writer(file)
            for k in range(first, min(first + 4, num_scenes)):
                scene_ids.append(f"f18_aperture10/scene{k}")
                writer.write(schema.scene_record(scene_ids[-1], ["a caption"], [text], [0] * 10))
                for i, camera in enumerate(multicam.CAMERAS):
                    writer.write(schema.camera_record(scene_ids[-1], camera, latents[i], extrinsics, 18.0, multicam.SENSOR_SIZE_MM))
        index = {"scenes": scene_ids, "offsets": writer.offsets, "skipped": {}, "default_caption": []}
        shards.write_json_atomically(shards.index_path(directory, names[-1]), index)
    shards.write_manifest(directory, SHAPES, {"video": "synthetic", "text": "synthetic"}, {"train": names}, {})


def evict_page_cache(directory: str) -> None:
    """Drops the shards' pages from the OS cache so the next reads hit the disk."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def bytes_per_example(directory: str, text_len: int) -> tuple[float, float]:
    """Bytes read (3 whole records) and bytes used (2 latents, the text, 2 extrinsics) per example."""
    offsets = np.diff(shards.read_json(shards.index_path(directory, shards.shard_name("train", 0)))["offsets"])
    read = offsets[0] + 2 * offsets[1:11].mean()
    used = 2 * np.prod(SHAPES.latent_shape) * 2 + text_len * SHAPES.text_dim * 2 + 2 * SHAPES.video_frames * 16 * 8
    return float(read), float(used)


def time_config(directory: str, worker_count: int, read_threads: int) -> float:
    """Examples per second of the train iterator, cold cache, after 2 warm-up batches."""
    evict_page_cache(directory)
    iterator = loader.make_train_iterator(
        directory, batch_size=FLAGS.batch_size, text_len=512, seed=0, worker_count=worker_count, read_threads=read_threads
    )
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(iterator)
    return FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)


def main(argv) -> None:
    del argv
    write_shards(FLAGS.dir, FLAGS.scenes, FLAGS.text_len)
    read, used = bytes_per_example(FLAGS.dir, FLAGS.text_len)
    print(f"{FLAGS.scenes} scenes, text {FLAGS.text_len} tokens, batch {FLAGS.batch_size}, {os.cpu_count()} cores")
    print(f"bytes per example: read {read / 1e6:.2f} MB, used {used / 1e6:.2f} MB, ratio {read / used:.3f}")
    print("| workers | read threads | examples/s | MB/s read |")
    print("|---|---|---|---|")
    for workers, threads in [(0, 1), (0, 4), (2, 2)]:
        rate = time_config(FLAGS.dir, workers, threads)
        print(f"| {workers} | {threads} | {rate:.1f} | {rate * read / 1e6:.0f} |")


if __name__ == "__main__":
    app.run(main)
