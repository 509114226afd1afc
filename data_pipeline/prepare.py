"""Pre-encode MultiCamVideo into TFRecord shards of VAE latents and umT5 caption embeddings.

    python -m data_pipeline.prepare --input_root=/data/MultiCamVideo-Dataset \
        --output_dir=/data/recam_shards --captions=/data/captions.csv \
        --text_encoder_dir=/models/umt5-xxl --video_encoder=wan2.1 --vae_path=/models/Wan2.1_VAE.pth \
        [--process_index=0 --process_count=1] [--limit=N] [--validate_only] [--replan]

The first run writes the plan (plan.py: every scene with a fingerprint of its files, the split,
every shard's scenes, the encoders and settings); every later run and every other process checks
its own against it and stops, saying what changed, if they differ. Scenes are cut into shards of
`--scenes_per_shard`; process p of P writes shards p, p + P, ... A shard is complete when its index
file names the current plan: a rerun skips complete shards, and a killed run leaves only temporary
files, which the loader never reads. Held-out scenes (`--num_val_scenes`, chosen by a hash of their
id) go to `val-*` shards only.

Throughput: `--decode_workers` threads validate and decode (ffmpeg) the next scenes while the
video encoder, data parallel over the host's devices, encodes the current one.

Every scene is encoded alone: any failure skips the scene with its reason (naming the file) in the
shard's index file and `prepare_report.json`. The run fails (exit 1) when nothing was prepared or
more than `--max_skipped_fraction` of the scenes were skipped. The last process to finish writes
`manifest.json` and `prepare_report.json` (skips, entries outside the layout, every process's
throughput). Every path may be a gs:// URL (recam_jax/storage.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import time

import numpy as np
import tqdm

from data_pipeline import multicam, plan, schema, shards, tfrecord, video, video_encoder
from data_pipeline.multicam import CAMERAS, Scene, SceneError
from data_pipeline.video import VideoError
from recam_jax import storage

DEFAULT_CAPTION = "A video of a scene filmed by a moving camera."


class PrepareError(RuntimeError):
    """A run that must not pass for done: no scenes found, or too many of them skipped."""


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
    limit: int = 0  # when > 0, only the first `limit` scenes (by id): a trial run on a large root
    encode_batch: int = 10  # cameras per video-encoder call; divides 10
    decode_workers: int = 8  # ffmpeg processes decoding the next scenes while the current one encodes
    ffmpeg_timeout_s: float = video.FFMPEG_TIMEOUT_S  # a video still decoding after this fails its scene
    max_skipped_fraction: float = 0.05  # a run that skips more of its scenes than this fails
    process_index: int = 0
    process_count: int = 1
    plan_wait_s: float = 1800.0  # how long processes > 0 wait for process 0 to write the plan
    replan: bool = False  # make this run's plan the output's plan; shards made under the old one are rewritten
    validate_only: bool = False  # check the root (layout, files, camera JSON) and encode nothing
    strict: bool = False  # raise on the first broken scene instead of skipping it


def list_scenes(config: PrepareConfig) -> tuple[list[Scene], list[str]]:
    """The scenes to prepare (the first `limit` when set) and the entries outside the layout."""
    split_dir = storage.join(config.input_root, "train")
    scenes, unmatched = multicam.scan_split(split_dir)
    for entry in unmatched:
        print(f"not a scene, left out: {entry}")
    if not scenes:
        raise PrepareError(f"{split_dir}: no scene folders <f<mm>_...>/<scene> ({len(unmatched)} other entries)")
    return scenes[: config.limit or None], unmatched


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


def make_plan(config: PrepareConfig, scenes: list[Scene], encode_video, encode_text) -> dict:
    """This run's plan (plan.py): scene fingerprints, shard assignment, encoders and settings."""
    captions = hashlib.sha256(storage.read_bytes(config.captions)).hexdigest()[:16] if config.captions else None
    settings = {
        "num_frames": config.num_frames, "height": config.height, "width": config.width,
        "num_val_scenes": config.num_val_scenes, "scenes_per_shard": config.scenes_per_shard, "limit": config.limit,
        "default_caption": config.default_caption, "captions_sha256": captions,
        "sensor_size_mm": multicam.SENSOR_SIZE_MM,
        "video_encoder": encode_video.identity, "text_encoder": encode_text.identity,
    }  # fmt: skip
    assignment = shard_plan(split_scenes(scenes, config.num_val_scenes), config.scenes_per_shard)
    shard_ids = {split: [[scene.scene_id for scene in chunk] for chunk in chunks]
                 for split, chunks in assignment.items()}  # fmt: skip
    split_dir = storage.join(config.input_root, "train")
    return plan.make_plan(settings, plan.scene_fingerprints(split_dir, [scene.scene_id for scene in scenes]), shard_ids)


class SceneEncoder:
    """Turns one decoded scene into its 11 serialized records."""

    def __init__(self, config: PrepareConfig, encode_video, encode_text, captions: dict[str, dict[int, str]]):
        if multicam.NUM_CAMERAS % config.encode_batch:
            raise ValueError(f"encode_batch={config.encode_batch} must divide {multicam.NUM_CAMERAS}")
        self.config = config
        self.encode_video = encode_video
        self.encode_text = functools.lru_cache(maxsize=4096)(encode_text)  # the default caption repeats
        self.caption_file = captions
        self.shapes = schema.Shapes(
            video_encoder.latent_shape(config.num_frames, config.height, config.width, encode_video.latent_channels),
            config.num_frames,
            encode_text.text_dim,
            encode_text.max_len,
        )

    def uncaptioned(self, scene: Scene) -> bool:
        """Whether the caption file misses the scene (it gets the default caption)."""
        return scene.scene_id not in self.caption_file

    def captions(self, scene: Scene) -> tuple[list[str], list[int]]:
        """The scene's distinct captions and, per camera, the index of its caption."""
        if self.uncaptioned(scene):
            return [self.config.default_caption], [0] * multicam.NUM_CAMERAS
        return multicam.camera_captions(self.caption_file[scene.scene_id])

    def latents(self, videos: np.ndarray) -> np.ndarray:
        """Latents (10, frames, h, w, C) of a scene's uint8 videos (10, F, H, W, 3), in encoder batches."""
        batches = range(0, len(videos), self.config.encode_batch)
        latents = np.concatenate([self.encode_video(video.to_model_range(videos[i : i + self.config.encode_batch]))
                                  for i in batches])  # fmt: skip
        if latents.shape[1:] != self.shapes.latent_shape:
            raise ValueError(f"video encoder returned {latents.shape[1:]}, expected {self.shapes.latent_shape}")
        return latents

    def __call__(self, scene: Scene, extrinsics: np.ndarray, videos: np.ndarray) -> list[bytes]:
        latents = self.latents(videos)
        captions, camera_text = self.captions(scene)
        focal = multicam.read_focal_lengths(scene, self.config.num_frames)
        records = [schema.scene_record(scene.scene_id, captions, [self.encode_text(c) for c in captions], camera_text)]
        for i, camera in enumerate(CAMERAS):
            lens = (focal[i], multicam.SENSOR_SIZE_MM)
            records.append(schema.camera_record(scene.scene_id, camera, latents[i], extrinsics[i], *lens))
        return records


def decode_ahead(scenes, config: PrepareConfig):
    """Yields (scene, load) in order; `load()` returns the scene's (extrinsics, uint8 videos) or
    raises why it cannot be used. Worker threads validate and decode the next few scenes (one task
    per video; ffmpeg runs outside the GIL) while the caller encodes."""
    read = functools.partial(video.read_frames, num_frames=config.num_frames, height=config.height,
                             width=config.width, timeout_s=config.ffmpeg_timeout_s)  # fmt: skip
    ahead = 1 + -(-config.decode_workers // multicam.NUM_CAMERAS)  # scenes in flight: every worker busy
    pool = concurrent.futures.ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")

    def submit(scene):
        checked = pool.submit(multicam.validate_scene, scene, config.num_frames)
        videos = [pool.submit(read, scene.video_path(camera)) for camera in CAMERAS]
        return scene, lambda: (checked.result(), np.stack([v.result() for v in videos]))

    try:
        queue = collections.deque()
        for scene in scenes:
            queue.append(submit(scene))
            if len(queue) > ahead:
                yield queue.popleft()
        while queue:
            yield queue.popleft()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@dataclasses.dataclass
class Throughput:
    """Scenes and videos this process encoded, and where its time went."""

    scenes: int = 0
    decode_wait_s: float = 0.0  # waiting for the decoders: large next to encode_s means decode-bound
    encode_s: float = 0.0
    start: float = dataclasses.field(default_factory=time.monotonic)

    def summary(self) -> dict:
        seconds = time.monotonic() - self.start
        return {"scenes": self.scenes, "videos": self.scenes * multicam.NUM_CAMERAS, "seconds": round(seconds, 3),
                "scenes_per_s": self.scenes / seconds, "videos_per_s": self.scenes * multicam.NUM_CAMERAS / seconds,
                "decode_wait_s": round(self.decode_wait_s, 3), "encode_s": round(self.encode_s, 3)}  # fmt: skip


def failure_reason(scene: Scene, error: Exception) -> str:
    """Why a scene was skipped, naming the file: SceneError and VideoError name theirs, others get the scene folder."""
    if isinstance(error, SceneError | VideoError):
        return str(error)
    return f"{scene.path}: {type(error).__name__}: {error}"


def write_shard(directory: str, name: str, key: str, loads, encode: SceneEncoder, progress, throughput) -> dict:
    """Encodes and writes one shard (it appears whole, or not at all), then its index file; returns the index."""
    written, skipped, defaulted = [], {}, []
    with storage.atomic_open(storage.join(directory, name)) as file:
        writer = tfrecord.Writer(file)
        for scene, load in loads:
            try:
                waited = time.monotonic()
                extrinsics, videos = load()
                encoding = time.monotonic()
                records = encode(scene, extrinsics, videos)
                throughput.decode_wait_s += encoding - waited
                throughput.encode_s += time.monotonic() - encoding
            except Exception as e:  # noqa: BLE001 (whatever breaks one scene skips it, with the reason)
                if encode.config.strict:
                    raise
                skipped[scene.scene_id] = failure_reason(scene, e)
            else:
                for record in records:
                    writer.write(record)
                written.append(scene.scene_id)
                throughput.scenes += 1
                if encode.uncaptioned(scene):
                    defaulted.append(scene.scene_id)
            progress.update(1)
            progress.set_postfix(videos_per_s=f"{throughput.summary()['videos_per_s']:.2f}", skipped=len(skipped))
    index = {"shard_key": key, "scenes": written, "offsets": writer.offsets, "skipped": skipped,
             "default_caption": defaulted}  # fmt: skip
    shards.write_json_atomically(shards.index_path(directory, name), index)
    return index


def complete_index(directory: str, name: str, key: str) -> dict | None:
    """The shard's index if the shard was completed with the content `key` (plan.shard_key) names, else None."""
    path = shards.index_path(directory, name)
    index = shards.read_json(path) if storage.exists(path) else None
    return index if index is not None and index.get("shard_key") == key else None


def check_skipped(where: str, num_scenes: int, skipped: dict, max_fraction: float) -> None:
    """PrepareError when every scene, or more than `max_fraction` of them, was skipped."""
    if num_scenes and (len(skipped) == num_scenes or len(skipped) > max_fraction * num_scenes):
        reasons = "".join(f"\n  {scene}: {reason}" for scene, reason in list(skipped.items())[:5])
        raise PrepareError(f"{where}: {len(skipped)} of {num_scenes} scenes skipped, more than "
                           f"--max_skipped_fraction={max_fraction}; the first reasons:{reasons}")  # fmt: skip


def throughput_path(output_dir: str, process_index: int) -> str:
    return storage.join(output_dir, "throughput", f"process-{process_index:05d}.json")


def combined_throughput(config: PrepareConfig, plan_id: str) -> dict:
    """Every process's latest throughput under this plan and process count, and their sum (they run at once)."""
    found = [throughput_path(config.output_dir, i) for i in range(config.process_count)]
    processes = [shards.read_json(path) for path in found if storage.exists(path)]
    processes = [p for p in processes if p["plan"] == plan_id and p["process_count"] == config.process_count]
    return {"processes": processes, "scenes_per_s": sum(p["scenes_per_s"] for p in processes),
            "videos_per_s": sum(p["videos_per_s"] for p in processes)}  # fmt: skip


def finish(config: PrepareConfig, the_plan: dict, plan_id: str, encode: SceneEncoder,
           unmatched: list[str]) -> dict | None:  # fmt: skip
    """Once every shard of every split is complete under this plan: writes the manifest and the
    report, and returns the report (None while shards are missing)."""
    names = {split: [shards.shard_name(split, k) for k in range(len(chunks))]
             for split, chunks in the_plan["shards"].items()}  # fmt: skip
    indexes = [complete_index(config.output_dir, shards.shard_name(split, k), plan.shard_key(the_plan, split, k))
               for split, chunks in the_plan["shards"].items() for k in range(len(chunks))]  # fmt: skip
    if not all(indexes):
        return None
    encoders = {"video": the_plan["settings"]["video_encoder"], "text": the_plan["settings"]["text_encoder"]}
    settings = {"height": config.height, "width": config.width, "sensor_size_mm": multicam.SENSOR_SIZE_MM,
                "plan": plan_id}  # fmt: skip
    shards.write_manifest(config.output_dir, encode.shapes, encoders, names, settings)
    report = {"plan": plan_id, "num_scenes": len(the_plan["scenes"]), "skipped": {}, "default_caption": [],
              "unmatched": unmatched, "throughput": combined_throughput(config, plan_id)}  # fmt: skip
    for index in indexes:
        report["skipped"].update(index["skipped"])
        report["default_caption"].extend(index["default_caption"])
    shards.write_json_atomically(storage.join(config.output_dir, "prepare_report.json"), report)
    return report


def prepare(config: PrepareConfig, encode_video, encode_text) -> bool:
    """Writes this process's shards; returns whether the dataset is complete (manifest written).
    PlanError if the output was made under another plan, PrepareError if too many scenes failed."""
    scenes, unmatched = list_scenes(config)
    captions = multicam.load_captions(config.captions) if config.captions else {}
    if captions and not captions.keys() & {scene.scene_id for scene in scenes}:
        raise multicam.CaptionError(f"{config.captions}: no key names a scene under {config.input_root}/train")
    storage.makedirs(config.output_dir)
    the_plan = make_plan(config, scenes, encode_video, encode_text)
    plan_id = plan.agree(config.output_dir, the_plan, config.process_index, config.replan, config.plan_wait_s)
    by_id = {scene.scene_id: scene for scene in scenes}
    encode = SceneEncoder(config, encode_video, encode_text, captions)
    mine = [(shards.shard_name(split, k), plan.shard_key(the_plan, split, k), [by_id[scene_id] for scene_id in chunk])
            for split, chunks in the_plan["shards"].items() for k, chunk in enumerate(chunks)
            if k % config.process_count == config.process_index]  # fmt: skip
    indexes = {name: complete_index(config.output_dir, name, key) for name, key, _ in mine}  # None: still to write
    todo = [(name, key, chunk) for name, key, chunk in mine if indexes[name] is None]
    throughput = Throughput()
    desc = f"prepare {config.process_index}/{config.process_count}"
    pending = [scene for *_, chunk in todo for scene in chunk]
    with tqdm.tqdm(total=sum(len(chunk) for *_, chunk in mine), unit="scene", desc=desc) as progress, \
            contextlib.closing(decode_ahead(pending, config)) as loads:  # fmt: skip
        progress.update(progress.total - len(pending))  # shards done by an earlier run
        for name, key, chunk in todo:
            chunk_loads = itertools.islice(loads, len(chunk))  # decoding runs on into the next shard
            indexes[name] = write_shard(config.output_dir, name, key, chunk_loads, encode, progress, throughput)
    if todo:  # a rerun that finds its shards done keeps the record of the run that wrote them
        record = {"process": config.process_index, "process_count": config.process_count, "plan": plan_id,
                  **throughput.summary()}  # fmt: skip
        shards.write_json_atomically(throughput_path(config.output_dir, config.process_index), record)
        print(f"process {config.process_index}: {record['scenes']} scenes, {record['videos_per_s']:.2f} videos/s "
              f"({record['scenes_per_s']:.3f} scenes/s), waited {record['decode_wait_s']:.0f} s "
              "for decoding")  # fmt: skip
    report = finish(config, the_plan, plan_id, encode, unmatched)
    if report is not None:
        print(f"all processes: {report['throughput']['videos_per_s']:.2f} videos/s "
              f"({report['throughput']['scenes_per_s']:.3f} scenes/s)")  # fmt: skip
        check_skipped(config.output_dir, report["num_scenes"], report["skipped"], config.max_skipped_fraction)
    mine_skipped = {scene: reason for index in indexes.values() for scene, reason in index["skipped"].items()}
    check_skipped(f"process {config.process_index}", sum(len(chunk) for *_, chunk in mine), mine_skipped,
                  config.max_skipped_fraction)  # fmt: skip
    return report is not None


def validate(config: PrepareConfig) -> dict:
    """Checks every scene's layout, files and camera JSON (no decoding, no encoding, no output);
    returns {num_scenes, skipped, unmatched}, or PrepareError when too many scenes fail."""
    scenes, unmatched = list_scenes(config)

    def failure(scene):
        try:
            multicam.validate_scene(scene, config.num_frames)
        except Exception as e:  # noqa: BLE001 (reported per scene)
            return failure_reason(scene, e)

    with concurrent.futures.ThreadPoolExecutor(config.decode_workers) as pool:
        failures = list(tqdm.tqdm(pool.map(failure, scenes), total=len(scenes), unit="scene", desc="validate"))
    skipped = {scene.scene_id: reason for scene, reason in zip(scenes, failures) if reason}
    for scene_id, reason in skipped.items():
        print(f"invalid scene {scene_id}: {reason}")
    check_skipped(config.input_root, len(scenes), skipped, config.max_skipped_fraction)
    return {"num_scenes": len(scenes), "skipped": skipped, "unmatched": unmatched}


def main(argv) -> None:
    del argv
    from absl import flags

    values = {field.name: getattr(flags.FLAGS, field.name) for field in dataclasses.fields(PrepareConfig)}
    config = PrepareConfig(**values)
    try:
        if config.validate_only:
            report = validate(config)
            print(f"{config.input_root}: {report['num_scenes'] - len(report['skipped'])} of {report['num_scenes']} "
                  f"scenes valid, {len(report['unmatched'])} entries outside the layout")  # fmt: skip
            return
        if not flags.FLAGS.text_encoder_dir:
            raise PrepareError("--text_encoder_dir is needed (unless --validate_only)")
        import jax  # not imported by --validate_only, which encodes nothing

        from data_pipeline.text_encoder import TextEncoder

        encode_video = video_encoder.make_video_encoder(flags.FLAGS.video_encoder, flags.FLAGS.vae_path,
                                                        flags.FLAGS.vae_dtype, devices=jax.local_devices())  # fmt: skip
        encode_text = TextEncoder(flags.FLAGS.text_encoder_dir, flags.FLAGS.max_text_len)
        complete = prepare(config, encode_video, encode_text)
    except (PrepareError, plan.PlanError, multicam.SceneError, multicam.CaptionError) as e:
        raise SystemExit(f"prepare failed: {e}") from e
    print(f"{config.output_dir}: {'complete, manifest written' if complete else 'waiting for other processes'}")


def _define_flags() -> None:
    """One flag per PrepareConfig field (same name, same default), plus the encoders."""
    from absl import flags

    for field in dataclasses.fields(PrepareConfig):
        default = None if field.default is dataclasses.MISSING else field.default
        defines = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}
        define = defines.get(type(default), flags.DEFINE_string)
        define(field.name, default, f"PrepareConfig.{field.name}", required=field.default is dataclasses.MISSING)
    flags.DEFINE_string("video_encoder", "wan2.1", "VAE config: 'wan2.1' (needs --vae_path) or 'demo' (random weights)")
    flags.DEFINE_string("vae_path", None, "Wan2.1_VAE.pth or a diffusers AutoencoderKLWan file/folder")
    flags.DEFINE_string("vae_dtype", "float32", "VAE compute dtype (bfloat16 is faster on accelerators)")
    flags.DEFINE_string("text_encoder_dir", None, "local umT5 encoder + tokenizer folder (not for --validate_only)")
    flags.DEFINE_integer("max_text_len", 512, "caption tokens kept (Wan: 512)")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
