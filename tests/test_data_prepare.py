"""prepare: broken scenes skipped with reasons, held-out split, bit-exact records, resumable runs."""

import json
import os
import shutil

import numpy as np
import pytest

from data_pipeline import demo_data, multicam, prepare, schema, shards, tfrecord, text_encoder, video, video_encoder

FRAMES, HEIGHT, WIDTH = 9, 16, 24
NUM_SCENES = 8


class CountingEncoder:
    """The demo VAE, counting its calls so a rerun can be shown to encode nothing."""

    calls = 0

    def __init__(self):
        self.vae = video_encoder.make_video_encoder("demo")
        self.latent_channels, self.identity = self.vae.latent_channels, self.vae.identity

    def __call__(self, video):
        CountingEncoder.calls += 1
        return self.vae(video)


def _break_scenes(root):
    """Three scenes broken the ways the released archives are: a missing video, partial JSON, a short video."""
    scenes = {s.scene_id: s for s in multicam.find_scenes(os.path.join(root, "train"))}
    os.remove(scenes["f18_aperture10/scene5"].video_path(7))
    path = scenes["f24_aperture5/scene2"].extrinsics_path
    data = json.load(open(path))
    del data[f"frame{FRAMES - 1}"]["cam04"]
    json.dump(data, open(path, "w"))
    video.write_video(scenes["f35_aperture2.4/scene3"].video_path(2), np.zeros((FRAMES - 2, HEIGHT, WIDTH, 3), np.uint8))
    return {"f18_aperture10/scene5": "cam07.mp4: missing", "f24_aperture5/scene2": "frame8/cam04", "f35_aperture2.4/scene3": "cam02.mp4: has 7 frames"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multicam"))
    demo_data.write_dataset(root, NUM_SCENES, FRAMES, HEIGHT, WIDTH)
    text_dir = os.path.join(root, "tiny_umt5")
    text_encoder.write_tiny_umt5(text_dir, demo_data.WORDS)
    reasons = _break_scenes(root)
    config = prepare.PrepareConfig(root, os.path.join(root, "out"), captions=os.path.join(root, "captions.csv"),
                                   num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_val_scenes=2, scenes_per_shard=2)  # fmt: skip
    encoders = (CountingEncoder(), text_encoder.TextEncoder(text_dir))
    assert prepare.prepare(config, *encoders)
    return config, encoders, reasons


def _index(config, name):
    return shards.read_json(shards.index_path(config.output_dir, name))


def test_broken_scenes_are_skipped_with_their_reason(dataset):
    config, _, reasons = dataset
    report = shards.read_json(os.path.join(config.output_dir, "prepare_report.json"))
    assert set(report["skipped"]) == set(reasons)
    for scene_id, reason in reasons.items():
        assert reason in report["skipped"][scene_id]
    manifest = shards.read_json(os.path.join(config.output_dir, shards.MANIFEST))
    counts = {split: manifest["splits"][split]["num_scenes"] for split in ("train", "val")}
    assert counts["train"] + counts["val"] == NUM_SCENES - len(reasons)
    assert sum(manifest["splits"][s]["num_skipped"] for s in ("train", "val")) == len(reasons)


def test_held_out_scenes_never_reach_train_shards(dataset):
    config, _, _ = dataset
    manifest = shards.read_json(os.path.join(config.output_dir, shards.MANIFEST))
    scenes = {split: {s for shard in manifest["splits"][split]["shards"] for s in _index(config, shard["file"])["scenes"]} for split in ("train", "val")}
    expected_val = {s.scene_id for s in prepare.split_scenes(multicam.find_scenes(os.path.join(config.input_root, "train")), 2)["val"]}
    assert not scenes["train"] & expected_val
    assert scenes["val"] == expected_val - set(shards.read_json(os.path.join(config.output_dir, "prepare_report.json"))["skipped"])


def test_default_captions_are_counted(dataset):
    config, _, _ = dataset
    captions = multicam.load_captions(config.captions)
    report = shards.read_json(os.path.join(config.output_dir, "prepare_report.json"))
    written = [s.scene_id for s in multicam.find_scenes(os.path.join(config.input_root, "train")) if s.scene_id not in report["skipped"]]
    assert sorted(report["default_caption"]) == sorted(s for s in written if s not in captions)
    assert report["default_caption"]  # the demo leaves every fourth scene uncaptioned


def test_records_round_trip_bit_for_bit(dataset):
    config, (encode_video, encode_text), _ = dataset
    manifest = shards.read_json(os.path.join(config.output_dir, shards.MANIFEST))
    shapes = shards.read_shapes(manifest)
    name = manifest["splits"]["train"]["shards"][0]["file"]
    scene_id = _index(config, name)["scenes"][0]
    scene = next(s for s in multicam.find_scenes(os.path.join(config.input_root, "train")) if s.scene_id == scene_id)
    encoder = prepare.SceneEncoder(config, encode_video, encode_text, multicam.load_captions(config.captions))
    path = os.path.join(config.output_dir, name)
    offsets = tfrecord.scan_offsets(path, shapes.max_record_bytes())
    assert offsets == _index(config, name)["offsets"]
    records = [tfrecord.read_record(path, offsets[i], offsets[i + 1], shapes.max_record_bytes(), name) for i in range(11)]
    text = schema.parse_scene(records[0], shapes, name)
    caption, _ = encoder.caption(scene)
    assert text["caption"] == caption
    expected_text = encode_text(caption).astype(schema.TEXT_DTYPE)
    assert text["text_embeds"].tobytes() == expected_text.tobytes() and len(expected_text) < shapes.max_text_len
    latents = encoder.latents(scene).astype(schema.LATENT_DTYPE)
    extrinsics = multicam.read_extrinsics(scene.extrinsics_path, FRAMES)
    for camera in multicam.CAMERAS:
        record = schema.parse_camera(records[camera], shapes, name)
        assert record["latents"].tobytes() == latents[camera - 1].tobytes()
        assert record["extrinsics"].tobytes() == extrinsics[camera - 1].tobytes()
        np.testing.assert_array_equal(record["focal_length_mm"], np.full(FRAMES, scene.focal_length_mm))
        np.testing.assert_allclose(record["sensor_size_mm"], [multicam.SENSOR_SIZE_MM] * 2, rtol=1e-6)


def test_rerun_encodes_nothing_and_ignores_a_killed_runs_leftovers(dataset, tmp_path):
    config, (encode_video, encode_text), _ = dataset
    out = str(tmp_path / "out")
    shutil.copytree(config.output_dir, out)
    os.remove(os.path.join(out, shards.MANIFEST))
    os.remove(shards.index_path(out, "train-00001.tfrecord"))  # as if killed after the rename
    with open(os.path.join(out, ".train-00002.tfrecord.tmp-999"), "wb") as f:
        f.write(b"half a shard")  # as if killed mid-shard
    before = CountingEncoder.calls
    rerun = prepare.PrepareConfig(**{**config.__dict__, "output_dir": out})
    assert prepare.prepare(rerun, encode_video, encode_text)
    assert CountingEncoder.calls - before == len(_index(config, "train-00001.tfrecord")["scenes"])  # 1 call per scene
    for name in ("train-00001.tfrecord", "train-00002.tfrecord"):
        with open(os.path.join(out, name), "rb") as new, open(os.path.join(config.output_dir, name), "rb") as old:
            assert new.read() == old.read()


def test_processes_write_disjoint_shards_and_the_last_writes_the_manifest(dataset, tmp_path):
    config, (encode_video, encode_text), _ = dataset
    written = []
    for index in (0, 1):
        part = prepare.PrepareConfig(**{**config.__dict__, "output_dir": str(tmp_path), "process_index": index, "process_count": 2})
        before = set(os.listdir(tmp_path))
        complete = prepare.prepare(part, encode_video, encode_text)
        assert complete == (index == 1)
        written.append({n for n in set(os.listdir(tmp_path)) - before if n.endswith(".tfrecord")})
    assert written[0] and written[1] and not written[0] & written[1]
    assert written[0] | written[1] == {n for n in os.listdir(config.output_dir) if n.endswith(".tfrecord")}
    same = shards.read_json(os.path.join(config.output_dir, shards.MANIFEST))
    assert shards.read_json(str(tmp_path / shards.MANIFEST))["splits"] == same["splits"]


def test_strict_mode_raises_on_the_first_broken_scene(dataset, tmp_path):
    config, (encode_video, encode_text), _ = dataset
    strict = prepare.PrepareConfig(**{**config.__dict__, "output_dir": str(tmp_path), "strict": True})
    with pytest.raises(ValueError, match="scene"):
        prepare.prepare(strict, encode_video, encode_text)
