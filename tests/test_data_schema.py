"""Record decoding: a missing key, a wrong shape or a wrong kind is named, never decoded."""

import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

from data_pipeline import schema
from data_pipeline.tfrecord import CorruptRecordError

SHAPES = schema.Shapes(latent_shape=(3, 2, 5, 7), video_frames=9, text_dim=11, max_text_len=13)


def _camera(latents=None):
    latents = np.arange(3 * 2 * 5 * 7, dtype=np.float32).reshape(3, 2, 5, 7) if latents is None else latents
    return schema.camera_record("f18_aperture10/scene1", 4, latents, np.zeros((9, 4, 4)), 18.0, 23.76)


def _without(record, key):
    example = tf_example_pb2.Example()
    example.ParseFromString(record)
    del example.features.feature[key]
    return example.SerializeToString()


def test_camera_record_round_trips():
    record = schema.parse_camera(_camera(), SHAPES, "s record 1")
    assert record["camera"] == 4 and record["latents"].shape == (3, 2, 5, 7)
    np.testing.assert_array_equal(record["latents"].astype(np.float32), np.arange(210).reshape(3, 2, 5, 7))


@pytest.mark.parametrize("key", ["latents", "latents_shape", "extrinsics", "camera", "kind"])
def test_missing_key_is_named(key):
    with pytest.raises(CorruptRecordError, match=rf"s record 1: missing key '{key}'"):
        schema.parse_camera(_without(_camera(), key), SHAPES, "s record 1")


def test_wrong_shape_is_rejected():
    with pytest.raises(CorruptRecordError, match=r"s record 1: latents_shape \(3, 2, 5, 8\) != manifest"):
        schema.parse_camera(_camera(np.zeros((3, 2, 5, 8))), SHAPES, "s record 1")


def _scene(lengths=(2, 5), camera_text=(0, 0, 0, 1, 1, 1, 1, 1, 1, 1)):
    texts = [np.arange(n * 11, dtype=np.float32).reshape(n, 11) + i for i, n in enumerate(lengths)]
    return schema.scene_record("f18_aperture10/scene1", [f"text {i}" for i in range(len(lengths))], texts, list(camera_text))


def test_scene_record_round_trips_a_caption_per_camera():
    record = schema.parse_scene(_scene(), SHAPES, "s record 0")
    assert record["captions"] == ["text 0", "text 1"] and record["camera_text"] == (0, 0, 0, 1, 1, 1, 1, 1, 1, 1)
    np.testing.assert_array_equal(record["text_embeds"][1].astype(np.float32), np.arange(55).reshape(5, 11) + 1)
    assert record["text_embeds"][0].shape == (2, 11)


def test_a_scene_record_without_camera_text_gives_every_camera_its_one_caption():
    """Shards written before per-camera captions hold one caption and no camera_text: they still load."""
    record = schema.parse_scene(_without(_scene(lengths=(3,), camera_text=[0] * 10), "camera_text"), SHAPES, "s")
    assert record["captions"] == ["text 0"] and record["camera_text"] == (0,) * 10


@pytest.mark.parametrize("camera_text", [(0,) * 9, (0,) * 9 + (2,)])
def test_a_camera_text_index_that_names_no_caption_is_refused(camera_text):
    example = tf_example_pb2.Example()
    example.ParseFromString(_scene())
    del example.features.feature["camera_text"].int64_list.value[:]
    example.features.feature["camera_text"].int64_list.value.extend(camera_text)
    with pytest.raises(CorruptRecordError, match=r"s record 0: camera_text .* is not one caption index \(0..1\) per camera"):
        schema.parse_scene(example.SerializeToString(), SHAPES, "s record 0")


def test_captions_and_text_embeddings_that_do_not_pair_up_are_refused():
    example = tf_example_pb2.Example()
    example.ParseFromString(_scene())
    del example.features.feature["text_embeds"].bytes_list.value[1]
    with pytest.raises(CorruptRecordError, match=r"s record 0: 2 captions, 1 text_embeds .* do not pair up"):
        schema.parse_scene(example.SerializeToString(), SHAPES, "s record 0")


def test_text_longer_than_the_manifest_allows_is_rejected():
    with pytest.raises(CorruptRecordError, match=r"s record 0: text_shape \(14, 11\) is not \(1..13, 11\)"):
        schema.parse_scene(_scene(lengths=(2, 14)), SHAPES, "s record 0")


def test_writing_a_camera_text_that_names_no_caption_is_refused():
    with pytest.raises(ValueError, match=r"scene1 scene record: 2 captions, 2 text embeddings, camera_text"):
        _scene(camera_text=[0] * 9 + [2])


def test_a_camera_record_is_not_a_scene_record():
    with pytest.raises(CorruptRecordError, match=r"'kind' is b'camera', expected b'scene'"):
        schema.parse_scene(_camera(), SHAPES, "s record 0")
