"""Reading MultiCamVideo scenes: discovery, captions and the validation that runs before encoding.

Layout (one scene = 10 synchronised cameras filming the same animated scene):

    ROOT/train/<focal_aperture>/<scene>/videos/cam01.mp4 ... cam10.mp4
    ROOT/train/<focal_aperture>/<scene>/cameras/camera_extrinsics.json   frameK -> camXX -> matrix

A scene id is its path below the split folder, e.g. "f18_aperture10/scene1". The released archives
hold broken scenes (missing or truncated files, partial JSON); `validate_scene` names what is wrong
so a long run can skip the scene and report it instead of crashing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np

from data_pipeline import cameras
from recam_jax import storage

NUM_CAMERAS = 10
CAMERAS = tuple(range(1, NUM_CAMERAS + 1))  # numbered as in the files: cam01 ... cam10
SENSOR_SIZE_MM = 23.76  # square sensor of every MultiCamVideo camera
_FOCAL_FOLDER = re.compile(r"^f(\d+(?:\.\d+)?)_")  # "f18_aperture10" -> 18 mm


class SceneError(ValueError):
    """A scene that cannot be encoded; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Scene:
    """One MultiCamVideo scene: where its files are and its lens."""

    split_dir: str
    scene_id: str
    focal_length_mm: float

    @property
    def path(self) -> str:
        return storage.join(self.split_dir, self.scene_id)

    @property
    def extrinsics_path(self) -> str:
        return storage.join(self.path, "cameras", "camera_extrinsics.json")

    def video_path(self, camera: int) -> str:
        return storage.join(self.path, "videos", f"cam{camera:02d}.mp4")


def find_scenes(split_dir: str) -> list[Scene]:
    """Every `<focal_aperture>/<scene>` folder under a split, sorted so all hosts agree."""
    scenes = []
    for lens in storage.listdir(split_dir):
        match = _FOCAL_FOLDER.match(lens)
        if match is None or not storage.isdir(storage.join(split_dir, lens)):
            continue
        for name in storage.listdir(storage.join(split_dir, lens)):
            if storage.isdir(storage.join(split_dir, lens, name)):
                scenes.append(Scene(split_dir, f"{lens}/{name}", float(match.group(1))))
    return scenes


def read_extrinsics(path: str, num_frames: int) -> np.ndarray:
    """Unreal matrices (cameras, frames, 4, 4) float64 from a scene's JSON; SceneError if incomplete."""
    try:
        data = storage.read_json(path)
    except (OSError, json.JSONDecodeError) as e:
        raise SceneError(f"{path}: cannot read camera JSON ({e})") from e
    poses = np.empty((NUM_CAMERAS, num_frames, 4, 4))
    for frame in range(num_frames):
        for i, camera in enumerate(CAMERAS):
            key = f"frame{frame}/cam{camera:02d}"
            try:
                poses[i, frame] = cameras.parse_unreal_matrix(data[f"frame{frame}"][f"cam{camera:02d}"])
            except (KeyError, TypeError, ValueError) as e:
                raise SceneError(f"{path}: missing or malformed {key} ({e!r})") from e
    if not np.all(np.isfinite(poses)):
        raise SceneError(f"{path}: non-finite numbers in the extrinsics")
    return poses


def validate_scene(scene: Scene, num_frames: int) -> np.ndarray:
    """The scene's extrinsics once every file is present; SceneError naming the first problem."""
    for camera in CAMERAS:
        video = scene.video_path(camera)
        if not storage.isfile(video) or storage.size(video) == 0:
            raise SceneError(f"{video}: missing or empty video")
    return read_extrinsics(scene.extrinsics_path, num_frames)


def load_captions(path: str) -> dict[str, str]:
    """Captions keyed by scene id, from a CSV (`file_name,text`) or JSONL (`{"scene", "text"}`)."""
    with storage.open(path, newline="") as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
            return {row["scene"].strip("/"): row["text"] for row in rows}
        return {row["file_name"].strip("/"): row["text"] for row in csv.DictReader(f)}
