"""Analytic FLOPs of a ReCamMaster training step, for TFLOP/s and MFU.

Counted from the model shape, one multiply-add = 2 FLOPs, matmuls and attention only (norms,
RoPE, softmax and elementwise work are ignored, as is usual for MFU):
- forward dense: 2 · tokens · (weights of every matmul a token goes through), per block
  q,k,v,o, projector, cross-attn q,o, FFN, and the head; plus cross-attn k,v and the text MLP
  over text tokens, the camera encoder over latent frames, and the extra Linear of a non-official
  camera encoding (models/camera_encoding.py): the intrinsics encoder over latent frames, the
  Plücker encoder over target tokens (the rays themselves are elementwise work);
- forward attention: self 4 · L² · dim per block (QKᵀ and PV), cross 4 · L · L_text · dim;
- backward: activation gradients cost the forward dense FLOPs again and twice the attention
  FLOPs; weight gradients are counted only for trainable matmuls (2 · rows · their weights; every
  camera module trains under any `trainable`).
Rematerialisation recomputes are not counted: this is model FLOPs, the basis of MFU.
"""

from __future__ import annotations

import numpy as np

from recam_jax.batch import CAMERA_DIM
from recam_jax.models import camera_encoding
from recam_jax.models.dit import DiTConfig


def _per_block_token_weights(cfg: DiTConfig) -> dict[str, int]:
    """Weights of each per-token matmul in a block, by module name."""
    d = cfg.dim
    weights = {"self_attn": 4 * d * d, "cross_attn_q_o": 2 * d * d, "ffn": 2 * d * cfg.ffn_dim}
    if cfg.camera:
        weights["projector"] = d * d
    return weights


def _per_block_camera_encoder_macs(cfg: DiTConfig, frames: int, target_tokens: int) -> int:
    """Multiply-adds of a block's camera encoders (the projector is a per-token weight): the pose
    encoder and the intrinsics encoder per latent frame, the Plücker encoder per target token."""
    if not cfg.camera:
        return 0
    macs = frames * CAMERA_DIM * cfg.dim
    if cfg.camera_encoding in camera_encoding.EXTRA_MODULES:
        _, in_dim = camera_encoding.EXTRA_MODULES[cfg.camera_encoding]
        macs += (target_tokens if cfg.camera_encoding == "plucker" else frames) * in_dim * cfg.dim
    return macs


def flop_breakdown(cfg: DiTConfig, latent_shape, text_len: int, trainable: str) -> dict[str, float]:
    """Model FLOPs of one training example by kind: forward dense and attention, backward, weight grads.

    `latent_shape` is (frames, height, width, channels) of ONE half; `trainable` as in the config.
    """
    frames, height, width, _ = latent_shape
    patch = int(np.prod(cfg.patch_size))
    tokens = 2 * frames * height * width // patch
    d, layers = cfg.dim, cfg.num_layers
    token_weights = _per_block_token_weights(cfg)
    camera_macs = _per_block_camera_encoder_macs(cfg, frames, tokens // 2)

    forward_dense = 2 * layers * (tokens * sum(token_weights.values()) + text_len * 2 * d * d  # cross k, v
                                  + camera_macs)
    forward_dense += 2 * tokens * (cfg.in_dim * patch * d + d * cfg.out_dim * patch)  # patch embed, head
    forward_dense += 2 * text_len * (cfg.text_dim * d + d * d)  # text MLP
    forward_attention = 4 * layers * (tokens * tokens * d + tokens * text_len * d)

    if trainable == "all":
        weight_grads = forward_dense
    else:
        per_block = token_weights.get("projector", 0) * tokens + camera_macs
        if trainable == "camera+self_attn":
            per_block += token_weights["self_attn"] * tokens
        weight_grads = 2 * layers * per_block
    return {"forward_dense": float(forward_dense), "forward_attention": float(forward_attention),
            "backward_activations": float(forward_dense + 2 * forward_attention),
            "weight_grads": float(weight_grads)}


def forward_flops(cfg: DiTConfig, latent_shape, text_len: int) -> float:
    """Model FLOPs of one forward pass on one example."""
    parts = flop_breakdown(cfg, latent_shape, text_len, "all")
    return parts["forward_dense"] + parts["forward_attention"]


def train_step_flops(cfg: DiTConfig, latent_shape, text_len: int, trainable: str, batch_size: int = 1) -> float:
    """Model FLOPs of one training step on `batch_size` examples of [target ‖ source] latents."""
    return batch_size * sum(flop_breakdown(cfg, latent_shape, text_len, trainable).values())
