"""Cross-checks our TFRecord files against TensorFlow itself (needs `pip install tensorflow-cpu`,
which the project never requires; run it in a separate environment).

  python tests/golden/tensorflow_tfrecord.py write
      writes tests/golden/tensorflow_written.tfrecord with tf.io.TFRecordWriter: the reference bytes
      tests/test_data_tfrecord.py compares our writer and reader with (the test needs no TensorFlow).

  python tests/golden/tensorflow_tfrecord.py read SHARD_DIR
      reads every shard of a prepared dataset with tf.data and parses every record with
      tf.io.parse_single_example against the schema of data_pipeline/schema.py; prints the counts.
"""

import glob
import os
import sys

import tensorflow as tf

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tensorflow_written.tfrecord")

# The payloads, as tests/test_data_tfrecord.py expects them: framing edge cases, then an Example.
RAW_PAYLOADS = [b"", b"x", bytes(range(256)) * 5]
EXAMPLE_FEATURES = {"kind": [b"camera"], "latents_shape": [21, 60, 104, 16], "focal_length_mm": [24.0]}

SCENE_FEATURES = {
    "kind": tf.io.FixedLenFeature([], tf.string), "scene": tf.io.FixedLenFeature([], tf.string),
    "caption": tf.io.FixedLenFeature([], tf.string), "text_embeds": tf.io.FixedLenFeature([], tf.string),
    "text_shape": tf.io.FixedLenFeature([2], tf.int64),
}
CAMERA_FEATURES = {
    "kind": tf.io.FixedLenFeature([], tf.string), "scene": tf.io.FixedLenFeature([], tf.string),
    "camera": tf.io.FixedLenFeature([], tf.int64), "latents": tf.io.FixedLenFeature([], tf.string),
    "latents_shape": tf.io.FixedLenFeature([4], tf.int64), "extrinsics": tf.io.FixedLenFeature([], tf.string),
    "focal_length_mm": tf.io.FixedLenFeature([], tf.float32),
    "sensor_size_mm": tf.io.FixedLenFeature([2], tf.float32),
}


def reference_example() -> bytes:
    feature = {
        "kind": tf.train.Feature(bytes_list=tf.train.BytesList(value=EXAMPLE_FEATURES["kind"])),
        "latents_shape": tf.train.Feature(int64_list=tf.train.Int64List(value=EXAMPLE_FEATURES["latents_shape"])),
        "focal_length_mm": tf.train.Feature(float_list=tf.train.FloatList(value=EXAMPLE_FEATURES["focal_length_mm"])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_golden() -> None:
    with tf.io.TFRecordWriter(GOLDEN) as writer:
        for payload in [*RAW_PAYLOADS, reference_example()]:
            writer.write(payload)
    print(f"wrote {GOLDEN}")


def read_shards(shard_dir: str) -> None:
    paths = sorted(glob.glob(os.path.join(shard_dir, "*.tfrecord")))
    if not paths:
        raise SystemExit(f"no *.tfrecord in {shard_dir}")
    scenes = cameras = 0
    for record in tf.data.TFRecordDataset(paths):  # checks both CRCs of every record
        kind = tf.io.parse_single_example(record, {"kind": tf.io.FixedLenFeature([], tf.string)})["kind"]
        if kind.numpy() == b"scene":
            fields = tf.io.parse_single_example(record, SCENE_FEATURES)
            assert len(fields["text_embeds"].numpy()) == 2 * int(tf.reduce_prod(fields["text_shape"]))
            scenes += 1
        else:
            fields = tf.io.parse_single_example(record, CAMERA_FEATURES)
            assert len(fields["latents"].numpy()) == 2 * int(tf.reduce_prod(fields["latents_shape"]))
            cameras += 1
    print(f"tf.data read {len(paths)} shards: {scenes} scene records, {cameras} camera records, all parsed")


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"]:
        write_golden()
    elif sys.argv[1:2] == ["read"] and len(sys.argv) == 3:
        read_shards(sys.argv[2])
    else:
        raise SystemExit(__doc__)
