"""Pre-encode MultiCamVideo into TFRecord shards of VAE latents and umT5 caption embeddings.

    python -m data_pipeline.prepare --input_root=/data/MultiCamVideo-Dataset \
        --output_dir=/data/recam_shards --captions=/data/captions.csv \
        --text_encoder_dir=/models/umt5-xxl --video_encoder=wan2.1 --vae_path=/models/Wan2.1_VAE.pth \
        [--process_index=0 --process_count=1]

Every scene is validated and encoded alone: a broken scene is skipped with its reason (written to
the shard's index file and `prepare_report.json`), never crashing the run. Scenes are cut into
shards of `--scenes_per_shard`; process p of P writes shards p, p + P, ... Rerunning skips complete
shards; a killed run leaves only temporary files, which the loader never reads. Every path may
be a gs:// URL (recam_jax/storage.py). Held-out scenes
(`--num_val_scenes`, chosen by a hash of their id) go to `val-*` shards only. The last process to
finish writes `manifest.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np
import tqdm

from data_pipeline import multicam, schema, shards, tfrecord, video, video_encoder
from data_pipeline.multicam import CAMERAS, Scene, SceneError
from data_pipeline.video import VideoError
from recam_jax import storage

DEFAULT_CAPTION = "A video of a scene filmed by a moving camera."


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What to encode and how; every field is also a flag of the command line."""

    input_root: str
    output_dir: str
    captions: str | None = None  # CSV `file_name,text` or JSONL, keyed by scene id or camera video
    default_caption: str = DEFAULT_CAPTION  # for scenes the caption file misses (they are counted)
    num_frames: int = 81
    height: int = 480
    width: int = 832
    num_val_scenes: int = 16
    scenes_per_shard: int = 16
    encode_batch: int = 10  # cameras per video-encoder call; divides 10
    process_index: int = 0
    process_count: int = 1
    strict: bool = False  # raise on the first broken scene instead of skipping it


def split_scenes(scenes: list[Scene], num_val: int) -> dict[str, list[Scene]]:
    """Train and held-out scenes; held-out ones are picked by a hash of their id, stable across runs."""
    ranked = sorted(scenes, key=lambda scene: hashlib.sha256(scene.scene_id.encode()).hexdigest())
    held_out = {scene.scene_id for scene in ranked[:num_val]}
    return {
        "train": [scene for scene in scenes if scene.scene_id not in held_out],
        "val": [scene for scene in scenes if scene.scene_id in held_out],
    }


def shard_plan(split_to_scenes: dict[str, list[Scene]], per_shard: int) -> dict[str, list[list[Scene]]]:
    """The scenes of every shard of every split (the same on every process)."""
    return {
        split: [scenes[i : i + per_shard] for i in range(0, len(scenes), per_shard)]
        for split, scenes in split_to_scenes.items()
    }


class SceneEncoder:
    """Turns one scene into its 11 serialized records, or raises SceneError / VideoError."""

    def __init__(self, config: PrepareConfig, encode_video, encode_text, captions: dict[str, dict[int, str]]):
        if multicam.NUM_CAMERAS % config.encode_batch:
            raise ValueError(f"encode_batch={config.encode_batch} must divide {multicam.NUM_CAMERAS}")
        self.config = config
        self.encode_video = encode_video
        self.encode_text = functools.lru_cache(maxsize=4096)(encode_text)  # the default caption repeats
        self.captions = captions
        self.shapes = schema.Shapes(
            video_encoder.latent_shape(config.num_frames, config.height, config.width, encode_video.latent_channels),
            config.num_frames,
            encode_text.text_dim,
            encode_text.max_len,
        )

    def caption(self, scene: Scene) -> tuple[str, bool]:
        """The scene's caption and whether it is the default one."""
        if scene.scene_id in self.captions:
            return multicam.scene_caption(self.captions[scene.scene_id]), False
        return self.config.default_caption, True

    def latents(self, scene: Scene) -> np.ndarray:
        """Latents (10, frames, h, w, C) of the scene's cameras, in encoder batches."""
        c = self.config
        videos = np.stack([video.read_video(scene.video_path(cam), c.num_frames, c.height, c.width) for cam in CAMERAS])
        batches = range(0, len(videos), c.encode_batch)
        latents = np.concatenate([self.encode_video(videos[i : i + c.encode_batch]) for i in batches])
        if latents.shape[1:] != self.shapes.latent_shape:
            raise ValueError(f"video encoder returned {latents.shape[1:]}, expected {self.shapes.latent_shape}")
        return latents

    def __call__(self, scene: Scene) -> list[bytes]:
        extrinsics = multicam.validate_scene(scene, self.config.num_frames)
        latents = self.latents(scene)
        caption, _ = self.caption(scene)
        focal = multicam.read_focal_lengths(scene, self.config.num_frames)
        records = [schema.scene_record(scene.scene_id, caption, self.encode_text(caption))]
        for i, camera in enumerate(CAMERAS):
            lens = (focal[i], multicam.SENSOR_SIZE_MM)
            records.append(schema.camera_record(scene.scene_id, camera, latents[i], extrinsics[i], *lens))
        return records


def write_shard(directory: str, name: str, scenes: list[Scene], encode: SceneEncoder, progress) -> None:
    """Encodes and writes one shard (it appears whole, or not at all), then its index file."""
    written, skipped, defaulted = [], {}, []
    with storage.atomic_open(storage.join(directory, name)) as file:
        writer = tfrecord.Writer(file)
        for scene in scenes:
            try:
                records = encode(scene)
            except (SceneError, VideoError) as e:
                if encode.config.strict:
                    raise
                skipped[scene.scene_id] = str(e)
            else:
                for record in records:
                    writer.write(record)
                written.append(scene.scene_id)
                if encode.caption(scene)[1]:
                    defaulted.append(scene.scene_id)
            progress.update(1)
    index = {"scenes": written, "offsets": writer.offsets, "skipped": skipped, "default_caption": defaulted}
    shards.write_json_atomically(shards.index_path(directory, name), index)


def finish(config: PrepareConfig, plan: dict[str, list[list[Scene]]], encode: SceneEncoder, encoders: dict) -> bool:
    """Writes the manifest and the report once every shard of every split is complete."""
    names = {split: [shards.shard_name(split, k) for k in range(len(chunks))] for split, chunks in plan.items()}
    if not all(storage.exists(shards.index_path(config.output_dir, n)) for split in names.values() for n in split):
        return False
    settings = {"height": config.height, "width": config.width, "sensor_size_mm": multicam.SENSOR_SIZE_MM}
    shards.write_manifest(config.output_dir, encode.shapes, encoders, names, settings)
    report = {"skipped": {}, "default_caption": []}
    for name in (n for split in names.values() for n in split):
        index = shards.read_json(shards.index_path(config.output_dir, name))
        report["skipped"].update(index["skipped"])
        report["default_caption"].extend(index["default_caption"])
    shards.write_json_atomically(storage.join(config.output_dir, "prepare_report.json"), report)
    return True


def prepare(config: PrepareConfig, encode_video, encode_text) -> bool:
    """Writes this process's shards; returns whether the dataset is complete (manifest written)."""
    storage.makedirs(config.output_dir)
    captions = multicam.load_captions(config.captions) if config.captions else {}
    scenes = multicam.find_scenes(storage.join(config.input_root, "train"))
    if captions and not captions.keys() & {scene.scene_id for scene in scenes}:
        raise multicam.CaptionError(f"{config.captions}: no key names a scene under {config.input_root}/train")
    plan = shard_plan(split_scenes(scenes, config.num_val_scenes), config.scenes_per_shard)
    encode = SceneEncoder(config, encode_video, encode_text, captions)
    mine = [
        (split, k, chunk)
        for split, chunks in plan.items()
        for k, chunk in enumerate(chunks)
        if k % config.process_count == config.process_index
    ]
    with tqdm.tqdm(total=sum(len(chunk) for *_, chunk in mine), unit="scene", desc="prepare") as progress:
        for split, k, chunk in mine:
            name = shards.shard_name(split, k)
            if storage.exists(shards.index_path(config.output_dir, name)):
                progress.update(len(chunk))  # finished by an earlier run
                continue
            write_shard(config.output_dir, name, chunk, encode, progress)
    encoders = {"video": encode_video.identity, "text": encode_text.identity}
    return finish(config, plan, encode, encoders)


def main(argv) -> None:
    del argv
    from absl import flags

    from data_pipeline.text_encoder import TextEncoder

    values = {field.name: getattr(flags.FLAGS, field.name) for field in dataclasses.fields(PrepareConfig)}
    config = PrepareConfig(**values)
    encode_video = video_encoder.make_video_encoder(flags.FLAGS.video_encoder, flags.FLAGS.vae_path,
                                                    flags.FLAGS.vae_dtype)
    encode_text = TextEncoder(flags.FLAGS.text_encoder_dir, flags.FLAGS.max_text_len)
    complete = prepare(config, encode_video, encode_text)
    print(f"{config.output_dir}: {'complete, manifest written' if complete else 'waiting for other processes'}")


def _define_flags() -> None:
    """One flag per PrepareConfig field (same name, same default), plus the encoders."""
    from absl import flags

    for field in dataclasses.fields(PrepareConfig):
        default = None if field.default is dataclasses.MISSING else field.default
        define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer}.get(type(default), flags.DEFINE_string)
        define(field.name, default, f"PrepareConfig.{field.name}", required=field.default is dataclasses.MISSING)
    flags.DEFINE_string("video_encoder", "wan2.1", "VAE config: 'wan2.1' (needs --vae_path) or 'demo' (random weights)")
    flags.DEFINE_string("vae_path", None, "Wan2.1_VAE.pth or a diffusers AutoencoderKLWan file/folder")
    flags.DEFINE_string("vae_dtype", "float32", "VAE compute dtype (bfloat16 is faster on accelerators)")
    flags.DEFINE_string("text_encoder_dir", None, "local umT5 encoder + tokenizer directory", required=True)
    flags.DEFINE_integer("max_text_len", 512, "caption tokens kept (Wan: 512)")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
