"""Training metrics to stdout, TensorBoard and a JSON-lines file (one record per logged step);
images and videos (samples, trajectory plots) to TensorBoard."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
from tensorboardX import SummaryWriter, record_writer
from tensorboardX.proto.summary_pb2 import Summary

from recam_jax import storage


class MetricWriter:
    """Writes each record three ways: a readable line, TensorBoard scalars, `metrics.jsonl` (in a
    local or gs:// workdir).

    With `write_files=False` (every process of a multi-host job but the first) only the line is
    printed, so the shared workdir gets one copy of each file.
    """

    def __init__(self, workdir: str, write_files: bool = True):
        self.tensorboard = self.jsonl = None
        if write_files:
            self.tensorboard = SummaryWriter(storage.join(workdir, "tensorboard"))
            self.jsonl = storage.AppendLog(storage.join(workdir, "metrics.jsonl"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        print(f"step {step:>7d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in scalars.items()), flush=True)
        if self.jsonl is None:
            return
        for name, value in scalars.items():
            self.tensorboard.add_scalar(name, value, step)
        self.jsonl.write((json.dumps({"step": step, **scalars}) + "\n").encode())
        self.jsonl.flush()

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """uint8 RGB images (height, width, 3) by tag."""
        if self.tensorboard is None:
            return
        for tag, image in images.items():
            self.tensorboard.add_image(tag, image, step, dataformats="HWC")
        self.tensorboard.flush()

    def write_videos(self, step: int, videos: dict[str, np.ndarray], fps: float) -> None:
        """uint8 RGB videos (frames, height, width, 3) by tag, as the looping GIFs TensorBoard's image
        tab plays (what tensorboardX's add_video writes, without its moviepy dependency)."""
        if self.tensorboard is None:
            return
        for tag, frames in videos.items():
            gif = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)
            image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3, encoded_image_string=gif)
            self.tensorboard.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.tensorboard.close()
            self.jsonl.close()


class _EventFiles:
    """tensorboardX's writer of gs:// event files, through recam_jax/storage.py (its own needs
    google-cloud-storage clients and re-uploads from a finaliser, after the program is done)."""

    def open(self, path: str) -> storage.AppendLog:
        return storage.AppendLog(path)

    def directory_check(self, path: str) -> None:
        del path  # object stores have no folders to create


record_writer.register_writer_factory("gs", _EventFiles())


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
