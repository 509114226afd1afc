"""python -m data_pipeline.caption: a tiny random VLM captions demo scenes, resumably, for prepare to read."""

import csv
import os

import numpy as np
import pytest

from data_pipeline import caption, demo_data, multicam, prepare

FRAMES, SIZE, NUM_SCENES = 5, 16, 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multicam"))
    demo_data.write_dataset(root, NUM_SCENES, FRAMES, SIZE, SIZE)
    caption.write_tiny_vlm(os.path.join(root, "tiny_vlm"), demo_data.WORDS)
    return root


@pytest.fixture(scope="module")
def captioner(root):
    return caption.Captioner(os.path.join(root, "tiny_vlm"), max_new_tokens=4)


def _scene_ids(root):
    return [scene.scene_id for scene in multicam.find_scenes(os.path.join(root, "train"))]


class _Stub:
    """What SceneEncoder reads of its encoders (no encoding happens here)."""

    latent_channels, text_dim, max_len, identity = 4, 8, 16, "stub"

    def __call__(self, _):
        raise AssertionError("not called")


def test_cli_captions_every_scene_and_prepare_reads_them(root, tmp_path):
    output = str(tmp_path / "captions.csv")
    caption.main(["--input_root", root, "--model_dir", os.path.join(root, "tiny_vlm"), "--output", output,
                  "--clip_frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE), "--batch_size", "2",
                  "--max_new_tokens", "4"])  # fmt: skip
    with open(output, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file_name", "text"] and [row[0] for row in rows[1:]] == _scene_ids(root)
    assert all(row[1].strip() and set(row[1].split()) <= set(demo_data.WORDS) | {"USER:", "ASSISTANT:"} for row in rows[1:])
    config = prepare.PrepareConfig(root, str(tmp_path / "out"), captions=output, num_frames=FRAMES, height=SIZE, width=SIZE)
    encoder = prepare.SceneEncoder(config, _Stub(), _Stub(), multicam.load_captions(output))
    for scene, (_, text) in zip(multicam.find_scenes(os.path.join(root, "train")), rows[1:]):
        assert not encoder.uncaptioned(scene) and encoder.captions(scene) == ([text], [0] * 10)


class _Crashing:
    """Captions the first batch, then dies as a killed run would; counts the images it was given."""

    def __init__(self, captioner, batches_before_crash):
        self.captioner, self.left, self.images = captioner, batches_before_crash, 0

    def __call__(self, images):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        self.images += len(images)
        return self.captioner(images)


def test_a_killed_run_resumes_where_it_stopped(root, captioner, tmp_path):
    output = str(tmp_path / "captions.csv")
    settings = dict(clip_frames=FRAMES, height=SIZE, width=SIZE, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        caption.caption_scenes(root, output, _Crashing(captioner, 1), **settings)
    first = _scene_ids(root)[:2]
    assert set(multicam.load_captions(output)) == set(first)
    with open(output, "a") as f:
        f.write(f"{_scene_ids(root)[2]},a ball cir")  # the kill cut this row short
    rerun = _Crashing(captioner, 99)
    assert caption.caption_scenes(root, output, rerun, **settings) == {}
    assert rerun.images == 1  # only the scene the killed run had not written
    with open(output, newline="") as f:
        keys = [row[0] for row in list(csv.reader(f))[1:]]
    assert keys == _scene_ids(root)


def test_unreadable_video_is_reported_and_left_for_the_next_run(root, captioner, tmp_path):
    broken = tmp_path / "root"
    os.makedirs(broken / "train" / "f18_aperture10" / "scene1" / "videos")
    (broken / "train" / "f18_aperture10" / "scene1" / "videos" / "cam01.mp4").write_bytes(b"not a video")
    output = str(tmp_path / "captions.csv")
    failed = caption.caption_scenes(str(broken), output, captioner, clip_frames=FRAMES, height=SIZE, width=SIZE)
    assert list(failed) == ["f18_aperture10/scene1"] and "cam01.mp4" in failed["f18_aperture10/scene1"]
    assert multicam.load_captions(output) == {}


def test_frames_are_spread_over_the_clip_and_tiled(root):
    path = multicam.find_scenes(os.path.join(root, "train"))[0].video_path(1)
    clip = caption.sample_frames(path, FRAMES, FRAMES, SIZE, SIZE)
    picked = caption.sample_frames(path, FRAMES, 3, SIZE, SIZE)
    np.testing.assert_array_equal(picked, clip[[0, 2, 4]])
    grid = caption.tile(picked)
    assert grid.shape == (2 * SIZE, 2 * SIZE, 3)
    np.testing.assert_array_equal(grid[SIZE:, :SIZE], picked[2])
    assert not grid[SIZE:, SIZE:].any()
