"""Our train step side by side with the peers' (../shared/peers), one run each, figures as ratios.

    # The official PyTorch ReCamMaster train step and ours on this machine (CPU: a small model at the
    # official 30×52 token grid; with a GPU for both, the 1.3B at full size with TFLOP/s and MFU):
    PYTHONPATH=. python benchmarks/peers.py official [--size small|full] [--dtype float32] [--steps 5]

    # MaxDiffusion's Wan2.1-1.3B train step and ours, AOT-compiled for a TPU topology here (libtpu):
    pip install --target /tmp/peer_deps --no-deps google-cloud-storage aqtp chex toolz qwix jaxopt \
        tensorflow gast astunparse flatbuffers datasets multiprocess pandas dill xxhash scikit-image \
        lazy_loader imageio tifffile
    PYTHONPATH=.:../shared/peers/maxdiffusion/src:/tmp/peer_deps JAX_PLATFORMS=cpu \
        python benchmarks/peers.py maxdiffusion --topology v5p-8 [--max_batch 64]

official: each side runs in its own process: the official model is DiffSynth's `WanModel` with the
camera modules and freezing of `train_recammaster.py`'s `LightningModelForTrain.__init__`, its
`FlowMatchScheduler`, and the arithmetic of its `training_step` (noise, timestep, clean source half,
target-half MSE times the training weight) then `AdamW.step`, with the gradient checkpointing it
trains with; `train_recammaster.py` itself cannot be imported without lightning, torchvision and
the whole diffsynth package, so those lines are restated in `official_train_step`. Ours is
`train.compile_step` of configs/base.py at the same sizes (V2V only, as the official code trains).
After warm-up the process's peak RSS is reset (/proc/self/clear_refs) and the timed steps' peak read.

maxdiffusion: its own config (configs/base_wan_1_3b.yml through its pyconfig), mesh
(`max_utils.create_device_mesh`), model (`WanModel`), optimizer (`max_utils.create_optimizer`), train
state (`base_wan_trainer.TrainState`), data shardings and jitted train step (`WanTrainer.get_train_step`
around `wan_trainer.train_step`), lowered for abstract arguments and compiled. What had to be adapted:
the packages above installed beside the project (MaxDiffusion declares Python >= 3.12 and more
dependencies; only these are imported on the way to its trainer); pyconfig sizes the batch from
the local devices (one CPU), so `per_device_batch_size` is given the global batch; the model config
(12 heads of 128, FFN 8960, 30 layers, text 4096, frequency 256: Wan2.1-T2V-1.3B's) is passed in,
where `create_sharded_logical_transformer` reads it from the hub, and the model is built abstract
(`nnx.eval_shape`, its step 2) without loading weights; the state's shardings are taken from the
abstract state (its training loop takes them from the initialised one); the data are abstract
arrays of its TFRecord latents and text embeddings (float32, as its loader parses them).
Ours is `recam_jax.compile.plan` with MaxDiffusion's settings (its mesh, every parameter trained and
stored in bf16, the same remat) and as configs/base.py trains. Each row is compiled at one example
per chip, then at growing batches for the largest that fits one chip's HBM.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests import peers  # noqa: E402  (the peers' paths and the official files' loader)

GiB = 2**30
CAMERA_AND_SELF_ATTENTION = ("cam_encoder", "projector", "self_attn")  # train_recammaster.py's trainable modules
# Sizes of the `official` comparison: the official block hard-codes a 30×52 token grid (60×104 latents).
SIZES = {
    "small": dict(variant="peers-small", frames=2, text_len=512),  # CPU: 4 latent frames, 6,240 tokens
    "full": dict(variant="1.3B", frames=21, text_len=512),  # GPU: 81 + 81 video frames, 65,520 tokens
}
# The `small` variant with Wan's head size (128): the official RoPE needs head_dim // 3 even (64 is not).
PEERS_SMALL = dict(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, text_dim=256, freq_dim=64)


# --- process memory (Linux /proc) ----------------------------------------------------------------------

def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def timed_steps(step, warmup: int, steps: int) -> dict:
    """Median seconds of `steps` calls of `step` after `warmup`, the RSS before them and the peak RSS
    while they ran."""
    for _ in range(warmup):
        step()
    before = rss_mb("VmRSS")
    reset_peak_rss()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": float(np.median(times)), "rss_before_mb": before, "peak_rss_mb": rss_mb("VmHWM")}


# --- official: the PyTorch ReCamMaster step -----------------------------------------------------------

def variants() -> dict:
    """recam_jax's named DiT sizes plus this comparison's small one."""
    from recam_jax.models.dit import VARIANTS

    VARIANTS.setdefault("peers-small", PEERS_SMALL)
    return VARIANTS


def our_config(size: str, dtype: str, attention: str = "xla"):
    """configs/base.py at a comparison size, V2V only, one example (the official head is unbatched)."""
    from configs import base

    s = SIZES[size]
    config = base.get_config()
    config.model.variant = s["variant"]
    config.model.dtype = dtype
    config.model.param_dtype = "float32"
    config.data.batch_size = 1
    config.data.latent_shape = (s["frames"], 60, 104, 16)
    config.data.text_len = s["text_len"]
    config.data.text_dim = variants()[s["variant"]].get("text_dim", 4096)
    config.flow.p_t2v = config.flow.p_i2v = 0.0
    config.model.attention = attention
    return config


def official_train_step(size: str, dtype: str):
    """The official model, scheduler and optimizer at `size`, and one training step on fixed data."""
    import torch

    s, v = SIZES[size], {**dict(text_dim=4096, freq_dim=256), **variants()[SIZES[size]["variant"]]}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    with peers.official_modules(peers.WAN_VIDEO_DIT, peers.FLOW_MATCH) as (wan_video_dit, flow_match):
        model = wan_video_dit.WanModel(dim=v["dim"], in_dim=16, ffn_dim=v["ffn_dim"], out_dim=16, text_dim=v["text_dim"],
                                       freq_dim=v["freq_dim"], eps=1e-6, patch_size=(1, 2, 2),
                                       num_heads=v["num_heads"], num_layers=v["num_layers"], has_image_input=False)
        scheduler = flow_match.FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)  # its Wan preset
    scheduler.set_timesteps(1000, training=True)
    for block in model.blocks:  # LightningModelForTrain.__init__
        block.cam_encoder = torch.nn.Linear(12, v["dim"])
        block.projector = torch.nn.Linear(v["dim"], v["dim"])
        torch.nn.init.zeros_(block.cam_encoder.weight), torch.nn.init.zeros_(block.cam_encoder.bias)
        block.projector.weight = torch.nn.Parameter(torch.eye(v["dim"]))
        block.projector.bias = torch.nn.Parameter(torch.zeros(v["dim"]))
    model = model.to(device=device, dtype=torch_dtype)
    model.requires_grad_(False)
    model.train()
    for name, module in model.named_modules():
        if any(keyword in name for keyword in CAMERA_AND_SELF_ATTENTION):
            module.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2 * s["frames"], 60, 104, generator=generator).to(device, torch_dtype)
    context = torch.randn(1, s["text_len"], v["text_dim"], generator=generator).to(device, torch_dtype)
    camera = torch.randn(1, s["frames"], 12, generator=generator).to(device, torch_dtype)

    def step():  # LightningModelForTrain.training_step, then Lightning's zero_grad / backward / step
        noise = torch.randn_like(latents)
        timestep_id = torch.randint(0, scheduler.num_train_timesteps, (1,))
        timestep = scheduler.timesteps[timestep_id].to(dtype=torch_dtype, device=device)
        noisy_latents = scheduler.add_noise(latents, noise, timestep)
        target_len = noisy_latents.shape[2] // 2
        noisy_latents[:, :, target_len:] = latents[:, :, target_len:]
        training_target = scheduler.training_target(latents, noise, timestep)
        noise_pred = model(noisy_latents, timestep=timestep, cam_emb=camera, context=context,
                           use_gradient_checkpointing=True)
        loss = torch.nn.functional.mse_loss(noise_pred[:, :, :target_len].float(),
                                            training_target[:, :, :target_len].float())
        loss = loss * scheduler.training_weight(timestep)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    def device_peak_mb():
        return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None

    return step, device_peak_mb


def our_train_step(size: str, dtype: str):
    """Our compiled train step for configs/base.py at `size`, and one call of it on a fixed batch."""
    import jax
    from flax import nnx

    from recam_jax import sharding, train

    # The memory-safe attention of each backend: the official model uses torch's fused SDPA kernels.
    attention = {"cpu": "chunked", "gpu": "cudnn"}.get(jax.default_backend(), "splash")
    config = our_config(size, dtype, attention)
    mesh = train.make_mesh(config)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules_for(config.sharding_rules)):
        compiled, _, _, shardings, data_sharding = train.compile_step(config, mesh)
        state = jax.jit(train.init_fn(config), out_shardings=shardings)()
        batch = train.to_global(next(train.make_data_iterator(config, data_sharding)), data_sharding, config)
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    def device_peak_mb():
        stats = jax.local_devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        return stats["peak_bytes_in_use"] / 2**20 if stats else None

    return step, device_peak_mb


def run_side(side: str, size: str, dtype: str, warmup: int, steps: int) -> None:
    """One side in this process: prints its figures as one JSON line (device memory: the peak on an
    accelerator, None on CPU)."""
    step, device_peak_mb = (official_train_step if side == "official" else our_train_step)(size, dtype)
    result = timed_steps(step, warmup, steps)
    print("RESULT", json.dumps({**result, "device_peak_mb": device_peak_mb()}), flush=True)


def step_tflops(size: str) -> float:
    """Analytic model TFLOPs of one train step at `size` (recam_jax/flops.py; the same for both sides).
    Computed without starting a JAX backend: on a GPU the parent would otherwise hold its memory."""
    from recam_jax import flops, train

    config = our_config(size, "bfloat16")
    return flops.train_step_flops(train.model_config(config), config.data.latent_shape, config.data.text_len,
                                  config.trainable, config.data.batch_size) / 1e12


def compare_official(args) -> None:
    results = {}
    for side in ("official", "ours"):
        command = [sys.executable, __file__, "official", "--side", side, "--size", args.size, "--dtype", args.dtype,
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"the {side} side failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[side] = json.loads(line.removeprefix("RESULT "))
    s, tflops = SIZES[args.size], step_tflops(args.size)
    print(f"variant {s['variant']}, batch 1, latents 2×{s['frames']}×60×104×16, text {s['text_len']}, {args.dtype}, "
          f"camera + self-attention trained, median of {args.steps} steps after {args.warmup}")
    print("| step | step s | RSS before the steps MB | peak RSS MB | device peak MB | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for side, r in results.items():
        achieved = tflops / r["step_s"]
        mfu = f"{achieved / args.peak_tflops:.1%}" if args.peak_tflops else "-"
        device = f"{r['device_peak_mb']:.0f}" if r["device_peak_mb"] else "-"
        print(f"| {side} | {r['step_s']:.3f} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | {device} | "
              f"{achieved:.3f} | {mfu} |")
    ours, official = results["ours"], results["official"]
    memory = "device_peak_mb" if ours["device_peak_mb"] else "peak_rss_mb"
    print(f"\nours / official: step time {ours['step_s'] / official['step_s']:.2f}, "
          f"{memory} {ours[memory] / official[memory]:.2f}")


# --- maxdiffusion: AOT-compiled per-chip memory ---------------------------------------------------------

MAXDIFFUSION_CONFIG = os.path.join(peers.MAXDIFFUSION_SRC, "maxdiffusion", "configs", "base_wan_1_3b.yml")


def maxdiffusion_config(batch: int, remat_policy: str):
    """MaxDiffusion's Wan2.1-1.3B training config (its yml through its pyconfig) at a global batch.
    pyconfig multiplies per_device_batch_size by the local devices (here one CPU), so it is given the
    global batch."""
    from maxdiffusion import pyconfig

    pyconfig.initialize([__file__, MAXDIFFUSION_CONFIG, "skip_jax_distributed_system=True",
                         f"per_device_batch_size={batch}", "height=480", "width=832", "num_frames=81",
                         "max_sequence_length=512", f"remat_policy={remat_policy}", "run_name=peers"])
    return pyconfig.config


def maxdiffusion_compile(batch: int, devices, remat_policy: str):
    """MaxDiffusion's jitted train step, compiled for `devices` at `batch` (Wan2.1-1.3B, 21 + 21 latent
    frames as one 42-frame sequence) with one of its remat policies (NONE, its default, or FULL)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from flax.linen import partitioning as nn_partitioning
    from jax.sharding import Mesh
    from maxdiffusion import max_utils
    from maxdiffusion.models.wan.transformers.transformer_wan import WanModel
    from maxdiffusion.trainers import base_wan_trainer, wan_trainer

    from recam_jax.models.dit import VARIANTS

    config = maxdiffusion_config(batch, remat_policy)
    mesh = Mesh(max_utils.create_device_mesh(config, devices), config.mesh_axes)
    v = VARIANTS["1.3B"]
    wan_config = dict(  # the model config create_sharded_logical_transformer builds (sizes: the hub's 1.3B)
        num_attention_heads=v["num_heads"], attention_head_dim=v["dim"] // v["num_heads"], ffn_dim=v["ffn_dim"],
        num_layers=v["num_layers"], text_dim=4096, freq_dim=256, in_channels=16, out_channels=16,
        mesh=mesh, dtype=config.activations_dtype, weights_dtype=config.weights_dtype, attention=config.attention,
        precision=max_utils.get_precision(config), flash_block_sizes=max_utils.get_flash_block_sizes(config),
        remat_policy=config.remat_policy, names_which_can_be_saved=config.names_which_can_be_saved,
        names_which_can_be_offloaded=config.names_which_can_be_offloaded,
        flash_min_seq_length=config.flash_min_seq_length, dropout=config.dropout,
        mask_padding_tokens=config.mask_padding_tokens, scan_layers=config.scan_layers,
        enable_jax_named_scopes=config.enable_jax_named_scopes,
        attention_config={"use_base2_exp": config.use_base2_exp,
                          "use_experimental_scheduler": config.use_experimental_scheduler,
                          "ulysses_shards": config.ulysses_shards,
                          "ulysses_attention_chunks": config.ulysses_attention_chunks})
    trainer = types.SimpleNamespace(config=config)  # the WanTrainer methods used read only its config
    scheduler, scheduler_state = base_wan_trainer.BaseWanTrainer.create_scheduler(trainer)
    with mesh, nn_partitioning.axis_rules(config.logical_axis_rules):
        model = nnx.eval_shape(functools.partial(WanModel, **wan_config), rngs=nnx.Rngs(config.seed))
        graphdef, params, rest_of_state = nnx.split(model, nnx.Param, ...)
        learning_rate = max_utils.create_learning_rate_schedule(
            config.learning_rate, config.learning_rate_schedule_steps, config.warmup_steps_fraction,
            config.max_train_steps)
        optimizer = max_utils.create_optimizer(config, learning_rate)
        state = jax.eval_shape(lambda: base_wan_trainer.TrainState.create(
            apply_fn=graphdef.apply, params=params, tx=optimizer, graphdef=graphdef, rest_of_state=rest_of_state))
        state_shardings = nnx.get_named_sharding(state, mesh)
        data_shardings = wan_trainer.WanTrainer.get_data_shardings(trainer, mesh)
        train_step = wan_trainer.WanTrainer.get_train_step(
            trainer, types.SimpleNamespace(scheduler=scheduler), mesh, state_shardings, data_shardings)
        data = {"latents": jax.ShapeDtypeStruct((batch, 16, 42, 60, 104), jnp.float32),
                "encoder_hidden_states": jax.ShapeDtypeStruct((batch, 512, 4096), jnp.float32)}
        rng = jax.eval_shape(lambda: jax.random.key(config.seed))
        return train_step.lower(state, data, rng, scheduler_state).compile()


def our_tpu_config(batch: int, remat: str | None):
    """configs/base.py at `batch`; with a `remat`, MaxDiffusion's other settings: mesh context 4 (its
    `ici_context_parallelism: -1`), every parameter trained and stored in bf16, and a context-parallel
    splash attention."""
    from configs import base

    config = base.get_config()
    config.data.batch_size = batch
    if remat is not None:
        config.mesh.fsdp, config.mesh.context = 1, -1
        config.sharding_rules = "fsdp_context"  # weights over fsdp × context, as its `embed` rule
        config.model.attention = "ulysses_splash"
        config.model.remat = remat
        config.model.param_dtype = "bfloat16"
        config.trainable = "all"
    return config


def compile_memory(row: str, batch: int, devices) -> dict[str, int]:
    """Per-chip memory of one row's train step at `batch` (`ROWS`)."""
    from recam_jax import compile as planner

    peer, remat = ROWS[row]
    if peer == "maxdiffusion":
        return planner.memory_bytes(maxdiffusion_compile(batch, devices, remat))
    return planner.plan(our_tpu_config(batch, remat), devices).memory_bytes


# Row → (whose step, remat): MaxDiffusion's step with its default (no remat) and with full remat, ours
# with MaxDiffusion's settings at each, and ours as configs/base.py trains (remat full, fsdp, camera +
# self-attention trained over fp32 master weights, frozen weights in bf16).
ROWS = {
    "MaxDiffusion, its defaults (remat NONE)": ("maxdiffusion", "NONE"),
    "ours, MaxDiffusion's settings, remat none": ("ours", "none"),
    "MaxDiffusion, remat FULL": ("maxdiffusion", "FULL"),
    "ours, MaxDiffusion's settings, remat full": ("ours", "full"),
    "ours, configs/base.py": ("ours", None),
}


def compile_row(row: str, batch: int, devices) -> dict:
    """Compile seconds and per-chip memory of one row at `batch`; {"error": ...} when it does not compile."""
    start = time.perf_counter()
    try:
        memory = compile_memory(row, batch, devices)
    except Exception as error:  # XLA refuses a program larger than HBM (RESOURCE_EXHAUSTED)
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:240]}",
                "compile_s": time.perf_counter() - start}
    return {"memory": memory, "compile_s": time.perf_counter() - start}


def fits(row: dict, hbm_bytes: float) -> bool:
    return "memory" in row and row["memory"]["total"] <= hbm_bytes


def largest_batch(row: str, devices, hbm_bytes: float, step: int, max_batch: int) -> tuple[str, dict]:
    """The largest multiple of `step` up to `max_batch` whose step fits (doubling, then bisecting; "≥ N"
    when `max_batch` cut the search), and the compile of each batch tried."""
    tried = {}
    low, high = 0, None
    batch = step
    while high is None and batch <= max_batch:
        tried[batch] = compile_row(row, batch, devices)
        print(f"  {row}: batch {batch}: {describe(tried[batch])}", flush=True)
        if fits(tried[batch], hbm_bytes):
            low, batch = batch, batch * 2
        else:
            high = batch
    while high is not None and high - low > step:
        batch = (low + high) // 2 // step * step
        tried[batch] = compile_row(row, batch, devices)
        print(f"  {row}: batch {batch}: {describe(tried[batch])}", flush=True)
        low, high = (batch, high) if fits(tried[batch], hbm_bytes) else (low, batch)
    if high is None:
        return f"≥ {low}", tried
    return str(low) if low else f"< {step}", tried


def describe(row: dict) -> str:
    if "memory" not in row:
        return f"does not compile ({row['error']}), {row['compile_s']:.0f} s"
    return f"{row['memory']['total'] / GiB:.2f} GiB per chip, compiled in {row['compile_s']:.0f} s"


def compare_maxdiffusion(args) -> None:
    from recam_jax import compile as planner

    devices = planner.topology_devices(args.topology)
    hbm = planner.device_memory(devices)
    batch = len(devices)  # MaxDiffusion shards the batch over every device: one example each at least
    print(f"{args.topology} ({len(devices)} × {devices[0].device_kind}, {hbm / GiB:.0f} GiB), Wan2.1-1.3B, "
          f"480×832, 21 + 21 latent frames, text 512, bf16 compute", flush=True)
    results = {row: largest_batch(row, devices, hbm, step=batch, max_batch=args.max_batch) for row in ROWS}
    print(f"\n| step | per chip GiB at batch {batch} | arguments | temporaries | compile s | largest batch that fits |")
    print("|---|---|---|---|---|---|")
    for row, (largest, tried) in results.items():
        r = tried[batch]
        if "memory" in r:
            m = r["memory"]
            print(f"| {row} | {m['total'] / GiB:.2f} | {m['arguments'] / GiB:.2f} | {m['temporaries'] / GiB:.2f} | "
                  f"{r['compile_s']:.0f} | {largest} |")
        else:
            print(f"| {row} | {r['error']} | | | {r['compile_s']:.0f} | {largest} |")
    for remat_row, (theirs, ours) in (("none", list(ROWS)[:2]), ("full", list(ROWS)[2:4])):
        (their_largest, their_tried), (our_largest, our_tried) = results[theirs], results[ours]
        if "memory" in their_tried[batch] and "memory" in our_tried[batch]:
            ratio = our_tried[batch]["memory"]["total"] / their_tried[batch]["memory"]["total"]
            print(f"remat {remat_row}: ours / MaxDiffusion per-chip memory {ratio:.2f}, "
                  f"largest batch {our_largest} vs {their_largest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="peer", required=True)
    official = subcommands.add_parser("official", help="the official PyTorch ReCamMaster step, on this machine")
    official.add_argument("--size", choices=sorted(SIZES), default="small")
    official.add_argument("--dtype", default="float32", help="parameters and compute of both sides")
    official.add_argument("--warmup", type=int, default=2)
    official.add_argument("--steps", type=int, default=5)
    official.add_argument("--peak_tflops", type=float, default=0.0, help="of the device, for MFU (H200: 989)")
    official.add_argument("--side", choices=("official", "ours"), help=argparse.SUPPRESS)  # a child process
    maxdiffusion = subcommands.add_parser("maxdiffusion", help="MaxDiffusion's Wan2.1 step, AOT for a TPU topology")
    maxdiffusion.add_argument("--topology", default="v5p-8")
    maxdiffusion.add_argument("--max_batch", type=int, default=64)
    args = parser.parse_args()
    if args.peer == "maxdiffusion":
        compare_maxdiffusion(args)
    elif args.side:
        run_side(args.side, args.size, args.dtype, args.warmup, args.steps)
    else:
        compare_official(args)


if __name__ == "__main__":
    main()
