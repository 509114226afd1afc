"""A real multi-host job on one machine: two trainer processes of 4 CPU devices each, joined by
jax.distributed (gloo collectives), training one model sharded over all 8 devices; and the same job
on meshes whose context groups span both processes, so both must feed the same batch rows."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from recam_jax import checkpoint, convert, sharding, train
from tests.conftest import REPO, read_metrics, tiny_config

OVERRIDES = {"checkpoint_every": 2, "log_every": 1, "eval_every": 2, "mesh.data": 1, "mesh.fsdp": -1,
             "max_unsharded_fraction": 0.05}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_trainer(workdir, steps: int, env: dict, config="configs/tiny.py", overrides=None) -> subprocess.Popen:
    """`config` with `overrides` (default OVERRIDES), as one process of a job with the given extra environment."""
    overrides = OVERRIDES if overrides is None else overrides
    command = [sys.executable, "-m", "recam_jax.train", "--config", config, "--workdir", str(workdir),
               f"--config.steps={steps}", *(f"--config.{k}={v}" for k, v in overrides.items())]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_two_processes(workdir, steps: int, **trainer) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one job of 4 devices each (launched by hand: the env names the layout)."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    return [start_trainer(workdir, steps, {**env, "JAX_PROCESS_ID": str(i)}, **trainer) for i in range(2)]


def wait_for_success(processes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
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


def launch_two_processes(workdir, steps: int, timeout: float = 300, **trainer) -> list[str]:
    return wait_for_success(start_two_processes(workdir, steps, **trainer), timeout)


def launch_one_process(workdir, steps: int, overrides: dict = OVERRIDES) -> str:
    """The same job as one process owning all 8 devices."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return wait_for_success([start_trainer(workdir, steps, env, overrides=overrides)])[0]


def loss_lines(output: str) -> list[str]:
    """The printed train and eval loss records (not the timings, which differ between processes)."""
    return [line.split("| step_time_s")[0] for line in output.splitlines() if line.startswith("step ") and "loss" in line]


@pytest.mark.slow
def test_two_process_job_trains_evaluates_checkpoints_exports_and_resumes(tmp_path):
    outputs = launch_two_processes(tmp_path, steps=4)
    assert all("devices 8 (cpu), processes 2" in output for output in outputs)
    assert len(loss_lines(outputs[0])) == 6 and loss_lines(outputs[0]) == loss_lines(outputs[1])  # 4 train, 2 eval

    # One copy of the shared files (written by process 0), the data position of both processes.
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert sorted(os.listdir(tmp_path / "checkpoints" / "4" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    # The exported .ckpt holds the step-4 parameters, gathered from both hosts' shards.
    config = tiny_config(steps=4, **OVERRIDES)
    mesh = train.make_mesh(config)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules_for(config.sharding_rules)):
        abstract = jax.eval_shape(train.init_fn(config))
        shardings = train.state_shardings(abstract, mesh, config)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        manager = checkpoint.make_manager(str(tmp_path), every=2, keep_last=3, keep_every=0)
        saved = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(target.replace(frozen=None)))).state
    exported = convert.load_pytorch(str(tmp_path / "exports" / "recammaster_step4.ckpt"), train.model_config(config))
    for got, want in zip(jax.tree.leaves(nnx.state(exported, nnx.Param)), jax.tree.leaves(saved.trainable),
                         strict=True):
        np.testing.assert_array_equal(got, want)

    # The same job on one process (same global batches, same mesh): the same losses and weights.
    launch_one_process(tmp_path / "one_process", steps=4)
    for key in ("loss", "grad_norm", "eval_loss"):
        two, one = ([r[key] for r in records_ if key in r] for records_ in (records, read_metrics(tmp_path / "one_process")))
        np.testing.assert_allclose(two, one, rtol=1e-5, err_msg=key)
    one_process = convert.load_pytorch(str(tmp_path / "one_process" / "exports" / "recammaster_step4.ckpt"),
                                       train.model_config(config))
    for got, want in zip(jax.tree.leaves(nnx.state(exported)), jax.tree.leaves(nnx.state(one_process)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # A restarted job resumes from step 4, each process from its own data position.
    outputs = launch_two_processes(tmp_path, steps=6)
    assert all("resumed from step 4" in output for output in outputs)
    assert [line.split("|")[0].split()[1] for line in loss_lines(outputs[0]) if "| loss" in line] == ["5", "6"]


@pytest.mark.slow
def test_sigterm_on_one_host_makes_every_host_save_the_same_step_and_exit(tmp_path):
    processes = start_two_processes(tmp_path, steps=100_000)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
    outputs = wait_for_success(processes)
    saved = [int(re.search(r"SIGTERM: saved step (\d+), exiting", output).group(1)) for output in outputs]
    assert saved[0] == saved[1] >= 3
    manager = checkpoint.make_manager(str(tmp_path), every=2, keep_last=3, keep_every=0)
    assert manager.latest_step() == saved[0]


# Meshes on which context groups span the two processes: (two-process overrides, one-process mesh).
# With num_slices=2 each process is a DCN granule (`sharding.make_mesh`), and the granule is the outer
# index of an axis, so `dcn_context=2` puts half of every context group on each process.
CONTEXT_ACROSS_PROCESSES = {
    "context8": ({"mesh.context": 8}, {"mesh.context": 8}),
    "data2_context4_split": ({"mesh.data": 2, "mesh.context": 2, "mesh.num_slices": 2, "mesh.dcn_data": 1,
                              "mesh.dcn_context": 2}, {"mesh.data": 2, "mesh.context": 4}),
    "fsdp2_context2_tensor2": ({"mesh.fsdp": 2, "mesh.tensor": 2, "mesh.num_slices": 2, "mesh.dcn_data": 1,
                                "mesh.dcn_context": 2}, {"mesh.fsdp": 2, "mesh.context": 2, "mesh.tensor": 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", CONTEXT_ACROSS_PROCESSES)
def test_context_groups_across_processes_train_like_one_process(tmp_path, mesh):
    two_process_mesh, one_process_mesh = CONTEXT_ACROSS_PROCESSES[mesh]
    base = {"checkpoint_every": 100, "log_every": 1, "eval_every": 2, "mesh.data": 1, "mesh.fsdp": 1,
            "max_unsharded_fraction": 1.0}
    launch_two_processes(tmp_path / "two", steps=2, overrides={**base, **two_process_mesh})
    launch_one_process(tmp_path / "one", steps=2, overrides={**base, **one_process_mesh})
    for key in ("loss", "grad_norm", "eval_loss"):
        two, one = ([r[key] for r in read_metrics(tmp_path / run) if key in r] for run in ("two", "one"))
        assert len(two) == (2 if key != "eval_loss" else 1)
        np.testing.assert_allclose(two, one, rtol=1e-5, err_msg=key)
    config = train.model_config(tiny_config())
    two, one = (convert.load_pytorch(str(tmp_path / run / "exports" / "recammaster_step2.ckpt"), config)
                for run in ("two", "one"))
    for got, want in zip(jax.tree.leaves(nnx.state(two)), jax.tree.leaves(nnx.state(one)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
