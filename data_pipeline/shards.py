"""Where shards live and what describes them: the per-shard index file and the dataset manifest.

    OUT/train-00000.tfrecord        records of whole scenes (schema.py)
    OUT/train-00000.index.json      written last, after the rename: the shard's scenes, record
                                    offsets, skipped scenes with reasons, scenes given the default caption
    OUT/manifest.json               shapes, dtypes, encoder identities, splits and their shards

A shard is complete exactly when its index file exists: the record file is written whole first
(storage.atomic_open), so a killed run never leaves a shard the loader would read. OUT may be a
local folder or a gs:// URL.
"""

from __future__ import annotations

import dataclasses

from data_pipeline.schema import RECORDS_PER_SCENE, Shapes
from data_pipeline.tfrecord import FRAMING_BYTES
from recam_jax import storage

MANIFEST = "manifest.json"
FORMAT = "recam_jax.multicam_latents.v1"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.tfrecord"


def index_path(directory: str, name: str) -> str:
    return storage.join(directory, name.removesuffix(".tfrecord") + ".index.json")


write_json_atomically = storage.write_json  # readers see all of it or nothing
read_json = storage.read_json


def read_index(directory: str, name: str, num_scenes: int) -> dict:
    """A shard's index file, checked against the manifest's scene count before any record is read:
    one offset per record plus the end, from 0, each record at least its framing long."""
    path = index_path(directory, name)
    index = read_json(path)
    scenes, offsets = index.get("scenes"), index.get("offsets")
    if not isinstance(scenes, list) or len(scenes) != num_scenes:
        raise ValueError(f"{path}: {len(scenes) if isinstance(scenes, list) else 'no'} scenes, the manifest says {num_scenes}")
    expected = num_scenes * RECORDS_PER_SCENE + 1
    if not isinstance(offsets, list) or len(offsets) != expected or not all(type(o) is int for o in offsets):
        raise ValueError(f"{path}: 'offsets' must be {expected} integers ({num_scenes} scenes x {RECORDS_PER_SCENE} records + the end)")
    if offsets[0] != 0:
        raise ValueError(f"{path}: offsets[0] is {offsets[0]}, not 0")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1] + FRAMING_BYTES:
            raise ValueError(f"{path}: offsets[{i}] = {offsets[i]} is not past offsets[{i - 1}] = {offsets[i - 1]} "
                             f"by a record's framing ({FRAMING_BYTES} bytes): the index is not monotonic")
    return index


def write_manifest(directory: str, shapes: Shapes, encoders: dict, splits: dict[str, list[str]], settings: dict) -> None:
    """The manifest of a dataset whose shards (by split) are all complete."""
    manifest = {
        "format": FORMAT,
        "shapes": dataclasses.asdict(shapes),
        "dtypes": {"latents": "bfloat16", "text_embeds": "bfloat16", "extrinsics": "float64"},
        "encoders": encoders,
        "settings": settings,
        "splits": {},
    }
    for split, names in splits.items():
        indexes = [read_json(index_path(directory, name)) for name in names]
        manifest["splits"][split] = {
            "num_scenes": sum(len(index["scenes"]) for index in indexes),
            "num_skipped": sum(len(index["skipped"]) for index in indexes),
            "num_default_caption": sum(len(index["default_caption"]) for index in indexes),
            "shards": [{"file": name, "num_scenes": len(index["scenes"])} for name, index in zip(names, indexes)],
        }
    write_json_atomically(storage.join(directory, MANIFEST), manifest)


def read_shapes(manifest: dict) -> Shapes:
    """The record shapes a manifest promises, as the loader checks them."""
    shapes = manifest["shapes"]
    return Shapes(tuple(shapes["latent_shape"]), shapes["video_frames"], shapes["text_dim"], shapes["max_text_len"])
