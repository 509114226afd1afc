"""Rectified-flow objective of ReCamMaster: noise the target half, condition on the source half.

Conventions of the official Wan / DiffSynth code: σ ∈ [0, 1], timestep = 1000·σ,
x_σ = (1 − σ)·x0 + σ·ε, the model predicts the velocity ε − x0. Training σs come from the same
shifted 1000-step grid the sampler uses (`shifted_sigmas`), so one `shift` serves both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTINGS = ("none", "bsmntw")
TASKS = ("v2v", "i2v", "t2v")  # the task codes condition_latents draws: 0, 1, 2
SIGMA_BUCKETS = 4  # the loss is also reported over σ in [0, ¼), [¼, ½), [½, ¾), [¾, 1]


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """How training draws noise levels, weights them, and builds the conditioning half."""

    shift: float = 5.0  # Wan's default; used by training and by sampling
    timestep_sampling: str = "uniform"  # "uniform" over the shifted grid, or "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str = "none"  # "none" or "bsmntw" (the official Gaussian bump, mean 1 over the grid)
    condition_noise: tuple[float, float] = (0.0, 0.0)  # timestep range noising the source; the paper: (200, 500)
    p_t2v: float = 0.0  # probability that every source frame is replaced by noise
    p_i2v: float = 0.0  # probability that all but the first source frame are replaced by noise


def shift_sigma(sigma, shift: float):
    """Wan's timestep shift s' = shift·s / (1 + (shift − 1)·s): more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def shifted_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """The shifted σ grid from 1 down to 0 (exclusive), as DiffSynth's FlowMatchScheduler builds it."""
    return shift_sigma(np.linspace(1.0, 0.0, num_steps + 1)[:-1], shift)


def _bump(timesteps, xp=jnp):
    """The official "bsmntw" Gaussian bump, unnormalised: peaks at timestep 500."""
    n = NUM_TRAIN_TIMESTEPS
    return xp.exp(-2.0 * ((timesteps - n / 2) / n) ** 2)


def loss_weight(sigma: jax.Array, cfg: FlowConfig) -> jax.Array:
    """Per-example loss weight. The bump is normalised over the whole shifted 1000-step grid (mean 1
    there), never over the sampled batch, so the loss scale does not depend on the batch size."""
    if cfg.loss_weighting == "none":
        return jnp.ones_like(sigma)
    if cfg.loss_weighting != "bsmntw":
        raise ValueError(f"flow.loss_weighting={cfg.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
    grid_bump = _bump(shifted_sigmas(NUM_TRAIN_TIMESTEPS, cfg.shift) * NUM_TRAIN_TIMESTEPS, xp=np)
    floor, mean = grid_bump.min(), (grid_bump - grid_bump.min()).mean()
    return (_bump(sigma * NUM_TRAIN_TIMESTEPS) - floor) / mean


def sample_sigmas(keys: jax.Array, cfg: FlowConfig) -> jax.Array:
    """One training noise level per key: a uniform draw from the shifted grid, or a shifted logit-normal."""
    if cfg.timestep_sampling == "uniform":
        grid = jnp.asarray(shifted_sigmas(NUM_TRAIN_TIMESTEPS, cfg.shift), jnp.float32)
        return grid[jax.vmap(lambda k: jax.random.randint(k, (), 0, NUM_TRAIN_TIMESTEPS))(keys)]
    if cfg.timestep_sampling == "logit_normal":
        normal = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
        return shift_sigma(jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * normal), cfg.shift)
    raise ValueError(f"flow.timestep_sampling={cfg.timestep_sampling!r} is not one of {TIMESTEP_SAMPLINGS}")


def _per_example(values, like):
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _split_each(keys: jax.Array, num: int) -> list[jax.Array]:
    """`num` independent key arrays from one key per example."""
    return list(jax.vmap(lambda k: jax.random.split(k, num), out_axes=1)(keys))


def _normal_each(keys: jax.Array, shape) -> jax.Array:
    """Standard normal noise of `shape` per example, from that example's key."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def condition_latents(keys: jax.Array, source: jax.Array, cfg: FlowConfig) -> tuple[jax.Array, jax.Array]:
    """The source half the model sees, and the task drawn per example (0 V2V, 1 I2V, 2 T2V).

    V2V keeps every source frame; I2V replaces all but the first with noise; T2V replaces all.
    The kept frames are noised at a σ drawn from the `condition_noise` timestep range (0, 0 keeps
    them clean), with noise independent of the target's.
    """
    task_keys, level_keys, noise_keys, replace_keys = _split_each(keys, 4)
    frames = source.shape[1]
    u = jax.vmap(jax.random.uniform)(task_keys)
    task = jnp.where(u < cfg.p_t2v, 2, jnp.where(u < cfg.p_t2v + cfg.p_i2v, 1, 0))
    low, high = (t / NUM_TRAIN_TIMESTEPS for t in cfg.condition_noise)
    sigma = _per_example(jax.vmap(lambda k: jax.random.uniform(k, (), minval=low, maxval=high))(level_keys), source)
    kept = (1 - sigma) * source + sigma * _normal_each(noise_keys, source.shape[1:])
    num_kept = jnp.select([task == 0, task == 1], [frames, 1], 0)
    keep = (jnp.arange(frames)[None, :] < num_kept[:, None]).reshape(-1, frames, 1, 1, 1)
    return jnp.where(keep, kept, _normal_each(replace_keys, source.shape[1:])), task


def flow_loss(apply_fn, keys: jax.Array, batch: dict, cfg: FlowConfig,
              sigma: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Weighted MSE between the predicted and true velocity on the target half, in float32.

    `apply_fn(latents, timesteps, text, camera[, intrinsics=])` is the DiT on [target ‖ source] latents
    (intrinsics passed when the batch has them); `keys`
    holds one key per example, so an example's noise does not depend on how the batch is split.
    `sigma` fixes the noise levels (evaluation) instead of drawing them.
    """
    sigma_keys, noise_keys, cond_keys = _split_each(keys, 3)
    x0 = batch["target_latents"].astype(jnp.float32)
    eps = _normal_each(noise_keys, x0.shape[1:])
    sigma = sample_sigmas(sigma_keys, cfg) if sigma is None else sigma
    noisy = (1 - _per_example(sigma, x0)) * x0 + _per_example(sigma, x0) * eps
    source, task = condition_latents(cond_keys, batch["source_latents"].astype(jnp.float32), cfg)
    latents = jnp.concatenate([noisy, source], axis=1)
    lens = {"intrinsics": batch["intrinsics"]} if "intrinsics" in batch else {}
    prediction = apply_fn(latents, sigma * NUM_TRAIN_TIMESTEPS, batch["text_embeds"], batch["camera"], **lens)
    target_prediction = prediction[:, : x0.shape[1]].astype(jnp.float32)
    per_example = jnp.mean(jnp.square(target_prediction - (eps - x0)), axis=tuple(range(1, x0.ndim)))
    per_example = per_example * loss_weight(sigma, cfg)
    return jnp.mean(per_example), {"sigma": sigma, "task": task, "per_example": per_example}


def loss_breakdown(per_example: jax.Array, sigma: jax.Array, task: jax.Array) -> dict:
    """Sums and counts of the per-example loss by task (`TASKS`) and by σ bucket (`SIGMA_BUCKETS`):
    sums, so they add up over micro-batches, steps and hosts before one division at log time."""
    bucket = jnp.minimum((sigma * SIGMA_BUCKETS).astype(jnp.int32), SIGMA_BUCKETS - 1)
    by = lambda index, size: (jnp.zeros(size).at[index].add(per_example), jnp.zeros(size).at[index].add(1.0))
    (task_sum, task_count), (sigma_sum, sigma_count) = by(task, len(TASKS)), by(bucket, SIGMA_BUCKETS)
    return {"task_sum": task_sum, "task_count": task_count, "sigma_sum": sigma_sum, "sigma_count": sigma_count}


def breakdown_means(sums: dict) -> dict[str, float]:
    """`loss_breakdown` sums as named means (`loss_t2v`, `loss_sigma_0.25-0.50`, ...); empty groups left out."""
    names = [f"loss_{t}" for t in TASKS] + [
        f"loss_sigma_{i / SIGMA_BUCKETS:.2f}-{(i + 1) / SIGMA_BUCKETS:.2f}" for i in range(SIGMA_BUCKETS)]
    totals = np.concatenate([sums["task_sum"], sums["sigma_sum"]])
    counts = np.concatenate([sums["task_count"], sums["sigma_count"]])
    return {name: float(total / count) for name, total, count in zip(names, totals, counts) if count}
