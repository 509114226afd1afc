"""Trainable sets, the learning-rate schedule and the optimizer, on toy parameters (seconds)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from recam_jax import optim


def optimizer_config(**fields):
    cfg = ml_collections.ConfigDict(dict(
        learning_rate=1e-2, end_learning_rate=1e-3, warmup_steps=4, schedule="constant", decay_steps=10,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1e9))
    cfg.update(fields)
    return cfg


class Block(nnx.Module):
    def __init__(self, rngs):
        self.cam_encoder = nnx.Linear(2, 2, rngs=rngs)
        self.cam_encoder.calls = nnx.BatchStat(jnp.zeros(()))  # state inside a trainable module, not a parameter
        self.projector = nnx.Linear(2, 2, rngs=rngs)
        self.self_attn = nnx.Linear(2, 2, rngs=rngs)
        self.cross_attn = nnx.Linear(2, 2, rngs=rngs)
        self.count = nnx.Variable(jnp.zeros(()))


def selected(trainable):
    _, chosen, _ = nnx.split(Block(nnx.Rngs(0)), optim.trainable_filter(trainable), ...)
    return {path for path, _ in nnx.to_flat_state(chosen)}


def params_of(*modules):
    return {(m, p) for m in modules for p in ("kernel", "bias")}


def test_each_trainable_set_selects_the_parameters_of_its_modules_and_nothing_else():
    assert selected("camera") == params_of("cam_encoder", "projector")
    assert selected("camera+self_attn") == params_of("cam_encoder", "projector", "self_attn")
    assert selected("all") == params_of("cam_encoder", "projector", "self_attn", "cross_attn")
    with pytest.raises(ValueError, match=r"trainable='camera\+cross' is not one of"):
        optim.trainable_filter("camera+cross")


def rates(cfg, updates):
    schedule = optim.learning_rate_schedule(cfg)
    return np.array([float(schedule(n)) for n in range(updates)])


def test_warmup_moves_from_the_first_update_and_peaks_at_update_warmup_minus_one():
    np.testing.assert_allclose(rates(optimizer_config(), 7), [2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2, 1e-2],
                               rtol=1e-6)
    np.testing.assert_allclose(rates(optimizer_config(warmup_steps=0), 2), [1e-2, 1e-2], rtol=1e-6)


def test_cosine_decays_to_the_end_rate_after_decay_steps_more_updates():
    got = rates(optimizer_config(schedule="cosine", warmup_steps=2, decay_steps=4), 8)
    # Update n runs step n + 1: warmup steps 1, 2 then cosine steps 1..4 of 4, then it stays at the end.
    cosine = [1e-3 + 9e-3 * (1 + np.cos(np.pi * k / 4)) / 2 for k in range(1, 5)]
    np.testing.assert_allclose(got, [5e-3, 1e-2, *cosine, 1e-3, 1e-3], rtol=1e-5)
    one_step = rates(optimizer_config(schedule="cosine", warmup_steps=1, decay_steps=1), 3)
    np.testing.assert_allclose(one_step, [1e-2, 1e-3, 1e-3], rtol=1e-5)  # the peak, then the end at once
    with pytest.raises(ValueError, match=r"optimizer.schedule='linear' is not one of"):
        optim.learning_rate_schedule(optimizer_config(schedule="linear"))


def test_applied_learning_rate_follows_optax_count_of_updates():
    cfg = optimizer_config()
    tx = optim.make_optimizer(cfg)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for n in range(3):
        assert float(optim.applied_learning_rate(cfg, state)) == pytest.approx(rates(cfg, 3)[n], rel=1e-6)
        _, state = tx.update({"w": jnp.ones(3)}, state, params)


def adamw_reference(grads, params, cfg, rates):
    """AdamW written out: clip by global norm, bias-corrected moments, decoupled weight decay."""
    m = v = np.zeros_like(params)
    for t, (g, lr) in enumerate(zip(grads, rates), start=1):
        g = g * min(1.0, cfg.grad_clip / np.linalg.norm(g))
        m = cfg.b1 * m + (1 - cfg.b1) * g
        v = cfg.b2 * v + (1 - cfg.b2) * g * g
        m_hat, v_hat = m / (1 - cfg.b1 ** t), v / (1 - cfg.b2 ** t)
        params = params - lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + cfg.weight_decay * params)
    return params


def test_optimizer_is_clipped_adamw_with_the_configured_hyperparameters():
    cfg = optimizer_config(b1=0.5, b2=0.7, eps=0.3, weight_decay=0.2, grad_clip=0.5, warmup_steps=1)
    grads = [np.array([3.0, -4.0, 0.5]), np.array([0.1, 0.2, -0.05]), np.array([-2.0, 1.0, 1.0])]
    params = np.array([1.0, -2.0, 0.5])
    tx = optim.make_optimizer(cfg)
    got, state = jnp.asarray(params, jnp.float32), tx.init(jnp.asarray(params, jnp.float32))
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, got)
        got = optax.apply_updates(got, updates)
    np.testing.assert_allclose(got, adamw_reference(grads, params, cfg, rates(cfg, 3)), rtol=1e-5)


def test_moments_are_float32_for_bfloat16_parameters():
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    state = optim.make_optimizer(optimizer_config()).init(params)
    moments = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)]
    assert moments and all(m.mu["w"].dtype == jnp.float32 for m in moments)
