"""The README's main job in small: MultiCamVideo-format scenes → prepare → train on the shards."""

import json
import os
import struct

import imageio.v3 as iio
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from configs import demo
from data_pipeline import demo_data
from recam_jax import convert, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multicam"))
    out = os.path.join(root, "shards")
    demo_data.write_dataset(root, num_scenes=5, num_frames=9, height=32, width=32)
    demo_data.prepare_demo(root, out, num_frames=9, height=32, width=32, num_val_scenes=2, scenes_per_shard=2)
    return out


def demo_config(path, steps):
    config = demo.get_config()
    config.data.path = path
    config.data.latent_shape = (3, 4, 4, 16)  # 9 frames of 32×32 through the VAE
    config.data.batch_size = 8  # one example per (fake) device
    config.data.eval_pairs_per_scene = 4  # 2 held-out scenes × 4 pairs: one eval batch
    config.data.skip_corrupt = True  # batches carry skip counts, which the trainer logs and keeps from the step
    config.steps, config.log_every, config.eval_every, config.checkpoint_every = steps, 1, 2, 2
    return config


def tensorboard_events(folder):
    """Every Event in the TFRecord-framed event files of a TensorBoard folder."""
    events = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return events


@pytest.mark.slow  # two training runs with eval, the second with a sample (compiles the denoising step, decodes)
def test_trains_on_prepared_shards_resumes_exports_and_writes_samples_and_the_camera_gap(shards, tmp_path):
    workdir = str(tmp_path / "run")
    train.train(demo_config(shards, steps=2), workdir)
    config = demo_config(shards, steps=4)
    config.sample_every, config.sample.steps = 4, 2  # configs/demo.py decodes with the shards' demo VAE
    state = train.train(config, workdir)  # resumes at step 2, loader included
    assert int(state.step) == 4
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["skipped_corrupt"] == 0 for r in records if "loss" in r)
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(np.isfinite(r["eval_loss"]) and np.isfinite(r["camera_gap"]) for r in evals)
    export = os.path.join(workdir, "exports", "recammaster_step4.ckpt")
    assert convert.read_model_record(export)["flow_shift"] == config.flow.shift
    exported = convert.load_pytorch(export, train.model_config(config))
    assert exported.blocks.cam_encoder.kernel[...].shape[1:] == (12, 64)  # (layers, 12, dim)

    events = tensorboard_events(os.path.join(workdir, "tensorboard"))
    scalars = {v.tag: v.simple_value for e in events for v in e.summary.value if not v.HasField("image")}
    images = {v.tag: iio.imread(v.image.encoded_image_string, index=None) for e in events for v in e.summary.value
              if v.HasField("image")}
    assert np.isfinite(scalars["camera_gap"]) and scalars["sample_time_s"] > 0
    for scene in range(config.sample.scenes):
        strip = images[f"samples/scene{scene}/source_generated_target"]  # 3 rows of 5 frames of 32×32
        assert strip.shape == (3 * 32, 5 * 32, 3)
        source, generated, target = strip[:32].astype(int), strip[32:64].astype(int), strip[64:].astype(int)
        assert np.abs(generated - target).mean() > 1 and np.abs(generated - source).mean() > 1  # rendered, not copied
        video = images[f"samples/scene{scene}/video"]
        assert video.shape[:3] == (9, 32, 3 * 32)  # every decoded frame, [source | generated | target]
        gif_error = np.abs(video[0, :, 32:64, :3].astype(int) - generated[:, :32]).mean()
        assert gif_error < 8  # the first generated frame, up to the GIF's 256-colour palette
        assert images[f"samples/scene{scene}/trajectory"].ndim == 3
