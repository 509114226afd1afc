"""Lenses through the data: focal lengths per frame from the scene folder to records, loader and batch."""

import json
import os

import numpy as np
import pytest

from data_pipeline import cameras, demo_data, loader, multicam, schema
from data_pipeline.tfrecord import CorruptRecordError

FRAMES, HEIGHT, WIDTH = 9, 16, 24
SHAPES = schema.Shapes((3, 2, 3, 4), FRAMES, text_dim=8, max_text_len=4)


def camera_record(focal):
    latents, extrinsics = np.zeros(SHAPES.latent_shape), np.tile(np.eye(4), (FRAMES, 1, 1))
    return schema.camera_record("f18_aperture10/scene1", 3, latents, extrinsics, focal, multicam.SENSOR_SIZE_MM)


def test_records_keep_a_focal_length_per_frame_and_one_value_when_constant():
    ramp = np.linspace(18.0, 50.0, FRAMES)
    np.testing.assert_allclose(schema.parse_camera(camera_record(ramp), SHAPES, "r")["focal_length_mm"], ramp, rtol=1e-6)
    constant = camera_record(np.full(FRAMES, 35.0))
    assert len(constant) < len(camera_record(ramp))  # stored once
    np.testing.assert_array_equal(schema.parse_camera(constant, SHAPES, "r")["focal_length_mm"], np.full(FRAMES, 35.0))


@pytest.mark.parametrize("focal", [np.linspace(18.0, 50.0, FRAMES - 1), np.full(FRAMES, -1.0)])
def test_a_record_with_bad_focal_lengths_is_corrupt(focal):
    with pytest.raises(CorruptRecordError, match="shard-7 record 3: focal_length_mm"):
        schema.parse_camera(camera_record(focal), SHAPES, "shard-7 record 3")


def test_intrinsics_input_holds_the_target_then_the_source_lens_per_latent_frame():
    target, source = np.linspace(20.0, 60.0, FRAMES), np.full(FRAMES, 23.76)
    intrinsics = cameras.training_intrinsics(source, target, 23.76, aspect=1.5)
    assert intrinsics.shape == (3, 8)  # video frames 0, 4, 8
    np.testing.assert_allclose(intrinsics[:, 0], target[::4] / 23.76, rtol=1e-6)  # focal in image widths
    np.testing.assert_allclose(intrinsics[:, 1], 1.5 * target[::4] / 23.76, rtol=1e-6)  # in image heights
    np.testing.assert_allclose(intrinsics[:, 4:], [[1.0, 1.5, 0.5, 0.5]] * 3, rtol=1e-6)
    np.testing.assert_array_equal(intrinsics[:, 2:4], 0.5)


def test_focal_file_overrides_the_folder_lens_and_a_bad_one_names_itself(tmp_path):
    scene = multicam.Scene(str(tmp_path), "f18_aperture10/scene1", 18.0)
    np.testing.assert_array_equal(multicam.read_focal_lengths(scene, FRAMES), 18.0)
    os.makedirs(os.path.dirname(scene.focal_path))
    multicam.write_focal_lengths(scene.focal_path, {4: np.linspace(18.0, 36.0, FRAMES)})
    focal = multicam.read_focal_lengths(scene, FRAMES)
    np.testing.assert_allclose(focal[3], np.linspace(18.0, 36.0, FRAMES))
    np.testing.assert_array_equal(np.delete(focal, 3, axis=0), 18.0)
    with open(scene.focal_path, "w") as f:
        json.dump({"cam11": [20.0] * FRAMES}, f)
    with pytest.raises(multicam.SceneError, match="focal_lengths.json: bad focal lengths.*cam11"):
        multicam.read_focal_lengths(scene, FRAMES)


def test_demo_render_zooms_about_the_image_centre():
    pose = demo_data.camera_path(1, 2)[0]
    colours = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [250, 250, 0]])
    wide, tele = (demo_data.render(pose, 0.3, 40, 60, focal, colours) for focal in (18.0, 36.0))
    # twice the focal length: pixel centre + 2d sees what pixel centre + d saw
    agree = np.mean(tele[20 - 10:20 + 10:2, 30 - 14:30 + 14:2] == wide[20 - 5:20 + 5, 30 - 7:30 + 7])
    assert agree > 0.97 and np.mean(tele == wide) < 0.9


def test_a_zoom_rig_films_one_path_with_ten_lenses_in_a_per_scene_order(tmp_path):
    demo_data.write_dataset(str(tmp_path), 2, FRAMES, HEIGHT, WIDTH, lenses="zoom_rig")
    split = os.path.join(tmp_path, "train")
    lenses = []
    for scene in multicam.find_scenes(split):
        poses = multicam.read_extrinsics(scene.extrinsics_path, FRAMES)
        np.testing.assert_array_equal(poses, np.broadcast_to(poses[:1], poses.shape))  # every camera on one path
        focal = multicam.read_focal_lengths(scene, FRAMES)
        np.testing.assert_array_equal(focal, np.broadcast_to(focal[:, :1], focal.shape))  # no zoom within a clip
        assert sorted(focal[:, 0]) == sorted(demo_data.ZOOM_RIG_MM)
        lenses.append(focal[:, 0])
    assert not np.array_equal(*lenses)  # the lens order changes with the scene
    with pytest.raises(ValueError, match="lenses='zoom'"):
        demo_data.write_scene(str(tmp_path / "x"), 18.0, FRAMES, HEIGHT, WIDTH, seed=0, lenses="zoom")


@pytest.fixture(scope="module")
def varying_focal_shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multicam"))
    demo_data.write_dataset(root, 2, FRAMES, HEIGHT, WIDTH, lenses="varying")
    out = os.path.join(root, "out")
    demo_data.prepare_demo(root, out, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_val_scenes=1, scenes_per_shard=1)
    return root, out


def test_demo_focal_ramps_reach_the_loaders_batches(varying_focal_shards):
    root, out = varying_focal_shards
    reader, scenes = loader.open_split(out, "train")
    scene_id = schema.parse_scene(reader.read(scenes[0].shard, 0), reader.shapes, "")["scene"]
    focal = multicam.read_focal_lengths(multicam.Scene(os.path.join(root, "train"), scene_id, 0.0), FRAMES)
    assert focal[2, -1] < focal[2, 0] and focal[4, -1] == pytest.approx(2 * focal[4, 0])  # dolly zoom in; zoom
    example = loader.ExampleLoader(reader, scenes, text_len=8, skip_corrupt=False).load(scene=0, target=5, source=3)
    expected = cameras.training_intrinsics(focal[2], focal[4], multicam.SENSOR_SIZE_MM, WIDTH / HEIGHT)
    np.testing.assert_allclose(example["intrinsics"], expected, rtol=1e-6)
