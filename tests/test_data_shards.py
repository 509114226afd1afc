"""Shard index files: checked against the manifest's scene count before any record is read."""

import json

import pytest

from data_pipeline import shards
from data_pipeline.schema import RECORDS_PER_SCENE
from data_pipeline.tfrecord import FRAMING_BYTES

NAME = "train-00003.tfrecord"


def _index(tmp_path, scenes, offsets=None):
    """An index file of `scenes` (None: no such key) whose records are all empty (just their framing)
    unless `offsets` says."""
    count = len(scenes or ()) * RECORDS_PER_SCENE + 1
    offsets = [k * FRAMING_BYTES for k in range(count)] if offsets is None else offsets
    index = {"offsets": offsets, "skipped": {}, "default_caption": []}
    if scenes is not None:
        index["scenes"] = list(scenes)
    with open(shards.index_path(str(tmp_path), NAME), "w") as f:
        json.dump(index, f)
    return offsets


def test_an_index_of_empty_records_is_valid(tmp_path):
    offsets = _index(tmp_path, scenes=("a/1", "a/2"))
    assert shards.read_index(str(tmp_path), NAME, 2)["offsets"] == offsets


def _steps(*steps):
    """Offsets of one scene whose records are FRAMING_BYTES long, but for the first few `steps`."""
    lengths = [*steps, *[FRAMING_BYTES] * (RECORDS_PER_SCENE - len(steps))]
    return [sum(lengths[:k]) for k in range(RECORDS_PER_SCENE + 1)]


@pytest.mark.parametrize("scenes, offsets, error", [
    (None, None, r"train-00003.index.json: no scenes, the manifest says 1"),
    (("a/1", "a/2"), None, r"train-00003.index.json: 2 scenes, the manifest says 1"),
    (("a/1",), [0, 16], r"train-00003.index.json: 'offsets' must be 12 integers \(1 scenes x 11 records \+ the end\)"),
    (("a/1",), [k * 20 + 7 for k in range(12)], r"train-00003.index.json: offsets\[0\] is 7, not 0"),
    (("a/1",), _steps(0), r"offsets\[1\] = 0 is not past offsets\[0\] = 0 by a record's framing \(16 bytes\)"),
    (("a/1",), _steps(16, 40, 8), r"offsets\[3\] = 64 is not past offsets\[2\] = 56 by a record's framing"),
])  # fmt: skip
def test_a_broken_index_is_refused_naming_the_file_and_offsets(tmp_path, scenes, offsets, error):
    _index(tmp_path, scenes, offsets)
    with pytest.raises(ValueError, match=error):
        shards.read_index(str(tmp_path), NAME, 1)
