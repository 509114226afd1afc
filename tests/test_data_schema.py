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


def test_text_longer_than_the_manifest_allows_is_rejected():
    record = schema.scene_record("f18_aperture10/scene1", "x", np.zeros((14, 11)))
    with pytest.raises(CorruptRecordError, match=r"s record 0: text_shape \(14, 11\) is not \(1..13, 11\)"):
        schema.parse_scene(record, SHAPES, "s record 0")


def test_a_camera_record_is_not_a_scene_record():
    with pytest.raises(CorruptRecordError, match=r"'kind' is b'camera', expected b'scene'"):
        schema.parse_scene(_camera(), SHAPES, "s record 0")
