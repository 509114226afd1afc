"""The grain loader: shards of pre-encoded scenes -> training and evaluation batches (recam_jax/batch.py).

An example is (scene, target camera, source camera): every (scene, target camera) pair once per
epoch, in a global shuffle (by seed, different every epoch) of the split's scenes, with a source
camera drawn among the 9 others. It reads 3 records (target, source, the scene's text), computes
the camera input on the fly (cameras.training_camera), casts bfloat16 to float32 and zero-pads the
text to `text_len`. Every process walks the same global order and reads only its `rows` of each
global batch (`recam_jax.batch.rows_of_global_batches`; the trainer passes the rows its devices
hold), so a global batch is the same for any number of processes; shards are opened on first read.
Reads go through the stored record offsets, with CRC and shape checks.

    it = make_train_iterator(data_dir, batch_size=4, text_len=512, seed=0, rows=[0, 1])
    batch = next(it); state = it.get_state(); ...; it.set_state(state)
"""

from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from data_pipeline import cameras, schema, shards, tfrecord
from data_pipeline.multicam import NUM_CAMERAS
from data_pipeline.schema import RECORDS_PER_SCENE
from data_pipeline.text_encoder import pad_text
from data_pipeline.tfrecord import CorruptRecordError
from recam_jax import storage
from recam_jax.batch import rows_of_global_batches

TIMESTEPS = 1000  # the trainer's timestep grid; eval examples index into it


@dataclasses.dataclass(frozen=True)
class SceneLocation:
    """Where one scene's 11 records are: shard number (in this reader) and first record index."""

    shard: int
    first_record: int


class ShardReader:
    """Random access to the records of some shards; files are opened on first use, per process."""

    def __init__(self, data_dir: str, files: list[str], shapes: schema.Shapes):
        self.data_dir = data_dir
        self.files = files
        self.shapes = shapes
        self.max_record_bytes = shapes.max_record_bytes()
        self.offsets = [shards.read_json(shards.index_path(data_dir, name))["offsets"] for name in files]
        self._read_from: set[int] = set()

    def read(self, shard: int, record: int) -> bytes:
        """Record `record` of shard `shard` (one ranged read: local or gs://), framing and CRCs checked."""
        path = storage.join(self.data_dir, self.files[shard])
        where = f"{path} record {record}"
        offsets = self.offsets[shard]
        if record + 1 >= len(offsets):
            raise CorruptRecordError(f"{where}: not in the shard's index ({len(offsets) - 1} records)")
        self._read_from.add(shard)
        return tfrecord.read_record(path, offsets[record], offsets[record + 1], self.max_record_bytes, where)

    def opened_files(self) -> list[str]:
        return [self.files[shard] for shard in sorted(self._read_from)]


def _where(reader: ShardReader, location: SceneLocation, offset: int) -> str:
    return f"{storage.join(reader.data_dir, reader.files[location.shard])} record {location.first_record + offset}"


def open_split(data_dir: str, split: str) -> tuple[ShardReader, list[SceneLocation]]:
    """Every scene of a split and a reader over its shards (each opened on first read)."""
    manifest = shards.read_json(storage.join(data_dir, shards.MANIFEST))
    if manifest.get("format") != shards.FORMAT:
        raise ValueError(f"{data_dir}/{shards.MANIFEST}: format {manifest.get('format')!r}, expected {shards.FORMAT!r}")
    scenes = [(entry["file"], k) for entry in manifest["splits"][split]["shards"] for k in range(entry["num_scenes"])]
    files = sorted({name for name, _ in scenes})
    reader = ShardReader(data_dir, files, shards.read_shapes(manifest))
    return reader, [SceneLocation(files.index(name), k * RECORDS_PER_SCENE) for name, k in scenes]


class ExampleLoader:
    """(scene, target, source) -> one example of the batch spec, read and checked record by record."""

    def __init__(self, reader: ShardReader, scenes: list[SceneLocation], text_len: int, skip_corrupt: bool):
        self.reader = reader
        self.scenes = scenes
        self.text_len = text_len
        self.skip_corrupt = skip_corrupt
        self.skipped = 0
        _, height, width, _ = reader.shapes.latent_shape
        self.aspect = width / height  # of the frames, for the focal length in image heights

    def _camera(self, location: SceneLocation, scene_id: str, camera: int) -> dict:
        where = _where(self.reader, location, camera)
        record = schema.parse_camera(self.reader.read(location.shard, location.first_record + camera), self.reader.shapes, where)
        if (record["scene"], record["camera"]) != (scene_id, camera):
            found = f"{record['scene']} cam{record['camera']:02d}"
            raise CorruptRecordError(f"{where}: holds {found}, expected {scene_id} cam{camera:02d}")
        return record

    def load(self, scene: int, target: int, source: int) -> dict[str, np.ndarray]:
        """One example; cameras are numbered 1..10."""
        location = self.scenes[scene]
        text_record = self.reader.read(location.shard, location.first_record)
        text = schema.parse_scene(text_record, self.reader.shapes, _where(self.reader, location, 0))
        target_record = self._camera(location, text["scene"], target)
        source_record = self._camera(location, text["scene"], source)
        text_embeds, text_length = pad_text(text["text_embeds"], self.text_len)
        return {
            "target_latents": target_record["latents"].astype(np.float32),
            "source_latents": source_record["latents"].astype(np.float32),
            "text_embeds": text_embeds,
            "text_lengths": np.int32(text_length),
            "camera": cameras.training_camera(source_record["extrinsics"], target_record["extrinsics"]),
            "intrinsics": cameras.training_intrinsics(source_record["focal_length_mm"], target_record["focal_length_mm"],
                                                      target_record["sensor_size_mm"][0], self.aspect),
        }

    def __call__(self, element: dict) -> dict | None:
        """grain map: an example, or None (dropped) for a corrupt record when skipping is configured."""
        try:
            example = self.load(element["scene"], element["target"], element["source"])
        except CorruptRecordError as e:
            if not self.skip_corrupt:
                raise
            self.skipped += 1
            logging.warning("skipping example %s (%d skipped in this process): %s", element, self.skipped, e)
            return None
        return {**example, **{k: np.int32(v) for k, v in element.items() if k in ("timestep_index", "noise_seed")}}


def draw_pair(index: int, rng: np.random.Generator) -> dict:
    """grain random_map: example index -> scene, its target camera and a different source camera."""
    scene, target = divmod(int(index), NUM_CAMERAS)
    source = 1 + (target + rng.integers(1, NUM_CAMERAS)) % NUM_CAMERAS  # any camera but the target
    return {"scene": scene, "target": target + 1, "source": int(source)}


def _batched(elements: grain.MapDataset, global_batch_size: int, rows, loader: ExampleLoader, read_threads: int,
             worker_count: int) -> grain.DatasetIterator:
    """This process's rows of each global batch of `elements`, loaded with threaded reads (only those
    rows are read) and stacked, optionally in worker processes; a checkpointable iterator."""
    rows = np.arange(global_batch_size) if rows is None else rows
    mine = rows_of_global_batches(elements, global_batch_size, rows).map(loader)
    iterable = mine.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * len(rows)))
    iterable = iterable.batch(len(rows), drop_remainder=True)
    if worker_count > 0:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(iterable)


def make_train_iterator(
    data_dir: str,
    *,
    batch_size: int,
    text_len: int,
    seed: int,
    rows=None,
    worker_count: int = 0,
    read_threads: int = 4,
    skip_corrupt: bool = False,
    split: str = "train",
) -> grain.DatasetIterator:
    """An endless, shuffled, checkpointable iterator of rows `rows` (default: all) of each global
    training batch of `batch_size`."""
    reader, scenes = open_split(data_dir, split)
    pairs = grain.MapDataset.range(len(scenes) * NUM_CAMERAS).shuffle(seed=seed).repeat(None)
    pairs = pairs.random_map(draw_pair, seed=seed)
    return _batched(pairs, batch_size, rows, ExampleLoader(reader, scenes, text_len, skip_corrupt), read_threads,
                    worker_count)


def eval_examples(num_scenes: int, pairs_per_scene: int, seed: int) -> list[dict]:
    """Fixed (scene, target, source, timestep, noise seed) tuples: the same in every run."""
    examples = []
    for scene in range(num_scenes):
        rng = np.random.default_rng([seed, scene])
        for target in rng.choice(NUM_CAMERAS, pairs_per_scene, replace=False):
            example = draw_pair(scene * NUM_CAMERAS + target, rng)
            example.update(timestep_index=int(rng.integers(TIMESTEPS)), noise_seed=int(rng.integers(2**31)))
            examples.append(example)
    return examples


def make_eval_iterator(
    data_dir: str,
    *,
    batch_size: int,
    text_len: int,
    rows=None,
    pairs_per_scene: int = 2,
    seed: int = 0,
    read_threads: int = 4,
    split: str = "val",
) -> grain.DatasetIterator:
    """One pass over fixed held-out examples (with `timestep_index`, `noise_seed`): rows `rows`
    (default: all) of each complete global batch of `batch_size`."""
    reader, scenes = open_split(data_dir, split)
    examples = eval_examples(len(scenes), pairs_per_scene, seed)
    if len(examples) < batch_size:
        raise ValueError(f"{data_dir}: {len(examples)} {split} examples, fewer than one batch of {batch_size}")
    return _batched(grain.MapDataset.source(examples), batch_size, rows,
                    ExampleLoader(reader, scenes, text_len, skip_corrupt=False), read_threads, worker_count=0)
