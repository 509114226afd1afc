"""Real multi-host jobs on one machine: two trainer processes of 4 CPU devices each, joined by
jax.distributed (gloo collectives): a preemption notice reaching one host, and layouts whose batch,
context and tensor groups span the processes in different ways, each training like one process. (The job on a GCS bucket, with its
SIGKILL and resume, is in test_gcs.py.)"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from recam_jax import checkpoint, convert, train
from tests.conftest import REPO, read_metrics, shared_cache, tiny_config

OVERRIDES = {"checkpoint_every": 2, "log_every": 1, "eval_every": 0, "mesh.data": 1, "mesh.fsdp": -1,
             "max_unsharded_fraction": 0.05}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_trainer(workdir, steps: int, env: dict, config="configs/tiny.py", overrides=None) -> subprocess.Popen:
    """`config` with `overrides` (default OVERRIDES), as one process of a job with the given extra environment;
    its compiled programs go to the test session's shared cache unless `overrides` names another."""
    overrides = OVERRIDES if overrides is None else overrides
    command = [sys.executable, "-m", "recam_jax.train", "--config", config, "--workdir", str(workdir),
               f"--config.steps={steps}",
               *(f"--config.{k}={v}" for k, v in {"compilation_cache": shared_cache(), **overrides}.items())]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_two_processes(workdir, steps: int, **trainer) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one job of 4 devices each (launched by hand: the env names the layout)."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    return [start_trainer(workdir, steps, {**env, "JAX_PROCESS_ID": str(i)}, **trainer) for i in range(2)]


def wait_for_success(processes: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Each process's output, after checking that all of them exited 0."""
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout)[0])
        finally:
            process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    return outputs


def launch_two_processes(workdir, steps: int, timeout: float = 600, **trainer) -> list[str]:
    return wait_for_success(start_two_processes(workdir, steps, **trainer), timeout)


def launch_one_process(workdir, steps: int, **trainer) -> str:
    """The same job as one process owning all 8 devices."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return wait_for_success([start_trainer(workdir, steps, env, **trainer)])[0]


@pytest.mark.slow
def test_sigterm_on_one_host_makes_every_host_save_the_same_step_and_exit(tmp_path):
    processes = start_two_processes(tmp_path, steps=100_000)
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in processes):
        metrics = tmp_path / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"loss":') >= 3:
            break  # three steps were logged
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
    outputs = wait_for_success(processes)
    saved = [int(re.search(r"SIGTERM: saved step (\d+), exiting", output).group(1)) for output in outputs]
    assert saved[0] == saved[1] >= 3
    manager = checkpoint.make_manager(str(tmp_path), every=2, keep_last=3, keep_every=0)
    assert manager.latest_step() == saved[0]


# Layouts of the two-process job (overrides). Without slices the outer mesh axis splits the processes:
# `fsdp8` shards the batch over both, so each process loads other rows; `context8` spans a context
# group over both, so both load the same rows. With num_slices=2 each process is a DCN granule
# (`sharding.make_mesh`), the outer index of an axis: `dcn_context=2` puts half of every context group
# on each process, beside data (or fsdp and tensor) groups inside each process.
LAYOUTS = {
    "fsdp8": {"mesh.fsdp": 8},
    "context8": {"mesh.context": 8},
    "data2_context4_split": {"mesh.data": 2, "mesh.context": 2, "mesh.num_slices": 2, "mesh.dcn_data": 1,
                             "mesh.dcn_context": 2},
    "fsdp2_context2_tensor2": {"mesh.fsdp": 2, "mesh.tensor": 2, "mesh.num_slices": 2, "mesh.dcn_data": 1,
                               "mesh.dcn_context": 2},
}


@pytest.mark.slow
def test_two_process_layouts_train_like_one_process(tmp_path):
    """Each two-process job equals one process on 8 devices (global batches do not depend on the layout):
    the rows each process loads follow the batch sharding, whichever axes span the processes."""
    base = {"checkpoint_every": 100, "log_every": 1, "eval_every": 2, "mesh.data": 1, "mesh.fsdp": 1,
            "max_unsharded_fraction": 1.0}
    launch_one_process(tmp_path / "one", steps=2, overrides={**base, "mesh.context": 8})
    config = train.model_config(tiny_config())
    one = convert.load_pytorch(str(tmp_path / "one" / "exports" / "recammaster_step2.ckpt"), config)
    for mesh, overrides in LAYOUTS.items():
        launch_two_processes(tmp_path / mesh, steps=2, overrides={**base, **overrides})
        for key in ("loss", "grad_norm", "eval_loss"):
            two, reference = ([r[key] for r in read_metrics(tmp_path / run) if key in r] for run in (mesh, "one"))
            assert len(two) == (2 if key != "eval_loss" else 1), mesh
            np.testing.assert_allclose(two, reference, rtol=1e-5, err_msg=f"{mesh}: {key}")
        two = convert.load_pytorch(str(tmp_path / mesh / "exports" / "recammaster_step2.ckpt"), config)
        for got, want in zip(jax.tree.leaves(nnx.state(two)), jax.tree.leaves(nnx.state(one)), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=mesh)
