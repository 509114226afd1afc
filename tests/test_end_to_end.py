"""The README's main job in small: MultiCamVideo-format scenes → prepare → train on the shards."""

import json
import os

import numpy as np
import pytest

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


def test_trains_on_prepared_shards_resumes_and_exports(shards, tmp_path):
    workdir = str(tmp_path / "run")
    train.train(demo_config(shards, steps=2), workdir)
    state = train.train(demo_config(shards, steps=4), workdir)  # resumes at step 2, loader included
    assert int(state.step) == 4
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["skipped_corrupt"] == 0 for r in records if "loss" in r)
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(np.isfinite(r["eval_loss"]) and np.isfinite(r["camera_gap"]) for r in evals)
    export = os.path.join(workdir, "exports", "recammaster_step4.ckpt")
    assert convert.read_model_record(export)["flow_shift"] == demo_config(shards, 4).flow.shift
    exported = convert.load_pytorch(export, train.model_config(demo_config(shards, 4)))
    assert exported.blocks.cam_encoder.kernel[...].shape[1:] == (12, 64)  # (layers, 12, dim)
