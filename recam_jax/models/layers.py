"""Building blocks of the Wan DiT: dense layers with logical axes, fp32 norms, embeddings, 3D RoPE."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recam_jax.sharding import param_axes


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    kernel_init: Callable = nnx.initializers.xavier_uniform(),
) -> nnx.Linear:
    """A Linear whose kernel (in, out) and bias (out,) carry logical axis names."""
    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        kernel_metadata=param_axes(*axes),
        bias_metadata=param_axes(axes[1]),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMS norm over the last axis, computed in float32 (Wan's q/k norm over all heads)."""

    def __init__(self, features: int, axis_name: str, *, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), **param_axes(axis_name))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis in float32, with or without affine parameters; returns float32."""

    def __init__(self, features: int, *, eps: float, affine: bool, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), **param_axes("embed")) if affine else None
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), **param_axes("embed")) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y


class MLP(nnx.Module):
    """Linear → activation → Linear, the shape of Wan's FFN and its text/time embedders."""

    def __init__(self, in_features, hidden, out_features, activation, *, in_axis="embed", dtype, param_dtype, rngs):
        self.fc1 = dense(in_features, hidden, (in_axis, "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = dense(hidden, out_features, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def sinusoidal_embedding(timesteps: jax.Array, dim: int) -> jax.Array:
    """Wan's timestep features: [cos(t·f), sin(t·f)] with f = 10000^(−i/(dim/2)), in float32."""
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """How Wan splits head_dim between frame, height and width rotary frequencies."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of 3D RoPE angles for every token of an (f, h, w) grid: (f·h·w, head_dim/2) each.

    Computed on the host in float64 (the grid is static), like the PyTorch references.
    """
    angles = []
    for axis, (part, size) in enumerate(zip(rope_split(head_dim), grid)):
        inv_freq = 1.0 / theta ** (np.arange(0, part, 2, dtype=np.float64)[: part // 2] / part)
        per_axis = np.outer(np.arange(size, dtype=np.float64), inv_freq)  # (size, part/2)
        shape = [1, 1, 1, part // 2]
        shape[axis] = size
        angles.append(np.broadcast_to(per_axis.reshape(shape), (*grid, part // 2)))
    angles = np.concatenate(angles, axis=-1).reshape(-1, head_dim // 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates consecutive pairs (x[2i], x[2i+1]) of x (batch, length, heads, head_dim) in float32."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x_even, x_odd = x32[..., 0], x32[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
