"""The grain loader: the batch spec, determinism, exact resume, per-host rows, corruption, eval."""

import itertools
import os
import re
import shutil

import grain
import numpy as np
import pytest
from absl import flags

from data_pipeline import cameras, demo_data, loader, multicam, schema, shards, tfrecord
from data_pipeline.tfrecord import CorruptRecordError
from recam_jax import storage
from recam_jax.batch import batch_spec

FRAMES, HEIGHT, WIDTH, TEXT_LEN = 9, 16, 24, 24
TRAIN_SCENES = 6


SHAPES = schema.Shapes(latent_shape=(3, 2, 3, 16), video_frames=FRAMES, text_dim=32, max_text_len=TEXT_LEN)


def write_shards(out: str, num_scenes: dict[str, int], scenes_per_shard: int = 2) -> str:
    """Shards laid out as prepare writes them (test_data_prepare.py checks that), of random latents and
    text and the demo cameras' extrinsics: built in a blink, so the loader's tests (and mutants) run fast."""
    rng = np.random.default_rng(0)
    extrinsics = [demo_data.camera_path(camera, FRAMES) for camera in multicam.CAMERAS]
    names, numbers = {}, itertools.count()
    for split, count in num_scenes.items():
        names[split] = []
        for first in range(0, count, scenes_per_shard):
            names[split].append(shards.shard_name(split, len(names[split])))
            scene_ids = []
            with storage.atomic_open(os.path.join(out, names[split][-1])) as file:
                writer = tfrecord.Writer(file)
                for number in itertools.islice(numbers, min(scenes_per_shard, count - first)):
                    lens = demo_data.FOCAL_FOLDERS[number % len(demo_data.FOCAL_FOLDERS)]
                    scene_ids.append(f"{lens}/scene{number}")
                    # Odd scenes are captioned per camera: cameras 1..5 one way, 6..10 another.
                    captions = [f"caption {number}"] + [f"caption {number}, cameras 6-10"] * (number % 2)
                    texts = [rng.normal(size=(rng.integers(2, TEXT_LEN), SHAPES.text_dim)) for _ in captions]
                    camera_text = [(camera > 5) * (number % 2) for camera in multicam.CAMERAS]
                    writer.write(schema.scene_record(scene_ids[-1], captions, texts, camera_text))
                    for camera in multicam.CAMERAS:
                        latents = rng.normal(size=SHAPES.latent_shape)
                        focal = float(lens.split("_")[0][1:])
                        writer.write(schema.camera_record(scene_ids[-1], camera, latents, extrinsics[camera - 1], focal,
                                                          multicam.SENSOR_SIZE_MM))
            index = {"scenes": scene_ids, "offsets": writer.offsets, "skipped": {}, "default_caption": []}
            shards.write_json_atomically(shards.index_path(out, names[split][-1]), index)
    shards.write_manifest(out, SHAPES, {"video": "random", "text": "random"}, names, {})
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), {"train": TRAIN_SCENES, "val": 2})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_match_the_batch_spec(data_dir):
    batch = next(loader.make_train_iterator(data_dir, batch_size=3, text_len=TEXT_LEN, seed=0))
    shapes = shards.read_shapes(shards.read_json(os.path.join(data_dir, shards.MANIFEST)))
    spec = batch_spec(3, shapes.latent_shape, TEXT_LEN, shapes.text_dim)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s.shape, s.dtype) for k, s in spec.items()}
    for embeds, length in zip(batch["text_embeds"], batch["text_lengths"]):
        assert 1 < length < TEXT_LEN and np.all(embeds[length:] == 0) and np.all(np.any(embeds[:length] != 0, axis=-1))


@pytest.mark.parametrize("target, source, caption", [(3, 8, 0), (8, 3, 1)])
def test_example_holds_its_records_exactly_and_its_target_cameras_caption(data_dir, target, source, caption):
    reader, scenes = loader.open_split(data_dir, "train")
    scene = 5  # captioned per camera: 1..5 caption 0, 6..10 caption 1
    example = loader.ExampleLoader(reader, scenes, TEXT_LEN, skip_corrupt=False).load(scene, target, source)
    first = scenes[scene].first_record
    text = schema.parse_scene(reader.read(scenes[scene].shard, first), reader.shapes, "")
    assert len(text["captions"]) == 2
    target, source = (schema.parse_camera(reader.read(scenes[scene].shard, first + c), reader.shapes, "") for c in (target, source))
    np.testing.assert_array_equal(example["target_latents"], target["latents"].astype(np.float32))
    np.testing.assert_array_equal(example["source_latents"], source["latents"].astype(np.float32))
    want = text["text_embeds"][caption].astype(np.float32)
    assert example["text_lengths"] == len(want) and not np.any(example["text_embeds"][len(want):])
    np.testing.assert_array_equal(example["text_embeds"][: len(want)], want)
    np.testing.assert_array_equal(example["camera"], cameras.training_camera(source["extrinsics"], target["extrinsics"]))
    assert not np.array_equal(example["target_latents"], example["source_latents"])


def test_source_camera_differs_from_target_and_every_pair_occurs():
    pairs = {(d["target"], d["source"]) for i in range(2000) for d in [loader.draw_pair(i % 10, np.random.default_rng(i))]}
    assert all(1 <= t <= 10 and 1 <= s <= 10 and t != s for t, s in pairs)
    assert len(pairs) == 90


def test_same_seed_same_batches_other_seed_other_order(data_dir):
    make = lambda seed: loader.make_train_iterator(data_dir, batch_size=4, text_len=TEXT_LEN, seed=seed)
    first, again, other = _take(make(7), 5), _take(make(7), 5), _take(make(8), 5)
    _assert_same(first, again)
    assert not np.array_equal(first[0]["target_latents"], other[0]["target_latents"])


def test_resume_continues_with_the_next_batch_across_an_epoch_boundary(data_dir):
    iterator = loader.make_train_iterator(data_dir, batch_size=4, text_len=TEXT_LEN, seed=3)
    _take(iterator, 14)  # 60 examples per epoch: batch 15 straddles the boundary
    state = iterator.get_state()
    expected = _take(iterator, 4)
    resumed = loader.make_train_iterator(data_dir, batch_size=4, text_len=TEXT_LEN, seed=3)
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), expected)


def test_each_epoch_sees_every_target_video_once(data_dir):
    iterator = loader.make_train_iterator(data_dir, batch_size=5, text_len=TEXT_LEN, seed=1)
    epoch = np.concatenate([b["target_latents"] for b in _take(iterator, TRAIN_SCENES * 10 // 5)])
    assert len({latents.tobytes() for latents in epoch}) == TRAIN_SCENES * 10


@pytest.mark.parametrize("host_rows", [([0, 1], [2, 3]), ([1, 3], [0, 2]), ([0, 1, 2, 3], [0, 1, 2, 3])],
                         ids=["halves", "interleaved", "replicated"])
def test_each_host_reads_its_rows_of_the_single_host_global_batches(data_dir, host_rows):
    make = lambda rows: loader.make_train_iterator(data_dir, batch_size=4, text_len=TEXT_LEN, seed=2, rows=rows)
    single = _take(make(None), 4)
    for rows in host_rows:
        _assert_same(_take(make(rows), 4), [{k: v[rows] for k, v in batch.items()} for batch in single])


def copy_with_a_flipped_byte(data_dir: str, out: str, shard: str, record: int) -> str:
    """A copy of the dataset at `out` with one byte flipped inside record `record` of `shard`."""
    shutil.copytree(data_dir, out)
    offsets = shards.read_json(shards.index_path(out, shard))["offsets"]
    with open(os.path.join(out, shard), "r+b") as f:
        f.seek(offsets[record] + 40)
        byte = f.read(1)
        f.seek(offsets[record] + 40)
        f.write(bytes([byte[0] ^ 0xFF]))
    return out


@pytest.fixture()
def corrupt_dir(data_dir, tmp_path):
    """A copy of the dataset with one byte flipped inside the first train shard's record 5."""
    return copy_with_a_flipped_byte(data_dir, str(tmp_path / "corrupt"), "train-00000.tfrecord", record=5)


def test_corrupt_record_error_names_shard_and_record(corrupt_dir):
    iterator = loader.make_train_iterator(corrupt_dir, batch_size=TRAIN_SCENES * 10, text_len=TEXT_LEN, seed=0)
    with pytest.raises(CorruptRecordError, match=r"train-00000.tfrecord record 5: data CRC mismatch"):
        next(iterator)


def test_corrupt_records_can_be_skipped_are_never_fed_and_are_counted(data_dir, corrupt_dir, caplog):
    reader, scenes = loader.open_split(corrupt_dir, "train")
    example_loader = loader.ExampleLoader(reader, scenes, TEXT_LEN, skip_corrupt=True)
    results = [example_loader({"scene": 0, "target": t, "source": 1 + t % 10}) for t in range(1, 11)]
    assert [t for t, r in zip(range(1, 11), results) if r == {loader.SKIPPED: 1}] == [4, 5]  # camera 5 as source, target
    assert [r.getMessage() for r in caplog.records][-1].endswith(
        "skipping example {'scene': 0, 'target': 5, 'source': 6}: "
        f"{os.path.join(corrupt_dir, 'train-00000.tfrecord')} record 5: data CRC mismatch")
    make = lambda folder: loader.make_train_iterator(folder, batch_size=1, text_len=TEXT_LEN, seed=0, skip_corrupt=True)
    clean = _take(make(data_dir), TRAIN_SCENES * 10)
    position = 0
    for batch in _take(make(corrupt_dir), TRAIN_SCENES * 10 - 6):  # the clean stream with the skipped examples taken out
        position += int(batch[loader.SKIPPED][0])
        np.testing.assert_array_equal(batch["target_latents"], clean[position]["target_latents"])
        assert clean[position][loader.SKIPPED] == 0
        position += 1
    assert position > TRAIN_SCENES * 10 - 6  # (scene 0, camera 5) is the target once an epoch: skipped, counted


def test_skip_counts_survive_a_resume(corrupt_dir):
    make = lambda: loader.make_train_iterator(corrupt_dir, batch_size=5, text_len=TEXT_LEN, seed=0, skip_corrupt=True)
    expected = [int(b[loader.SKIPPED].sum()) for b in _take(make(), 30)]
    iterator = make()
    counts = [int(b[loader.SKIPPED].sum()) for b in _take(iterator, 10)]
    resumed = make()
    resumed.set_state(iterator.get_state())
    assert counts + [int(b[loader.SKIPPED].sum()) for b in _take(resumed, 20)] == expected and sum(expected) > 0


def _rewrite_json(path, change):
    value = shards.read_json(path)
    change(value)
    shards.write_json_atomically(path, value)


def test_non_monotonic_index_is_refused_naming_the_index_and_offsets(data_dir, tmp_path):
    out = str(tmp_path / "index")
    shutil.copytree(data_dir, out)
    path = shards.index_path(out, "train-00001.tfrecord")
    _rewrite_json(path, lambda index: index["offsets"].__setitem__(slice(3, 5), index["offsets"][4:2:-1]))
    with pytest.raises(ValueError, match=r"train-00001.index.json: offsets\[4\] = \d+ is not past offsets\[3\]"):
        loader.make_train_iterator(out, batch_size=2, text_len=TEXT_LEN, seed=0)


def test_index_disagreeing_with_the_manifest_is_refused(data_dir, tmp_path):
    out = str(tmp_path / "index")
    shutil.copytree(data_dir, out)
    path = shards.index_path(out, "train-00001.tfrecord")
    _rewrite_json(path, lambda index: index["offsets"].pop())
    with pytest.raises(ValueError, match=r"train-00001.index.json: 'offsets' must be 23 integers"):
        loader.open_split(out, "train")
    _rewrite_json(path, lambda index: index["scenes"].pop())
    with pytest.raises(ValueError, match=r"train-00001.index.json: 1 scenes, the manifest says 2"):
        loader.open_split(out, "train")


def test_a_record_of_another_scene_is_refused(data_dir, tmp_path):
    """Two scenes' ids swapped in a shard's index: every record read is checked against its scene."""
    out = str(tmp_path / "swapped")
    shutil.copytree(data_dir, out)
    _rewrite_json(shards.index_path(out, "train-00000.tfrecord"), lambda index: index["scenes"].reverse())
    reader, scenes = loader.open_split(out, "train")
    with pytest.raises(CorruptRecordError, match=rf"train-00000.tfrecord record 0: holds {scenes[1].scene_id} scene record, "
                                                 rf"expected {scenes[0].scene_id} scene record"):
        loader.ExampleLoader(reader, scenes, TEXT_LEN, skip_corrupt=False).load(0, 2, 3)
    with pytest.raises(CorruptRecordError, match=rf"record 14: holds {scenes[0].scene_id} cam03, expected {scenes[1].scene_id} cam03"):
        loader.ExampleLoader(reader, scenes, TEXT_LEN, skip_corrupt=False)._record(scenes[1], 3)


def test_nan_latents_are_refused_at_load_naming_shard_and_record(data_dir, tmp_path):
    """A record rewritten with NaN latents and valid CRCs: only the finiteness check catches it."""
    out = str(tmp_path / "nan")
    shutil.copytree(data_dir, out)
    reader, scenes = loader.open_split(out, "train")
    first = scenes[2].first_record
    records = [reader.read(scenes[2].shard, k) for k in range(reader.offsets[scenes[2].shard].__len__() - 1)]
    camera = schema.parse_camera(records[first + 7], reader.shapes, "")
    latents = camera["latents"].astype(np.float32)
    latents[0, 1, 2, 3] = np.nan
    fields = (camera["scene"], 7, latents, camera["extrinsics"], camera["focal_length_mm"][0], camera["sensor_size_mm"][0])
    with pytest.raises(ValueError, match=rf"{camera['scene']} cam07: latents holds NaN or inf; the record is not written"):
        schema.camera_record(*fields)  # the writer refuses it
    records[first + 7] = _camera_record_unchecked(*fields)
    name = reader.files[scenes[2].shard]
    with open(os.path.join(out, name), "wb") as f:
        writer = tfrecord.Writer(f)
        for record in records:
            writer.write(record)
    _rewrite_json(shards.index_path(out, name), lambda index: index.__setitem__("offsets", writer.offsets))
    reader, scenes = loader.open_split(out, "train")
    with pytest.raises(CorruptRecordError, match=rf"^{re.escape(os.path.join(out, name))} record {first + 7}: 'latents' holds NaN or inf"):
        loader.ExampleLoader(reader, scenes, TEXT_LEN, skip_corrupt=False).load(2, 7, 1)


def _camera_record_unchecked(*fields) -> bytes:
    """A camera record as a writer without the finiteness check would serialize it."""
    finite = lambda array, key, where: array
    original, schema._finite = schema._finite, finite
    try:
        return schema.camera_record(*fields)
    finally:
        schema._finite = original


def test_record_disagreeing_with_the_manifest_is_rejected(data_dir, tmp_path):
    out = str(tmp_path / "shapes")
    shutil.copytree(data_dir, out)
    manifest = shards.read_json(os.path.join(out, shards.MANIFEST))
    manifest["shapes"]["latent_shape"][1] += 1
    shards.write_json_atomically(os.path.join(out, shards.MANIFEST), manifest)
    iterator = loader.make_train_iterator(out, batch_size=2, text_len=TEXT_LEN, seed=0)
    with pytest.raises(CorruptRecordError, match=r"train-0000\d.tfrecord record \d+: latents_shape .* != manifest"):
        next(iterator)


def _eval_pass(folder, batch_size, rows=None):
    return list(loader.make_eval_iterator(folder, batch_size=batch_size, text_len=TEXT_LEN, rows=rows))


def _weighted_rows(batches):
    """The rows of an eval pass that count (`eval_weight` 1), in order, as one batch."""
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert set(np.unique(merged["eval_weight"])) <= {0.0, 1.0}
    return {k: v[merged["eval_weight"] == 1] for k, v in merged.items()}


def test_eval_examples_are_fixed_and_do_not_depend_on_the_process_count_or_batch_size(data_dir):
    single = _eval_pass(data_dir, 2)
    _assert_same(single, _eval_pass(data_dir, 2))
    for rows in ([0], [1]):
        _assert_same(_eval_pass(data_dir, 2, rows), [{k: v[rows] for k, v in batch.items()} for batch in single])
    assert len(single) == 2 and len(single[0]["noise_seed"]) == 2  # 2 held-out scenes x 2 pairs
    examples = _weighted_rows(single)
    assert all(0 <= t < loader.TIMESTEPS for t in examples["timestep_index"])
    assert len(set(examples["noise_seed"].tolist())) == 4
    # A global batch of 3 does not divide the 4 examples: none is dropped, the padding weighs 0.
    by_three = _eval_pass(data_dir, 3)
    assert len(by_three) == 2 and by_three[1]["eval_weight"].tolist() == [1, 0, 0]
    _assert_same([_weighted_rows(by_three)], [examples])
    # The padding copies the examples just before the last batch (1 and 2, before example 3).
    np.testing.assert_array_equal(by_three[1]["noise_seed"][1:], examples["noise_seed"][1:3])


def test_eval_draws_distinct_targets_per_scene_and_spread_noise_seeds():
    examples = loader.eval_examples(num_scenes=5, pairs_per_scene=10, seed=0)
    for scene in range(5):
        assert sorted(e["target"] for e in examples if e["scene"] == scene) == list(multicam.CAMERAS)
    assert [e["scene"] for e in examples] == [scene for scene in range(5) for _ in range(10)]
    seeds = [int(e["noise_seed"]) for e in examples]
    assert all(0 <= seed < 2**31 for seed in seeds) and max(seeds) > 2**24  # the whole int32 range is drawn from


def test_eval_without_held_out_scenes_says_so(tmp_path):
    folder = write_shards(str(tmp_path), {"train": 2, "val": 0})
    with pytest.raises(ValueError, match=r"no val scenes to evaluate"):
        _eval_pass(folder, 2)


def test_eval_never_skips_a_corrupt_record(data_dir, tmp_path):
    out = copy_with_a_flipped_byte(data_dir, str(tmp_path / "corrupt_val"), "val-00000.tfrecord", record=0)
    with pytest.raises(CorruptRecordError, match=r"val-00000.tfrecord record 0: data CRC mismatch"):
        _eval_pass(out, 2)


def test_count_skipped_adds_each_run_of_markers_to_the_next_example_and_resumes():
    marker = {loader.SKIPPED: 1}
    elements = [marker, marker, {"x": 1}, {"x": 2}, marker, {"x": 3}]
    counted = lambda: iter(loader.CountSkipped(grain.MapDataset.source(elements).to_iter_dataset()))
    assert [(e["x"], e[loader.SKIPPED]) for e in counted()] == [(1, 2), (2, 0), (3, 1)]
    iterator = counted()
    next(iterator)
    resumed = counted()
    resumed.set_state(iterator.get_state())
    assert [(e["x"], e[loader.SKIPPED]) for e in resumed] == [(2, 0), (3, 1)]


def test_three_processes_evaluate_one_held_out_scene(tmp_path):
    """One val scene (2 examples), 3 processes reading one row each of a global batch of 3: each gets
    a batch and together they hold the two examples once (weight 1) plus padding (weight 0)."""
    folder = write_shards(str(tmp_path), {"train": 2, "val": 1})
    examples = _weighted_rows(_eval_pass(folder, 1))
    per_process = [_eval_pass(folder, 3, rows=[p]) for p in range(3)]
    assert [len(batches) for batches in per_process] == [1, 1, 1]
    global_batch = {k: np.concatenate([batches[0][k] for batches in per_process]) for k in per_process[0][0]}
    assert global_batch["eval_weight"].tolist() == [1, 1, 0]
    _assert_same([_weighted_rows([global_batch])], [examples])
    # The padding row copies the last example, so the first row's rolled-in camera is another's.
    assert not np.array_equal(global_batch["camera"][2], global_batch["camera"][0])


def test_every_host_draws_from_every_focal_length(data_dir):
    """The shuffle is global, before each host takes its rows: a host is not tied to a slice of the
    sorted scene list (neighbouring scenes share a lens)."""
    reader, scenes = loader.open_split(data_dir, "train")
    lens_of = {}
    for location in scenes:
        for camera in multicam.CAMERAS:
            record = reader.read(location.shard, location.first_record + camera)
            latents = schema.parse_camera(record, reader.shapes, "")["latents"].astype(np.float32)
            lens_of[latents.tobytes()] = location.scene_id.split("/")[0]
    for rows in ([0, 1], [2, 3]):
        iterator = loader.make_train_iterator(data_dir, batch_size=4, text_len=TEXT_LEN, seed=0, rows=rows)
        seen = {lens_of[x.tobytes()] for batch in _take(iterator, 4) for x in batch["target_latents"]}
        assert len(seen) == len(demo_data.FOCAL_FOLDERS), (rows, seen)


def test_worker_processes_give_the_same_batches_and_resume(data_dir):
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    make = lambda workers: loader.make_train_iterator(data_dir, batch_size=4, text_len=TEXT_LEN, seed=5, worker_count=workers)
    expected = _take(make(0), 6)
    iterator = make(1)
    _assert_same(_take(iterator, 3), expected[:3])
    state = iterator.get_state()
    resumed = make(1)
    resumed.set_state(state)
    _assert_same(_take(resumed, 3), expected[3:])


def test_manifest_describes_the_shards(tmp_path):
    folder = write_shards(str(tmp_path), {"train": TRAIN_SCENES, "val": 2})  # not the shared fixture: mutmut
    manifest = shards.read_json(os.path.join(folder, shards.MANIFEST))       # credits a fixture's calls to one test
    assert manifest == {
        "format": shards.FORMAT,
        "shapes": {"latent_shape": list(SHAPES.latent_shape), "video_frames": FRAMES, "text_dim": 32, "max_text_len": TEXT_LEN},
        "dtypes": {"latents": "bfloat16", "text_embeds": "bfloat16", "extrinsics": "float64"},
        "encoders": {"video": "random", "text": "random"},
        "settings": {},
        "splits": {
            "train": {"num_scenes": 6, "num_skipped": 0, "num_default_caption": 0,
                      "shards": [{"file": f"train-0000{k}.tfrecord", "num_scenes": 2} for k in range(3)]},
            "val": {"num_scenes": 2, "num_skipped": 0, "num_default_caption": 0,
                    "shards": [{"file": "val-00000.tfrecord", "num_scenes": 2}]},
        },
    }
    assert shards.read_shapes(manifest) == SHAPES


def test_a_manifest_of_another_format_is_refused(data_dir, tmp_path):
    out = str(tmp_path / "format")
    shutil.copytree(data_dir, out)
    _rewrite_json(os.path.join(out, shards.MANIFEST), lambda manifest: manifest.__setitem__("format", "v0"))
    with pytest.raises(ValueError, match=rf"{out}/manifest.json: format 'v0', expected '{shards.FORMAT}'"):
        loader.open_split(out, "train")
