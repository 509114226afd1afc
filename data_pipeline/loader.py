"""The grain loader: shards of pre-encoded scenes -> training and evaluation batches (recam_jax/batch.py).

An example is (scene, target camera, source camera): every (scene, target camera) pair once per
epoch, in a global shuffle (by seed, different every epoch) of the split's scenes, with a source
camera drawn among the 9 others. It reads 3 records (target, source, the scene's text), computes
the camera input on the fly (cameras.training_camera), casts bfloat16 to float32 and zero-pads the
text to `text_len`. Every process walks the same global order and reads only its `rows` of each
global batch (`recam_jax.batch.rows_of_global_batches`; the trainer passes the rows its devices
hold), so a global batch is the same for any number of processes; shards are opened on first read.
Reads go through the stored record offsets (index files checked when a split is opened), with CRC,
shape, finiteness and which-scene checks.

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
SKIPPED = "skipped_corrupt"  # with skip_corrupt: a train batch key, corrupt examples dropped before each row


@dataclasses.dataclass(frozen=True)
class SceneLocation:
    """Where one scene's 11 records are: shard number (in this reader), first record index, and the
    scene id its shard's index lists there (the records must hold it)."""

    shard: int
    first_record: int
    scene_id: str


class ShardReader:
    """Random access to the records of some shards (their index files checked when opened); record
    files are opened on first use, per process."""

    def __init__(self, data_dir: str, files: dict[str, int], shapes: schema.Shapes):
        """`files`: shard name -> number of scenes the manifest lists in it."""
        self.data_dir = data_dir
        self.files = list(files)
        self.shapes = shapes
        self.max_record_bytes = shapes.max_record_bytes()
        indexes = [shards.read_index(data_dir, name, num_scenes) for name, num_scenes in files.items()]
        self.offsets = [index["offsets"] for index in indexes]
        self.scenes = [index["scenes"] for index in indexes]

    def read(self, shard: int, record: int) -> bytes:
        """Record `record` of shard `shard` (one ranged read: local or gs://), framing and CRCs checked."""
        path = storage.join(self.data_dir, self.files[shard])
        offsets = self.offsets[shard]
        return tfrecord.read_record(path, offsets[record], offsets[record + 1], self.max_record_bytes, f"{path} record {record}")


def _where(reader: ShardReader, location: SceneLocation, offset: int) -> str:
    return f"{storage.join(reader.data_dir, reader.files[location.shard])} record {location.first_record + offset}"


def _record_name(scene_id: str, camera: int) -> str:
    return f"{scene_id} cam{camera:02d}" if camera else f"{scene_id} scene record"


def open_split(data_dir: str, split: str) -> tuple[ShardReader, list[SceneLocation]]:
    """Every scene of a split and a reader over its shards (each opened on first read)."""
    manifest = shards.read_json(storage.join(data_dir, shards.MANIFEST))
    if manifest.get("format") != shards.FORMAT:
        raise ValueError(f"{data_dir}/{shards.MANIFEST}: format {manifest.get('format')!r}, expected {shards.FORMAT!r}")
    entries = manifest["splits"][split]["shards"]
    reader = ShardReader(data_dir, {entry["file"]: entry["num_scenes"] for entry in entries}, shards.read_shapes(manifest))
    return reader, [SceneLocation(shard, k * RECORDS_PER_SCENE, scene_id)
                    for shard, scene_ids in enumerate(reader.scenes) for k, scene_id in enumerate(scene_ids)]


class ExampleLoader:
    """(scene, target, source) -> one example of the batch spec, read and checked record by record."""

    def __init__(self, reader: ShardReader, scenes: list[SceneLocation], text_len: int, skip_corrupt: bool):
        self.reader = reader
        self.scenes = scenes
        self.text_len = text_len
        self.skip_corrupt = skip_corrupt
        _, height, width, _ = reader.shapes.latent_shape
        self.aspect = width / height  # of the frames, for the focal length in image heights

    def _record(self, location: SceneLocation, offset: int) -> dict:
        """Record `offset` of a scene (0: its scene record, 1..10: its cameras), checked to be that one."""
        where = _where(self.reader, location, offset)
        data = self.reader.read(location.shard, location.first_record + offset)
        record = (schema.parse_camera if offset else schema.parse_scene)(data, self.reader.shapes, where)
        found = (record["scene"], record.get("camera", 0))
        if found != (location.scene_id, offset):
            raise CorruptRecordError(f"{where}: holds {_record_name(*found)}, expected {_record_name(location.scene_id, offset)}")
        return record

    def load(self, scene: int, target: int, source: int) -> dict[str, np.ndarray]:
        """One example, captioned with the target camera's caption; cameras are numbered 1..10."""
        location = self.scenes[scene]
        text, target_record, source_record = (self._record(location, camera) for camera in (0, target, source))
        text_embeds, text_length = pad_text(text["text_embeds"][text["camera_text"][target - 1]], self.text_len)
        return {
            "target_latents": target_record["latents"].astype(np.float32),
            "source_latents": source_record["latents"].astype(np.float32),
            "text_embeds": text_embeds,
            "text_lengths": np.int32(text_length),
            "camera": cameras.training_camera(source_record["extrinsics"], target_record["extrinsics"]),
            "intrinsics": cameras.training_intrinsics(source_record["focal_length_mm"], target_record["focal_length_mm"],
                                                      target_record["sensor_size_mm"][0], self.aspect),
        }

    def __call__(self, element: dict) -> dict:
        """grain map: an example, or for a corrupt record, when skipping is configured, a marker
        `{SKIPPED: 1}` that `CountSkipped` drops and counts."""
        try:
            example = self.load(element["scene"], element["target"], element["source"])
        except CorruptRecordError as e:
            if not self.skip_corrupt:
                raise
            logging.warning("skipping example %s: %s", element, e)
            return {SKIPPED: np.int32(1)}
        return {**example, **{k: v for k, v in element.items() if k not in ("scene", "target", "source")}}  # eval fields


class CountSkipped(grain.IterDataset):
    """Drops the markers of skipped examples, adding their number to the next example as `SKIPPED`:
    the count travels with the batches, through worker processes and checkpointed iterators."""

    def __iter__(self) -> grain.DatasetIterator:
        return _CountSkippedIterator(self._parent.__iter__())


class _CountSkippedIterator(grain.DatasetIterator):
    def __next__(self) -> dict:
        skipped, element = 0, next(self._parent)
        while element.keys() == {SKIPPED}:
            skipped, element = skipped + 1, next(self._parent)
        return {**element, SKIPPED: np.int32(skipped)}

    def get_state(self) -> dict:
        return self._parent.get_state()  # between elements no marker is pending

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)


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
    if loader.skip_corrupt:
        iterable = CountSkipped(iterable)
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
    training batch of `batch_size`. With `skip_corrupt`, corrupt examples are dropped (logged) and
    each batch has `SKIPPED`, per row the examples dropped before it in this process."""
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
            example.update(timestep_index=np.int32(rng.integers(TIMESTEPS)), noise_seed=np.int32(rng.integers(2**31)))
            examples.append(example)
    return examples


def padded_to_batches(examples: list[dict], batch_size: int) -> list[dict]:
    """`examples` with `eval_weight` 1, then weight-0 copies completing the last global batch, so no
    example is dropped whatever the batch size. The copies are the examples just before that batch
    (cyclically): its last row is never a copy of its first, whose shuffled camera it provides
    (`evaluate.camera_sensitivity` rolls the cameras by one)."""
    start, missing = len(examples) - len(examples) % batch_size, -len(examples) % batch_size
    padding = [examples[i % len(examples)] for i in range(start - missing, start)]
    return [{**e, "eval_weight": np.float32(1)} for e in examples] + [{**e, "eval_weight": np.float32(0)} for e in padding]


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
    """One pass over fixed held-out examples (with `timestep_index`, `noise_seed`, `eval_weight`):
    rows `rows` (default: all) of each global batch of `batch_size`, the last one padded with
    weight-0 rows (`padded_to_batches`). The weighted examples are the same for any batch size and
    number of processes, more processes than held-out scenes included."""
    reader, scenes = open_split(data_dir, split)
    if not scenes:
        raise ValueError(f"{data_dir}: no {split} scenes to evaluate")
    examples = padded_to_batches(eval_examples(len(scenes), pairs_per_scene, seed), batch_size)
    return _batched(grain.MapDataset.source(examples), batch_size, rows,
                    ExampleLoader(reader, scenes, text_len, skip_corrupt=False), read_threads, worker_count=0)
