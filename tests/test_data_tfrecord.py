"""TFRecord framing: round trip, index rebuild, and corruption named by shard and record."""

import os
import struct
import tracemalloc

import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

from data_pipeline import tfrecord
from data_pipeline.tfrecord import CorruptRecordError
from recam_jax import storage
from tests.conftest import REPO

LIMIT = 1 << 20


@pytest.fixture()
def shard(tmp_path):
    """A shard of 5 random records of different sizes; returns (path, records, offsets)."""
    rng = np.random.default_rng(0)
    records = [rng.bytes(int(n)) for n in rng.integers(1, 5000, 5)]
    path = str(tmp_path / "train-00000.tfrecord")
    with storage.atomic_open(path) as file:
        writer = tfrecord.Writer(file)
        for record in records:
            writer.write(record)
    return path, records, writer.offsets


def _read_all(path, offsets):
    return [tfrecord.read_record(path, offsets[i], offsets[i + 1], LIMIT, f"{path} record {i}") for i in range(len(offsets) - 1)]


def test_round_trip_and_index_rebuilt_from_the_framing(shard):
    path, records, offsets = shard
    assert _read_all(path, offsets) == records
    assert tfrecord.scan_offsets(path, LIMIT) == offsets


def _patch(path, position, data):
    with open(path, "r+b") as f:
        f.seek(position)
        f.write(data)


def test_flipped_data_byte_is_a_crc_error_naming_shard_and_record(shard):
    path, _, offsets = shard
    with open(path, "rb") as f:
        f.seek(offsets[3] + 20)
        byte = f.read(1)
    _patch(path, offsets[3] + 20, bytes([byte[0] ^ 0x01]))
    with pytest.raises(CorruptRecordError, match=r"train-00000.tfrecord record 3: data CRC mismatch"):
        _read_all(path, offsets)


def test_truncated_shard_is_named(shard):
    path, _, offsets = shard
    with open(path, "r+b") as f:
        f.truncate(offsets[-1] - 10)
    span = offsets[5] - offsets[4]
    with pytest.raises(CorruptRecordError, match=rf"train-00000.tfrecord record 4: truncated \({span - 10} of {span} bytes\)"):
        _read_all(path, offsets)
    with pytest.raises(CorruptRecordError, match=r"record 4: declared length"):
        tfrecord.scan_offsets(path, LIMIT)
    with open(path, "r+b") as f:
        f.truncate(offsets[4] + 5)
    with pytest.raises(CorruptRecordError, match=r"record 4: truncated header \(5 of 12 bytes\)"):
        tfrecord.scan_offsets(path, LIMIT)


def test_records_exactly_at_the_size_limit_are_read(shard):
    """The limits are inclusive: a record of max_record_bytes is read (at any offset) and scanned."""
    path, records, offsets = shard
    for i, record in enumerate(records):
        assert tfrecord.read_record(path, offsets[i], offsets[i + 1], len(record), f"record {i}") == record
    biggest = max(len(record) for record in records)
    assert tfrecord.scan_offsets(path, biggest) == offsets
    with pytest.raises(CorruptRecordError, match="past the limit"):
        tfrecord.scan_offsets(path, biggest - 1)


def test_hostile_length_field_is_rejected_before_allocating(shard):
    path, _, offsets = shard
    length = struct.pack("<Q", 1 << 60)
    _patch(path, offsets[2], length + struct.pack("<I", tfrecord.masked_crc(length)))  # a consistent header
    tracemalloc.start()
    with pytest.raises(CorruptRecordError, match=r"record 2: declared length 1152921504606846976"):
        tfrecord.scan_offsets(path, LIMIT)
    indexed = offsets[3] - offsets[2] - tfrecord.FRAMING_BYTES
    with pytest.raises(CorruptRecordError, match=rf"record 2: declared length {1 << 60} disagrees with the index \({indexed}\)"):
        _read_all(path, offsets)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < LIMIT


def test_length_field_with_the_top_bit_set_is_unsigned(shard):
    """A length is uint64: 2**64 - 1 is far past the limit, not -1 (which would step backwards)."""
    path, _, offsets = shard
    length = struct.pack("<Q", 2**64 - 1)
    _patch(path, offsets[2], length + struct.pack("<I", tfrecord.masked_crc(length)))
    with pytest.raises(CorruptRecordError, match=rf"record 2: declared length {2**64 - 1} is past the limit"):
        tfrecord.scan_offsets(path, LIMIT)


def test_corrupt_length_crc_is_named(shard):
    path, _, offsets = shard
    _patch(path, offsets[1] + 8, b"\x00\x00\x00\x00")
    with pytest.raises(CorruptRecordError, match=r"record 1: length CRC mismatch"):
        tfrecord.scan_offsets(path, LIMIT)
    with pytest.raises(CorruptRecordError, match=r"train-00000.tfrecord record 1: length CRC mismatch"):
        _read_all(path, offsets)


def test_oversized_index_span_is_refused_unread(shard):
    path, _, offsets = shard
    with pytest.raises(CorruptRecordError, match=rf"record 1: indexed size {1 << 40} exceeds the limit {LIMIT}"):
        tfrecord.read_record(path, offsets[1], offsets[1] + (1 << 40), LIMIT, f"{path} record 1")


def test_tensorflow_written_file_reads_back_and_our_writer_writes_the_same_bytes(tmp_path):
    """tests/golden/tensorflow_written.tfrecord was written by tf.io.TFRecordWriter (see the script
    next to it): our reader must accept TensorFlow's framing and CRCs, our writer reproduce them."""
    golden = os.path.join(REPO, "tests", "golden", "tensorflow_written.tfrecord")
    offsets = tfrecord.scan_offsets(golden, LIMIT)
    payloads = _read_all(golden, offsets)
    assert payloads[:3] == [b"", b"x", bytes(range(256)) * 5] and len(payloads) == 4
    example = tf_example_pb2.Example.FromString(payloads[3])  # TensorFlow's serialized tf.train.Example
    features = example.features.feature
    assert features["kind"].bytes_list.value == [b"camera"]
    assert features["latents_shape"].int64_list.value == [21, 60, 104, 16]
    assert features["focal_length_mm"].float_list.value == [24.0]

    ours = str(tmp_path / "ours.tfrecord")
    with storage.atomic_open(ours) as file:
        writer = tfrecord.Writer(file)
        for payload in payloads:
            writer.write(payload)
    with open(golden, "rb") as expected, open(ours, "rb") as written:
        assert written.read() == expected.read()
