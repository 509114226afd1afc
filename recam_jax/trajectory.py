"""Camera trajectories: the 10 official basic ones as presets, and a small generator for new ones.

A trajectory is what MultiCamVideo's camera_extrinsics.json holds for one camera: Unreal matrices
(frames, 4, 4), rows = forward, right, up axes, then the position in cm (data_pipeline/cameras.py).
Every trajectory starts where the official ones do, looking along Unreal's +x; the model only sees
poses relative to frame 0, so the start only matters for equality with the official file.

Spec syntax (what `--trajectory` and `python -m recam_jax.trajectory` take):

    SPEC = TERM+TERM+...     the terms run at the same time, each mounted on the camera as the
                             terms before it have moved it (a rig stack: `truck:1+pan:-20` slides
                             right while turning left, `pan:-20+truck:1` slides along the turning
                             right axis)
    TERM = PRESET  or  MOVE:AMOUNT,KEY=VALUE,...

    MOVE      AMOUNT     positive means
    pan       degrees    turn right (about the camera's up axis)
    tilt      degrees    look up
    roll      degrees    clockwise (the camera's up leans to its right)
    dolly     metres     forward (the official "zoom" is a dolly: MultiCamVideo's lenses are fixed)
    truck     metres     right
    pedestal  metres     up
    arc       degrees    circle the point `radius` m ahead: move right, turn left to keep it centred
    aim       metres     look at the point that far ahead of the first camera, horizon level (it
                         sets the orientation, so it does not mix with pan, tilt, roll or arc)
    focal     mm         the lens reaches this focal length (a zoom; the pose is untouched); the
                         lens starts at `--focal_mm` (24) and follows the focal terms in order

    KEY=VALUE  speed=linear|ease_in|ease_out|ease (default linear); start=0, end=1: the window
               of the clip the move runs in (fractions); radius=4 (arc only, metres)

e.g. `pan:30`, `arc:60,radius=3,speed=ease`, `truck:1+pan:-20`, `pan:90,end=0.5+dolly:2,start=0.5`,
`pedestal:1+aim:4`, `zoom_in+roll:10`, `dolly:2+focal:12` (a dolly zoom from 24 mm). A move
reaches its amount on the clip's last frame. `focal_lengths` gives the lens along a spec, and
`target_focal_lengths` the lens of any `--trajectory` (the sampler's, starting from the source's lens).

The presets reproduce the official file to its 6 printed digits. They are linear moves that run
half a frame past the last frame (frame k of 81 is at k/80.5 of the move, measured from the file);
`translate_*` and `arc_*` move in a straight line while aiming at the point 4 m ahead, so the
official "arc" is the chord of a 30-degree arc of radius 4 m, not the arc itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np

from data_pipeline import multicam
from recam_jax import storage

DEFAULT_FRAMES = 81
START_CM = np.array([3390.0, 1380.0, 240.0])  # where every official trajectory starts
FORWARD, RIGHT, UP = 0, 1, 2  # axes of the start camera = Unreal's world axes (left-handed)
ROTATIONS = {"pan": (FORWARD, RIGHT), "tilt": (FORWARD, UP), "roll": (UP, RIGHT)}  # plane, + turns 1st to 2nd
TRANSLATIONS = {"dolly": FORWARD, "truck": RIGHT, "pedestal": UP}
MOVES = (*ROTATIONS, *TRANSLATIONS, "arc", "aim", "focal")
DEFAULT_FOCAL_MM = 24.0  # where a spec's lens starts
SPEEDS = {
    "linear": lambda x: x,
    "ease_in": lambda x: x**2,
    "ease_out": lambda x: 1 - (1 - x) ** 2,
    "ease": lambda x: x * x * (3 - 2 * x),
}
_ARC_RADIUS, _ARC_DEGREES = 4.0, math.radians(30.0)  # the official arcs' chords end on this circle
_CHORD_SIDE, _CHORD_FORWARD = _ARC_RADIUS * math.sin(_ARC_DEGREES), _ARC_RADIUS * (1 - math.cos(_ARC_DEGREES))
PRESETS = {  # official cam01 ... cam10, in order (README table of the official ReCamMaster)
    "pan_right": "pan:20",
    "pan_left": "pan:-20",
    "tilt_up": "tilt:10",
    "tilt_down": "tilt:-10",
    "zoom_in": "dolly:2",
    "zoom_out": "dolly:-2",
    "translate_up": "pedestal:1+aim:4",
    "translate_down": "pedestal:-1+aim:4",
    "arc_left": f"truck:{-_CHORD_SIDE!r}+dolly:{_CHORD_FORWARD!r}+aim:{_ARC_RADIUS!r}",
    "arc_right": f"truck:{_CHORD_SIDE!r}+dolly:{_CHORD_FORWARD!r}+aim:{_ARC_RADIUS!r}",
}


@dataclasses.dataclass(frozen=True)
class Move:
    """One camera move over the window [start, end] of the clip (fractions; end may pass 1)."""

    kind: str
    amount: float  # degrees (pan, tilt, roll, arc), metres (dolly, truck, pedestal, aim) or mm (focal)
    radius: float = _ARC_RADIUS  # arc: metres from the camera to the point it circles
    speed: str = "linear"
    start: float = 0.0
    end: float = 1.0

    def progress(self, clip_fraction: np.ndarray) -> np.ndarray:
        """How far through the move (0..1) the camera is at each clip fraction."""
        x = np.clip((clip_fraction - self.start) / (self.end - self.start), 0.0, 1.0)
        return SPEEDS[self.speed](x)

    def local_transform(self, progress: float) -> np.ndarray:
        """4x4 (column vectors, metres) of the move in the frame of the camera it is mounted on.

        Identity for `aim`, which sets the orientation once the position is known (`generate`), and
        for `focal`, which moves the lens only (`focal_lengths`).
        """
        transform = np.eye(4)
        if self.kind in ROTATIONS:
            transform[:3, :3] = _plane_rotation(*ROTATIONS[self.kind], self.amount * progress)
        elif self.kind in TRANSLATIONS:
            transform[TRANSLATIONS[self.kind], 3] = self.amount * progress
        elif self.kind == "arc":
            angle = np.radians(self.amount * progress)
            transform[:3, 3] = [self.radius * (1 - np.cos(angle)), self.radius * np.sin(angle), 0.0]
            transform[:3, :3] = _plane_rotation(FORWARD, RIGHT, -self.amount * progress)
        return transform


def _plane_rotation(first: int, second: int, degrees: float) -> np.ndarray:
    """3x3 rotation turning axis `first` towards axis `second` (columns: the new axes)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rotation = np.eye(3)
    rotation[[first, second], first] = c, s
    rotation[[first, second], second] = -s, c
    return rotation


def _look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """3x3 orientation facing `target` with a level horizon: yaw, then pitch in the yawed frame."""
    d = target - position
    yaw = np.degrees(np.arctan2(d[RIGHT], d[FORWARD]))
    pitch = np.degrees(np.arctan2(d[UP], np.hypot(d[FORWARD], d[RIGHT])))
    return _plane_rotation(FORWARD, RIGHT, yaw) @ _plane_rotation(FORWARD, UP, pitch)


def parse(spec: str, frames: int = DEFAULT_FRAMES) -> list[Move]:
    """The moves a spec (see the module docstring) spells; ValueError naming the bad term."""
    moves = []
    for term in spec.split("+"):
        term = term.strip()
        if term in PRESETS:  # the official moves run to frame n - 0.5
            official_end = (frames - 0.5) / max(frames - 1, 1)
            moves += [dataclasses.replace(m, end=official_end) for m in parse(PRESETS[term], frames)]
        else:
            moves.append(_parse_move(term, spec))
    aims = [m for m in moves if m.kind == "aim"]
    if len(aims) > 1 or (aims and any(m.kind in (*ROTATIONS, "arc") for m in moves)):
        raise ValueError(f"trajectory {spec!r}: one aim sets the orientation; drop the pan/tilt/roll/arc or the aim")
    return moves


def _parse_move(term: str, spec: str) -> Move:
    kind, _, rest = term.partition(":")
    if kind not in MOVES or not rest:
        raise ValueError(f"trajectory {spec!r}: {term!r} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor MOVE:AMOUNT with MOVE one of {', '.join(MOVES)}")
    amount, *options = rest.split(",")
    fields = {"kind": kind, "amount": _number(amount, "amount", term, spec)}
    for option in options:
        key, _, value = option.partition("=")
        key = key.strip()
        if key == "speed" and value.strip() in SPEEDS:
            fields["speed"] = value.strip()
        elif key in ("start", "end") or (key == "radius" and kind == "arc"):
            fields[key] = _number(value, key, term, spec)
        else:
            raise ValueError(f"trajectory {spec!r}: bad option {option!r} in {term!r} (speed={'|'.join(SPEEDS)}, "
                             "start=, end=, radius= for arc)")
    move = Move(**fields)
    if not move.end > move.start or move.radius <= 0 or (kind in ("aim", "focal") and move.amount <= 0):
        raise ValueError(f"trajectory {spec!r}: {term!r} needs start < end, radius > 0 and a positive aim "
                         "distance or focal length")
    return move


def _number(text: str, field: str, term: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"trajectory {spec!r}: {field} of {term!r} is not a number: {text!r}") from None


def generate(spec: str, frames: int = DEFAULT_FRAMES) -> np.ndarray:
    """Unreal matrices (frames, 4, 4) of the trajectory a spec describes."""
    if frames < 1:
        raise ValueError(f"trajectory {spec!r}: frames must be at least 1, got {frames}")
    moves = parse(spec, frames)
    clip_fraction = np.arange(frames) / max(frames - 1, 1)
    progress = [move.progress(clip_fraction) for move in moves]
    aim = [np.array([m.amount, 0.0, 0.0]) for m in moves if m.kind == "aim"]
    unreal = np.zeros((frames, 4, 4))
    for k in range(frames):
        pose = np.eye(4)
        for move, p in zip(moves, progress):
            pose = pose @ move.local_transform(p[k])
        if aim:
            pose[:3, :3] = _look_at(pose[:3, 3], aim[0])
        unreal[k] = pose.T  # Unreal's row-vector layout: axes as rows, position as the last row
        unreal[k, 3, :3] = START_CM + 100.0 * pose[:3, 3]
    return unreal


def focal_lengths(spec: str, frames: int = DEFAULT_FRAMES, start_mm: float = DEFAULT_FOCAL_MM) -> np.ndarray:
    """The lens (frames,) in mm along a spec: `start_mm`, taken by each `focal:MM` term in turn to MM
    over its window and speed (constant when the spec has none)."""
    if start_mm <= 0:
        raise ValueError(f"trajectory {spec!r}: the start focal length must be positive, got {start_mm}")
    clip_fraction = np.arange(frames) / max(frames - 1, 1)
    focal, previous = np.full(frames, float(start_mm)), float(start_mm)
    for move in (m for m in parse(spec, frames) if m.kind == "focal"):
        focal += (move.amount - previous) * move.progress(clip_fraction)
        previous = move.amount
    return focal


def _is_file(trajectory: str) -> bool:
    return trajectory.endswith(".json") or storage.exists(trajectory)


def load(trajectory: str, camera: int = 1, frames: int = DEFAULT_FRAMES) -> np.ndarray:
    """Unreal matrices (frames, 4, 4) from a camera JSON file (its camXX), a preset name or a spec."""
    if _is_file(trajectory):
        return multicam.read_extrinsics(trajectory, frames, camera_numbers=(camera,))[0]
    return generate(trajectory, frames)


def target_focal_lengths(trajectory: str, camera: int, frames: int, source_focal_mm: float) -> np.ndarray:
    """The lens (frames,) in mm of the camera `load` gives: for a camera JSON, its camXX curve in the
    `focal_lengths.json` beside it (what `--out` writes for a spec that zooms), else the source's lens;
    for a spec, its focal terms starting from the source's lens (a preset keeps it)."""
    if not _is_file(trajectory):
        return focal_lengths(trajectory, frames, start_mm=source_focal_mm)
    focal_path = storage.join(storage.parent(trajectory), multicam.FOCAL_FILE)
    return multicam.read_focal_curves(focal_path, frames).get(camera, np.full(frames, float(source_focal_mm)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="presets (official cam01 ... cam10): " + ", ".join(PRESETS))
    parser.add_argument("specs", nargs="+", help="one spec or preset per camera: cam01, cam02, ...")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames per trajectory (MultiCamVideo: 81)")
    parser.add_argument("--out", help="camera JSON in MultiCamVideo's format (and, when a spec has a focal term, "
                                      f"{multicam.FOCAL_FILE} beside it)")
    parser.add_argument("--focal_mm", type=float, default=DEFAULT_FOCAL_MM, help="the lens at the start (mm)")
    parser.add_argument("--plot", help="PNG of the camera frusta from above and from the side")
    args = parser.parse_args(argv)
    try:
        paths = {i + 1: generate(spec, args.frames) for i, spec in enumerate(args.specs)}
    except ValueError as e:
        parser.error(str(e))
    if args.out:
        multicam.write_extrinsics(args.out, paths)
        print(f"wrote {args.out}")
        if any(m.kind == "focal" for spec in args.specs for m in parse(spec, args.frames)):
            focal_path = storage.join(storage.parent(args.out), multicam.FOCAL_FILE)
            multicam.write_focal_lengths(focal_path, {i + 1: focal_lengths(spec, args.frames, args.focal_mm)
                                                      for i, spec in enumerate(args.specs)})
            print(f"wrote {focal_path}")
    if args.plot:
        from recam_jax import trajectory_plot

        trajectory_plot.write_png(args.plot, dict(zip(args.specs, paths.values())))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
