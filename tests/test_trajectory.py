"""Trajectories: presets = the official JSON; generated JSON → the camera math → the intended motion."""

import json
import os

import imageio.v3 as iio
import numpy as np
import pytest

from data_pipeline import cameras, multicam
from recam_jax import trajectory, trajectory_plot

OFFICIAL_JSON = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "recammaster_examples",
                             "cameras", "camera_extrinsics.json")
needs_fixtures = pytest.mark.skipif(not os.path.exists(OFFICIAL_JSON), reason=f"official camera JSON absent: {OFFICIAL_JSON}")


def relative_to_start(spec, tmp_path, frames=81):
    """Every frame's pose relative to frame 0 (OpenCV camera axes, metres), via the written JSON."""
    path = str(tmp_path / "traj.json")
    trajectory.main([spec, "--frames", str(frames), "--out", path])
    unreal = multicam.read_extrinsics(path, frames, camera_numbers=(1,))[0]
    return cameras.relative_poses(unreal[0], unreal).reshape(-1, 3, 4).astype(np.float64)


@needs_fixtures
def test_presets_equal_the_official_json(tmp_path):
    ours_path = str(tmp_path / "presets.json")
    trajectory.main([*trajectory.PRESETS, "--out", ours_path])  # cam01 ... cam10 in the official order
    ours = multicam.read_extrinsics(ours_path, 81)
    official = multicam.read_extrinsics(OFFICIAL_JSON, 81)
    # The official file prints 6 significant digits (plus Unreal's 1e-35 noise where 0 is meant).
    np.testing.assert_allclose(ours, official, rtol=1e-6, atol=1e-6)
    for ours_cam, official_cam in zip(ours, official):
        np.testing.assert_allclose(cameras.inference_camera(ours_cam), cameras.inference_camera(official_cam), atol=2e-6)


S20, C20 = np.sin(np.radians(20)), np.cos(np.radians(20))
ROUND_TRIPS = {  # spec: the last frame's (forward, down, position) in the first frame's camera axes
    "pan:30": ((np.sin(np.radians(30)), 0, np.cos(np.radians(30))), (0, 1, 0), (0, 0, 0)),  # turns right about y
    "tilt:20": ((0, -S20, C20), (0, C20, S20), (0, 0, 0)),  # looks up: forward gains -y (up)
    "roll:20": ((0, 0, 1), (-S20, C20, 0), (0, 0, 0)),  # clockwise: the camera's up leans right
    "dolly:2": ((0, 0, 1), (0, 1, 0), (0, 0, 2)),
    "truck:-1.5": ((0, 0, 1), (0, 1, 0), (-1.5, 0, 0)),
    "pedestal:1": ((0, 0, 1), (0, 1, 0), (0, -1, 0)),
    "arc:90,radius=4": ((-1, 0, 0), (0, 1, 0), (4, 0, 4)),  # a quarter circle right of the point 4 m ahead
    "truck:1+pan:-20": ((-S20, 0, C20), (0, 1, 0), (1, 0, 0)),  # slides right while turning left
    "pan:90,end=0.5+dolly:2,start=0.5": ((1, 0, 0), (0, 1, 0), (2, 0, 0)),  # turns right, then moves the new forward
    "tilt_up": ((0, -np.sin(np.radians(10 * 80 / 80.5)), np.cos(np.radians(10 * 80 / 80.5))), None, (0, 0, 0)),  # official timing
}


@pytest.mark.parametrize("spec", ROUND_TRIPS)
def test_generated_json_gives_the_intended_relative_motion(spec, tmp_path):
    forward, down, position = ROUND_TRIPS[spec]
    last = relative_to_start(spec, tmp_path)[-1]
    np.testing.assert_allclose(last[:, 2], forward, atol=1e-5)
    if down is not None:
        np.testing.assert_allclose(last[:, 1], down, atol=1e-5)
    np.testing.assert_allclose(last[:, 3], position, atol=1e-4)
    np.testing.assert_allclose(np.linalg.det(last[:, :3]), 1.0, atol=1e-5)


@pytest.mark.parametrize("spec, point", [("arc:-50,radius=3,speed=ease", 3.0), ("pedestal:1+truck:-1+aim:3", 3.0),
                                         ("arc_right", 4.0)])
def test_arcs_and_aims_keep_their_point_in_the_image_centre(spec, point, tmp_path):
    poses = relative_to_start(spec, tmp_path, frames=33)
    for pose in poses:  # the point `point` m ahead of the first camera, seen from each later camera
        seen = pose[:, :3].T @ (np.array([0, 0, point]) - pose[:, 3])
        np.testing.assert_allclose(seen[:2], 0, atol=1e-4)
        assert seen[2] > 0


def yaws(spec, frames):
    forward = trajectory.generate(spec, frames)[:, 0, :3]  # Unreal rows: forward first
    return np.degrees(np.arctan2(forward[:, 1], forward[:, 0]))


@pytest.mark.parametrize("frames", [2, 7, 200])
def test_speed_curves_and_windows_at_any_frame_count(frames):
    t = np.arange(frames) / (frames - 1)
    np.testing.assert_allclose(yaws("pan:40", frames), 40 * t, atol=1e-9)
    np.testing.assert_allclose(yaws("pan:40,speed=ease", frames), 40 * t * t * (3 - 2 * t), atol=1e-9)
    np.testing.assert_allclose(yaws("pan:40,speed=ease_in", frames), 40 * t**2, atol=1e-9)
    window = np.clip((t - 0.25) / 0.5, 0, 1)
    np.testing.assert_allclose(yaws("pan:40,speed=ease_out,start=0.25,end=0.75", frames), 40 * (1 - (1 - window) ** 2), atol=1e-9)
    # Presets run half a frame past the last one, as the official moves do.
    np.testing.assert_allclose(yaws("pan_left", frames), -20 * np.arange(frames) / (frames - 0.5), atol=1e-9)


@pytest.mark.parametrize("spec, named", [
    ("pan", "'pan'"), ("pan:left", "amount of 'pan:left'"), ("zoom:2", "'zoom:2'"), ("", "''"),
    ("pan:10,speed=fast", "speed=fast"), ("pan:10,radius=2", "radius=2"), ("arc:30,radius=0", "arc:30,radius=0"),
    ("pan:10,start=0.6,end=0.4", "start=0.6"), ("tilt:5+aim:4", "aim"), ("pan_right+dolly:x", "'dolly:x'"),
])
def test_bad_specs_are_refused_naming_the_term(spec, named):
    with pytest.raises(ValueError, match=f"trajectory '{spec}'.*{named}".replace("+", r"\+")):
        trajectory.generate(spec)


def test_load_takes_a_json_camera_a_preset_or_a_spec(tmp_path):
    path = str(tmp_path / "two.json")
    trajectory.main(["pan:10", "tilt:-5", "--frames", "9", "--out", path])
    np.testing.assert_array_equal(trajectory.load(path, camera=2, frames=9),
                                  multicam.read_extrinsics(path, 9, camera_numbers=(2,))[0])
    np.testing.assert_array_equal(trajectory.load("zoom_in", frames=9), trajectory.generate("dolly:2,end=1.0625", 9))
    np.testing.assert_array_equal(trajectory.load("dolly:2+pan:5", frames=9), trajectory.generate("dolly:2+pan:5", 9))
    with pytest.raises(multicam.SceneError, match="cam03"):
        trajectory.load(path, camera=3, frames=9)
    with pytest.raises(multicam.SceneError, match="missing.json"):
        trajectory.load(str(tmp_path / "missing.json"))


def test_plot_is_a_picture_for_png_and_tensorboard(tmp_path):
    from tensorboardX import SummaryWriter

    png = str(tmp_path / "traj.png")
    trajectory.main(["arc_left", "pan:30+tilt:10", "--frames", "21", "--plot", png])
    image = iio.imread(png)
    arc_left = {"arc_left": trajectory.generate("arc_left", 21)}
    both = trajectory_plot.render({**arc_left, "pan:30+tilt:10": trajectory.generate("pan:30+tilt:10", 21)})
    np.testing.assert_array_equal(image, both)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert image.shape[0] == 2 * trajectory_plot.render(arc_left).shape[0]  # one row of views per trajectory
    top_views = image[:, : image.shape[1] // 2].astype(int)  # left column: no colour bar there
    assert np.sum(top_views.max(-1) - top_views.min(-1) > 60) > 1000  # coloured frusta drawn, not only axes
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        writer.add_image("trajectory", image, 0, dataformats="HWC")


def test_focal_terms_give_the_lens_along_the_clip_and_leave_the_poses():
    np.testing.assert_allclose(trajectory.focal_lengths("dolly:2+focal:12", 5), [24.0, 21.0, 18.0, 15.0, 12.0])
    np.testing.assert_allclose(trajectory.focal_lengths("focal:50,end=0.5+focal:18,start=0.5", 5, start_mm=35),
                               [35.0, 42.5, 50.0, 34.0, 18.0])
    np.testing.assert_array_equal(trajectory.focal_lengths("pan:20", 3), 24.0)
    np.testing.assert_array_equal(trajectory.generate("dolly:2+focal:12", 9), trajectory.generate("dolly:2", 9))
    with pytest.raises(ValueError, match="positive aim distance or focal length"):
        trajectory.focal_lengths("focal:-5")


def test_cli_writes_the_focal_curves_beside_the_camera_json(tmp_path):
    out = str(tmp_path / "camera_extrinsics.json")
    trajectory.main(["pan:20", "dolly:1+focal:48", "--frames", "5", "--out", out])
    with open(tmp_path / multicam.FOCAL_FILE) as f:
        focal = json.load(f)
    np.testing.assert_allclose(focal["cam02"], [24.0, 30.0, 36.0, 42.0, 48.0])
    np.testing.assert_array_equal(focal["cam01"], 24.0)


def test_the_target_lens_ramps_from_the_source_s_or_follows_the_focal_file_beside_a_json(tmp_path):
    """A spec's focal terms start at the source's lens (a preset keeps it); a camera JSON takes its
    camera's curve from the focal_lengths.json beside it, else keeps the source's lens."""
    np.testing.assert_allclose(trajectory.target_focal_lengths("pan:20+focal:48", 1, 5, 36.0), [36, 39, 42, 45, 48])
    np.testing.assert_array_equal(trajectory.target_focal_lengths("zoom_in", 1, 5, 36.0), np.full(5, 36.0))
    zooming, plain = tmp_path / "zooming", tmp_path / "plain"
    zooming.mkdir(), plain.mkdir()
    trajectory.main(["pan:20", "dolly:1+focal:48", "--frames", "5", "--focal_mm", "12",
                     "--out", str(zooming / "camera_extrinsics.json")])
    trajectory.main(["pan:20", "--frames", "5", "--out", str(plain / "camera_extrinsics.json")])
    from_file = lambda folder, camera: trajectory.target_focal_lengths(
        str(folder / "camera_extrinsics.json"), camera, 5, 36.0)
    np.testing.assert_allclose(from_file(zooming, 2), [12, 21, 30, 39, 48])
    np.testing.assert_array_equal(from_file(zooming, 1), np.full(5, 12.0))  # the file's lens, not the source's
    np.testing.assert_array_equal(from_file(plain, 1), np.full(5, 36.0))
    (zooming / multicam.FOCAL_FILE).write_text(json.dumps({"cam01": [24.0, 24.0]}))
    with pytest.raises(multicam.SceneError, match=r"zooming/focal_lengths.json: bad focal lengths .*5 positive"):
        from_file(zooming, 1)
