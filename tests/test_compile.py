"""The AOT planner: the real train step compiled for a TPU topology description, and for local devices."""

import os
import subprocess
import sys

import jax
import pytest

from recam_jax import compile as planner
from recam_jax import flops, train
from tests.conftest import REPO
from tests.test_attention import tpu_topology
from tests.conftest import tiny_config


def check_figures(plan):
    """Every figure the planner prints is there and positive."""
    memory = plan.memory_bytes
    assert all(memory[k] > 0 for k in ("arguments", "outputs", "temporaries", "total"))
    assert all(size >= 0 for size in memory.values())  # generated code is 0 on CPU
    assert memory["total"] >= memory["temporaries"]
    assert plan.train_flops > 0 and plan.peak_tflops_per_device > 0
    assert 0 < plan.step_seconds(1.0) < plan.step_seconds(0.5)


def test_plan_for_a_tpu_topology_shards_and_communicates():
    devices = tpu_topology("v5p:2x2x1").devices
    config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.context": 2, "model.attention": "ring",
                            "data.batch_size": 4, "max_unsharded_fraction": 1.0})
    with jax.default_matmul_precision("default"):  # the trainer's precision, not the tests' "highest"
        plan = planner.plan(config, devices)
    check_figures(plan)
    assert plan.devices == 4 and plan.mesh == {"data": 1, "fsdp": 2, "context": 2, "tensor": 1}
    assert plan.device_memory_bytes == 95 * planner.GiB and plan.peak_tflops_per_device == 459
    assert plan.collectives["all-gather"] > 0  # fsdp gathers parameters
    assert plan.collectives["collective-permute"] > 0  # the ring passes K/V


def test_offload_remat_puts_residuals_in_host_memory_on_tpu():
    devices = tpu_topology("v5p:2x2x1").devices
    config = tiny_config(**{"mesh.data": 4, "data.batch_size": 4, "model.remat": "offload"})
    with jax.default_matmul_precision("default"):
        plan = planner.plan(config, devices)
    assert plan.memory_bytes["host temporaries (offload)"] > 0


def test_plan_for_local_devices_with_the_paper_recipe():
    """8 CPU devices, fsdp, full remat and a frozen backbone (trainable and frozen parameters merged)."""
    config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8, "model.remat": "full", "trainable": "camera+self_attn",
                            "max_unsharded_fraction": 1.0})
    plan = planner.plan(config)
    check_figures(plan)
    assert plan.device_kind == "cpu" and plan.device_memory_bytes is None
    assert plan.peak_tflops_per_device == config.peak_tflops_per_device
    assert plan.collectives["all-gather"] > 0


def test_collectives_are_counted_by_opcode_not_by_name():
    hlo = ("%all-gather-start.1 = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %p), dimensions={0}\n"
           "%all-gather-done.1 = f32[8]{0} all-gather-done((f32[2]{0}, f32[8]{0}) %all-gather-start.1)\n"
           "%reduce-scatter.2 = f32[2]{0} reduce-scatter(f32[8]{0} %x), to_apply=%add\n"
           "%all-reduce.3 = f32[] all-reduce(f32[] %y), to_apply=%add\n")
    assert planner.count_collectives(hlo) == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1,
                                              "all-to-all": 0, "collective-permute": 0}


def test_unknown_topology_names_the_accepted_ones():
    with pytest.raises(ValueError, match="v5p-8"):
        planner.topology_devices("v5p-7")


def run_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "recam_jax.compile", "--config", "configs/tiny.py", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_prints_memory_flops_and_collectives():
    result = run_cli()
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("| total |", "model FLOPs per step:", "| 50% |", "| all-gather |"):
        assert line in result.stdout, result.stdout


def test_cli_rejects_an_unknown_override():
    result = run_cli("--config.model.no_such_field=1")
    assert result.returncode != 0 and "no_such_field" in result.stderr


def test_cli_says_when_the_step_does_not_fit_a_chip():
    tpu_topology("v5p:2x2x1")  # skips, saying why, without libtpu
    assert len(planner.topology_devices("v5e-1")) == 1  # a slice smaller than one host
    # Full attention over 2 x 8 x 32 x 32 tokens: ~32 GiB of scores for a 16 GiB v5e chip.
    result = run_cli("--topology", "v5e-1", "--config.mesh.data=1", "--config.data.batch_size=4",
                     "--config.data.latent_shape=(8,64,64,16)")
    assert result.returncode != 0
    assert "does not fit: RESOURCE_EXHAUSTED" in result.stderr and "HBM" in result.stderr, result.stderr[-2000:]


def test_sample_plan_compiles_one_denoising_step_and_the_vae_decode():
    """Two forward passes (both guidance branches) per video, one video per data-parallel group."""
    config = tiny_config(**{"mesh.data": -1, "mesh.fsdp": 1})
    text = planner.plan_sample(config, jax.devices()[:2])
    forward = flops.forward_flops(train.model_config(config), config.data.latent_shape, config.data.text_len)
    assert "2 × latents" in text and f"model FLOPs per step: {2 * 2 * forward:.4g}" in text, text
    assert text.count("| total |") == 2 and "## VAE decode" in text
