"""prepare: broken scenes skipped with reasons, held-out split, bit-exact records, resumable runs,
the plan every run and host checks, failing runs, decoding ahead of a data-parallel encoder."""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipeline import demo_data, loader, multicam, plan, prepare, schema, shards, tfrecord, text_encoder, video, video_encoder

FRAMES, HEIGHT, WIDTH = 9, 16, 24
NUM_SCENES = 8


class CountingEncoder:
    """The demo VAE, counting its calls so a rerun can be shown to encode nothing."""

    calls = 0

    def __init__(self):
        self.vae = video_encoder.make_video_encoder("demo")
        self.latent_channels, self.identity = self.vae.latent_channels, self.vae.identity

    def __call__(self, video):
        CountingEncoder.calls += 1
        return self.vae(video)


class ZeroEncoder:
    """A video encoder giving zero latents at once (tests of the run, not of the VAE); call
    `fail_on_call` raises as a device error would."""

    latent_channels, identity = 4, "zeros"

    def __init__(self, fail_on_call=None):
        self.calls, self.fail_on_call = 0, fail_on_call

    def __call__(self, videos):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("device out of memory")
        return np.zeros((len(videos), *video_encoder.latent_shape(*videos.shape[1:4], self.latent_channels)), np.float32)


class StubText:
    text_dim, max_len, identity = 8, 16, "stub text"

    def __call__(self, caption):
        return np.zeros((3, self.text_dim), np.float32)


def _break_scenes(root):
    """Three scenes broken the ways the released archives are: a missing video, partial JSON, a short video."""
    scenes = {s.scene_id: s for s in multicam.find_scenes(os.path.join(root, "train"))}
    os.remove(scenes["f18_aperture10/scene5"].video_path(7))
    path = scenes["f24_aperture5/scene2"].extrinsics_path
    data = json.load(open(path))
    del data[f"frame{FRAMES - 1}"]["cam04"]
    json.dump(data, open(path, "w"))
    video.write_video(scenes["f35_aperture2.4/scene3"].video_path(2), np.zeros((FRAMES - 2, HEIGHT, WIDTH, 3), np.uint8))
    return {"f18_aperture10/scene5": "cam07.mp4: missing", "f24_aperture5/scene2": "frame8/cam04", "f35_aperture2.4/scene3": "cam02.mp4: has 7 frames"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multicam"))
    demo_data.write_dataset(root, NUM_SCENES, FRAMES, HEIGHT, WIDTH)
    text_dir = os.path.join(root, "tiny_umt5")
    text_encoder.write_tiny_umt5(text_dir, demo_data.WORDS)
    reasons = _break_scenes(root)
    config = prepare.PrepareConfig(root, os.path.join(root, "out"), captions=os.path.join(root, "captions.csv"),
                                   num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_val_scenes=2, scenes_per_shard=2,
                                   max_skipped_fraction=0.6)  # fmt: skip
    encoders = (CountingEncoder(), text_encoder.TextEncoder(text_dir))
    assert prepare.prepare(config, *encoders)
    return config, encoders, reasons


def _index(config, name):
    return shards.read_json(shards.index_path(config.output_dir, name))


def test_broken_scenes_are_skipped_with_their_reason(dataset):
    config, _, reasons = dataset
    report = shards.read_json(os.path.join(config.output_dir, "prepare_report.json"))
    assert set(report["skipped"]) == set(reasons)
    for scene_id, reason in reasons.items():
        assert reason in report["skipped"][scene_id]
    manifest = shards.read_json(os.path.join(config.output_dir, shards.MANIFEST))
    counts = {split: manifest["splits"][split]["num_scenes"] for split in ("train", "val")}
    assert counts["train"] + counts["val"] == NUM_SCENES - len(reasons)
    assert sum(manifest["splits"][s]["num_skipped"] for s in ("train", "val")) == len(reasons)


def test_held_out_scenes_never_reach_train_shards(dataset):
    config, _, _ = dataset
    manifest = shards.read_json(os.path.join(config.output_dir, shards.MANIFEST))
    scenes = {split: {s for shard in manifest["splits"][split]["shards"] for s in _index(config, shard["file"])["scenes"]} for split in ("train", "val")}
    expected_val = {s.scene_id for s in prepare.split_scenes(multicam.find_scenes(os.path.join(config.input_root, "train")), 2)["val"]}
    assert not scenes["train"] & expected_val
    assert scenes["val"] == expected_val - set(shards.read_json(os.path.join(config.output_dir, "prepare_report.json"))["skipped"])


def test_default_captions_are_counted(dataset):
    config, _, _ = dataset
    captions = multicam.load_captions(config.captions)
    report = shards.read_json(os.path.join(config.output_dir, "prepare_report.json"))
    written = [s.scene_id for s in multicam.find_scenes(os.path.join(config.input_root, "train")) if s.scene_id not in report["skipped"]]
    assert sorted(report["default_caption"]) == sorted(s for s in written if s not in captions)
    assert report["default_caption"]  # the demo leaves every fourth scene uncaptioned


def test_records_round_trip_bit_for_bit(dataset):
    config, (encode_video, encode_text), _ = dataset
    manifest = shards.read_json(os.path.join(config.output_dir, shards.MANIFEST))
    shapes = shards.read_shapes(manifest)
    name = manifest["splits"]["train"]["shards"][0]["file"]
    scene_id = _index(config, name)["scenes"][0]
    scene = next(s for s in multicam.find_scenes(os.path.join(config.input_root, "train")) if s.scene_id == scene_id)
    encoder = prepare.SceneEncoder(config, encode_video, encode_text, multicam.load_captions(config.captions))
    path = os.path.join(config.output_dir, name)
    offsets = tfrecord.scan_offsets(path, shapes.max_record_bytes())
    assert offsets == _index(config, name)["offsets"]
    records = [tfrecord.read_record(path, offsets[i], offsets[i + 1], shapes.max_record_bytes(), name) for i in range(11)]
    text = schema.parse_scene(records[0], shapes, name)
    captions, camera_text = encoder.captions(scene)
    assert text["captions"] == captions and text["camera_text"] == tuple(camera_text)
    for embeds, caption in zip(text["text_embeds"], captions, strict=True):
        expected_text = encode_text(caption).astype(schema.TEXT_DTYPE)
        assert embeds.tobytes() == expected_text.tobytes() and len(expected_text) < shapes.max_text_len
    videos = np.stack([video.read_frames(scene.video_path(camera), FRAMES, HEIGHT, WIDTH) for camera in multicam.CAMERAS])
    latents = encoder.latents(videos).astype(schema.LATENT_DTYPE)
    extrinsics = multicam.read_extrinsics(scene.extrinsics_path, FRAMES)
    for camera in multicam.CAMERAS:
        record = schema.parse_camera(records[camera], shapes, name)
        assert record["latents"].tobytes() == latents[camera - 1].tobytes()
        assert record["extrinsics"].tobytes() == extrinsics[camera - 1].tobytes()
        np.testing.assert_array_equal(record["focal_length_mm"], np.full(FRAMES, scene.focal_length_mm))
        np.testing.assert_allclose(record["sensor_size_mm"], [multicam.SENSOR_SIZE_MM] * 2, rtol=1e-6)


def test_rerun_encodes_nothing_and_ignores_a_killed_runs_leftovers(dataset, tmp_path):
    config, (encode_video, encode_text), _ = dataset
    out = str(tmp_path / "out")
    shutil.copytree(config.output_dir, out)
    os.remove(os.path.join(out, shards.MANIFEST))
    os.remove(shards.index_path(out, "train-00001.tfrecord"))  # as if killed after the rename
    with open(os.path.join(out, ".train-00002.tfrecord.tmp-999"), "wb") as f:
        f.write(b"half a shard")  # as if killed mid-shard
    before = CountingEncoder.calls
    rerun = prepare.PrepareConfig(**{**config.__dict__, "output_dir": out})
    assert prepare.prepare(rerun, encode_video, encode_text)
    assert CountingEncoder.calls - before == len(_index(config, "train-00001.tfrecord")["scenes"])  # 1 call per scene
    for name in ("train-00001.tfrecord", "train-00002.tfrecord"):
        with open(os.path.join(out, name), "rb") as new, open(os.path.join(config.output_dir, name), "rb") as old:
            assert new.read() == old.read()


def test_processes_write_disjoint_shards_and_the_last_writes_the_manifest(dataset, tmp_path):
    config, (encode_video, encode_text), _ = dataset
    written = []
    for index in (0, 1):
        part = prepare.PrepareConfig(**{**config.__dict__, "output_dir": str(tmp_path), "process_index": index, "process_count": 2})
        before = set(os.listdir(tmp_path))
        complete = prepare.prepare(part, encode_video, encode_text)
        assert complete == (index == 1)
        written.append({n for n in set(os.listdir(tmp_path)) - before if n.endswith(".tfrecord")})
    assert written[0] and written[1] and not written[0] & written[1]
    assert written[0] | written[1] == {n for n in os.listdir(config.output_dir) if n.endswith(".tfrecord")}
    same = shards.read_json(os.path.join(config.output_dir, shards.MANIFEST))
    assert shards.read_json(str(tmp_path / shards.MANIFEST))["splits"] == same["splits"]
    throughput = shards.read_json(str(tmp_path / "prepare_report.json"))["throughput"]
    assert [p["process"] for p in throughput["processes"]] == [0, 1]
    for process, names in zip(throughput["processes"], written):
        encoded = sum(len(_index(part, name)["scenes"]) for name in names)
        assert (process["scenes"], process["videos"]) == (encoded, 10 * encoded) and process["videos_per_s"] > 0
    assert throughput["videos_per_s"] == pytest.approx(sum(p["videos_per_s"] for p in throughput["processes"]))


def test_strict_mode_raises_on_the_first_broken_scene(dataset, tmp_path):
    config, (encode_video, encode_text), _ = dataset
    strict = prepare.PrepareConfig(**{**config.__dict__, "output_dir": str(tmp_path), "strict": True})
    with pytest.raises(ValueError, match="scene"):
        prepare.prepare(strict, encode_video, encode_text)


def _copy(config, tmp_path):
    """A copy of the dataset's root and of its prepared output, to change without touching the fixture."""
    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    shutil.copytree(os.path.join(config.input_root, "train"), os.path.join(root, "train"))
    shutil.copytree(config.output_dir, out)
    return root, out


def test_a_changed_scene_set_is_refused_and_replan_rewrites_only_the_shards_it_changes(dataset, tmp_path):
    config, (encode_video, encode_text), reasons = dataset
    root, out = _copy(config, tmp_path)
    shutil.copytree(os.path.join(root, "train", "f50_aperture2.4", "scene4"), os.path.join(root, "train", "f50_aperture2.4", "scene10"))
    rerun = dataclasses.replace(config, input_root=root, output_dir=out)
    with pytest.raises(plan.PlanError, match=r"plan.json: this run makes a different plan.*\n  1 scene\(s\) added: f50_aperture2.4/scene10\n"):
        prepare.prepare(rerun, encode_video, encode_text)
    old = shards.read_json(os.path.join(out, plan.PLAN))
    before = CountingEncoder.calls
    assert prepare.prepare(dataclasses.replace(rerun, replan=True), encode_video, encode_text)
    new = shards.read_json(os.path.join(out, plan.PLAN))
    keys = {(split, k): plan.shard_key(new, split, k) for split, chunks in new["shards"].items() for k in range(len(chunks))}
    changed = [where for where, key in keys.items() if where[1] >= len(old["shards"][where[0]]) or plan.shard_key(old, *where) != key]
    assert 0 < len(changed) < len(keys)  # the new scene's shard is rewritten, the others are kept
    rewritten = [s for split, k in changed for s in new["shards"][split][k] if s not in reasons]
    assert CountingEncoder.calls - before == len(rewritten)  # one encoder call per scene (encode_batch = 10)
    manifest = shards.read_json(os.path.join(out, shards.MANIFEST))
    prepared = {s for split in manifest["splits"].values() for shard in split["shards"] for s in _index(rerun, shard["file"])["scenes"]}
    assert prepared == set(new["scenes"]) - set(reasons) and "f50_aperture2.4/scene10" in prepared


def test_a_changed_encoder_frame_size_or_limit_is_refused_naming_it(dataset, tmp_path):
    config, (encode_video, encode_text), _ = dataset
    _, out = _copy(config, tmp_path)
    for change, encoders, message in [
        ({"height": 24}, (encode_video, encode_text), r"\n  height: 16 -> 24\n"),
        ({}, (ZeroEncoder(), encode_text), r"\n  video_encoder: 'wan_vae\(demo, random weights seed 0, float32\)' -> 'zeros'\n"),
        ({"limit": 3}, (encode_video, encode_text), r"\n  limit: 0 -> 3\n  5 scene\(s\) missing: f24_aperture5/scene6, f35_aperture2.4"),
    ]:  # fmt: skip
        with pytest.raises(plan.PlanError, match=message):
            prepare.prepare(dataclasses.replace(config, output_dir=out, **change), *encoders)
    assert shards.read_json(os.path.join(out, shards.MANIFEST)) == shards.read_json(os.path.join(config.output_dir, shards.MANIFEST))


def test_a_host_whose_listing_differs_is_refused_naming_the_scenes(dataset, tmp_path):
    config, (encode_video, encode_text), _ = dataset
    root, out = _copy(config, tmp_path)
    shutil.rmtree(os.path.join(root, "train", "f18_aperture10", "scene1"))  # not yet extracted on this host
    with open(os.path.join(root, "train", "f24_aperture5", "scene6", "videos", "cam03.mp4"), "r+b") as f:
        f.truncate(100)  # cut short
    host = dataclasses.replace(config, input_root=root, output_dir=out, process_index=1, process_count=2)
    with pytest.raises(plan.PlanError, match=r"process 1 makes a different plan.*\n  1 scene\(s\) missing: f18_aperture10/scene1\n"
                                             r"  1 scene\(s\) changed \(file names or sizes\): f24_aperture5/scene6\n"):
        prepare.prepare(host, encode_video, encode_text)


def test_processes_wait_for_process_0_to_write_the_plan(tmp_path):
    the_plan = plan.make_plan({"height": 16}, {"f18_aperture10/scene1": "ab12"}, {"train": [["f18_aperture10/scene1"]], "val": []})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(plan.agree, str(tmp_path), the_plan, 1, False, 60, 0.02)
        time.sleep(0.3)
        assert not waiting.done()  # no plan yet
        assert plan.agree(str(tmp_path), the_plan, 0, False, 0) == waiting.result(timeout=60)
    other = {**the_plan, "settings": {"height": 32}}
    with pytest.raises(plan.PlanError, match="(?s)process 2 makes a different plan.*height: 16 -> 32"):
        plan.agree(str(tmp_path), other, 2, False, 60)
    with pytest.raises(plan.PlanError, match="process 0 wrote no plan within 0 s"):
        plan.agree(str(tmp_path / "empty"), the_plan, 1, False, 0.1, 0.02)


def test_any_failure_skips_only_its_scene_with_the_reason_and_file(dataset, tmp_path):
    config, _, reasons = dataset
    root, _ = _copy(config, tmp_path)
    json_path = os.path.join(root, "train", "f50_aperture2.4", "scene4", "cameras", "camera_extrinsics.json")
    with open(json_path, "rb") as f:
        data = f.read()
    with open(json_path, "wb") as f:
        f.write(data.replace(b"{", b'{"note": "cam\xe9ra",', 1))  # latin-1, not UTF-8
    run = dataclasses.replace(config, input_root=root, output_dir=str(tmp_path / "new"), max_skipped_fraction=0.9)
    assert prepare.prepare(run, ZeroEncoder(fail_on_call=1), StubText())
    skipped = shards.read_json(os.path.join(run.output_dir, "prepare_report.json"))["skipped"]
    the_plan = shards.read_json(os.path.join(run.output_dir, plan.PLAN))
    in_order = [s for chunks in the_plan["shards"].values() for chunk in chunks for s in chunk]  # process 0 encodes in plan order
    first_encoded = next(s for s in in_order if s not in reasons and s != "f50_aperture2.4/scene4")
    assert skipped[first_encoded] == f"{os.path.join(root, 'train', first_encoded)}: RuntimeError: device out of memory"
    assert skipped["f50_aperture2.4/scene4"].startswith(f"{json_path}: cannot read camera JSON")
    assert set(skipped) == {*reasons, first_encoded, "f50_aperture2.4/scene4"}


def test_a_run_that_skips_every_scene_or_too_many_fails(dataset, tmp_path, monkeypatch):
    config, _, reasons = dataset
    broken_ffmpeg = dataclasses.replace(config, output_dir=str(tmp_path / "a"))
    monkeypatch.setattr(video.imageio_ffmpeg, "get_ffmpeg_exe", lambda: "false")  # exits 1 on every video
    with pytest.raises(prepare.PrepareError, match=rf"{NUM_SCENES} of {NUM_SCENES} scenes skipped"):
        prepare.prepare(broken_ffmpeg, ZeroEncoder(), StubText())
    assert len(shards.read_json(os.path.join(broken_ffmpeg.output_dir, "prepare_report.json"))["skipped"]) == NUM_SCENES
    monkeypatch.undo()
    strict_fraction = dataclasses.replace(config, output_dir=str(tmp_path / "b"), max_skipped_fraction=0.25)
    with pytest.raises(prepare.PrepareError, match=rf"{len(reasons)} of {NUM_SCENES} scenes skipped, more than --max_skipped_fraction=0.25"):
        prepare.prepare(strict_fraction, ZeroEncoder(), StubText())


def test_an_empty_root_fails_and_names_what_it_left_out(tmp_path, capsys):
    os.makedirs(tmp_path / "train" / "scene1" / "videos")  # a scene without its lens folder
    with pytest.raises(prepare.PrepareError, match=r"train: no scene folders .*\(1 other entries\)"):
        prepare.prepare(prepare.PrepareConfig(str(tmp_path), str(tmp_path / "out")), ZeroEncoder(), StubText())
    assert f"not a scene, left out: {tmp_path / 'train' / 'scene1'}" in capsys.readouterr().out
    with pytest.raises(multicam.SceneError, match="nowhere/train: no such folder"):
        prepare.prepare(prepare.PrepareConfig(str(tmp_path / "nowhere"), str(tmp_path / "out")), ZeroEncoder(), StubText())
    assert not os.path.exists(tmp_path / "out")


def test_validate_only_lists_broken_scenes_writes_nothing_and_exits_non_zero(dataset, tmp_path):
    config, _, reasons = dataset
    command = [sys.executable, "-m", "data_pipeline.prepare", f"--input_root={config.input_root}",
               f"--output_dir={tmp_path / 'out'}", "--validate_only", f"--num_frames={FRAMES}", "--max_skipped_fraction=0.1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 1, result.stderr
    structural = {s: r for s, r in reasons.items() if "frames" not in r}  # validation does not decode videos
    assert f"{len(structural)} of {NUM_SCENES} scenes skipped" in result.stderr
    for scene_id, reason in structural.items():
        assert f"invalid scene {scene_id}: " in result.stdout and reason in result.stdout
    assert not os.path.exists(tmp_path / "out")


def test_decoding_runs_ahead_while_a_scene_encodes(dataset, tmp_path, monkeypatch):
    config, _, _ = dataset
    decoding = set()  # scene folders whose videos were read

    def read_frames(path, num_frames, height, width, timeout_s):
        decoding.add(path.rsplit("/videos/", 1)[0])
        return np.zeros((num_frames, height, width, 3), np.uint8)

    class WaitingEncoder(ZeroEncoder):
        """On its first call, waits for another scene's videos to be read: never, if decoding waited for encoding."""

        def __call__(self, videos):
            if not self.calls:
                deadline = time.monotonic() + 30
                while len(decoding) < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                self.overlapped = len(decoding) >= 2
            return super().__call__(videos)

    monkeypatch.setattr(video, "read_frames", read_frames)
    encoder = WaitingEncoder()
    run = dataclasses.replace(config, output_dir=str(tmp_path / "out"), decode_workers=2)
    assert prepare.prepare(run, encoder, StubText())
    assert encoder.overlapped


def test_the_video_encoder_splits_a_batch_over_local_devices():
    videos = np.random.default_rng(0).uniform(-1, 1, (10, 1, 8, 8, 3)).astype(np.float32)  # 10 on 4 devices: padded to 12
    parallel = video_encoder.make_video_encoder("demo", devices=jax.local_devices()[:4])
    assert all(len(w.sharding.device_set) == 4 for w in jax.tree.leaves(nnx.state(parallel._vae)))  # replicated weights
    np.testing.assert_allclose(parallel(videos), video_encoder.make_video_encoder("demo")(videos), rtol=1e-5, atol=1e-5)


class _NaNForSceneTwo:
    """A video encoder gone wrong on one scene: NaN latents for f24_aperture5/scene2's cameras."""

    latent_channels, identity = 16, "nan-on-scene2"

    def __init__(self):
        self.calls = 0

    def __call__(self, videos):
        self.calls += 1
        latents = np.zeros((len(videos), *video_encoder.latent_shape(*videos.shape[1:4], 16)[:3], 16))
        return latents if self.calls != 2 else latents + np.nan


class _ConstantText:
    text_dim, max_len, identity = 8, 16, "constant"

    def __call__(self, caption):
        return np.ones((3, self.text_dim))


def test_non_finite_latents_are_never_written(tmp_path):
    root = str(tmp_path)
    demo_data.write_dataset(root, 2, FRAMES, HEIGHT, WIDTH)
    config = prepare.PrepareConfig(root, os.path.join(root, "out"), num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                                   num_val_scenes=0, encode_batch=10, strict=True)
    with pytest.raises(ValueError, match=r"f24_aperture5/scene2 cam01: latents holds NaN or inf; the record is not written"):
        prepare.prepare(config, _NaNForSceneTwo(), _ConstantText())
    assert not [name for name in os.listdir(config.output_dir)
                if name.endswith((".tfrecord", ".index.json")) or name == shards.MANIFEST]


class _LengthText:
    """Embeds a caption as its character count: different captions, different embeddings."""

    text_dim, max_len, identity = 8, 16, "length"

    def __call__(self, caption):
        return np.full((2, self.text_dim), len(caption), np.float32)


def test_per_camera_captions_reach_the_examples_whose_target_is_that_camera(tmp_path):
    root = str(tmp_path)
    demo_data.write_dataset(root, 1, FRAMES, HEIGHT, WIDTH)
    (scene,) = multicam.find_scenes(os.path.join(root, "train"))
    captions = tmp_path / "metadata.csv"  # a scene row, and a video row that overrides it for camera 4
    captions.write_text(f"file_name,text\n{scene.scene_id},every camera\n{scene.scene_id}/videos/cam04.mp4,camera four\n")
    config = prepare.PrepareConfig(root, os.path.join(root, "out"), captions=str(captions), num_frames=FRAMES,
                                   height=HEIGHT, width=WIDTH, num_val_scenes=0, encode_batch=10, strict=True)
    assert prepare.prepare(config, ZeroEncoder(), _LengthText())
    reader, scenes = loader.open_split(config.output_dir, "train")
    examples = loader.ExampleLoader(reader, scenes, text_len=4, skip_corrupt=False)
    for target, source, caption in ((4, 5, "camera four"), (5, 4, "every camera")):
        example = examples.load(0, target, source)
        np.testing.assert_array_equal(example["text_embeds"][:2], len(caption))
