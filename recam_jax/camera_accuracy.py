"""Camera accuracy: how closely a video's camera follows the trajectory it was asked for.

    python -m recam_jax.evaluate --camera_accuracy --video render.mp4 --trajectory arc_right [--focal_px 560]

COLMAP (through pycolmap: SIFT features, sequential matching, incremental mapping) estimates the
camera of every frame. Both trajectories are taken relative to their own first frame and their
translations divided by their largest displacement (structure from motion has no scale), then

    RotErr   = Σ_k arccos((tr(R_requested,k^T R_estimated,k) - 1) / 2)    radians, summed over frames
    TransErr = Σ_k ‖t_requested,k - t_estimated,k‖₂                       scale-free units, summed

as in CamI2V's evaluation code, which ReCamMaster follows (docs/camera.md). A video COLMAP cannot
reconstruct in full (a static camera, a pure rotation, too little texture) gives no numbers but
the reason, with the feature and match counts behind it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import video
from recam_jax import storage


class CouldNotReconstruct(Exception):
    """COLMAP did not recover a pose for every frame; the message says what it found."""


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """RotErr and TransErr of one video, or why COLMAP could not measure them."""

    frames: int
    rot_err: float | None = None  # radians, summed over frames
    trans_err: float | None = None  # scale-free, summed over frames
    failure: str | None = None  # set exactly when the errors are None

    def report(self) -> str:
        """The lines the CLI prints."""
        if self.failure is not None:
            return f"frames: {self.frames}\ncould not reconstruct: {self.failure}"
        return f"frames: {self.frames}\nrot_err: {self.rot_err:.6g}\ntrans_err: {self.trans_err:.6g}"


def relative_to_first(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world poses (n, 4, 4) re-expressed in the first camera's frame."""
    return np.linalg.inv(c2w[0]) @ c2w


def scale_free_translations(relative_c2w: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Camera positions (n, 3) divided by the largest one's norm: the trajectory at unit size."""
    positions = relative_c2w[:, :3, 3]
    return positions / (np.linalg.norm(positions, axis=-1).max() + eps)


def errors(requested_c2w: np.ndarray, estimated_c2w: np.ndarray) -> tuple[float, float]:
    """(RotErr, TransErr) of an estimated trajectory against the requested one, both (n, 4, 4) c2w.

    Each is aligned by its first frame and its scale, so a world frame or a scale of its own (what
    SfM returns) changes nothing.
    """
    requested, estimated = relative_to_first(requested_c2w), relative_to_first(estimated_c2w)
    cosines = (np.trace(np.swapaxes(requested[:, :3, :3], -1, -2) @ estimated[:, :3, :3], axis1=-2, axis2=-1) - 1) / 2
    rot_err = np.arccos(np.clip(cosines, -1.0, 1.0)).sum()
    trans_err = np.linalg.norm(scale_free_translations(requested) - scale_free_translations(estimated), axis=-1).sum()
    return float(rot_err), float(trans_err)


def read_frames(path: str) -> np.ndarray:
    """Every frame (n, H, W, 3) uint8 of a video at its own size; VideoError naming the file."""
    import imageio_ffmpeg

    try:
        with storage.local_copy(path) as local:
            reader = imageio_ffmpeg.read_frames(local)
            width, height = next(reader)["size"]
            frames = [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]
    except (OSError, RuntimeError, StopIteration) as e:
        raise video.VideoError(f"{path}: cannot decode the video ({e})") from e
    if not frames:
        raise video.VideoError(f"{path}: has no frames")
    return np.stack(frames)


def estimate_poses(frames: np.ndarray, workdir: str, focal_px: float | None = None) -> np.ndarray:
    """Camera-to-world poses (n, 4, 4) of every frame (n, H, W, 3) uint8, estimated by COLMAP.

    One pinhole camera for all frames, principal point at the centre; `focal_px` fixes its focal
    length, else COLMAP refines it from 1.2 × the larger side. The world is COLMAP's (right-handed,
    OpenCV camera axes: x right, y down, z forward), the same camera axes as cameras.c2w_from_unreal.
    CouldNotReconstruct if any frame is left without a pose.
    """
    import imageio.v3 as iio
    import pycolmap

    images, database, sparse = (storage.join(workdir, name) for name in ("images", "database.db", "sparse"))
    storage.makedirs(images)
    names = [f"frame{k:05d}.png" for k in range(len(frames))]
    for name, frame in zip(names, frames):
        iio.imwrite(storage.join(images, name), frame)
    height, width = frames.shape[1:3]

    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "SIMPLE_PINHOLE"
    if focal_px is not None:
        reader.camera_params = f"{focal_px},{width / 2},{height / 2}"
    pycolmap.extract_features(database, images, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                              reader_options=reader, device=pycolmap.Device.cpu)
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = 0
    pycolmap.match_sequential(database, verification_options=verification, device=pycolmap.Device.cpu)
    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.random_seed = 0
    mapping.ba_refine_focal_length = focal_px is None
    mapping.mapper.abs_pose_refine_focal_length = focal_px is None
    models = pycolmap.incremental_mapping(database, images, sparse, options=mapping)

    largest = max(models.values(), key=lambda model: model.num_reg_images(), default=None)
    posed = {} if largest is None else {image.name: image.cam_from_world().matrix() for image in largest.images.values()
                                        if image.has_pose}
    if len(posed) < len(frames):
        raise CouldNotReconstruct(_why(database, names, posed.keys()))
    w2c = np.tile(np.eye(4), (len(frames), 1, 1))
    w2c[:, :3, :] = [posed[name] for name in names]
    return np.linalg.inv(w2c)


def _why(database: str, names: list[str], posed) -> str:
    """What COLMAP found: frames posed, features per frame, verified frame pairs."""
    import pycolmap

    db = pycolmap.Database.open(database)
    try:
        features = np.median([db.num_keypoints_for_image(image.image_id) for image in db.read_all_images()])
        pairs = db.num_verified_image_pairs()
    finally:
        db.close()
    missing = [k for k, name in enumerate(names) if name not in posed]
    shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
    return (f"COLMAP posed {len(posed)} of {len(names)} frames in one model"
            + (f" (missing frames {shown})" if posed else "")
            + f"; median {features:.0f} SIFT features per frame, {pairs} frame pairs verified. A static camera, "
            "a pure rotation or too little texture leaves nothing to triangulate.")


def camera_accuracy(frames: np.ndarray, requested_c2w: np.ndarray, focal_px: float | None = None,
                    workdir: str | None = None) -> Accuracy:
    """RotErr and TransErr of `frames` (n, H, W, 3) uint8 against `requested_c2w` (n, 4, 4), or why not.

    COLMAP's database, frames and model go to `workdir` (kept for inspection), else a temporary folder.
    """
    if len(frames) != len(requested_c2w):
        raise ValueError(f"{len(frames)} frames but {len(requested_c2w)} requested camera poses")
    if workdir and storage.isdir(workdir) and storage.listdir(workdir):
        raise ValueError(f"{workdir}: not empty; COLMAP's folder must start empty (its database would mix runs)")
    with storage.local_folder(workdir or None) as folder:
        try:
            estimated = estimate_poses(frames, folder, focal_px)
        except CouldNotReconstruct as e:
            return Accuracy(frames=len(frames), failure=str(e))
    rot_err, trans_err = errors(requested_c2w, estimated)
    return Accuracy(frames=len(frames), rot_err=rot_err, trans_err=trans_err)
