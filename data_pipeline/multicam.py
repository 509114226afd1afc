"""Reading MultiCamVideo scenes: discovery, captions and the validation that runs before encoding.

Layout (one scene = 10 synchronised cameras filming the same animated scene):

    ROOT/train/<focal_aperture>/<scene>/videos/cam01.mp4 ... cam10.mp4
    ROOT/train/<focal_aperture>/<scene>/cameras/camera_extrinsics.json   frameK -> camXX -> matrix
    ROOT/train/<focal_aperture>/<scene>/cameras/focal_lengths.json       optional: camXX -> [mm per frame]

Every camera has the folder's focal length (f18 -> 18 mm); `focal_lengths.json`, a recam_jax
extension that MultiCamVideo does not ship, gives some cameras their own lens or a zoom (the demo
data's focal ramps).

A scene id is its path below the split folder, e.g. "f18_aperture10/scene1". The released archives
hold broken scenes (missing or truncated files, partial JSON); `validate_scene` names what is wrong
so a long run can skip the scene and report it instead of crashing.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re

import numpy as np

from data_pipeline import cameras
from recam_jax import storage

NUM_CAMERAS = 10
CAMERAS = tuple(range(1, NUM_CAMERAS + 1))  # numbered as in the files: cam01 ... cam10
SENSOR_SIZE_MM = 23.76  # square sensor of every MultiCamVideo camera
FOCAL_FILE = "focal_lengths.json"
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

    @property
    def focal_path(self) -> str:
        return storage.join(self.path, "cameras", FOCAL_FILE)

    def video_path(self, camera: int) -> str:
        return storage.join(self.path, "videos", f"cam{camera:02d}.mp4")


def find_scenes(split_dir: str) -> list[Scene]:
    """Every `<focal_aperture>/<scene>` folder under a split, sorted so all hosts agree."""
    return scan_split(split_dir)[0]


def scan_split(split_dir: str) -> tuple[list[Scene], list[str]]:
    """The split's scenes, and the entries that are not in the layout (a lens folder not named
    `f<mm>_...`, a file where a folder belongs), as paths, so a run can say what it left out."""
    if not storage.isdir(split_dir):
        raise SceneError(f"{split_dir}: no such folder (a MultiCamVideo root holds train/<focal_aperture>/<scene>)")
    scenes, unmatched = [], []
    for lens in storage.listdir(split_dir):
        match = _FOCAL_FOLDER.match(lens)
        if match is None or not storage.isdir(storage.join(split_dir, lens)):
            unmatched.append(storage.join(split_dir, lens))
            continue
        for name in storage.listdir(storage.join(split_dir, lens)):
            if storage.isdir(storage.join(split_dir, lens, name)):
                scenes.append(Scene(split_dir, f"{lens}/{name}", float(match.group(1))))
            else:
                unmatched.append(storage.join(split_dir, lens, name))
    return scenes, unmatched


def read_extrinsics(path: str, num_frames: int, camera_numbers: tuple[int, ...] = CAMERAS) -> np.ndarray:
    """Unreal matrices (cameras, frames, 4, 4) float64 from a scene's JSON; SceneError if incomplete."""
    try:
        with storage.open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, or bytes that are not UTF-8
        raise SceneError(f"{path}: cannot read camera JSON ({e})") from e
    poses = np.empty((len(camera_numbers), num_frames, 4, 4))
    for frame in range(num_frames):
        for i, camera in enumerate(camera_numbers):
            key = f"frame{frame}/cam{camera:02d}"
            try:
                poses[i, frame] = cameras.parse_unreal_matrix(data[f"frame{frame}"][f"cam{camera:02d}"])
            except (KeyError, TypeError, ValueError) as e:
                raise SceneError(f"{path}: missing or malformed {key} ({e!r})") from e
    if not np.all(np.isfinite(poses)):
        raise SceneError(f"{path}: non-finite numbers in the extrinsics")
    return poses


def write_extrinsics(path: str, paths: dict[int, np.ndarray]) -> None:
    """A camera JSON in MultiCamVideo's layout from Unreal matrices (frames, 4, 4) per camera number."""
    num_frames = len(next(iter(paths.values())))
    extrinsics = {f"frame{k}": {f"cam{c:02d}": cameras.unreal_string(poses[k]) for c, poses in paths.items()}
                  for k in range(num_frames)}
    with storage.atomic_open(path, "w") as f:
        json.dump(extrinsics, f, indent=4)


def read_focal_lengths(scene: Scene, num_frames: int) -> np.ndarray:
    """Focal lengths (cameras, frames) in mm: the folder's lens, or a camera's curve from `focal_lengths.json`."""
    focal = np.full((NUM_CAMERAS, num_frames), scene.focal_length_mm)
    for camera, curve in read_focal_curves(scene.focal_path, num_frames).items():
        focal[camera - 1] = curve
    return focal


def read_focal_curves(path: str, num_frames: int) -> dict[int, np.ndarray]:
    """The curves (frames,) in mm of a `focal_lengths.json` by camera number (none when there is no such
    file: every camera keeps its lens); SceneError naming the file."""
    curves = {}
    if not storage.exists(path):
        return curves
    try:
        with storage.open(path, encoding="utf-8") as f:
            raw = json.load(f)
        for key, values in raw.items():
            camera = int(key.removeprefix("cam")) if re.fullmatch(r"cam\d\d", key) else 0
            curve = np.asarray(values, np.float64)
            if camera not in CAMERAS or curve.shape != (num_frames,) or not np.all(curve > 0):
                raise ValueError(f"{key!r} must be cam01..cam10 with {num_frames} positive lengths")
            curves[camera] = curve
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise SceneError(f"{path}: bad focal lengths ({e})") from e
    return curves


def write_focal_lengths(path: str, curves: dict[int, np.ndarray]) -> None:
    """A `focal_lengths.json` from focal lengths (frames,) in mm per camera number."""
    with storage.atomic_open(path, "w") as f:
        json.dump({f"cam{c:02d}": [round(float(x), 4) for x in curve] for c, curve in curves.items()}, f)


def validate_scene(scene: Scene, num_frames: int) -> np.ndarray:
    """The scene's extrinsics once every file is present; SceneError naming the first problem."""
    for camera in CAMERAS:
        video = scene.video_path(camera)
        if not storage.isfile(video) or storage.size(video) == 0:
            raise SceneError(f"{video}: missing or empty video")
    return read_extrinsics(scene.extrinsics_path, num_frames)


def load_captions(path: str) -> dict[str, dict[int, str]]:
    """Captions per scene id and camera number, from a caption file (see `parse_caption_rows`)."""
    with storage.open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: a leading BOM is dropped
        text = f.read()
    return captions_by_camera(path, parse_caption_rows(path, text))


KEY_COLUMNS = ("file_name", "scene", "video", "path")  # first match wins, case and spaces ignored
TEXT_COLUMNS = ("text", "caption", "prompt")
# A key names a scene ("f18_aperture10/scene1") or one camera's video, as the official metadata.csv
# does ("f18_aperture10/scene1/videos/cam01.mp4"); anything above the lens folder is ignored.
_CAPTION_KEY = re.compile(r"^(?:.*/)?(?P<scene>f\d+(?:\.\d+)?_[^/]+/[^/]+?)(?:/videos/cam(?P<camera>\d+)\.mp4)?/?$")


class CaptionError(ValueError):
    """A caption file that cannot be used; the message names the file, line and key or column."""


def parse_caption_rows(path: str, text: str) -> list[tuple[int, str, str]]:
    """(line, key, caption) rows of a CSV with a key and a text column, or of JSONL objects (`.jsonl`)."""
    if path.endswith(".jsonl"):
        rows = [(line, _json_line(path, line, raw)) for line, raw in enumerate(text.splitlines(), 1) if raw.strip()]
        fields = sorted({key for _, row in rows if isinstance(row, dict) for key in row})
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [(reader.line_num, row) for row in reader]
        fields = reader.fieldnames or []
    key_column, text_column = (_find_column(path, fields, names) for names in (KEY_COLUMNS, TEXT_COLUMNS))
    parsed = []
    for line, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get(key_column), str) or not isinstance(row.get(text_column), str):
            raise CaptionError(f"{path}:{line}: expected text in columns {key_column!r} and {text_column!r}, got {row!r}")
        caption = " ".join(row[text_column].split())
        if not caption:
            raise CaptionError(f"{path}:{line}: empty {text_column!r} for {row[key_column]!r}")
        parsed.append((line, row[key_column], caption))
    return parsed


def _json_line(path: str, line: int, raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CaptionError(f"{path}:{line}: not a JSON object ({e})") from e


def _find_column(path: str, fields: list[str], names: tuple[str, ...]) -> str:
    """The first field named like one of `names` (case and surrounding spaces ignored)."""
    by_name = {field.strip().lower(): field for field in fields if field}
    for name in names:
        if name in by_name:
            return by_name[name]
    raise CaptionError(f"{path}: no column named one of {names}; the columns are {fields}")


def captions_by_camera(path: str, rows: list[tuple[int, str, str]]) -> dict[str, dict[int, str]]:
    """Scene id -> camera -> caption: a scene key covers every camera, a video key only its camera.

    A video's own row wins over its scene's row whatever their order; the same key twice with two
    different captions is refused rather than keeping one silently."""
    scene_rows, video_rows = {}, {}
    for line, key, caption in rows:
        match = _CAPTION_KEY.match(key.strip().replace("\\", "/"))
        camera = int(match.group("camera")) if match and match.group("camera") else None
        if match is None or (camera is not None and camera not in CAMERAS):
            raise CaptionError(f"{path}:{line}: key {key!r} names no scene (f18_aperture10/scene1) "
                               f"nor camera video (f18_aperture10/scene1/videos/cam01.mp4)")
        target, name = (scene_rows, match.group("scene")) if camera is None else (video_rows, (match.group("scene"), camera))
        if target.get(name, (line, caption))[1] != caption:
            raise CaptionError(f"{path}:{line}: {key!r} captioned differently on line {target[name][0]}")
        target[name] = (line, caption)
    captions = {scene: dict.fromkeys(CAMERAS, caption) for scene, (_, caption) in scene_rows.items()}
    for (scene, camera), (_, caption) in video_rows.items():
        captions.setdefault(scene, {})[camera] = caption
    return captions


def camera_captions(per_camera: dict[int, str]) -> tuple[list[str], list[int]]:
    """A scene record's distinct captions and, per camera 1..10, the index of its caption. A camera the
    caption file leaves out gets the lowest captioned camera's caption (the same scene, seen from elsewhere)."""
    fallback = per_camera[min(per_camera)]
    per_video = [per_camera.get(camera, fallback) for camera in CAMERAS]
    distinct = list(dict.fromkeys(per_video))
    return distinct, [distinct.index(caption) for caption in per_video]
