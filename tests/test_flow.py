"""The rectified-flow objective: schedule, weighting, conditioning branches, target-half loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recam_jax import flow
from tests import peers


def test_shifted_grid_matches_the_official_formula():
    sigmas = flow.shifted_sigmas(1000, shift=5.0)
    linear = np.linspace(1, 0, 1001)[:-1]  # DiffSynth: linspace(1, 0, n + 1)[:-1] (extra_one_step)
    np.testing.assert_allclose(sigmas, 5 * linear / (1 + 4 * linear), rtol=1e-12)
    assert sigmas[0] == 1.0 and 0 < sigmas[-1] < 0.01
    np.testing.assert_allclose(flow.shift_sigma(0.5, 5.0), 5 / 6)


def test_uniform_training_sigmas_come_from_the_shifted_grid():
    cfg = flow.FlowConfig(shift=3.0)
    drawn = np.asarray(flow.sample_sigmas(jax.random.split(jax.random.key(0), 4096), cfg))
    grid = flow.shifted_sigmas(1000, 3.0).astype(np.float32)
    assert np.isin(drawn, grid).all()
    assert len(np.unique(drawn)) > 900  # covers the grid


def test_logit_normal_sigmas_are_shifted_and_in_range():
    cfg = flow.FlowConfig(shift=5.0, timestep_sampling="logit_normal")
    drawn = np.asarray(flow.sample_sigmas(jax.random.split(jax.random.key(1), 20000), cfg))
    assert ((drawn > 0) & (drawn < 1)).all()
    assert np.median(drawn) == pytest.approx(5 / 6, abs=0.02)  # the median of sigmoid(N(0,1)) is 0.5


def test_bsmntw_weights_average_one_over_the_whole_grid_and_ignore_the_batch():
    cfg = flow.FlowConfig(shift=5.0, loss_weighting="bsmntw")
    grid = jnp.asarray(flow.shifted_sigmas(1000, 5.0), jnp.float32)
    weights = flow.loss_weight(grid, cfg)
    assert float(jnp.mean(weights)) == pytest.approx(1.0, rel=1e-4)
    single = flow.loss_weight(grid[500:501], cfg)  # batch of one: finite, the same value as in the grid
    assert np.isfinite(single).all() and float(single[0]) == pytest.approx(float(weights[500]), rel=1e-6)
    assert float(weights.max()) > 1 > float(weights.min()) >= 0


def test_bsmntw_weights_equal_the_official_schedulers_on_its_grid():
    """DiffSynth's FlowMatchScheduler as ReCamMaster trains with it (shift 5, σ_min 0, extra step)."""
    try:
        with peers.official_modules(peers.FLOW_MATCH) as (official,):
            scheduler = official.FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    scheduler.set_timesteps(1000, training=True)
    ours = flow.loss_weight(jnp.asarray(scheduler.sigmas.numpy()), flow.FlowConfig(shift=5.0, loss_weighting="bsmntw"))
    np.testing.assert_allclose(ours, scheduler.linear_timesteps_weights.numpy(), rtol=1e-4, atol=1e-6)


def keys(seed, batch):
    return jax.random.split(jax.random.key(seed), batch)


def batch_of(key, batch=6, frames=4):
    keys = jax.random.split(key, 3)
    return {"target_latents": jax.random.normal(keys[0], (batch, frames, 4, 4, 16)),
            "source_latents": jax.random.normal(keys[1], (batch, frames, 4, 4, 16)),
            "text_embeds": jnp.zeros((batch, 3, 8)), "camera": jnp.zeros((batch, frames, 12))}


def test_v2v_keeps_the_source_clean_by_default():
    source = batch_of(jax.random.key(0))["source_latents"]
    cond, task = flow.condition_latents(keys(1, len(source)), source, flow.FlowConfig())
    assert (task == 0).all()
    np.testing.assert_array_equal(cond, source)


def test_t2v_and_i2v_replace_the_right_frames_with_noise():
    source = batch_of(jax.random.key(0))["source_latents"]
    cond, task = flow.condition_latents(keys(2, len(source)), source, flow.FlowConfig(p_t2v=1.0))
    assert (task == 2).all() and not np.isclose(cond, source).any()
    cond, task = flow.condition_latents(keys(3, len(source)), source, flow.FlowConfig(p_i2v=1.0))
    assert (task == 1).all()
    np.testing.assert_array_equal(cond[:, 0], source[:, 0])
    assert not np.isclose(cond[:, 1:], source[:, 1:]).any()
    cond, task = flow.condition_latents(keys(4, 300), jnp.tile(source, (50, 1, 1, 1, 1)),
                                        flow.FlowConfig(p_t2v=0.2, p_i2v=0.2))
    fractions = np.bincount(np.asarray(task), minlength=3) / task.size
    np.testing.assert_allclose(fractions, [0.6, 0.2, 0.2], atol=0.07)


def test_condition_noise_level_stays_in_its_range():
    """300 examples, the shape of the task-fraction draw above (one XLA compile for both)."""
    source = jax.random.normal(jax.random.key(0), (300, 4, 4, 4, 16))
    cfg = flow.FlowConfig(condition_noise=(200, 500))
    cond, _ = flow.condition_latents(keys(5, len(source)), source, cfg)
    noise, _ = flow.condition_latents(keys(5, len(source)), jnp.zeros_like(source), cfg)
    # cond = (1 - s) source + s n, and the same keys give s n for a zero source: s exactly, per example.
    c, n, x = (np.asarray(a).reshape(300, -1) for a in (cond, noise, source))
    s = 1 - ((c - n) * x).sum(1) / (x * x).sum(1)
    np.testing.assert_allclose(c - n, (1 - s)[:, None] * x, atol=1e-5)
    assert (s >= 0.2 - 1e-6).all() and (s <= 0.5 + 1e-6).all()
    assert s.min() < 0.22 and s.max() > 0.48  # drawn per example over the whole range
    np.testing.assert_allclose(np.std(n / s[:, None], axis=1), 1, atol=0.2)  # unit noise


def test_model_sees_noisy_target_then_source_and_loss_covers_the_target_half_only():
    batch = batch_of(jax.random.key(7))
    seen = {}

    def apply_fn(latents, timesteps, text, camera, source_half_value=0.0):
        seen["latents"], seen["timesteps"] = latents, timesteps
        frames = batch["target_latents"].shape[1]
        return jnp.concatenate([jnp.zeros_like(latents[:, :frames]),
                                jnp.full_like(latents[:, frames:], source_half_value)], axis=1)

    cfg = flow.FlowConfig()
    loss, aux = flow.flow_loss(apply_fn, keys(8, 6), batch, cfg)
    huge_loss, _ = flow.flow_loss(lambda *a: apply_fn(*a, source_half_value=1e6), keys(8, 6), batch, cfg)
    assert float(loss) == float(huge_loss)  # the source half never enters the loss
    latents, sigma = seen["latents"], aux["sigma"]
    np.testing.assert_array_equal(latents[:, 4:], batch["source_latents"])  # clean source, target first
    np.testing.assert_allclose(seen["timesteps"], sigma * 1000, rtol=1e-6)
    # With a zero prediction the loss is E|eps - x0|^2 where x_t = (1 - s) x0 + s eps: check it exactly.
    x0, xt = batch["target_latents"], latents[:, :4]
    s = sigma[:, None, None, None, None]
    eps = (xt - (1 - s) * x0) / s
    np.testing.assert_allclose(loss, jnp.mean((eps - x0) ** 2), rtol=1e-4)


def test_the_model_gets_the_batchs_text_camera_and_lens_and_the_loss_is_weighted_per_example():
    """2 target frames on a 4×4 grid (frames ≠ height); text, camera and lens are random, so a
    dropped or swapped input shows."""
    batch = {**batch_of(jax.random.key(10), frames=2),
             "text_embeds": jax.random.normal(jax.random.key(11), (6, 3, 8)),
             "camera": jax.random.normal(jax.random.key(12), (6, 2, 12))}
    seen = {}

    def apply_fn(latents, timesteps, text, camera, **lens):
        seen.update(text=text, camera=camera, lens=lens)
        return jnp.zeros_like(latents)

    unweighted = flow.FlowConfig(loss_weighting="none")
    _, aux = flow.flow_loss(apply_fn, keys(13, 6), batch, unweighted)
    np.testing.assert_array_equal(seen["text"], batch["text_embeds"])
    np.testing.assert_array_equal(seen["camera"], batch["camera"])
    assert seen["lens"] == {}
    assert set(aux) == {"sigma", "task", "per_example"}
    assert aux["per_example"].shape == aux["task"].shape == (6,)
    assert len(set(np.asarray(aux["per_example"]).tolist())) == 6  # each example's own mean, not the batch's

    intrinsics = jax.random.normal(jax.random.key(14), (6, 2, 8))
    bsmntw = flow.FlowConfig(loss_weighting="bsmntw")
    _, weighted = flow.flow_loss(apply_fn, keys(13, 6), {**batch, "intrinsics": intrinsics}, bsmntw)
    assert set(seen["lens"]) == {"intrinsics"}
    np.testing.assert_array_equal(seen["lens"]["intrinsics"], intrinsics)
    # The same draws (same keys), each example's loss times its bsmntw weight.
    np.testing.assert_allclose(weighted["per_example"], aux["per_example"] * flow.loss_weight(aux["sigma"], bsmntw),
                               rtol=1e-6)


def test_predicting_the_true_velocity_gives_zero_loss_and_its_negation_four_times_the_zero_loss():
    """Pins the sign of the target: the model must predict ε − x0, not x0 − ε."""
    batch = batch_of(jax.random.key(9))
    x0 = batch["target_latents"]
    frames = x0.shape[1]

    def velocity(latents, timesteps, text, camera, sign=1.0):
        s = (timesteps / 1000)[:, None, None, None, None]
        eps = (latents[:, :frames] - (1 - s) * x0) / s
        return jnp.concatenate([sign * (eps - x0), jnp.zeros_like(latents[:, frames:])], axis=1)

    cfg = flow.FlowConfig()
    exact, _ = flow.flow_loss(velocity, keys(10, 6), batch, cfg)
    negated, _ = flow.flow_loss(lambda *a: velocity(*a, sign=-1.0), keys(10, 6), batch, cfg)
    zero, _ = flow.flow_loss(lambda latents, *_: jnp.zeros_like(latents), keys(10, 6), batch, cfg)
    assert float(exact) < 1e-6 * float(zero)
    np.testing.assert_allclose(negated, 4 * zero, rtol=1e-4)


def test_a_given_sigma_replaces_the_drawn_one():
    """Evaluation fixes the noise levels: the model must see exactly those."""
    batch, sigma, seen = batch_of(jax.random.key(11)), jnp.linspace(0.1, 0.9, 6), {}

    def apply_fn(latents, timesteps, text, camera):
        seen["timesteps"] = timesteps
        return jnp.zeros_like(latents)

    _, aux = flow.flow_loss(apply_fn, keys(12, 6), batch, flow.FlowConfig(), sigma=sigma)
    np.testing.assert_array_equal(aux["sigma"], sigma)
    np.testing.assert_allclose(seen["timesteps"], sigma * 1000, rtol=1e-6)


def test_unknown_weighting_or_sampling_is_refused_naming_the_field():
    sigma = jnp.full((2,), 0.5)
    with pytest.raises(ValueError, match=r"flow.loss_weighting='uniform' is not one of"):
        flow.loss_weight(sigma, flow.FlowConfig(loss_weighting="uniform"))
    with pytest.raises(ValueError, match=r"flow.timestep_sampling='normal' is not one of"):
        flow.sample_sigmas(keys(0, 2), flow.FlowConfig(timestep_sampling="normal"))


def test_loss_breakdown_averages_by_task_and_timestep_bucket():
    per_example = jnp.array([1.0, 2.0, 3.0, 4.0, 6.0])
    sigma = jnp.array([0.1, 0.3, 0.6, 0.9, 1.0])
    task = jnp.array([0, 0, 2, 1, 1])
    sums = flow.loss_breakdown(per_example, sigma, task)
    twice = jax.tree.map(jnp.add, sums, sums)  # sums over micro-batches or steps: the means stay
    for breakdown in (sums, twice):
        assert flow.breakdown_means(jax.device_get(breakdown)) == {
            "loss_v2v": 1.5, "loss_i2v": 5.0, "loss_t2v": 3.0, "loss_sigma_0.00-0.25": 1.0,
            "loss_sigma_0.25-0.50": 2.0, "loss_sigma_0.50-0.75": 3.0, "loss_sigma_0.75-1.00": 5.0}
    only_v2v = flow.loss_breakdown(per_example[:1], sigma[:1], task[:1])
    assert set(flow.breakdown_means(jax.device_get(only_v2v))) == {"loss_v2v", "loss_sigma_0.00-0.25"}
