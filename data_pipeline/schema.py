"""The two record kinds of a shard, as serialized tf.train.Example protos, and their checked decoding.

A shard holds whole scenes; each scene is 1 + 10 consecutive records:

  scene record (once per scene)
    kind            bytes   b"scene"
    scene           bytes   scene id, e.g. b"f18_aperture10/scene1"
    caption         bytes   the scene's distinct UTF-8 captions (one, or up to one per camera)
    text_embeds     bytes   per caption: bfloat16 little-endian, shape text_shape[i], real tokens only
    text_shape      int64   per caption [text_length, text_dim], 1 <= text_length <= max_text_len
    camera_text     int64   per camera 1..10, the index of its caption (absent: all use caption 0,
                            as records written before per-camera captions)

  camera record (cameras 1..10 in order)
    kind            bytes   b"camera"
    scene           bytes   scene id
    camera          int64   1..10
    latents         bytes   bfloat16 little-endian, shape latents_shape (frames, h, w, channels)
    latents_shape   int64   [latent_frames, height / 8, width / 8, channels]
    extrinsics      bytes   float64 little-endian, shape (video_frames, 4, 4): the Unreal matrices
                            of the JSON verbatim (see cameras.py for the convention)
    focal_length_mm float   lens focal length: one value, or one per video frame (a zoom)
    sensor_size_mm  float   sensor width and height

One record per camera (not per scene) because an example uses 2 of the 10 cameras: it reads the
two camera records and the scene's text record, about 1.0x the bytes it uses (a whole-scene record
would read 5x). An example is captioned with its target camera's caption, as the official training
(`data_tgt['prompt_emb']`); a scene captioned once stores that text once. Decoding checks every key,
type and shape against the manifest's `Shapes` before touching the payload, so a corrupt or hostile
record is rejected with its shard and index; arrays holding NaN or inf are refused both when a
record is written and when it is read.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

from data_pipeline.multicam import NUM_CAMERAS
from data_pipeline.tfrecord import CorruptRecordError

LATENT_DTYPE = np.dtype(ml_dtypes.bfloat16).newbyteorder("<")
TEXT_DTYPE = LATENT_DTYPE
EXTRINSICS_DTYPE = np.dtype("<f8")
RECORDS_PER_SCENE = 1 + NUM_CAMERAS  # the scene record, then cameras 1..10
_PROTO_SLACK_BYTES = 1 << 20  # keys, caption and protobuf framing on top of the arrays


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What every record of a dataset must hold; written to and read from the manifest."""

    latent_shape: tuple[int, int, int, int]  # (frames, height, width, channels)
    video_frames: int
    text_dim: int
    max_text_len: int

    def max_record_bytes(self) -> int:
        """An upper bound on a record's size: larger length fields are rejected unread."""
        latents = int(np.prod(self.latent_shape)) * LATENT_DTYPE.itemsize
        text = NUM_CAMERAS * self.max_text_len * self.text_dim * TEXT_DTYPE.itemsize  # a caption per camera
        return max(latents, text) + self.video_frames * 16 * EXTRINSICS_DTYPE.itemsize + _PROTO_SLACK_BYTES


def all_finite(array: np.ndarray) -> bool:
    """Whether every value is finite: one float64 sum (NaN and inf propagate through it), no mask."""
    return bool(np.isfinite(np.sum(array, dtype=np.float64)))


def _finite(array: np.ndarray, key: str, where: str) -> np.ndarray:
    """`array` as a record writes it; ValueError naming the record and key when it holds NaN or inf."""
    if not all_finite(array):
        raise ValueError(f"{where}: {key} holds NaN or inf; the record is not written")
    return array


def _set_bytes(example, key: str, value: bytes) -> None:
    example.features.feature[key].bytes_list.value.append(value)


def _set_ints(example, key: str, values) -> None:
    example.features.feature[key].int64_list.value.extend(int(v) for v in values)


def _set_floats(example, key: str, values) -> None:
    example.features.feature[key].float_list.value.extend(float(v) for v in values)


def scene_record(scene_id: str, captions: list[str], text_embeds: list[np.ndarray], camera_text: list[int]) -> bytes:
    """A serialized scene record: its distinct `captions`, their `text_embeds` (length, text_dim),
    stored as bfloat16, and per camera 1..10 the index of its caption."""
    if len(captions) != len(text_embeds) or len(camera_text) != NUM_CAMERAS or not set(camera_text) <= set(range(len(captions))):
        raise ValueError(f"{scene_id} scene record: {len(captions)} captions, {len(text_embeds)} text embeddings, "
                         f"camera_text {list(camera_text)} (one index per camera into the captions)")
    example = tf_example_pb2.Example()
    _set_bytes(example, "kind", b"scene")
    _set_bytes(example, "scene", scene_id.encode())
    for caption, embeds in zip(captions, text_embeds):
        embeds = _finite(np.asarray(embeds, TEXT_DTYPE), "text_embeds", f"{scene_id} scene record")
        _set_bytes(example, "caption", caption.encode())
        _set_bytes(example, "text_embeds", embeds.tobytes())
        _set_ints(example, "text_shape", embeds.shape)
    _set_ints(example, "camera_text", camera_text)
    return example.SerializeToString()


def camera_record(
    scene_id: str, camera: int, latents: np.ndarray, extrinsics: np.ndarray, focal_length_mm, sensor_size_mm: float
) -> bytes:
    """A serialized camera record; `latents` (frames, h, w, C) is stored as bfloat16, `focal_length_mm`
    (a number or one per video frame) as one value when it does not change."""
    focal = np.atleast_1d(np.asarray(focal_length_mm, np.float64))
    focal = focal[:1] if np.all(focal == focal[0]) else focal
    example = tf_example_pb2.Example()
    _set_bytes(example, "kind", b"camera")
    _set_bytes(example, "scene", scene_id.encode())
    _set_ints(example, "camera", [camera])
    where = f"{scene_id} cam{camera:02d}"
    _set_bytes(example, "latents", _finite(np.asarray(latents, LATENT_DTYPE), "latents", where).tobytes())
    _set_ints(example, "latents_shape", latents.shape)
    _set_bytes(example, "extrinsics", _finite(np.asarray(extrinsics, EXTRINSICS_DTYPE), "extrinsics", where).tobytes())
    _set_floats(example, "focal_length_mm", focal)
    _set_floats(example, "sensor_size_mm", [sensor_size_mm, sensor_size_mm])
    return example.SerializeToString()


class _Fields:
    """Typed access to an Example's features; a missing key or wrong type names the record."""

    def __init__(self, data: bytes, where: str):
        self.where = where
        example = tf_example_pb2.Example()
        try:
            example.ParseFromString(data)
        except Exception as e:  # protobuf raises its own DecodeError
            raise CorruptRecordError(f"{where}: not a tf.train.Example ({e})") from e
        self._features = example.features.feature

    def _get(self, key: str, kind: str):
        if key not in self._features or self._features[key].WhichOneof("kind") != kind:
            raise CorruptRecordError(f"{self.where}: missing key {key!r} (or not a {kind})")
        return self._features[key]

    def bytes(self, key: str) -> bytes:
        values = self.bytes_list(key)
        if len(values) != 1:
            raise CorruptRecordError(f"{self.where}: {key!r} holds {len(values)} values, 1 expected")
        return values[0]

    def bytes_list(self, key: str) -> list[bytes]:
        return list(self._get(key, "bytes_list").bytes_list.value)

    def has(self, key: str) -> bool:
        return key in self._features

    def ints(self, key: str) -> tuple[int, ...]:
        return tuple(self._get(key, "int64_list").int64_list.value)

    def int(self, key: str) -> int:
        values = self.ints(key)
        if len(values) != 1:
            raise CorruptRecordError(f"{self.where}: {key!r} holds {len(values)} values, 1 expected")
        return values[0]

    def floats(self, key: str) -> tuple[float, ...]:
        return tuple(self._get(key, "float_list").float_list.value)

    def array(self, key: str, shape: tuple[int, ...], dtype: np.dtype, raw: bytes | None = None) -> np.ndarray:
        """A bytes feature (or `raw`, one of its values) viewed as `shape` (no copy), after checking its
        size, and that it is finite."""
        raw = self.bytes(key) if raw is None else raw
        expected = int(np.prod(shape)) * dtype.itemsize
        if len(raw) != expected:
            raise CorruptRecordError(f"{self.where}: {key!r} has {len(raw)} bytes, shape {shape} needs {expected}")
        array = np.frombuffer(raw, dtype).reshape(shape)
        if not all_finite(array):
            raise CorruptRecordError(f"{self.where}: {key!r} holds NaN or inf")
        return array

    def expect(self, key: str, value: bytes) -> None:
        if self.bytes(key) != value:
            raise CorruptRecordError(f"{self.where}: {key!r} is {self.bytes(key)!r}, expected {value!r}")


def parse_scene(data: bytes, shapes: Shapes, where: str) -> dict:
    """A scene record's captions, their text embeddings ((length, text_dim) bfloat16, shapes checked)
    and per camera the index of its caption (`camera_text[camera - 1]`)."""
    fields = _Fields(data, where)
    fields.expect("kind", b"scene")
    captions, embeds, flat_shapes = fields.bytes_list("caption"), fields.bytes_list("text_embeds"), fields.ints("text_shape")
    text_shapes = [tuple(flat_shapes[i : i + 2]) for i in range(0, len(flat_shapes), 2)]
    if not 1 <= len(captions) <= NUM_CAMERAS or len(embeds) != len(captions) or len(flat_shapes) != 2 * len(captions):
        raise CorruptRecordError(f"{where}: {len(captions)} captions, {len(embeds)} text_embeds and text_shape "
                                 f"{flat_shapes} do not pair up (1..{NUM_CAMERAS} captions, 2 numbers per shape)")
    for text_shape in text_shapes:
        if not 1 <= text_shape[0] <= shapes.max_text_len or text_shape[1] != shapes.text_dim:
            raise CorruptRecordError(f"{where}: text_shape {text_shape} is not (1..{shapes.max_text_len}, {shapes.text_dim})")
    camera_text = fields.ints("camera_text") if fields.has("camera_text") else (0,) * NUM_CAMERAS
    if len(camera_text) != NUM_CAMERAS or not set(camera_text) <= set(range(len(captions))):
        raise CorruptRecordError(f"{where}: camera_text {list(camera_text)} is not one caption index "
                                 f"(0..{len(captions) - 1}) per camera")
    return {
        "scene": fields.bytes("scene").decode(),
        "captions": [caption.decode() for caption in captions],
        "text_embeds": [fields.array("text_embeds", shape, TEXT_DTYPE, raw) for shape, raw in zip(text_shapes, embeds)],
        "camera_text": camera_text,
    }


def parse_camera(data: bytes, shapes: Shapes, where: str) -> dict:
    """A camera record's latents (bfloat16), Unreal extrinsics (float64) and lens (focal length per
    video frame, sensor width and height, in mm), shapes checked."""
    fields = _Fields(data, where)
    fields.expect("kind", b"camera")
    if fields.ints("latents_shape") != tuple(shapes.latent_shape):
        raise CorruptRecordError(f"{where}: latents_shape {fields.ints('latents_shape')} != manifest {shapes.latent_shape}")
    focal, sensor = np.array(fields.floats("focal_length_mm")), np.array(fields.floats("sensor_size_mm"))
    if len(focal) not in (1, shapes.video_frames) or len(sensor) != 2 or not np.all(np.concatenate([focal, sensor]) > 0):
        raise CorruptRecordError(f"{where}: focal_length_mm {focal.tolist()} (1 or {shapes.video_frames} values) or "
                                 f"sensor_size_mm {sensor.tolist()} (2 values) is not positive lengths")
    return {
        "scene": fields.bytes("scene").decode(),
        "camera": fields.int("camera"),
        "latents": fields.array("latents", shapes.latent_shape, LATENT_DTYPE),
        "extrinsics": fields.array("extrinsics", (shapes.video_frames, 4, 4), EXTRINSICS_DTYPE),
        "focal_length_mm": np.broadcast_to(focal, (shapes.video_frames,)),
        "sensor_size_mm": tuple(sensor),
    }
