"""Camera poses of MultiCamVideo: Unreal extrinsics -> the relative poses ReCamMaster is trained on.

MultiCamVideo stores, per frame and camera, a string "[r r r 0] [r r r 0] [r r r 0] [tx ty tz 1] ":
a 4x4 Unreal Engine matrix in row-vector layout (translation in the last row), in centimetres.

The official ReCamMaster conversion (`official_c2w`) transposes it, reorders the columns to
(y, z, x, t), negates the new second column and converts cm to m. The camera axes come out as
OpenCV's (x right, y down, z forward) but the world stays Unreal's left-handed one, so these
matrices have det(R) = -1. The model input only ever sees RELATIVE poses inv(A) @ B, which are
proper rotations and are computed here exactly as the official code does (float64, then float32).

Absolute poses exposed to the rest of the code (`c2w_from_unreal`) are made right-handed by
negating the world's Unreal-y row: world = (Unreal x forward, -Unreal y = left, Unreal z up),
metres. Relative poses are unchanged by that flip: inv(F A) @ (F B) = inv(A) @ B.
"""

from __future__ import annotations

import numpy as np

POSE_DIM = 12  # the top 3x4 of a relative camera-to-world matrix, flattened row-major
LATENT_FRAME_STRIDE = 4  # the VAE compresses time 4x: video frames 0, 4, ..., 80 -> 21 latents
_RIGHT_HANDED_WORLD = np.diag([1.0, -1.0, 1.0, 1.0])  # flips Unreal's left-handed world


def parse_unreal_matrix(text: str) -> np.ndarray:
    """A MultiCamVideo extrinsics string as the (4, 4) float64 Unreal matrix it spells."""
    if not isinstance(text, str):
        raise ValueError(f"expected a matrix string, got {text!r}")
    rows = [row.split() for row in text.replace("]", "[").split("[") if row.strip()]
    matrix = np.array(rows, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"expected 4 rows of 4 numbers, got shape {matrix.shape}: {text!r}")
    return matrix


def unreal_string(matrix: np.ndarray) -> str:
    """A 4x4 matrix spelled as MultiCamVideo's JSON spells it (6 significant digits): "[a b c d] ... "."""
    return " ".join("[" + " ".join(f"{x:g}" for x in row) + "]" for row in matrix) + " "


def official_c2w(unreal: np.ndarray) -> np.ndarray:
    """Camera-to-world (..., 4, 4) exactly as ReCamMaster computes it (left-handed world, metres)."""
    c2w = np.swapaxes(unreal, -1, -2)[..., [1, 2, 0, 3]].copy()
    c2w[..., :3, 1] *= -1.0
    c2w[..., :3, 3] /= 100.0
    return c2w


def unreal_from_poses(poses: np.ndarray) -> np.ndarray:
    """Unreal matrices (n, 4, 4) whose `official_c2w` are these poses (n, 12), e.g. a model's camera
    input: the official conversion undone, so the poses can be drawn (`recam_jax.trajectory_plot`)."""
    c2w = np.tile(np.eye(4), (len(poses), 1, 1))
    c2w[:, :3, :] = np.asarray(poses, np.float64).reshape(-1, 3, 4)
    c2w[:, :3, 1] *= -1.0
    c2w[:, :3, 3] *= 100.0
    return np.swapaxes(c2w[..., [2, 0, 1, 3]], -1, -2)


def c2w_from_unreal(unreal: np.ndarray) -> np.ndarray:
    """Absolute camera-to-world (..., 4, 4) in a right-handed world: a proper rotation, metres."""
    return _RIGHT_HANDED_WORLD @ official_c2w(unreal)


def relative_poses(reference_unreal: np.ndarray, target_unreal: np.ndarray) -> np.ndarray:
    """Poses (n, 12) float32 of each target frame relative to one reference pose, as in the paper."""
    to_reference = np.linalg.inv(official_c2w(reference_unreal))
    relative = to_reference @ official_c2w(target_unreal)
    return relative[:, :3, :].reshape(-1, POSE_DIM).astype(np.float32)


def training_camera(source_unreal: np.ndarray, target_unreal: np.ndarray) -> np.ndarray:
    """Model camera input (latent_frames, 12): target frames 0, 4, ... relative to source frame 0."""
    return relative_poses(source_unreal[0], target_unreal[::LATENT_FRAME_STRIDE])


def inference_camera(target_unreal: np.ndarray) -> np.ndarray:
    """Camera input at inference (official): the target trajectory relative to its own frame 0."""
    return relative_poses(target_unreal[0], target_unreal[::LATENT_FRAME_STRIDE])


def normalised_intrinsics(focal_mm: np.ndarray, sensor_width_mm: float, aspect: float) -> np.ndarray:
    """(n, 4) float32 (fx, fy, cx, cy) of a lens per frame: the focal length in image widths and in image
    heights (square pixels; `aspect` = width / height), the principal point at the centre.

    Assumes the frame's width spans the sensor's width, as in MultiCamVideo's renders and the demo's;
    a centre crop keeps the principal point at 0.5.
    """
    fx = np.asarray(focal_mm, np.float64) / sensor_width_mm
    centre = np.full_like(fx, 0.5)
    return np.stack([fx, fx * aspect, centre, centre], axis=-1).astype(np.float32)


def training_intrinsics(source_focal_mm: np.ndarray, target_focal_mm: np.ndarray, sensor_width_mm: float,
                        aspect: float) -> np.ndarray:
    """Model intrinsics input (latent_frames, 8): target then source lens at video frames 0, 4, ...

    Each focal array holds one value per video frame (a zoom changes it along the clip)."""
    lens = lambda focal: normalised_intrinsics(np.asarray(focal)[::LATENT_FRAME_STRIDE], sensor_width_mm, aspect)
    return np.concatenate([lens(target_focal_mm), lens(source_focal_mm)], axis=-1)
