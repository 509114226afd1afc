"""The one attention function every attention layer calls; backends plug in here."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recam_jax.sharding import constrain


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Reference softmax attention; logits and softmax statistics in float32.

    q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, heads, head_dim).
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


BACKENDS = {"xla": xla_attention}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, backend: str = "xla") -> jax.Array:
    """Multi-head attention without mask (Wan attends to every token, padded text included)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {sorted(BACKENDS)}")
    q, k, v = (constrain(t, ("act_batch", "act_length", "act_heads", "act_kv")) for t in (q, k, v))
    return BACKENDS[backend](q, k, v)
