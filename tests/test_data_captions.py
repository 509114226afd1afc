"""Caption files (official per-video metadata, BOM, column names, clear errors) and camera JSON failures."""

import csv
import io
import json
import os

import pytest

from data_pipeline import demo_data, multicam, prepare

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "recammaster_examples")
OFFICIAL_METADATA = os.path.join(FIXTURES, "metadata.csv")
needs_fixtures = pytest.mark.skipif(not os.path.exists(OFFICIAL_METADATA), reason=f"official metadata.csv absent: {OFFICIAL_METADATA}")


def _write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


def _camera_json(tmp_path, value):
    path = tmp_path / "camera_extrinsics.json"
    path.write_text(json.dumps({"frame0": {"cam01": value}}))
    return str(path)


def test_camera_json_that_is_not_utf8_is_a_scene_error_naming_the_file(tmp_path):
    path = tmp_path / "camera_extrinsics.json"
    path.write_bytes('{"frame0": {"cam01": "[1 0 0 0] [0 1 0 0] [0 0 1 0] [0 0 0 1]", "note": "caméra"}}'.encode("latin-1"))
    with pytest.raises(multicam.SceneError, match="camera_extrinsics.json: cannot read camera JSON"):
        multicam.read_extrinsics(str(path), 1, camera_numbers=(1,))


@pytest.mark.parametrize("value", [None, 3.5, [[1, 0, 0, 0]]])
def test_matrix_that_is_not_a_string_is_a_scene_error_naming_the_key(tmp_path, value):
    with pytest.raises(multicam.SceneError, match="camera_extrinsics.json: missing or malformed frame0/cam01"):
        multicam.read_extrinsics(_camera_json(tmp_path, value), 1, camera_numbers=(1,))


@needs_fixtures
def test_official_per_video_metadata_gives_every_camera_its_own_caption(tmp_path):
    with open(OFFICIAL_METADATA, newline="") as f:
        official = f.read()
    texts = [row["text"] for row in csv.DictReader(official.splitlines())]
    # train_recammaster.py joins `file_name` to ROOT/train: one row per camera video. Same file, training keys.
    official = official.replace("\n4.mp4,", "\nf18_aperture10/scene1/videos/cam01.mp4,").replace("\n10.mp4,", "\nf18_aperture10/scene1/videos/cam02.mp4,")
    more = io.StringIO()
    csv.writer(more).writerows([*((f"f18_aperture10/scene1/videos/cam{c:02d}.mp4", texts[0]) for c in range(3, 11)),
                                ("train/f24_aperture5/scene7/videos/cam03.mp4", "seven")])  # fmt: skip
    path = _write(tmp_path, "metadata.csv", official.rstrip("\n") + "\n" + more.getvalue())
    captions = multicam.load_captions(path)
    assert captions["f18_aperture10/scene1"] == {1: texts[0], 2: texts[1], **{c: texts[0] for c in range(3, 11)}}
    assert captions["f24_aperture5/scene7"] == {3: "seven"}
    # The scene record keeps each distinct caption once, and per camera which one is its own;
    # a camera the file leaves out gets the lowest captioned camera's.
    assert multicam.camera_captions(captions["f18_aperture10/scene1"]) == ([texts[0], texts[1]], [0, 1] + [0] * 8)
    assert multicam.camera_captions(captions["f24_aperture5/scene7"]) == (["seven"], [0] * 10)


def test_a_video_row_wins_over_its_scene_row_in_any_order(tmp_path):
    path = _write(tmp_path, "c.csv", "file_name,text\nf18_aperture10/scene1/videos/cam04.mp4,four\nf18_aperture10/scene1,all\n")
    assert multicam.load_captions(path)["f18_aperture10/scene1"] == {**dict.fromkeys(multicam.CAMERAS, "all"), 4: "four"}


@needs_fixtures
def test_official_inference_metadata_names_no_scene_and_says_so():
    with pytest.raises(multicam.CaptionError, match=r"metadata.csv:2: key '4.mp4' names no scene"):
        multicam.load_captions(OFFICIAL_METADATA)


def test_csv_with_a_byte_order_mark_and_other_column_names(tmp_path):
    path = _write(tmp_path, "c.csv", " File_Name ,Caption\r\nf18_aperture10/scene1,\"a ball,\n rolls\"\r\n", "utf-8-sig")
    assert multicam.load_captions(path) == {"f18_aperture10/scene1": dict.fromkeys(multicam.CAMERAS, "a ball, rolls")}
    path = _write(tmp_path, "bom.csv", "file_name,text\nf18_aperture10/scene1,a ball\n", "utf-8-sig")
    assert multicam.load_captions(path)["f18_aperture10/scene1"][1] == "a ball"


@pytest.mark.parametrize("name, text, error", [
    ("c.csv", "scene_name,description\nf18_aperture10/scene1,a\n", r"c.csv: no column named one of \('file_name'.*\['scene_name', 'description'\]"),
    ("c.csv", "file_name,text\nf18_aperture10/scene1,a\nf18_aperture10/scene1,b\n", r"c.csv:3: 'f18_aperture10/scene1' captioned differently on line 2"),
    ("c.csv", "file_name,text\nf18_aperture10/scene1/videos/cam11.mp4,a\n", r"c.csv:2: key .*cam11.mp4' names no scene"),
    ("c.csv", "file_name,text\nf18_aperture10/scene1,  \n", r"c.csv:2: empty 'text'"),
    ("c.jsonl", '{"scene": "f18_aperture10/scene1", "text": "a"}\n{"scene": "f18_aperture10/scene2"\n', r"c.jsonl:2: not a JSON object"),
    ("c.jsonl", '{"scene": "f18_aperture10/scene1", "caption": 3}\n', r"c.jsonl:1: expected text in columns 'scene' and 'caption'"),
])  # fmt: skip
def test_bad_caption_files_are_refused_naming_file_line_and_key(tmp_path, name, text, error):
    with pytest.raises(multicam.CaptionError, match=error):
        multicam.load_captions(_write(tmp_path, name, text))


def test_jsonl_per_video_captions(tmp_path):
    rows = [{"video": "f50_aperture2.4/scene3/videos/cam10.mp4", "text": "ten"}, {"video": "f50_aperture2.4/scene3", "text": "x"}]
    path = _write(tmp_path, "c.jsonl", "\n".join(json.dumps(row) for row in rows))
    assert multicam.load_captions(path)["f50_aperture2.4/scene3"][10] == "ten"


def test_prepare_refuses_a_caption_file_that_names_none_of_the_scenes(tmp_path):
    os.makedirs(tmp_path / "train" / demo_data.FOCAL_FOLDERS[0] / "scene1")
    path = _write(tmp_path, "captions.csv", "file_name,text\nf24_aperture5/scene9/videos/cam01.mp4,a ball\n")
    config = prepare.PrepareConfig(str(tmp_path), str(tmp_path / "out"), captions=path)
    with pytest.raises(multicam.CaptionError, match="captions.csv: no key names a scene"):
        prepare.prepare(config, encode_video=None, encode_text=None)


def test_each_camera_gets_its_own_caption_or_else_the_lowest_captioned_cameras():
    assert multicam.camera_captions({2: "b", 5: "e", 9: "b"}) == (["b", "e"], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    assert multicam.camera_captions(dict.fromkeys(multicam.CAMERAS, "a")) == (["a"], [0] * 10)
