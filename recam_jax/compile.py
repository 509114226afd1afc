"""Plan a training run before paying for it: compile the real train step for a TPU topology here.

    JAX_PLATFORMS=cpu python -m recam_jax.compile --config configs/base.py --topology v5p-8 [--config.key=value ...]
    JAX_PLATFORMS=cpu python -m recam_jax.compile --job sample --config configs/base.py --topology v5p:1x1x1

Compiles `train.compile_step` (the trainer's own step, shardings and donation) ahead of time for the
devices of a TPU topology description (needs libtpu, no TPU: nothing is allocated), or for the local
devices without `--topology`, and prints per-device memory against the chip's HBM, the analytic
model FLOPs of a step with its step time at a given MFU, the collectives in the compiled program, and
the host map: each host's devices and the global batch rows it must load under the mesh. A layout the
loader cannot feed (a device's share of the batch not whole rows) is refused before compiling.
With `mesh.num_slices` > 1 it compiles for that many slices of the topology joined over DCN.

Topologies: Cloud names `v5p-N` and `v4-N` count TensorCores (two per chip: v5p-8 = 4 chips),
`v5e-N` and `v6e-N` count chips; they map to libtpu's `generation:AxBxC` names (`TOPOLOGIES`),
which are also accepted as they are (e.g. `v5p:2x2x1`). Multi-host topologies compile from this one
process. libtpu describes v4 per TensorCore (no megacore): its figures are per core, half a chip.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import sys

import jax
from absl import app, flags
from flax import nnx

from recam_jax import flops, sample, sharding, train

GiB = 2**30

# Cloud accelerator name → libtpu topology name (chips laid out x×y×z; v5e/v6e are 2-D).
TOPOLOGIES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x4x2", "v5p-64": "v5p:4x4x2",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4",
}


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures: HBM and peak dense bf16 matmul throughput."""

    hbm_gib: float
    peak_tflops: float


# Keyed by jax's `device_kind`.
CHIPS = {
    "TPU v4": Chip(hbm_gib=32, peak_tflops=275),
    "TPU v5": Chip(hbm_gib=95, peak_tflops=459),  # v5p
    "TPU v5 lite": Chip(hbm_gib=16, peak_tflops=197),  # v5e
    "TPU v6 lite": Chip(hbm_gib=32, peak_tflops=918),  # v6e (Trillium)
}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# An HLO instruction (not its `-done` half, not a name like %all-gather.3): the opcode then "(".
_COLLECTIVE_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_COMPUTATION_START = re.compile(r"\n(?=\S)")  # computations start unindented; their instructions are indented
_TPU_REDUCE_SCATTER = "%all-reduce-scatter"
_TPU_REDUCE_SCATTER_FUSION = re.compile(r"\sfusion\(.*calls=" + _TPU_REDUCE_SCATTER)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one compiled train step needs per device, and what it would cost."""

    devices: int
    device_kind: str
    mesh: dict[str, int]
    memory_bytes: dict[str, int]  # arguments, outputs, aliased, temporaries, generated code, total, host
    device_memory_bytes: float | None  # HBM of one device, when known
    peak_tflops_per_device: float
    train_flops: float  # analytic model FLOPs of one step, all devices together
    collectives: dict[str, int]  # static count of each collective in the HLO (loop bodies once)
    host_devices: dict[int, list[int]]  # process index → ids of its devices
    host_rows: dict[int, list[int]]  # process index → the global batch rows it loads

    def step_seconds(self, mfu: float) -> float:
        """Step time if the devices ran the model FLOPs at this fraction of their peak."""
        return self.train_flops / (self.devices * self.peak_tflops_per_device * 1e12 * mfu)


def topology_devices(name: str, num_slices: int = 1):
    """The devices of a TPU topology description, from a Cloud name (v5p-8) or a libtpu one (v5p:2x2x1),
    `num_slices` slices of it joined over DCN."""
    from jax.experimental import topologies
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling takes no chip, nor libtpu's lock
    libtpu_name = TOPOLOGIES.get(name, name)
    if ":" not in libtpu_name:
        raise ValueError(f"unknown topology {name!r}: use one of {sorted(TOPOLOGIES)} or a libtpu name like v5p:2x2x1")
    # libtpu assumes hosts of 2x2x1 chips; a smaller slice (v5e-1) is its own host.
    dims = [int(d) for d in libtpu_name.split(":")[1].split("x")] + [1]
    host_bounds = [min(dim, default) for dim, default in zip(dims, (2, 2, 1))]
    return topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name, chips_per_host_bounds=host_bounds,
                                        num_slices=num_slices).devices


def device_chip(devices) -> tuple[Chip | None, int]:
    """The chip of these devices (None off TPU) and how many devices share one chip."""
    chip = CHIPS.get(devices[0].device_kind)
    if chip is None:
        return None, 1
    chips = {tuple(d.coords) for d in devices}
    return chip, len(devices) // len(chips)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective instructions by kind in an HLO module's text (each loop body counted once).

    The TPU compiler writes a reduce-scatter as a fusion calling a computation named
    `all-reduce-scatter…` (an all-reduce and a slice inside): each such fusion counts as one
    reduce-scatter, and the all-reduce inside it not at all.
    """
    counts = collections.Counter()
    for computation in _COMPUTATION_START.split(hlo_text):
        if computation.startswith(_TPU_REDUCE_SCATTER):
            continue
        counts.update(m.group(1) for m in _COLLECTIVE_OP.finditer(computation))
        counts["reduce-scatter"] += len(_TPU_REDUCE_SCATTER_FUSION.findall(computation))
    return {kind: counts[kind] for kind in COLLECTIVES}


def memory_bytes(compiled) -> dict[str, int]:
    """Per-device memory of a compiled program; donated arguments alias their outputs."""
    m = compiled.memory_analysis()
    sizes = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
             "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
             "generated code": m.generated_code_size_in_bytes}
    sizes["total"] = (sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
                      + sizes["generated code"])
    sizes["host temporaries (offload)"] = m.host_temp_size_in_bytes  # pinned host memory, not in total
    return sizes


def local_device_memory(device) -> float | None:
    """Memory limit of a local accelerator as the runtime reports it (None on CPU)."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def device_memory(devices) -> float | None:
    """Memory of one device: its share of the chip's HBM on TPU, else what the runtime reports."""
    chip, devices_per_chip = device_chip(devices)
    return local_device_memory(devices[0]) if chip is None else chip.hbm_gib * GiB / devices_per_chip


def peak_tflops(config, devices) -> float:
    """Peak bf16 TFLOP/s of one device: its share of the chip's on TPU, else the config's figure."""
    chip, devices_per_chip = device_chip(devices)
    return config.peak_tflops_per_device if chip is None else chip.peak_tflops / devices_per_chip


def plan(config, devices=None) -> Plan:
    """Compiles the config's train step for `devices` (default: the local ones) and sizes it up."""
    devices = jax.devices() if devices is None else list(devices)
    train.check_config(config)
    mesh = train.make_mesh(config, devices)
    rules = sharding.rules_for(config.sharding_rules)
    host_devices, host_rows = host_map(config, mesh)  # refuses a layout the loader cannot feed, before compiling
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        compiled = train.compile_step(config, mesh)[0]
    return Plan(
        devices=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
        memory_bytes=memory_bytes(compiled), device_memory_bytes=device_memory(devices),
        peak_tflops_per_device=peak_tflops(config, devices),
        train_flops=flops.train_step_flops(train.model_config(config), config.data.latent_shape,
                                           config.data.text_len, config.trainable, config.data.batch_size),
        collectives=count_collectives(compiled.as_text()), host_devices=host_devices, host_rows=host_rows)


def host_map(config, mesh, batch_size: int | None = None) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Each host's device ids and the global batch rows it loads (`train.batch_rows`) on this mesh, for
    the config's batch or `batch_size` rows.

    Raises sharding.BatchLayoutError for a layout the loader cannot feed.
    """
    data_sharding = sharding.batch_sharding(mesh, sharding.rules_for(config.sharding_rules))
    rows = sharding.process_rows(data_sharding, batch_size or config.data.batch_size)
    host_rows = {host: host_rows.tolist() for host, host_rows in rows.items()}
    host_devices = collections.defaultdict(list)
    for device in sorted(mesh.devices.flat, key=lambda d: d.id):
        host_devices[device.process_index].append(device.id)
    return dict(sorted(host_devices.items())), host_rows


def report(p: Plan, mfus=(1.0, 0.5)) -> str:
    """The plan as markdown tables."""
    lines = [f"{p.devices} × {p.device_kind}, mesh {p.mesh}", "",
             "| per device | GiB |", "|---|---|"]
    lines += [f"| {name} | {size / GiB:.2f} |" for name, size in p.memory_bytes.items()]
    if p.device_memory_bytes:
        headroom = 1 - p.memory_bytes["total"] / p.device_memory_bytes
        lines.append(f"| device memory | {p.device_memory_bytes / GiB:.2f} (headroom {headroom:.0%}) |")
    lines += ["", f"model FLOPs per step: {p.train_flops:.4g} (peak {p.peak_tflops_per_device:g} TFLOP/s per device)",
              "", "| MFU | step time s |", "|---|---|"]
    lines += [f"| {mfu:.0%} | {p.step_seconds(mfu):.3g} |" for mfu in mfus]
    lines += ["", "| collective | count in HLO |", "|---|---|"]
    lines += [f"| {kind} | {n} |" for kind, n in p.collectives.items()]
    lines += ["", f"host map: {len(p.host_devices)} hosts; each loads the batch rows its devices hold", "",
              "| host | devices | batch rows to load |", "|---|---|---|"]
    lines += [f"| {host} | {', '.join(map(str, ids))} | {row_ranges(p.host_rows[host])} ({len(p.host_rows[host])}) |"
              for host, ids in p.host_devices.items()]
    return "\n".join(lines)


def row_ranges(rows: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    runs = []
    for row in rows:
        if runs and row == runs[-1][1] + 1:
            runs[-1][1] = row
        else:
            runs.append([row, row])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def plan_sample(config, devices=None) -> str:
    """`python -m recam_jax.compile --job sample`: one denoising step (both guidance branches) of the
    config's model, mesh and latent size, one video per data-parallel group, plus the VAE decode."""
    devices = jax.devices() if devices is None else list(devices)
    cfg = train.model_config(config)
    mesh = train.make_mesh(config, devices)
    latent_shape, text_len = tuple(config.data.latent_shape), config.data.text_len
    batch = mesh.shape["data"] * mesh.shape["fsdp"]
    host_devices, host_rows = host_map(config, mesh, batch)  # the videos (rows) each host renders
    step = sample.compile_denoise_step(cfg, mesh, latent_shape, text_len, batch,
                                       rules=sharding.rules_for(config.sharding_rules),
                                       device_memory_bytes=device_memory(devices))
    step_plan = Plan(
        devices=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
        memory_bytes=memory_bytes(step), device_memory_bytes=device_memory(devices),
        peak_tflops_per_device=peak_tflops(config, devices),
        train_flops=2 * batch * flops.forward_flops(cfg, latent_shape, text_len),
        collectives=count_collectives(step.as_text()), host_devices=host_devices, host_rows=host_rows)
    decode = memory_bytes(sample.compile_vae_decode(latent_shape, mesh))
    lines = [f"## one denoising step: {config.model.variant}, attention {cfg.attention}, {batch} × latents "
             f"{latent_shape}, both guidance branches", "", report(step_plan), "",
             "## VAE decode of one video on one device", "", "| per device | GiB |", "|---|---|"]
    lines += [f"| {name} | {size / GiB:.2f} |" for name, size in decode.items()]
    if step_plan.device_memory_bytes:
        peak = max(step_plan.memory_bytes["total"], decode["total"])
        verdict = "fits" if peak <= step_plan.device_memory_bytes else "does NOT fit"
        lines += ["", f"sampling {verdict}: peak {peak / GiB:.2f} GiB of "
                      f"{step_plan.device_memory_bytes / GiB:.2f} GiB per device"]
    return "\n".join(lines)


# --config and its --config.key=value overrides are the trainer's flag (defined by importing train).
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology to compile for, a Cloud name (v5p/v4 count TensorCores, v5e/v6e chips) → "
    f"libtpu name: {', '.join(f'{k} → {v}' for k, v in TOPOLOGIES.items())}; or a libtpu name like v5p:2x2x1. "
    "Default: the local devices.")


_JOB = flags.DEFINE_enum("job", "train", ["train", "sample"], "what to compile: the train step, or sampling "
                          "(one denoising step with both guidance branches + the VAE decode: plan_sample)")


def main(argv) -> None:
    del argv
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("--config is required")
    devices = topology_devices(_TOPOLOGY.value, config.mesh.num_slices) if _TOPOLOGY.value else None
    try:
        if _JOB.value == "sample":
            print(plan_sample(config, devices), flush=True)
        else:
            print(report(plan(config, devices)), flush=True)
    except sharding.BatchLayoutError as error:
        sys.exit(f"the loader cannot feed this layout: {error}")
    except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses a program over HBM
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        sys.exit(f"does not fit: {str(error).splitlines()[0]}")


if __name__ == "__main__":
    app.run(main)
