"""A tiny synthetic dataset in exactly MultiCamVideo's layout, for tests and the demo.

Each scene is a ball circling over a coloured checkerboard floor, filmed by 10 cameras that move
along simple trajectories (pans, arcs, dollies, tilts) around the centre. The frames are ray-cast
with the very poses written to `camera_extrinsics.json` in the Unreal convention (rows = forward,
right, up axes, last row = position in cm, left-handed world: x forward, y right, z up), so the
videos and the cameras agree the way the real dataset's do.

Lenses (`--lenses`): by default every scene has its folder's lens (18, 24, 35 or 50 mm, as
MultiCamVideo). `varying` gives each camera its own lens and some zoom (`focal_curves`: two dolly
zooms and a zoom); `zoom_rig` puts all ten cameras of a scene on one path, each with its own lens
from 14 to 100 mm (`zoom_rig_lenses`), so a target differs from its source by the lens alone. Both
write `cameras/focal_lengths.json` (data_pipeline/multicam.py): the lens is an input worth reading.

    python -m data_pipeline.demo_data --out /tmp/multicam_demo --num_scenes 8 --prepare_to /tmp/shards

also writes a random tiny umT5 (`/tmp/multicam_demo/tiny_umt5`) for `prepare --text_encoder_dir`.
"""

from __future__ import annotations

import csv

import numpy as np

from data_pipeline import video
from data_pipeline.multicam import CAMERAS, FOCAL_FILE, write_extrinsics, write_focal_lengths
from data_pipeline.text_encoder import write_tiny_umt5
from recam_jax import storage

FOCAL_FOLDERS = ("f18_aperture10", "f24_aperture5", "f35_aperture2.4", "f50_aperture2.4")
FOCALS_MM = (18.0, 24.0, 35.0, 50.0)
ZOOM_RIG_MM = tuple(np.geomspace(14.0, 100.0, 10).round(1))  # a 7x zoom range in ten even steps
LENSES = ("folder", "varying", "zoom_rig")
SENSOR_MM = 23.76
WORDS = "a ball circles over red green blue yellow checkerboard floor filmed by moving cameras".split()
# Per camera: (yaw at start, yaw swing, height change, radius change) in degrees / cm over the clip.
_TRAJECTORIES = [(0, 20, 0, 0), (0, -20, 0, 0), (0, 0, 0, -100), (0, 0, 0, 100), (0, 0, 80, 0),
                 (0, 0, -80, 0), (-30, 30, 0, 0), (30, -30, 0, 0), (60, -60, 40, 0), (-60, 60, 40, 0)]  # fmt: skip


def unreal_pose(position_cm: np.ndarray, yaw: float, pitch: float) -> np.ndarray:
    """A 4x4 Unreal matrix: rows forward, right, up (a rotation, det +1), then the position."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    forward = [cp * cy, cp * sy, -sp]
    right = [-sy, cy, 0.0]
    up = [sp * cy, sp * sy, cp]
    matrix = np.zeros((4, 4))
    matrix[:3, :3] = [forward, right, up]
    matrix[3] = [*position_cm, 1.0]
    return matrix


def camera_path(camera: int, num_frames: int) -> np.ndarray:
    """Unreal poses (frames, 4, 4) of one camera: it starts 6 m from the centre and follows its trajectory."""
    yaw0, swing, lift, dolly = _TRAJECTORIES[camera - 1]
    poses = []
    for t in np.linspace(0.0, 1.0, num_frames):
        orbit = np.radians(180 + yaw0 + swing * t * (camera > 6))  # cameras 7-10 arc around the centre
        radius = 600 + dolly * t
        position = np.array([np.cos(orbit) * radius, np.sin(orbit) * radius, 150 + lift * t])
        look = np.arctan2(-position[1], -position[0]) + np.radians(swing * t * (camera <= 2))  # 1-2 pan
        pitch = np.arctan2(position[2], np.hypot(*position[:2]))
        poses.append(unreal_pose(position, look, pitch))
    return np.stack(poses)


def focal_curves(num_frames: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Focal lengths (frames,) per camera for a varying-focal scene: a lens drawn from FOCALS_MM each;
    cameras 3 and 4 (the dollies) dolly-zoom (the lens follows the distance to the centre, which keeps
    its size) and camera 5 zooms to twice its lens."""
    t = np.linspace(0.0, 1.0, num_frames)
    curves = {camera: np.full(num_frames, rng.choice(FOCALS_MM)) for camera in CAMERAS}
    for camera in (3, 4):
        dolly = _TRAJECTORIES[camera - 1][3]
        curves[camera] = curves[camera] * (600 + dolly * t) / 600
    curves[5] = curves[5] * (1 + t)
    return curves


def zoom_rig_lenses(num_frames: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Focal lengths (frames,) per camera of a zoom rig: the ten lenses of ZOOM_RIG_MM, one per camera in a
    per-scene order (a camera's number says nothing of its lens)."""
    return {camera: np.full(num_frames, focal) for camera, focal in zip(CAMERAS, rng.permutation(ZOOM_RIG_MM))}


def render(pose: np.ndarray, time: float, height: int, width: int, focal_mm: float, colours: np.ndarray) -> np.ndarray:
    """One uint8 frame (height, width, 3): rays through the pixels hit the ball or the floor."""
    forward, right, up, position = pose[0, :3], pose[1, :3], pose[2, :3], pose[3, :3]
    focal_px = focal_mm / SENSOR_MM * max(height, width)
    v, u = np.mgrid[:height, :width]
    rays = forward + ((u - width / 2) / focal_px)[..., None] * right - ((v - height / 2) / focal_px)[..., None] * up
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    centre = np.array([150 * np.cos(2 * np.pi * time), 150 * np.sin(2 * np.pi * time), 50.0])
    to_centre = centre - position
    along = rays @ to_centre
    hits_ball = along**2 - (to_centre @ to_centre - 50.0**2) > 0
    sees_floor = rays[..., 2] < -1e-3
    floor = position + (-position[2] / np.where(sees_floor, rays[..., 2], -1.0))[..., None] * rays
    checker = ((np.floor(floor[..., 0] / 100) + np.floor(floor[..., 1] / 100)) % 2).astype(int)
    image = np.where(sees_floor[..., None], colours[checker], colours[2])
    return np.where(hits_ball[..., None], colours[3], image).astype(np.uint8)


def write_scene(scene_dir: str, focal_mm: float, num_frames: int, height: int, width: int, seed: int,
                lenses: str = "folder") -> None:
    """One scene folder: cameras/camera_extrinsics.json, videos/cam01..cam10.mp4 and, unless `lenses` is
    "folder" (every camera at `focal_mm`), cameras/focal_lengths.json."""
    if lenses not in LENSES:
        raise ValueError(f"lenses={lenses!r}: expected one of {LENSES}")
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (4, 3))
    paths = {camera: camera_path(camera, num_frames) for camera in CAMERAS}
    if lenses == "zoom_rig":  # one path for the whole rig, which of the ten depends on the scene
        paths = dict.fromkeys(CAMERAS, paths[CAMERAS[seed % len(CAMERAS)]])
    write_extrinsics(storage.join(scene_dir, "cameras", "camera_extrinsics.json"), paths)
    focal = {camera: np.full(num_frames, focal_mm) for camera in CAMERAS}
    if lenses != "folder":
        focal = (focal_curves if lenses == "varying" else zoom_rig_lenses)(num_frames, rng)
        write_focal_lengths(storage.join(scene_dir, "cameras", FOCAL_FILE), focal)
    for camera in CAMERAS:
        frames = np.stack([render(paths[camera][k], k / num_frames, height, width, focal[camera][k], colours)
                           for k in range(num_frames)])
        video.write_video(storage.join(scene_dir, "videos", f"cam{camera:02d}.mp4"), frames)


def write_dataset(root: str, num_scenes: int, num_frames: int = 81, height: int = 48, width: int = 80,
                  lenses: str = "folder") -> str:
    """A MultiCamVideo-shaped dataset under `root`/train plus `root`/captions.csv; returns the CSV path."""
    rows = []
    for i in range(num_scenes):
        scene_id = f"{FOCAL_FOLDERS[i % len(FOCAL_FOLDERS)]}/scene{i + 1}"
        focal = float(scene_id.split("_")[0][1:])
        write_scene(storage.join(root, "train", scene_id), focal, num_frames, height, width, seed=i,
                    lenses=lenses)
        if i % 4 != 3:  # every fourth scene has no caption, like scenes a caption file misses
            rows.append({"file_name": scene_id, "text": " ".join(np.random.default_rng(i).choice(WORDS, 8))})
    captions = storage.join(root, "captions.csv")
    with storage.open(captions, "w", newline="") as f:
        writer = csv.DictWriter(f, ["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return captions


def prepare_demo(root: str, output_dir: str, **config) -> None:
    """Shards of a demo dataset, encoded with a tiny random Flax Wan VAE and a random tiny umT5."""
    from data_pipeline import prepare, text_encoder, video_encoder

    text_dir = storage.join(root, "tiny_umt5")
    if not storage.isdir(text_dir):
        write_tiny_umt5(text_dir, WORDS)
    config = prepare.PrepareConfig(root, output_dir, captions=storage.join(root, "captions.csv"), **config)
    prepare.prepare(config, video_encoder.make_video_encoder("demo"), text_encoder.TextEncoder(text_dir))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num_scenes", type=int, default=8)
    parser.add_argument("--num_frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--lenses", choices=LENSES, default="folder", help="the scene folder's lens for every "
                        "camera; a lens per camera with dolly zooms and a zoom; or ten lenses on one path")
    parser.add_argument("--prepare_to", help="also encode it into shards here (tiny random VAE and umT5)")
    args = parser.parse_args()
    print(write_dataset(args.out, args.num_scenes, args.num_frames, args.height, args.width, args.lenses))
    write_tiny_umt5(storage.join(args.out, "tiny_umt5"), WORDS)  # a random text encoder to prepare with
    if args.prepare_to:
        prepare_demo(args.out, args.prepare_to, num_frames=args.num_frames, height=args.height, width=args.width,
                     num_val_scenes=max(1, args.num_scenes // 4), scenes_per_shard=2)  # fmt: skip


if __name__ == "__main__":
    main()
