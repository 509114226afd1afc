"""Analytic FLOPs: the counts MFU is based on."""

import jax
import numpy as np
import pytest
from flax import nnx

from recam_jax import flops
from recam_jax.models.dit import WanDiT, dit_config


def test_attention_is_most_of_the_1_3b_work_at_full_resolution():
    """ReCamMaster at 480×832, 81+81 frames: 65,520 tokens, attention ≈ 82% of the FLOPs."""
    cfg = dit_config("1.3B")
    parts = flops.flop_breakdown(cfg, (21, 60, 104, 16), 512, "all")
    attention = 3 * parts["forward_attention"]  # forward + twice that backward
    assert 2 * 21 * 60 * 104 // 4 == 65_520
    assert attention / sum(parts.values()) == pytest.approx(0.82, abs=0.02)


def test_dense_forward_flops_match_xla_cost_analysis():
    """Our dense count against XLA's own FLOP count of the compiled forward (no attention term)."""
    # Unrolled blocks: XLA's cost analysis counts a scanned loop (its while body, stacked-weight slicing)
    # differently from the blocks it runs (3.8x the unrolled count here), so it is no reference for them.
    cfg = dit_config("small", dtype="float32", camera=True, scan_layers=False)
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    shape, text_len = (2, 8, 8, 16), 8
    args = (np.zeros((1, 4, 8, 8, 16), np.float32), np.zeros((1,), np.float32),
            np.zeros((1, text_len, cfg.text_dim), np.float32), np.zeros((1, 2, 12), np.float32))
    compiled = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a)).lower(params, *args).compile()
    xla_flops = compiled.cost_analysis()["flops"]
    ours = flops.forward_flops(cfg, shape, text_len)
    assert ours == pytest.approx(xla_flops, rel=0.1)  # XLA also counts elementwise work


def test_frozen_weights_cost_no_weight_gradients():
    cfg = dit_config("1.3B")
    args = (cfg, (21, 60, 104, 16), 512)
    assert flops.train_step_flops(*args, "camera") < flops.train_step_flops(*args, "camera+self_attn") \
        < flops.train_step_flops(*args, "all")
    assert flops.train_step_flops(*args, "all", batch_size=3) == 3 * flops.train_step_flops(*args, "all")
