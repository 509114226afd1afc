"""Which parameters train, and the optimizer that trains them.

The paper fine-tunes the camera encoder, the projector and self-attention (q, k, v, o and its q/k
norms); the rest of Wan stays frozen. Frozen parameters are split off before differentiation, so
they get no gradient, no optimizer state and no update.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

CAMERA_MODULES = ("cam_encoder", "projector", "intrinsics_encoder", "plucker_encoder")  # any camera encoding's
TRAINABLE_SETS = {
    "camera": CAMERA_MODULES,
    "camera+self_attn": (*CAMERA_MODULES, "self_attn"),
    "all": None,
}
SCHEDULES = ("constant", "cosine")


def trainable_filter(trainable: str) -> nnx.filterlib.Filter:
    """An nnx filter selecting the trainable parameters of a named set."""
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"trainable={trainable!r} is not one of {sorted(TRAINABLE_SETS)}")
    modules = TRAINABLE_SETS[trainable]
    if modules is None:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(m) for m in modules)))


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then constant or cosine decay to `end_learning_rate`.

    Indexed by optax's count of applied updates: update n (from 0) takes the rate of step n + 1 of
    the warmup, so the first update already moves (lr / warmup_steps) and update warmup_steps − 1
    reaches the peak; the cosine then ends at `end_learning_rate` after `decay_steps` more updates.
    """
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.decay_steps, 1),
                                            alpha=cfg.end_learning_rate / cfg.learning_rate)
    else:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r} is not one of {SCHEDULES}")
    joined = optax.join_schedules([warmup, after], [cfg.warmup_steps])
    return lambda count: joined(count + 1)


def applied_learning_rate(cfg, opt_state) -> jax.Array:
    """The rate of the update `opt_state` is about to apply: the schedule at optax's own count,
    which (unlike the train step counter) does not move on a skipped non-finite step."""
    is_schedule_state = lambda x: isinstance(x, optax.ScaleByScheduleState)
    (schedule_state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule_state) if is_schedule_state(s)]
    return learning_rate_schedule(cfg)(schedule_state.count)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (fp32 moments, whatever the parameter dtype)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mu_dtype="float32"),
    )
