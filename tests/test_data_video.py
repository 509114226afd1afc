"""Video decoding: real mp4 shapes and range, the cover-resize + centre crop, short-video errors."""

import os

import numpy as np
import pytest

from data_pipeline import video

REAL_MP4 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "recammaster_examples", "videos", "4.mp4")


@pytest.mark.skipif(not os.path.exists(REAL_MP4), reason=f"real ReCamMaster example video absent: {REAL_MP4}")
def test_real_mp4_decodes_to_81_frames_in_range():
    frames = video.read_video(REAL_MP4, 81, 480, 832)  # a 1280x720 source: scaled to 853x480, then cropped
    assert frames.shape == (81, 480, 832, 3) and frames.dtype == np.float32
    assert frames.min() >= -1.0 and frames.max() <= 1.0
    assert frames.min() < -0.5 and frames.max() > 0.5  # real content, not a constant
    assert np.abs(frames[80] - frames[0]).mean() > 0.01  # frames advance


def test_resize_covers_the_target_and_crops_the_centre(tmp_path):
    frames = np.zeros((5, 48, 144, 3), np.uint8)  # black | white | black thirds
    frames[:, :, 48:96] = 255
    path = str(tmp_path / "thirds.mp4")
    video.write_video(path, frames)
    centre = video.read_video(path, 5, 32, 32)  # scale 2/3 -> 32x96, the middle 32 columns are white
    assert centre.shape == (5, 32, 32, 3)
    assert centre[:, :, 2:-2].min() > 0.8
    wide = video.read_video(path, 5, 24, 72)  # same aspect: the whole frame, scaled by 1/2
    assert wide[:, :, :20].max() < -0.8 and wide[:, :, 28:44].min() > 0.8


def test_short_video_is_an_error_naming_the_file(tmp_path):
    path = str(tmp_path / "short.mp4")
    video.write_video(path, np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(video.VideoError, match="short.mp4: has 3 frames, 5 needed"):
        video.read_video(path, 5, 16, 16)


def test_unreadable_video_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "truncated.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    with pytest.raises(video.VideoError, match="truncated.mp4"):
        video.read_video(str(path), 5, 16, 16)


def test_a_hung_ffmpeg_is_killed_after_its_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "_ffmpeg_command", lambda *args: ["sleep", "30"])  # a decoder that never finishes
    with pytest.raises(video.VideoError, match=r"hung.mp4: ffmpeg still decoding after 0.5 s"):
        video.read_frames(str(tmp_path / "hung.mp4"), 5, 16, 16, timeout_s=0.5)
