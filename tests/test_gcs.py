"""The pod path on a real GCS server (fake-gcs-server on loopback): prepare writes shards to a
bucket; a two-process job (one model sharded over the 8 devices of both processes, each process
loading its own rows) trains from them with its workdir and compilation cache in the bucket,
evaluates, checkpoints and exports there; a second job is SIGKILLed, resumes bit-identically from the
bucket, and its exported .ckpt is read back from there by the converter. (That two-process jobs equal
one process, this layout included, is test_multihost.py's.) The converter writes and reads orbax
folders in the bucket."""

import json
import os
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import demo
from data_pipeline import demo_data, shards
from recam_jax import convert, storage, torch_io, train
from tests.conftest import REPO
from tests.test_convert import trained_tiny_model
from tests.test_multihost import launch_two_processes, start_two_processes, wait_for_success

STEPS = 8
TIMEOUT = 900  # seconds per launch: each compiles the step in two processes sharing the CPU cores
# The demo config on the tiny demo shards (9 frames of 32×32 → latents 3×4×4×16), one example per device.
OVERRIDES = {"data.path": None, "data.latent_shape": "(3,4,4,16)", "data.batch_size": 8, "log_every": 1,
             "eval_every": STEPS // 2, "checkpoint_every": 2, "mesh.data": 1, "mesh.fsdp": -1,
             "max_unsharded_fraction": 0.05}


def read_metric(workdir: str, name: str = "loss") -> dict[int, float]:
    with storage.open(storage.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r[name] for r in map(json.loads, f) if name in r}


def exported(workdir: str, config):
    path = storage.join(workdir, "exports", f"recammaster_step{STEPS}.ckpt")
    return convert.load_pytorch(path, train.model_config(config))


@pytest.mark.slow
def test_two_process_job_on_a_bucket_trains_survives_sigkill_and_exports_there(gcs_bucket, tmp_path):
    data = f"{gcs_bucket}/shards"
    demo_data.write_dataset(str(tmp_path), num_scenes=3, num_frames=9, height=32, width=32)
    demo_data.prepare_demo(str(tmp_path), data, num_frames=9, height=32, width=32, num_val_scenes=1,
                           scenes_per_shard=1)
    assert storage.exists(storage.join(data, shards.MANIFEST))
    cache = f"{gcs_bucket}/compilation_cache"  # shared by the jobs below: the second loads what the first compiled
    trainer = dict(config="configs/demo.py", overrides={**OVERRIDES, "data.path": data, "compilation_cache": cache})
    straight = f"{gcs_bucket}/straight"
    outputs = launch_two_processes(straight, STEPS, timeout=TIMEOUT, **trainer)
    assert all("devices 8 (cpu), processes 2" in output for output in outputs)
    assert storage.listdir(cache)
    # One copy of the shared files (written by process 0), the data position of each process.
    assert sorted(read_metric(straight)) == list(range(1, STEPS + 1))
    assert sorted(read_metric(straight, "eval_loss")) == [STEPS // 2, STEPS]
    assert sorted(storage.listdir(storage.join(straight, "checkpoints", str(STEPS), "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    killed = f"{gcs_bucket}/killed"
    processes = start_two_processes(killed, STEPS, **trainer)
    checkpoints = storage.join(killed, "checkpoints")
    finished = lambda: storage.exists(checkpoints) and ocp.utils.checkpoint_steps(checkpoints)  # committed saves only
    deadline = time.time() + TIMEOUT
    while not finished() and time.time() < deadline and processes[0].poll() is None:
        time.sleep(0.05)
    for process in processes:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = max(read_metric(killed))
    assert all(p.returncode == -signal.SIGKILL for p in processes) and killed_at < STEPS, "ended before the kill"
    outputs = wait_for_success(start_two_processes(killed, STEPS, **trainer), TIMEOUT)
    assert all("resumed from step" in output for output in outputs), outputs[0]

    losses, resumed = read_metric(straight), read_metric(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1)) and resumed == losses
    assert storage.listdir(storage.join(killed, "tensorboard"))  # event files, written through the GCS client
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing went to a local folder named "gs:"
    config = demo.get_config()
    config.data.latent_shape = (3, 4, 4, 16)
    for got, want in zip(jax.tree.leaves(nnx.state(exported(killed, config))),
                         jax.tree.leaves(nnx.state(exported(straight, config))), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("saved_scanned", [True, False])
def test_conversion_into_and_out_of_an_orbax_folder_in_a_bucket_is_bit_exact(gcs_bucket, tmp_path, saved_scanned):
    """Written a batch of tensors at a time (`convert._lazy_tensor_handler`) and read a tensor at a
    time (`convert._stored_array_reader`, a block's row where they are stacked) through tensorstore's
    GCS driver, not through a local copy."""
    model = trained_tiny_model()
    source, back = str(tmp_path / "in.safetensors"), str(tmp_path / "back.safetensors")
    convert.save_pytorch(model, source)
    folder = f"{gcs_bucket}/convert_{tmp_path.name}"  # a folder per test
    if saved_scanned:  # blocks stacked on a `layers` axis, as `save_orbax` writes a scanned model
        convert.save_orbax(model, f"{folder}/orbax")
    else:
        convert.main([source, f"{folder}/orbax"])
    assert storage.listdir(f"{folder}/orbax") and not os.path.exists(os.path.join(REPO, "gs:"))
    convert.main([f"{folder}/orbax", back])
    want, got = torch_io.open_state_dict(source), torch_io.open_state_dict(back)
    assert list(got) == list(want)
    assert all(got.dtypes[k] == want.dtypes[k] and np.array_equal(got[k], want[k]) for k in want)
