"""Video decoding for the VAE: the first `num_frames` frames, resized to cover H x W, centre-cropped.

Decoding, the bilinear resize (scale = max(W / w, H / h)) and the crop all run inside ffmpeg (the
binary shipped by imageio-ffmpeg): the full-resolution frames never reach Python, which keeps a
13.6K-scene run decode-bound on ffmpeg rather than on numpy.
"""

from __future__ import annotations

import subprocess

import imageio_ffmpeg
import numpy as np

from recam_jax import storage


class VideoError(ValueError):
    """A video that cannot be used: names the file and what is wrong."""


def _ffmpeg_command(path: str, num_frames: int, height: int, width: int) -> list[str]:
    """ffmpeg arguments that write `num_frames` cover-resized, centre-cropped rgb24 frames to stdout."""
    scale = f"scale={width}:{height}:force_original_aspect_ratio=increase:flags=bilinear"
    crop = f"crop={width}:{height}"  # centred by default
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-i", path,
        "-frames:v", str(num_frames), "-vf", f"{scale},{crop}",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
    ]  # fmt: skip


FFMPEG_TIMEOUT_S = 600.0  # a decode that hangs (a broken file, a stalled network mount) fails its scene


def read_frames(path: str, num_frames: int, height: int, width: int, timeout_s: float = FFMPEG_TIMEOUT_S) -> np.ndarray:
    """Frames (num_frames, height, width, 3) uint8 (a quarter of float32's memory while queued for
    the encoder); VideoError if short, unreadable or still decoding after `timeout_s`."""
    with storage.local_copy(path) as local:  # ffmpeg reads local files (a gs:// video is downloaded)
        try:
            command = _ffmpeg_command(local, num_frames, height, width)
            result = subprocess.run(command, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise VideoError(f"{path}: ffmpeg still decoding after {timeout_s:g} s (killed)") from e
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise VideoError(f"{path}: ffmpeg failed: {message[-1] if message else result.returncode}")
    frame_bytes = height * width * 3
    decoded = len(result.stdout) // frame_bytes
    if decoded < num_frames:
        raise VideoError(f"{path}: has {decoded} frames, {num_frames} needed")
    return np.frombuffer(result.stdout[: num_frames * frame_bytes], np.uint8).reshape(num_frames, height, width, 3)


def to_model_range(frames: np.ndarray) -> np.ndarray:
    """uint8 frames as the VAE takes them: float32 in [-1, 1]."""
    return frames.astype(np.float32) / 127.5 - 1.0


def read_video(path: str, num_frames: int, height: int, width: int, timeout_s: float = FFMPEG_TIMEOUT_S) -> np.ndarray:
    """Frames (num_frames, height, width, 3) float32 in [-1, 1]; VideoError if short or unreadable."""
    return to_model_range(read_frames(path, num_frames, height, width, timeout_s))


def write_video(path: str, frames: np.ndarray, fps: float = 15) -> None:
    """Frames (F, H, W, 3) uint8 as an H.264 mp4, the way the dataset ships its videos."""
    with storage.local_output(path) as local:
        writer = imageio_ffmpeg.write_frames(local, frames.shape[2:0:-1], fps=fps, quality=8, macro_block_size=1)
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
