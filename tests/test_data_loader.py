"""The grain loader: the batch spec, determinism, exact resume, per-host rows, corruption, eval."""

import os
import shutil

import numpy as np
import pytest
from absl import flags

from data_pipeline import cameras, demo_data, loader, schema, shards
from data_pipeline.tfrecord import CorruptRecordError
from recam_jax.batch import batch_spec

FRAMES, HEIGHT, WIDTH, TEXT_LEN = 9, 16, 24, 24
TRAIN_SCENES = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multicam"))
    demo_data.write_dataset(root, TRAIN_SCENES + 2, FRAMES, HEIGHT, WIDTH)
    out = os.path.join(root, "out")
    demo_data.prepare_demo(root, out, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_val_scenes=2, scenes_per_shard=2)
    return out


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


def test_example_holds_its_records_exactly(data_dir):
    reader, scenes = loader.open_split(data_dir, "train")
    example = loader.ExampleLoader(reader, scenes, TEXT_LEN, skip_corrupt=False).load(scene=4, target=3, source=8)
    first = scenes[4].first_record
    text = schema.parse_scene(reader.read(scenes[4].shard, first), reader.shapes, "")
    target, source = (schema.parse_camera(reader.read(scenes[4].shard, first + c), reader.shapes, "") for c in (3, 8))
    np.testing.assert_array_equal(example["target_latents"], target["latents"].astype(np.float32))
    np.testing.assert_array_equal(example["source_latents"], source["latents"].astype(np.float32))
    np.testing.assert_array_equal(example["text_embeds"][: len(text["text_embeds"])], text["text_embeds"].astype(np.float32))
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


@pytest.fixture()
def corrupt_dir(data_dir, tmp_path):
    """A copy of the dataset with one byte flipped inside the first train shard's record 5."""
    out = str(tmp_path / "corrupt")
    shutil.copytree(data_dir, out)
    offsets = shards.read_json(shards.index_path(out, "train-00000.tfrecord"))["offsets"]
    with open(os.path.join(out, "train-00000.tfrecord"), "r+b") as f:
        f.seek(offsets[5] + 40)
        byte = f.read(1)
        f.seek(offsets[5] + 40)
        f.write(bytes([byte[0] ^ 0xFF]))
    return out


def test_corrupt_record_error_names_shard_and_record(corrupt_dir):
    iterator = loader.make_train_iterator(corrupt_dir, batch_size=TRAIN_SCENES * 10, text_len=TEXT_LEN, seed=0)
    with pytest.raises(CorruptRecordError, match=r"train-00000.tfrecord record 5: data CRC mismatch"):
        next(iterator)


def test_corrupt_records_can_be_skipped_and_are_never_fed(corrupt_dir):
    reader, scenes = loader.open_split(corrupt_dir, "train")
    example_loader = loader.ExampleLoader(reader, scenes, TEXT_LEN, skip_corrupt=True)
    results = [example_loader({"scene": 0, "target": t, "source": 1 + t % 10}) for t in range(1, 11)]
    assert sum(r is None for r in results) == example_loader.skipped == 2  # camera 5 as target and as source
    iterator = loader.make_train_iterator(corrupt_dir, batch_size=1, text_len=TEXT_LEN, seed=0, skip_corrupt=True)
    assert all(np.abs(b["target_latents"]).sum() > 0 for b in _take(iterator, TRAIN_SCENES * 10))


def test_record_disagreeing_with_the_manifest_is_rejected(data_dir, tmp_path):
    out = str(tmp_path / "shapes")
    shutil.copytree(data_dir, out)
    manifest = shards.read_json(os.path.join(out, shards.MANIFEST))
    manifest["shapes"]["latent_shape"][1] += 1
    shards.write_json_atomically(os.path.join(out, shards.MANIFEST), manifest)
    iterator = loader.make_train_iterator(out, batch_size=2, text_len=TEXT_LEN, seed=0)
    with pytest.raises(CorruptRecordError, match=r"train-0000\d.tfrecord record \d+: latents_shape .* != manifest"):
        next(iterator)


def test_eval_examples_are_fixed_and_do_not_depend_on_the_process_count(data_dir):
    make = lambda rows: list(loader.make_eval_iterator(data_dir, batch_size=2, text_len=TEXT_LEN, rows=rows))
    single = make(None)
    _assert_same(single, make(None))
    for rows in ([0], [1]):
        _assert_same(make(rows), [{k: v[rows] for k, v in batch.items()} for batch in single])
    assert len(single) == 2 and len(single[0]["noise_seed"]) == 2  # 2 held-out scenes x 2 pairs
    assert all(0 <= t < loader.TIMESTEPS for b in single for t in b["timestep_index"])
    assert len({int(seed) for b in single for seed in b["noise_seed"]}) == 4


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
