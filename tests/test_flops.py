"""Analytic FLOPs: the counts MFU is based on."""

import jax
import numpy as np
import pytest
from flax import nnx

from recam_jax import flops
from recam_jax.models import camera_encoding
from recam_jax.models.dit import WanDiT, dit_config


def test_attention_is_most_of_the_1_3b_work_at_full_resolution():
    """ReCamMaster at 480×832, 81+81 frames: 65,520 tokens, attention ≈ 82% of the FLOPs."""
    cfg = dit_config("1.3B")
    parts = flops.flop_breakdown(cfg, (21, 60, 104, 16), 512, "all")
    attention = 3 * parts["forward_attention"]  # forward + twice that backward
    assert 2 * 21 * 60 * 104 // 4 == 65_520
    assert attention / sum(parts.values()) == pytest.approx(0.82, abs=0.02)


@pytest.mark.parametrize("encoding", camera_encoding.ENCODINGS)
def test_dense_forward_flops_match_xla_cost_analysis(encoding):
    """Our dense count against XLA's own FLOP count of the compiled forward (no attention term)."""
    # Unrolled blocks: XLA's cost analysis counts a scanned loop (its while body, stacked-weight slicing)
    # differently from the blocks it runs (3.8x the unrolled count here), so it is no reference for them.
    cfg = dit_config("small", dtype="float32", camera=True, scan_layers=False, camera_encoding=encoding)
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    shape, text_len = (2, 8, 8, 16), 8
    args = (np.zeros((1, 4, 8, 8, 16), np.float32), np.zeros((1,), np.float32),
            np.zeros((1, text_len, cfg.text_dim), np.float32), np.zeros((1, 2, 12), np.float32),
            np.ones((1, 2, 8), np.float32))  # intrinsics (read by the lens encodings only)
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


@pytest.mark.parametrize("encoding, rows, in_dim", [("intrinsics", 21, 8), ("plucker", 21 * 30 * 52, 6)])
def test_a_lens_encoding_adds_its_linear_forward_backward_and_weight_grads(encoding, rows, in_dim):
    """Over the official model, per block: the extra Linear over latent frames (intrinsics) or target
    tokens (Plücker), as much again for activation gradients, and for weight gradients under any
    `trainable` (every camera module trains)."""
    official, lens = dit_config("1.3B"), dit_config("1.3B", camera_encoding=encoding)
    args = ((21, 60, 104, 16), 512)  # 81 frames of 480×832: 21 latent frames of 30×52 tokens per half
    matmul = 2 * official.num_layers * rows * in_dim * official.dim
    assert flops.forward_flops(lens, *args) - flops.forward_flops(official, *args) == matmul
    for trainable in ("camera", "camera+self_attn", "all"):
        extra = flops.train_step_flops(lens, *args, trainable) - flops.train_step_flops(official, *args, trainable)
        assert extra == 3 * matmul
