"""Camera math against the official ReCamMaster recipe and the official 10 basic trajectories."""

import json
import os

import numpy as np
import pytest

from data_pipeline import cameras, demo_data, multicam

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "recammaster_examples")
OFFICIAL_JSON = os.path.join(FIXTURES, "cameras", "camera_extrinsics.json")
needs_fixtures = pytest.mark.skipif(not os.path.exists(OFFICIAL_JSON), reason=f"official camera JSON absent: {OFFICIAL_JSON}")


def official_relative_poses(data, source_cam, target_cam):
    """ReCamMaster's train_recammaster.py recipe, transcribed step by step as the reference."""

    def parse_matrix(matrix_str):
        rows = matrix_str.strip().split("] ")
        return np.array([list(map(float, row.strip("[]").split())) for row in rows])

    def c2ws(cam, frames):
        traj = np.stack([parse_matrix(data[f"frame{k}"][f"cam{cam:02d}"]) for k in frames]).transpose(0, 2, 1)
        out = []
        for c2w in traj:
            c2w = c2w[:, [1, 2, 0, 3]]
            c2w[:3, 1] *= -1.0
            c2w[:3, 3] /= 100
            out.append(c2w)
        return out

    reference = c2ws(source_cam, [0])[0]
    poses = []
    for target in c2ws(target_cam, range(0, 81, 4)):
        abs2rel = np.eye(4) @ np.linalg.inv(reference)
        poses.append(np.array([np.eye(4), abs2rel @ target], dtype=np.float32)[1, :3, :])
    return np.stack(poses).reshape(-1, 12)


@pytest.fixture(scope="module")
def official():
    with open(OFFICIAL_JSON) as f:
        data = json.load(f)
    return data, multicam.read_extrinsics(OFFICIAL_JSON, 81)


@needs_fixtures
def test_training_camera_equals_official_recipe_exactly(official):
    data, unreal = official
    for source, target in [(1, 1), (1, 2), (3, 9), (10, 5), (7, 4)]:
        ours = cameras.training_camera(unreal[source - 1], unreal[target - 1])
        np.testing.assert_array_equal(ours, official_relative_poses(data, source, target))
        assert ours.shape == (21, 12) and ours.dtype == np.float32


@needs_fixtures
def test_first_frame_relative_to_itself_is_identity(official):
    _, unreal = official
    for cam in range(10):
        first = cameras.inference_camera(unreal[cam])[0].reshape(3, 4)
        np.testing.assert_allclose(first, np.eye(4)[:3], atol=1e-6)


def _yaw_pitch(pose12):
    """Where the camera looks, in its frame-0 camera axes (x right, y down, z forward)."""
    forward = pose12.reshape(3, 4)[:, 2]
    return np.degrees(np.arctan2(forward[0], forward[2])), np.degrees(np.arctan2(-forward[1], forward[2]))


@needs_fixtures
def test_pans_turn_opposite_ways_and_tilts_opposite_ways(official):
    _, unreal = official
    last = {cam: _yaw_pitch(cameras.inference_camera(unreal[cam - 1])[-1]) for cam in (1, 2, 3, 4)}
    assert last[1][0] > 5 and last[2][0] < -5  # cam01 pans right, cam02 pans left
    assert abs(last[1][1]) < 1e-3 and abs(last[2][1]) < 1e-3  # a pan keeps the horizon
    assert last[3][1] * last[4][1] < 0 and abs(last[3][1]) > 5  # cam03 and cam04 tilt opposite ways
    for cam in (1, 2):  # a pan rotates about the camera's vertical (y) axis only
        rotation = cameras.inference_camera(unreal[cam - 1])[-1].reshape(3, 4)[:, :3]
        np.testing.assert_allclose(rotation[1], [0, 1, 0], atol=1e-6)


@needs_fixtures
def test_relative_poses_are_proper_rotations_and_absolute_ones_are_made_proper(official):
    _, unreal = official
    relative = cameras.training_camera(unreal[8], unreal[2]).reshape(-1, 3, 4)[:, :, :3]
    np.testing.assert_allclose(np.linalg.det(relative), 1.0, atol=1e-5)
    assert np.all(np.linalg.det(cameras.official_c2w(unreal)[..., :3, :3]) < 0)  # the official world is left-handed
    absolute = cameras.c2w_from_unreal(unreal)[..., :3, :3]
    np.testing.assert_allclose(np.linalg.det(absolute), 1.0, atol=1e-5)
    np.testing.assert_allclose(absolute @ np.swapaxes(absolute, -1, -2), np.broadcast_to(np.eye(3), absolute.shape), atol=1e-5)


def test_relative_pose_is_invariant_to_the_world_flip():
    rng = np.random.default_rng(0)
    unreal = np.stack([demo_data.camera_path(cam, 9) for cam in (3, 9)])
    unreal[..., 3, :3] += rng.normal(size=3) * 100
    ours = cameras.relative_poses(unreal[0, 0], unreal[1])
    proper = np.linalg.inv(cameras.c2w_from_unreal(unreal[0, 0])) @ cameras.c2w_from_unreal(unreal[1])
    np.testing.assert_allclose(ours, proper[:, :3].reshape(-1, 12), atol=1e-5)


def test_translation_is_converted_from_cm_to_m():
    start, end = demo_data.unreal_pose(np.array([0.0, 0, 0]), 0, 0), demo_data.unreal_pose(np.array([250.0, 0, 0]), 0, 0)
    pose = cameras.relative_poses(start, end[None])[0].reshape(3, 4)
    np.testing.assert_allclose(pose[:, 3], [0, 0, 2.5], atol=1e-6)  # 2.5 m along the camera's forward (z) axis


def test_parse_rejects_a_malformed_matrix():
    with pytest.raises(ValueError, match="4 rows"):
        cameras.parse_unreal_matrix("[1 0 0 0] [0 1 0 0] [0 0 1 0] ")
    with pytest.raises(ValueError, match="expected a matrix string, got None"):
        cameras.parse_unreal_matrix(None)


def test_matrix_strings_round_trip_as_float64_to_six_digits():
    pose = demo_data.camera_path(9, 5)[3]
    text = cameras.unreal_string(pose)
    assert text.startswith("[") and text.endswith("] ") and text.count("] [") == 3  # MultiCamVideo's spelling
    parsed = cameras.parse_unreal_matrix(text)
    assert parsed.dtype == np.float64
    np.testing.assert_allclose(parsed, pose, rtol=1e-5, atol=1e-5)


def test_poses_drawn_back_as_unreal_matrices_convert_to_the_same_poses():
    """`unreal_from_poses` undoes the official conversion, so the plot of a model's camera input is its path."""
    from recam_jax import trajectory, trajectory_plot

    arc = trajectory.generate("arc_left", 21)
    poses = cameras.inference_camera(arc)
    unreal = cameras.unreal_from_poses(poses)
    np.testing.assert_allclose(cameras.official_c2w(unreal)[:, :3].reshape(-1, 12), poses, atol=1e-6)
    drawn, expected = trajectory_plot.in_start_frame(unreal), trajectory_plot.in_start_frame(arc[::4])
    np.testing.assert_allclose(drawn[0], expected[0], atol=1e-5)  # the same path in the first camera's frame
