"""Camera accuracy: COLMAP recovers a known trajectory from a video rendered along it; failures say so."""

import numpy as np
import pytest

from data_pipeline import cameras, video
from recam_jax import camera_accuracy, evaluate, trajectory

HEIGHT, WIDTH, FOCAL_PX, FRAMES = 120, 160, 75.0, 16  # a wide lens (94° across): it tells tilt from drift
SUPERSAMPLE = 2  # rays per pixel side
# Bounds of the recovered arc_right, summed over its 16 frames. Measured on this render (texture seeds 0 and 1):
# RotErr ≈ 0.037 rad (0.13° a frame) and TransErr ≈ 0.10-0.12 (under 1% of the path's size a frame).
MAX_ROT_ERR, MAX_TRANS_ERR = 0.1, 0.3


def textured_room(c2w: np.ndarray, seed: int = 0) -> np.ndarray:
    """Frames (n, H, W, 3) uint8 of a box room covered in coloured noise, seen from each c2w (OpenCV axes).

    The demo data's checkerboard repeats too much for SIFT; this texture has coloured blobs at three
    scales (value noise thresholded per channel), different on each of the six walls.
    The room spans 4 m behind to 8 m ahead of the first camera, 6 m to either side, floor 2.4 m below.
    """
    rng = np.random.default_rng(seed)
    octaves = [(cell, weight, rng.random((256, 256, 3))) for cell, weight in ((1.0, 1.0), (0.35, 0.7), (0.12, 0.5))]
    low, high = c2w[0, :3, 3] + [-4.0, -6.0, -2.4], c2w[0, :3, 3] + [8.0, 6.0, 3.6]
    v, u = (np.mgrid[: HEIGHT * SUPERSAMPLE, : WIDTH * SUPERSAMPLE] + 0.5) / SUPERSAMPLE  # COLMAP's pixel centres
    rays_cam = np.stack([(u - WIDTH / 2) / FOCAL_PX, (v - HEIGHT / 2) / FOCAL_PX, np.ones_like(u)], -1)
    frames = []
    for pose in c2w:
        rays, origin = rays_cam @ pose[:3, :3].T, pose[:3, 3]
        with np.errstate(divide="ignore"):
            distance = np.where(rays > 0, (high - origin) / rays, (low - origin) / rays)  # to each wall pair
        axis = distance.argmin(-1)  # the wall hit is normal to this axis
        hit = origin + distance.min(-1)[..., None] * rays
        wall = 2 * axis + (np.take_along_axis(rays, axis[..., None], -1)[..., 0] > 0)  # each of the 6 its own texture
        in_wall = np.take_along_axis(hit, np.array([[1, 2], [0, 2], [0, 1]])[axis], -1) + 40.0 * wall[..., None]
        image = sum(weight * (_value_noise(in_wall / cell, grid) > 0.5) for cell, weight, grid in octaves)
        image = image.reshape(HEIGHT, SUPERSAMPLE, WIDTH, SUPERSAMPLE, 3).mean((1, 3))  # anti-aliased
        frames.append((255 * (image - image.min()) / np.ptp(image)).astype(np.uint8))
    return np.stack(frames)


def _value_noise(coords: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The random `grid` (n, n, 3) bilinearly interpolated at 2D `coords` (in grid cells, wrapping)."""
    cell = np.floor(coords).astype(int)
    fx, fy = np.moveaxis(coords - cell, -1, 0)
    at = lambda dx, dy: grid[(cell[..., 0] + dx) % len(grid), (cell[..., 1] + dy) % len(grid)]  # noqa: E731
    top = at(0, 0) * (1 - fx[..., None]) + at(1, 0) * fx[..., None]
    bottom = at(0, 1) * (1 - fx[..., None]) + at(1, 1) * fx[..., None]
    return top * (1 - fy[..., None]) + bottom * fy[..., None]


def requested(spec: str, frames: int = FRAMES) -> np.ndarray:
    return cameras.c2w_from_unreal(trajectory.generate(spec, frames))


def report(capsys) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())


def test_errors_are_zero_for_the_same_path_in_another_world_frame_and_scale():
    path = requested("arc_right")
    world = np.eye(4)
    world[:3, :3] = trajectory._plane_rotation(0, 2, 40.0) @ trajectory._plane_rotation(1, 2, -25.0)
    world[:3, 3] = [5.0, -2.0, 7.0]
    similar = world @ path
    similar[:, :3, 3] *= 0.3  # SfM's arbitrary scale
    np.testing.assert_allclose(camera_accuracy.errors(path, similar), (0.0, 0.0), atol=1e-6)


def test_rot_err_sums_each_frames_angle_from_the_requested_rotation():
    path = requested("pan:40")
    turned = path.copy()
    turned[5, :3, :3] = path[5, :3, :3] @ trajectory._plane_rotation(0, 1, 3.0)  # 3° more about the camera's z
    turned[9, :3, :3] = path[9, :3, :3] @ trajectory._plane_rotation(1, 2, -4.0)  # 4° about its x
    assert camera_accuracy.errors(path, turned)[0] == pytest.approx(np.radians(7.0))


def test_trans_err_sums_the_distances_of_the_scale_free_positions():
    path = camera_accuracy.relative_to_first(requested("dolly:2"))  # 2 m along z: scale-free (0, 0, k / 15)
    drifted = path.copy()
    drifted[:, :3, 3] += np.linspace(0, 1, FRAMES)[:, None] * [0.0, 2.0, 0.0]  # drifts 2 m down (y) on the way
    # The estimate's largest displacement is √8 m, so frame k sits at (0, k, k) / 15 / √2 instead of (0, 0, k) / 15.
    expected = sum(np.linalg.norm([0.0, k / 15 / np.sqrt(2), k / 15 / np.sqrt(2) - k / 15]) for k in range(FRAMES))
    assert camera_accuracy.errors(path, drifted) == pytest.approx((0.0, expected))


def test_recovers_a_known_trajectory_from_a_video_rendered_along_it(tmp_path, capsys):
    path = str(tmp_path / "arc_right.mp4")
    video.write_video(path, textured_room(requested("arc_right")))
    evaluate.main(["--camera_accuracy", "--video", path, "--trajectory", "arc_right", "--focal_px", str(FOCAL_PX)])
    printed = report(capsys)
    assert printed["frames"] == str(FRAMES)
    assert float(printed["rot_err"]) < MAX_ROT_ERR and float(printed["trans_err"]) < MAX_TRANS_ERR


def test_the_bounds_tell_the_requested_trajectory_from_its_mirror():
    """arc_left scored against arc_right: far above the bounds, so passing them means the path was followed."""
    rot_err, trans_err = camera_accuracy.errors(requested("arc_left"), requested("arc_right"))
    assert rot_err > 10 * MAX_ROT_ERR and trans_err > 10 * MAX_TRANS_ERR


def test_a_static_camera_could_not_be_reconstructed(tmp_path):
    frames = textured_room(requested("pan:0", 8))
    result = camera_accuracy.camera_accuracy(frames, requested("arc_right", 8), FOCAL_PX)
    assert result.rot_err is None and result.trans_err is None
    assert "COLMAP posed 0 of 8 frames" in result.failure
    assert result.report().splitlines()[-1].startswith("could not reconstruct: ")


def test_a_textureless_video_could_not_be_reconstructed(tmp_path, capsys):
    path = str(tmp_path / "grey.mp4")
    video.write_video(path, np.full((8, HEIGHT, WIDTH, 3), 128, np.uint8))
    with pytest.raises(SystemExit) as exit_status:
        evaluate.main(["--camera_accuracy", "--video", path, "--trajectory", "arc_right", "--frame_stride", "2"])
    assert exit_status.value.code == 1
    printed = report(capsys)
    assert printed["frames"] == "4" and "rot_err" not in printed and "0 SIFT features per frame" in printed["could not reconstruct"]


def test_bad_inputs_are_named(tmp_path, capsys):
    missing = str(tmp_path / "missing.mp4")
    with pytest.raises(SystemExit):
        evaluate.main(["--camera_accuracy", "--video", missing, "--trajectory", "arc_right"])
    assert missing in capsys.readouterr().err
    path = str(tmp_path / "grey.mp4")
    video.write_video(path, np.full((4, 32, 32, 3), 128, np.uint8))
    with pytest.raises(SystemExit):
        evaluate.main(["--camera_accuracy", "--video", path, "--trajectory", "spin:3"])
    assert "'spin:3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--camera_accuracy", "--video", path])
    assert "--trajectory" in capsys.readouterr().err
    used = tmp_path / "used"
    (used / "sparse").mkdir(parents=True)
    with pytest.raises(SystemExit):
        evaluate.main(["--camera_accuracy", "--video", path, "--trajectory", "arc_right", "--colmap_dir", str(used)])
    assert f"{used}: not empty" in capsys.readouterr().err
