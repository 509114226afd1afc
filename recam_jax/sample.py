"""Sampling: the source video's scene re-rendered along a new camera trajectory, in JAX.

    python -m recam_jax.sample --params step20000.ckpt --video in.mp4 --caption "a man talks ..." \
        --trajectory camera_extrinsics.json --camera 1 --text_encoder_dir /models/umt5-xxl \
        --vae wan2.1 --vae_path /models/Wan2.1_VAE.pth --out out.mp4
    python -m recam_jax.sample --params ... --batch renders.csv --out_dir renders/ ...

Euler steps over the same shifted σ grid training draws from (`flow.shifted_sigmas`, one `shift`
for both), classifier-free guidance against a negative caption, as the official inference does.
The camera input follows the official inference: the target trajectory relative to its own
first frame (the source camera is taken to start there); the lens input (read by the intrinsics and
plucker camera encodings) is the trajectory's target lens and `--source_focal_mm`. Each step is one
jitted call (both guidance branches), stepped from Python under a progress bar. Defaults fit the official size on
one device: splash attention on TPU, cuDNN on GPU, the key-chunked XLA path elsewhere; `--attention
xla` (the whole score matrix) is refused when it cannot fit. `--batch` renders every row of a CSV
(video, caption, trajectory[, camera]) and a grid of [source | render] rows. See docs/sampling.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from data_pipeline import cameras, multicam
from recam_jax import convert, flow, sharding, storage, trajectory
from recam_jax.batch import batch_spec
from recam_jax.models.attention import BACKENDS
from recam_jax.models.vae import VAE_CONFIGS, WanVAE

# The attention backend that fits the official size on one device of each platform.
DEFAULT_ATTENTION = {"tpu": "splash", "gpu": "cudnn", "cpu": "chunked"}
GiB = 2**30
BATCH_COLUMNS = ("video", "caption", "trajectory")  # required; `camera` and `source_focal_mm` are optional


def euler_step(apply_fn, x, sigma, sigma_next, source, text, negative_text, camera, intrinsics,
               guidance: float):
    """x at σ → x at σ_next along dx/dσ = v; the model sees [x ‖ source] and predicts v on x.

    `apply_fn(latents, timesteps, text, camera, intrinsics)`; `intrinsics` (b, latent frames, 8): the
    target's then the source's lens, read by the non-official camera encodings (None for official
    models); `guidance` 1 skips the negative pass.
    """
    frames = x.shape[1]
    timesteps = jnp.full((x.shape[0],), sigma * flow.NUM_TRAIN_TIMESTEPS, jnp.float32)

    def velocity(caption):
        latents = jnp.concatenate([x, source], axis=1)
        return apply_fn(latents, timesteps, caption, camera, intrinsics)[:, :frames].astype(jnp.float32)

    v = velocity(text)
    if guidance != 1.0:
        v_negative = velocity(negative_text)
        v = v_negative + guidance * (v - v_negative)
    return x + (sigma_next - sigma) * v


def euler_sample(apply_fn, noise, source, text, negative_text, camera, sigmas, guidance: float, *,
                 intrinsics=None, step=euler_step, progress: bool = False):
    """Integrates from σ = sigmas[0] to 0, one `step` call per σ from Python (a progress bar with
    `progress`); `step` is `euler_step` or a jitted copy of it, compiled once for every step."""
    x = noise.astype(jnp.float32)
    sigmas = np.asarray(sigmas, np.float32)
    pairs = list(zip(sigmas, np.append(sigmas[1:], np.float32(0.0))))
    for sigma, sigma_next in tqdm(pairs, desc="denoising", unit="step", disable=not progress):
        x = step(apply_fn, x, sigma, sigma_next, source, text, negative_text, camera, intrinsics, guidance)
    return x


def _run_dit(graphdef, states, *inputs):
    return nnx.merge(graphdef, *states)(*inputs)


def dit_function(graphdef, *states):
    """The DiT as a pytree callable: a jitted step takes the weights (`nnx.split`'s states, as they
    are sharded) as arguments, not constants."""
    return jax.tree_util.Partial(_run_dit, graphdef, states)


# One denoising step (both guidance branches) as one program.
denoise_step = jax.jit(euler_step, static_argnames="guidance")


# --- fitting the device --------------------------------------------------------------------------


def default_attention(devices) -> str:
    """The attention backend that fits the official size on these devices' platform."""
    return DEFAULT_ATTENTION.get(devices[0].platform, "chunked")


def tokens_per_example(cfg, latent_shape) -> int:
    """Tokens of [target ‖ source] for one target latent (frames, height, width, channels)."""
    return 2 * math.prod(latent_shape[:3]) // math.prod(cfg.patch_size)


def check_attention_memory(cfg, latent_shape, mesh, device_memory_bytes: float | None) -> None:
    """Refuses the `xla` backend when its float32 score matrix (heads × L² per example, split over
    the tensor and context axes) exceeds one device's memory, naming both in GiB."""
    if cfg.attention != "xla" or device_memory_bytes is None:
        return
    device = mesh.devices.flat[0]
    length = tokens_per_example(cfg, latent_shape)
    needed = cfg.num_heads * length**2 * 4 / (mesh.shape["tensor"] * mesh.shape["context"])
    if needed > device_memory_bytes:
        raise ValueError(
            f"--attention xla materialises the {cfg.num_heads} × {length:,}² float32 score matrix: "
            f"{needed / GiB:.1f} GiB per example per device, more than the {device_memory_bytes / GiB:.1f} GiB "
            f"of one {device.device_kind}; use --attention {default_attention([device])} (the default here), "
            "which never holds it whole")


def local_memory_bytes(device) -> float | None:
    """Memory of a local device: what the runtime reports for an accelerator, the host's RAM for a CPU."""
    from recam_jax import compile as planner  # not at import: `python -m recam_jax.compile` imports this module
    if device.platform == "cpu":
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return planner.local_device_memory(device)


def parse_mesh(spec: str) -> dict[str, int]:
    """'tensor=4,context=2' → {'tensor': 4, 'context': 2} (axes of sharding.MESH_AXES, one may be -1)."""
    sizes = {}
    for term in filter(None, spec.split(",")):
        axis, _, size = term.partition("=")
        if axis.strip() not in sharding.MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {spec!r}: {term!r} is not AXIS=SIZE with AXIS one of {sharding.MESH_AXES}")
        sizes[axis.strip()] = int(size)
    return sizes


def sampling_mesh(spec: str, devices):
    """The mesh of `--mesh` over all devices; without it, one device (sampling a video needs no more)."""
    return sharding.make_mesh(parse_mesh(spec), devices=devices if spec else devices[:1])


def abstract_inputs(cfg, latent_shape, text_len: int, batch: int, mesh, params_sharding):
    """ShapeDtypeStructs of `denoise_step`'s arguments (shapes of the training batch, intrinsics
    included, as the CLI passes them for every encoding): weights sharded, the rest replicated."""
    abstract_model = convert.abstract_model(cfg)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.state(abstract_model, nnx.Param), params_sharding)
    replicated = NamedSharding(mesh, PartitionSpec())
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
            for k, v in batch_spec(batch, latent_shape, text_len, cfg.text_dim).items()}
    sigma = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    return (dit_function(nnx.graphdef(abstract_model), params), spec["target_latents"], sigma, sigma,
            spec["source_latents"], spec["text_embeds"], spec["text_embeds"], spec["camera"], spec["intrinsics"])


def compile_denoise_step(cfg, mesh, latent_shape, text_len: int, batch: int = 1, guidance: float = 5.0,
                         rules=sharding.DEFAULT_RULES, device_memory_bytes: float | None = None):
    """`denoise_step` AOT-compiled for `mesh` from shapes alone (a topology description works: nothing
    runs); `--attention xla` over `device_memory_bytes` is refused first."""
    check_attention_memory(cfg, latent_shape, mesh, device_memory_bytes)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        params_sharding = sharding.param_shardings(nnx.state(convert.abstract_model(cfg), nnx.Param), mesh, rules)
        inputs = abstract_inputs(cfg, latent_shape, text_len, batch, mesh, params_sharding)
        return denoise_step.lower(*inputs, guidance=guidance).compile()


def compile_vae_decode(latent_shape, mesh, batch: int = 1, tile=None, vae: str = "wan2.1"):
    """The VAE decode of `batch` latents AOT-compiled for the first device of `mesh` (tiled when `tile`)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: WanVAE(VAE_CONFIGS[vae], rngs=nnx.Rngs(0))))
    decode = lambda params, z: (nnx.merge(graphdef, params).decode_tiled(z, tile) if tile
                                else nnx.merge(graphdef, params).decode(z))
    one_device = NamedSharding(jax.sharding.Mesh(mesh.devices.flat[:1], ("one",)), PartitionSpec())
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device)
    z = jax.ShapeDtypeStruct((batch, *latent_shape), jnp.float32, sharding=one_device)
    return jax.jit(decode).lower(jax.tree.map(place, params), z).compile()


# --- the command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True, help="ReCamMaster/Wan PyTorch weights or a recam_jax params folder")
    parser.add_argument("--video", help="source video (or --batch)")
    parser.add_argument("--caption")
    parser.add_argument("--negative_caption", default=WAN_NEGATIVE_PROMPT,
                        help="the caption guidance steers away from; default: the official inference's (Wan's)")
    parser.add_argument("--trajectory",
                        help="a camera JSON (MultiCamVideo format), a preset (pan_right, ..., arc_right) or a spec "
                             "like 'pan:30+dolly:1' (see docs/trajectories.md)")
    parser.add_argument("--camera", type=int, default=1, help="which camXX of a trajectory JSON to follow")
    parser.add_argument("--source_focal_mm", type=float, default=trajectory.DEFAULT_FOCAL_MM,
                        help="the source video's lens (mm, on MultiCamVideo's 23.76 mm sensor); the target's "
                             "starts there unless the trajectory sets it (a focal:MM term, a focal_lengths.json "
                             "beside a camera JSON). Read only by the intrinsics and plucker camera encodings")
    parser.add_argument("--out", help="output .mp4 (one video)")
    parser.add_argument("--batch", help="CSV with columns video, caption, trajectory (and optionally camera, "
                                        "source_focal_mm): "
                                        "one mp4 per row in --out_dir, plus grid.mp4 of [source | render] rows")
    parser.add_argument("--out_dir", help="output folder of --batch")
    parser.add_argument("--text_encoder_dir", required=True)
    parser.add_argument("--vae", default="wan2.1", help="VAE config: wan2.1 (needs --vae_path) or demo")
    parser.add_argument("--vae_path", default=None)
    parser.add_argument("--vae_tile", default="", help="decode in overlapping spatial tiles of H,W latent pixels (e.g. "
                                                       "32,32; tiles overlap by 8): bounded memory at high resolution")
    parser.add_argument("--num_frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--text_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (official: 50)")
    parser.add_argument("--shift", type=float, default=None,
                        help="σ shift; default: the one the weights were trained with (their model record), else "
                             f"{OFFICIAL_SHIFT} (the official ReCamMaster/Wan2.1 inference)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (official: 5)")
    parser.add_argument("--fps", type=float, default=30, help="frame rate of the written mp4 (official: 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_heads", type=int, default=None,
                        help="DiT heads, only for weights with no model record that are no official Wan2.1 size")
    parser.add_argument("--attention", choices=sorted(BACKENDS), default=None,
                        help=f"attention backend; default by platform: {DEFAULT_ATTENTION}, chunked elsewhere")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the DiT (weights keep theirs)")
    parser.add_argument("--timestep_dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype the timesteps are rounded to; default: the one the weights were trained with "
                             "(their model record; bfloat16 for the official releases, as their code casts)")
    parser.add_argument("--mesh", default="", help="mesh axis sizes over all devices, e.g. 'tensor=4' or "
                                                   "'fsdp=2,context=2' (context needs --attention ring or ulysses); "
                                                   "default: one device")
    return parser


def read_batch(path: str) -> list[dict]:
    """The rows of a `--batch` CSV; a missing column or empty cell names the file, row and column."""
    with storage.open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BATCH_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the columns are {BATCH_COLUMNS} "
                             "(+ camera, source_focal_mm)")
        rows = list(reader)
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        empty = [c for c in BATCH_COLUMNS if not (row[c] or "").strip()]
        if empty:
            raise ValueError(f"{path}: line {number}: empty {empty}")
        if not (row.get("camera") or "1").strip().isdigit():
            raise ValueError(f"{path}: line {number}: camera {row['camera']!r} is not a camera number")
        if not _positive_number(row.get("source_focal_mm") or "1"):
            raise ValueError(f"{path}: line {number}: source_focal_mm {row['source_focal_mm']!r} is not a positive "
                             "number of mm")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def jobs_of(args) -> list[dict]:
    """The videos to render: the --batch rows, or the one of --video/--caption/--trajectory/--out."""
    if args.source_focal_mm <= 0:
        raise ValueError(f"--source_focal_mm {args.source_focal_mm:g}: a focal length is a positive number of mm")
    if args.batch:
        if not args.out_dir:
            raise ValueError("--batch needs --out_dir")
        rows = read_batch(args.batch)
        name = lambda i, row: f"{i:03d}_{storage.basename(row['video']).rsplit('.', 1)[0]}.mp4"
        return [{**row, "camera": int(row.get("camera") or 1), "out": storage.join(args.out_dir, name(i, row)),
                 "source_focal_mm": float(row.get("source_focal_mm") or args.source_focal_mm)}
                for i, row in enumerate(rows)]
    missing = [f"--{name}" for name in ("video", "caption", "trajectory", "out") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"give {', '.join(missing)} (or --batch CSV with --out_dir)")
    return [dict(video=args.video, caption=args.caption, trajectory=args.trajectory, camera=args.camera, out=args.out,
                 source_focal_mm=args.source_focal_mm)]


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.round((frames + 1) * 127.5).clip(0, 255).astype(np.uint8)


# The official inference's defaults (../shared/peers/recammaster, docs/sampling.md says where each is set).
OFFICIAL_SHIFT = 5.0  # ReCamMaster's inference script and Wan2.1's text-to-video default
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def sampling_shift(asked: float | None, params: str) -> float:
    """The σ shift to sample with: the one asked for, else the training shift the weights record."""
    if asked is not None:
        return asked
    record = convert.read_model_record(params)
    recorded = record["flow_shift"] if record else None
    return OFFICIAL_SHIFT if recorded is None else recorded


def sampling_timestep_dtype(asked: str | None, params: str) -> str:
    """The dtype timesteps are rounded to: the one asked for, else the one the weights were trained with."""
    return asked or convert.trained_timestep_dtype(convert.read_model_record(params))


def lens_input(job: dict, frames: int, aspect: float) -> np.ndarray:
    """The intrinsics input (latent frames, 8) of a job: its trajectory's target lens, then the source's."""
    source = np.full(frames, job["source_focal_mm"])
    target = trajectory.target_focal_lengths(job["trajectory"], job["camera"], frames, job["source_focal_mm"])
    return cameras.training_intrinsics(source, target, multicam.SENSOR_SIZE_MM, aspect)


def main(argv=None) -> None:
    from data_pipeline import text_encoder, video, video_encoder

    args = build_parser().parse_args(argv)
    jobs = jobs_of(args)
    devices = jax.devices()
    mesh = sampling_mesh(args.mesh, devices)
    attention = args.attention or default_attention(devices)
    model = convert.load_any(args.params, num_heads=args.num_heads, dtype=args.dtype, attention=attention,
                             timestep_dtype=sampling_timestep_dtype(args.timestep_dtype, args.params), on_host=True)
    latent_shape = video_encoder.latent_shape(args.num_frames, args.height, args.width, model.cfg.in_dim)
    check_attention_memory(model.cfg, latent_shape, mesh, local_memory_bytes(devices[0]))  # before the long work
    tile = tuple(int(t) for t in args.vae_tile.split(",")) if args.vae_tile else None
    shift = sampling_shift(args.shift, args.params)

    vae = video_encoder.make_video_encoder(args.vae, args.vae_path)
    encode_text = text_encoder.TextEncoder(args.text_encoder_dir, args.text_len)
    embed = lambda caption: text_encoder.pad_text(encode_text(caption), args.text_len)[0][None]
    negative = embed(args.negative_caption)
    graphdef, params = nnx.split(model)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        params = jax.device_put(params, sharding.param_shardings(params, mesh))
        dit = dit_function(graphdef, params)
        grid_rows = []
        for job in jobs:
            source_video = video.read_video(job["video"], args.num_frames, args.height, args.width)
            camera = cameras.inference_camera(trajectory.load(job["trajectory"], job["camera"], args.num_frames))[None]
            intrinsics = lens_input(job, args.num_frames, args.width / args.height)[None]
            source = vae(source_video[None])
            noise = jax.random.normal(jax.random.key(args.seed), source.shape, jnp.float32)
            latents = euler_sample(dit, noise, source, embed(job["caption"]), negative, camera,
                                   flow.shifted_sigmas(args.steps, shift), args.guidance,
                                   intrinsics=intrinsics, step=denoise_step, progress=True)
            frames = to_uint8(vae.decode(np.asarray(latents), tile=tile)[0])
            video.write_video(job["out"], frames, args.fps)
            print(f"wrote {job['out']}", flush=True)
            grid_rows.append(np.concatenate([to_uint8(source_video), frames], axis=2))
    if args.batch:
        grid = storage.join(args.out_dir, "grid.mp4")
        video.write_video(grid, np.concatenate(grid_rows, axis=1), args.fps)
        print(f"wrote {grid}")


if __name__ == "__main__":
    main()
