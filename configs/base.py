"""ReCamMaster on Wan2.1-T2V-1.3B at 480×832, 81 frames (21 + 21 latent frames), text length 512.

    python -m recam_jax.train --config configs/base.py --workdir /path/to/run \
        --config.init_from=/path/to/Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors \
        --config.data.source=tfrecord --config.data.path=/path/to/shards

Hardware: a TPU v5p-8 (4 chips, one example each, fsdp over all): 16.1 GiB per chip in the AOT plan
of docs/scale.md (`python -m recam_jax.compile --config configs/base.py --topology v5p-8`). On GPUs
use `--config.model.attention=cudnn`. One example is 65,520 tokens.
Recipe: the paper's (camera modules + self-attention trained, AdamW 1e-4, T2V/I2V/V2V mixing).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Seed of every random draw (init, data order, noise): the same seed gives the same run.
    c.seed = 0
    # Total optimizer steps.
    c.steps = 10_000

    c.model = ml_collections.ConfigDict()
    # Named DiT size: tiny, small, 1.3B, 14B (recam_jax/models/dit.py VARIANTS).
    c.model.variant = "1.3B"
    # Parameters (and optimizer moments) are kept in param_dtype; matmuls run in dtype.
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    # Frozen (untrained) parameters held and stored in `dtype` rather than param_dtype: the 1.3B's
    # frozen half in bf16 halves its memory; they are written once per run, not in every checkpoint.
    c.model.frozen_in_compute_dtype = True
    # Per-block rematerialisation: none, full, save_dots.
    c.model.remat = "full"
    # Blocks stacked on a `layers` axis under one lax.scan: one block is traced and compiled, not 30.
    # Checkpoints of a run hold one layout: keep it for the run (`init_from` converts either way).
    c.model.scan_layers = True
    # Attention backend (recam_jax/models/attention.py): splash (TPU kernel), cudnn (GPU), xla
    # (reference; materialises L×L logits), ring / ulysses / ulysses_splash (context parallel).
    c.model.attention = "splash"
    # Timesteps are rounded to this dtype before the DiT embeds them: the official ReCamMaster
    # training and inference cast them to bfloat16 (docs/sampling.md measures the difference).
    c.model.timestep_dtype = "float32"
    # Tiles of the splash kernels in tokens (multiples of 128): forward queries and keys, and the
    # backward's dK/dV and dQ kernels' (recam_jax/models/attention.py SplashBlocks).
    c.model.splash_blocks = ml_collections.ConfigDict(
        dict(q=512, kv=512, q_dkv=512, kv_dkv=512, q_dq=512, kv_dq=512))
    # What the camera path reads (recam_jax/models/camera_encoding.py): official (relative poses, the
    # released layout), intrinsics (+ per-frame focal and principal point of target and source) or
    # plucker (+ per-token rays of the target camera). The extra modules start at zero (a no-op);
    # non-official runs export .safetensors, which keeps them.
    c.model.camera_encoding = "official"

    # PyTorch weights (Wan2.1, diffusers or ReCamMaster layout) or a recam_jax params folder to
    # start from; empty = random init. Camera modules start at their official init when absent.
    c.init_from = ""
    # Which parameters train: camera, camera+self_attn (the paper), all.
    c.trainable = "camera+self_attn"

    c.flow = ml_collections.ConfigDict()
    # Timestep shift of the sigma grid, shared by training and sampling (Wan: 5).
    c.flow.shift = 5.0
    # uniform (over the shifted 1000-step grid, as the official code) or logit_normal.
    c.flow.timestep_sampling = "uniform"
    c.flow.logit_mean = 0.0
    c.flow.logit_std = 1.0
    # none, or bsmntw: the official Gaussian-bump weights, mean 1 over the whole grid.
    c.flow.loss_weighting = "bsmntw"
    # Timestep range (of 1000) at which the source half is noised; (0, 0) keeps it clean as in the
    # released code; the paper uses (200, 500).
    c.flow.condition_noise = (0.0, 0.0)
    # Task mixing of the paper: P(T2V: every source frame noise), P(I2V: all but the first).
    c.flow.p_t2v = 0.2
    c.flow.p_i2v = 0.2

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.end_learning_rate = 1e-5
    c.optimizer.warmup_steps = 100
    # constant or cosine (decaying over decay_steps after warmup).
    c.optimizer.schedule = "constant"
    c.optimizer.decay_steps = 10_000
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-2
    # Gradients are clipped to this global norm.
    c.optimizer.grad_clip = 1.0
    # EMA of the trainable parameters; 0 turns it off.
    c.optimizer.ema_decay = 0.0
    # Micro-batches per optimizer step (the global batch is split into this many).
    c.optimizer.grad_accum_steps = 1
    # A NaN/inf loss or gradient: stop (False) or skip the update and count it (True).
    c.optimizer.skip_nonfinite = False

    c.data = ml_collections.ConfigDict()
    # synthetic (structured random latents, no files) or tfrecord (data_pipeline shards).
    c.data.source = "synthetic"
    # Folder of prepared shards (tfrecord source).
    c.data.path = ""
    # Global batch size (examples per optimizer step, all hosts together).
    c.data.batch_size = 4
    # One half's latent shape: (frames, height, width, channels); 81×480×832 video → 21×60×104.
    c.data.latent_shape = (21, 60, 104, 16)
    # Text tokens after padding, and the text encoder width (umT5-XXL: 4096).
    c.data.text_len = 512
    c.data.text_dim = 4096
    # Fixed (target, source) camera pairs per held-out scene in the eval set (tfrecord source).
    c.data.eval_pairs_per_scene = 2
    # Data-loading worker processes per host (0: read in the main process with threads).
    c.data.worker_count = 0
    # A corrupt example (CRC, shape, NaN, wrong scene; tfrecord source): stop (False) or drop it, log
    # it and count it in the metrics' `skipped_corrupt` (True).
    c.data.skip_corrupt = False
    # Examples in the synthetic dataset (its eval split has as many, held out).
    c.data.synthetic_examples = 1024

    # Mesh axis sizes within one slice; -1 fills the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.context = 1
    c.mesh.tensor = 1
    # Multi-slice (DCN): the job's slices (TPU slices; on CPU/GPU each process is one) and how many
    # of them each axis spans (product = num_slices; -1 fills). An axis's full size is its size above
    # times its dcn_ size. Only num_slices > 1 uses them; keep data (or fsdp) across slices.
    c.mesh.num_slices = 1
    c.mesh.dcn_data = -1
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_context = 1
    c.mesh.dcn_tensor = 1
    # Logical-axis rule set of recam_jax/sharding.py (default, replicated, tensor_only, fsdp_context).
    c.sharding_rules = "default"
    # With fsdp or tensor > 1: fail if more than this fraction of parameter elements stays whole.
    c.max_unsharded_fraction = 0.01

    # Logging, checkpoints and exports, in steps.
    c.log_every = 10
    c.checkpoint_every = 500
    # Keep the last `keep_last` checkpoints plus every `keep_every`-th step (0: none extra).
    c.keep_last = 3
    c.keep_every = 5000
    # Validation loss on fixed held-out batches every N steps (0: never).
    c.eval_every = 1000
    # Samples in TensorBoard every N steps (0: never): held-out scenes re-rendered along their target
    # cameras, [source | generated | ground truth] (recam_jax/train_samples.py).
    c.sample_every = 1000
    c.sample = ml_collections.ConfigDict()
    # Scenes shown (the first of the first eval batch; rendered in multiples of data × fsdp).
    c.sample.scenes = 2
    # Euler steps over the training σ grid, no guidance.
    c.sample.steps = 10
    # Centre crop (height, width) of the latents sampled, in latent pixels; 0 keeps the axis whole.
    c.sample.crop = (0, 0)
    # Latents to pixels: latents (3 channels as colours, no weights), wan2.1 (with vae_path), demo.
    c.sample.vae = "latents"
    c.sample.vae_path = ""
    # Export a ReCamMaster .ckpt every N steps (0: only at the end).
    c.export_every = 0
    # Export the EMA parameters instead of the raw ones (needs ema_decay > 0).
    c.export_ema = False
    # Trace `profile_steps` steps from step `profile_from_step` with jax.profiler into WORKDIR/tensorboard
    # (TensorBoard's profile tab, xprof); 0: no trace. Start after the first steps (compile, warm-up).
    c.profile_steps = 0
    c.profile_from_step = 10
    # Peak dense bf16 TFLOP/s of one device, for MFU (TPU v5p: 459; H100 SXM: 989).
    c.peak_tflops_per_device = 459.0
    # jax's persistent compilation cache (local or gs://); empty: WORKDIR/compilation_cache. Runs of
    # a sweep that share shapes and mesh may share one folder and compile each program once.
    c.compilation_cache = ""
    return c
