"""TFRecord framing without TensorFlow: writing, an index of record offsets, checked random reads.

A TFRecord file is a sequence of records framed as

    length: uint64 little-endian | masked crc32c(length): uint32 | data | masked crc32c(data): uint32

(the format of tf.io.TFRecordWriter, so tf.data reads these shards too). Random access needs the
byte offset of every record: the writer returns them and `scan_offsets` rebuilds them from a file.
Every read checks the framing and both CRCs, and a length field is checked against the expected
record span and a size limit before any buffer is allocated for it.
"""

from __future__ import annotations

import struct

import google_crc32c

from recam_jax import storage

HEADER_BYTES = 12  # length (8) + its masked crc (4)
FOOTER_BYTES = 4  # masked crc of the data
FRAMING_BYTES = HEADER_BYTES + FOOTER_BYTES
_MASK_DELTA = 0xA282EAD8


class CorruptRecordError(ValueError):
    """A record that fails its framing or CRC checks: names the shard and the record index."""


def masked_crc(data: bytes) -> int:
    """TFRecord's masked crc32c: rotated and offset so a CRC of CRCs does not degenerate."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record's bytes as they appear in the file."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


class Writer:
    """Appends framed records to an open binary file (storage.atomic_open) and remembers where each starts."""

    def __init__(self, file):
        self._file = file
        self.offsets = [0]  # record i spans offsets[i]:offsets[i + 1]

    def write(self, data: bytes) -> None:
        self._file.write(frame(data))
        self.offsets.append(self.offsets[-1] + len(data) + FRAMING_BYTES)


def _parse_header(header: bytes, where: str) -> int:
    """The data length a record header declares, after checking its CRC."""
    if len(header) < HEADER_BYTES:
        raise CorruptRecordError(f"{where}: truncated header ({len(header)} of {HEADER_BYTES} bytes)")
    length_bytes, crc = header[:8], struct.unpack("<I", header[8:12])[0]
    if masked_crc(length_bytes) != crc:
        raise CorruptRecordError(f"{where}: length CRC mismatch")
    return struct.unpack("<Q", length_bytes)[0]


def scan_offsets(path: str, max_record_bytes: int) -> list[int]:
    """Record offsets of a shard (plus its end), read from the framing alone; checks every length."""
    offsets, size = [0], storage.size(path)
    with storage.open(path, "rb") as f:
        while offsets[-1] < size:
            where = f"{path} record {len(offsets) - 1}"
            length = _parse_header(f.read(HEADER_BYTES), where)
            if length > max_record_bytes or offsets[-1] + length + FRAMING_BYTES > size:
                raise CorruptRecordError(f"{where}: declared length {length} is past the limit or the file end")
            offsets.append(offsets[-1] + length + FRAMING_BYTES)
            f.seek(offsets[-1])
    return offsets


def read_record(path: str, start: int, end: int, max_record_bytes: int, where: str) -> bytes:
    """The data of the record spanning bytes [start, end) of a shard, size, framing and CRCs checked."""
    if end - start > max_record_bytes + FRAMING_BYTES:
        raise CorruptRecordError(f"{where}: indexed size {end - start} exceeds the limit {max_record_bytes}")
    span = storage.read_range(path, start, end)
    if len(span) != end - start:
        raise CorruptRecordError(f"{where}: truncated ({len(span)} of {end - start} bytes)")
    length = _parse_header(span[:HEADER_BYTES], where)
    if length != end - start - FRAMING_BYTES:
        raise CorruptRecordError(f"{where}: declared length {length} disagrees with the index ({end - start - FRAMING_BYTES})")
    data = span[HEADER_BYTES:-FOOTER_BYTES]
    if masked_crc(data) != struct.unpack("<I", span[-FOOTER_BYTES:])[0]:
        raise CorruptRecordError(f"{where}: data CRC mismatch")
    return data
