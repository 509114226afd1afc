"""Samples while training: held-out scenes re-rendered along their target cameras, in TensorBoard.

Every `sample_every` steps the trainer calls `TrainingSamples.write`. The scenes are the first rows
of the first eval batch, with a fixed noise: the same scenes, cameras and noise at every sample, so
samples are comparable across steps. They are denoised by the sampler's loop (`sample.euler_sample`
stepping `sample.denoise_step`) from the train state's weights as they lie sharded on the mesh
(never gathered): `sample.steps` Euler steps over the training σ grid, without guidance (the shards
hold no embedding of a negative caption), over a centre crop of `sample.crop` latent pixels. The
scenes keep their lenses (the eval batch's intrinsics, rescaled to the crop), which the intrinsics
and plucker camera encodings read.

Per scene TensorBoard gets a frame strip (rows: source, generated, ground-truth target), a GIF of
the three side by side, and once, the trajectory plot of the target camera. The sample's wall time
is logged as `sample_time_s` and left out of `step_time_s`. Latents become pixels through
`sample.vae`: a Wan VAE config of `data_pipeline.video_encoder` (`wan2.1` with `sample.vae_path`,
or `demo`, the random VAE the demo shards were encoded with), or `latents`: the first three latent
channels as colours, no weights needed.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from data_pipeline import cameras
from recam_jax import flow, sample, trajectory_plot
from recam_jax.models.vae import VAE_CONFIGS

SCENE_KEYS = ("source_latents", "target_latents", "text_embeds", "camera")
LENS_KEY = "intrinsics"  # carried too when the eval batch has it: the non-official camera encodings read it
STRIP_FRAMES = 5  # frames shown per row of a strip, evenly spaced
GIF_FPS = 15  # the frame rate of MultiCamVideo
VAE_SPATIAL = 8  # pixels per latent pixel of the Wan VAE: the `latents` preview is enlarged as much
DECODERS = ("latents", *VAE_CONFIGS)  # the choices of `sample.vae`


def latent_preview(latents: np.ndarray) -> np.ndarray:
    """Latents (b, f, h, w, c) as videos (b, f, 8h, 8w, 3) in [-1, 1]: channels 0-2, ±2 std to full range."""
    rgb = np.clip(latents[..., :3] / 2, -1, 1)
    return rgb.repeat(VAE_SPATIAL, axis=2).repeat(VAE_SPATIAL, axis=3)


def make_decoder(name: str, vae_path: str):
    """latents (b, f, h, w, c) → videos (b, frames, height, width, 3) in [-1, 1]."""
    if name == "latents":
        return latent_preview
    from data_pipeline import video_encoder
    return video_encoder.make_video_encoder(name, vae_path or None).decode


def centre_crop(latents: np.ndarray, crop) -> np.ndarray:
    """The central (height, width) latent pixels of (b, f, h, w, c) latents; a 0 keeps that axis whole."""
    sizes = [size or full for size, full in zip(crop, latents.shape[2:4])]
    top, left = ((full - size) // 2 for size, full in zip(sizes, latents.shape[2:4]))
    return latents[:, :, top:top + sizes[0], left:left + sizes[1]]


def cropped_intrinsics(intrinsics: np.ndarray, full_hw, crop_hw) -> np.ndarray:
    """Normalised intrinsics (..., 8) of a centre crop: focal lengths in the crop's (smaller) widths
    and heights, the principal point still central."""
    (full_h, full_w), (crop_h, crop_w) = full_hw, crop_hw
    return intrinsics * np.tile([full_w / crop_w, full_h / crop_h, 1.0, 1.0], 2).astype(intrinsics.dtype)


def frame_strip(videos: list[np.ndarray]) -> np.ndarray:
    """uint8 videos (frames, h, w, 3) as one image: a row of `STRIP_FRAMES` frames per video."""
    shown = np.unique(np.linspace(0, len(videos[0]) - 1, STRIP_FRAMES).round().astype(int))
    return np.concatenate([np.concatenate(list(v[shown]), axis=1) for v in videos], axis=0)


class TrainingSamples:
    """The fixed held-out scenes of a run, and `write`, which renders them and logs the result."""

    def __init__(self, config, mesh, graphdef, eval_batch: dict):
        """`eval_batch`: the first global eval batch; `graphdef` splits into (trainable, frozen) as the state."""
        c = config.sample
        groups = mesh.shape["data"] * mesh.shape["fsdp"]  # the batch axes: one video each
        rows = groups * math.ceil(c.scenes / groups)
        if not 0 < c.scenes <= rows <= config.data.batch_size:
            raise ValueError(f"sample.scenes={c.scenes}: between 1 and data.batch_size={config.data.batch_size} "
                             f"scenes, rendered in multiples of the {groups} data-parallel groups")
        if any(size % p for size, p in zip(c.crop, (2, 2))):
            raise ValueError(f"sample.crop={tuple(c.crop)} must be even (the DiT's 2×2 patches)")
        self.scenes, self.steps, self.graphdef = c.scenes, c.steps, graphdef
        self.sigmas = flow.shifted_sigmas(c.steps, config.flow.shift)
        keys = [*SCENE_KEYS, *([LENS_KEY] if LENS_KEY in eval_batch else [])]
        scenes = {k: np.asarray(multihost_utils.process_allgather(eval_batch[k], tiled=True))[:rows] for k in keys}
        full = scenes["target_latents"].shape[2:4]
        for k in ("source_latents", "target_latents"):
            scenes[k] = centre_crop(scenes[k], c.crop)
        if LENS_KEY in scenes:
            scenes[LENS_KEY] = cropped_intrinsics(scenes[LENS_KEY], full, scenes["target_latents"].shape[2:4])
        noise = np.random.default_rng(config.seed).standard_normal(scenes["target_latents"].shape, np.float32)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.inputs = jax.device_put({**scenes, "noise": noise}, replicated)
        self.decode = make_decoder(c.vae, c.vae_path)
        self.shown = {k: scenes[k][:c.scenes] for k in ("source_latents", "target_latents", "camera")}
        self.decoded = None  # source and target pixels, decoded at the first write (they never change)

    def render(self, state) -> np.ndarray:
        """Denoised target latents (rows, f, h, w, c) of the scenes under the state's weights, on every host."""
        x = self.inputs
        dit = sample.dit_function(self.graphdef, state.trainable, state.frozen)
        latents = sample.euler_sample(dit, x["noise"], x["source_latents"], x["text_embeds"], x["text_embeds"],
                                      x["camera"], self.sigmas, guidance=1.0, intrinsics=x.get(LENS_KEY),
                                      step=sample.denoise_step)
        return np.asarray(multihost_utils.process_allgather(latents, tiled=True))

    def write(self, state, step: int, writer) -> float:
        """Renders the scenes, writes them (and at the first call the trajectory plots) with `writer`, and
        logs `sample_time_s`; returns that time. Every process renders; the writer's process writes."""
        jax.block_until_ready(state)  # the queued train steps are step time, not sample time
        started = time.perf_counter()
        generated = sample.to_uint8(self.decode(self.render(state)[:self.scenes]))
        if self.decoded is None:
            self.decoded = [sample.to_uint8(self.decode(self.shown[k])) for k in ("source_latents", "target_latents")]
            writer.write_images(step, {f"samples/scene{i}/trajectory": trajectory_plot.render(
                {f"scene {i} target camera": cameras.unreal_from_poses(camera)}) for i, camera in
                enumerate(self.shown["camera"])})
        source, target = self.decoded
        writer.write_images(step, {f"samples/scene{i}/source_generated_target": frame_strip([s, g, t])
                                   for i, (s, g, t) in enumerate(zip(source, generated, target))})
        writer.write_videos(step, {f"samples/scene{i}/video": np.concatenate([s, g, t], axis=2)
                                   for i, (s, g, t) in enumerate(zip(source, generated, target))}, GIF_FPS)
        seconds = time.perf_counter() - started
        writer.write(step, {"sample_time_s": seconds})
        return seconds
