"""The one attention function every attention layer calls; backends plug in here.

A backend is a per-device kernel (`xla`, `chunked`, `splash`, `cudnn`) optionally wrapped in a context-parallel
scheme over the mesh axis that `act_length` maps to (`ulysses`: all-to-all between sequence and head
sharding; `ring`: K/V blocks passed around the ring with an online softmax). Context parallelism
applies to self-attention only: cross-attention keeps each device's query shard and the whole
(short, replicated) text K/V. Sequences that do not divide the shard count or the kernel block are
padded, and padded keys are masked out of the softmax.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from recam_jax.sharding import constrain, logical_to_spec

QKV_AXES = ("act_batch", "act_length", "act_heads", "act_kv")
TEXT_KV_AXES = ("act_batch", "act_kv_length", "act_heads", "act_kv")
WHOLE_SEQUENCE_AXES = ("act_batch", None, "act_heads", "act_kv")
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked block gives no NaN
RING_CHUNK = 512  # keys per logits tile of ring attention
# Keys per logits tile of chunked attention (off TPU and GPU): smaller tiles stay in a CPU's caches;
# 256 against 512 took our CPU step in `benchmarks/peers.py official` from 6.86 s to 6.07 s.
CHUNKED_KEYS = 256


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
    """Tiles of the splash kernels, in tokens (multiples of 128; a shorter sequence uses one tile of its
    padded length): the forward's query and key tiles, then the backward's two kernels' (dK/dV, dQ)."""

    q: int = 512
    kv: int = 512
    q_dkv: int = 512
    kv_dkv: int = 512
    q_dq: int = 512
    kv_dq: int = 512

    def __post_init__(self):
        bad = {name: size for name, size in dataclasses.asdict(self).items() if size <= 0 or size % 128}
        if bad:
            raise ValueError(f"splash block sizes must be positive multiples of 128; got {bad}")


# Per-device kernels: (q, k, v, kv_len) → out; q (batch, q_len, heads, head_dim), k and v
# (batch, kv_len_padded, heads, head_dim); keys at positions ≥ kv_len (when given) are padding.


def _logits(q, k, kv_start=0, kv_len=None):
    """Scaled float32 logits (batch, heads, q, k); keys at global position ≥ kv_len masked."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if kv_len is None:
        return logits
    return jnp.where(kv_start + jnp.arange(k.shape[1]) < kv_len, logits, MASK_VALUE)


def xla_attention(q, k, v, kv_len=None):
    """Reference softmax attention; logits and softmax statistics in float32."""
    probs = jax.nn.softmax(_logits(q, k, kv_len=kv_len), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def cudnn_attention(q, k, v, kv_len=None):
    """GPU flash attention through cuDNN (untested here: no GPU on the development machines)."""
    lengths = None if kv_len is None else jnp.full((q.shape[0],), kv_len, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_length(x, length):
    """Zero-pads axis 1 (the sequence) to `length`."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _on_tpu() -> bool:
    """Whether the active mesh (or the default backend) is TPU; elsewhere Pallas runs interpreted."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return (jax.default_backend() if device is None else device.platform) == "tpu"


def splash_attention(q, k, v, kv_len=None, blocks: SplashBlocks = SplashBlocks()):
    """TPU Pallas splash attention; both sequences padded to whole tiles, padded keys in their own segment.

    Padded queries stay in segment 0 (they attend to real keys and are dropped), so no row is empty.
    """
    q_len, kv_valid = q.shape[1], k.shape[1] if kv_len is None else kv_len
    fit = lambda size, n: min(size, _round_up(n, 128))  # one tile for a short sequence
    q_tiles = [fit(size, q_len) for size in (blocks.q, blocks.q_dkv, blocks.q_dq)]
    kv_tiles = [fit(size, k.shape[1]) for size in (blocks.kv, blocks.kv_dkv, blocks.kv_dq)]
    q = _pad_length(q * q.shape[-1] ** -0.5, _round_up(q_len, math.lcm(*q_tiles)))  # splash does not scale logits
    k, v = (_pad_length(t, _round_up(k.shape[1], math.lcm(*kv_tiles))) for t in (k, v))
    segments = splash.SegmentIds(q=jnp.zeros(q.shape[1], jnp.int32),
                                 kv=(jnp.arange(k.shape[1]) >= kv_valid).astype(jnp.int32))
    heads = q.shape[2]
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((q.shape[1], k.shape[1]))] * heads)
    sizes = splash.BlockSizes(block_q=q_tiles[0], block_kv=kv_tiles[0], block_q_dkv=q_tiles[1],
                              block_kv_dkv=kv_tiles[1], block_q_dq=q_tiles[2], block_kv_dq=kv_tiles[2])
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=not _on_tpu())
    heads_first = lambda t: t.transpose(0, 2, 1, 3)  # the kernel takes one example (heads, len, head_dim)
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(heads_first(q), heads_first(k), heads_first(v), segments)
    return heads_first(out)[:, :q_len]


# Context parallelism: functions of per-device shards inside shard_map, sequence split over `axis`.


def ulysses_shard(q, k, v, kv_len, axis, kernel: Callable):
    """All-to-all from sequence to head sharding, the whole sequence per device, and back."""
    n, heads = jax.lax.axis_size(axis), q.shape[2]
    if heads % n:
        raise ValueError(f"ulysses attention needs the heads per device ({heads}) divisible by the "
                         f"'{axis}' mesh axis size ({n}); use ring attention or another mesh")
    to_heads = lambda t: jax.lax.all_to_all(t, axis, split_axis=2, concat_axis=1, tiled=True)
    out = kernel(to_heads(q), to_heads(k), to_heads(v), kv_len)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def _shift(axis, *blocks):
    """Sends each device's blocks to the next device of the ring."""
    n = jax.lax.axis_size(axis)
    return [jax.lax.ppermute(b, axis, [(j, (j + 1) % n) for j in range(n)]) for b in blocks]


def _chunk(x, index, size):
    """Tokens [index·size, (index+1)·size) of x (batch, length, ...)."""
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def ring_shard(q, k, v, kv_len, axis, chunk):
    """Ring attention of this device's query block against every K/V block, `chunk` keys at a time.

    Memory per device: the local q, k, v plus one (local queries × chunk) logits tile.
    """
    return _ring_fwd(q, k, v, kv_len, axis, chunk)[0]


def _online_softmax(q, k, v, kv_start, kv_len, chunk, carry):
    """Adds keys k, v (a multiple of `chunk` long, the first at global position `kv_start`) to the
    online-softmax carry (out, row_max, row_sum), one (queries × chunk) logits tile at a time."""

    def add_chunk(c, carry):
        out, row_max, row_sum = carry
        logits = _logits(q, _chunk(k, c, chunk), kv_start + c * chunk, kv_len)
        new_max = jnp.maximum(row_max, logits.max(-1))
        probs = jnp.exp(logits - new_max[..., None])
        correction = jnp.exp(row_max - new_max)
        out = out * correction[..., None] + jnp.einsum(
            "bhqk,bkhd->bhqd", probs.astype(v.dtype), _chunk(v, c, chunk), preferred_element_type=jnp.float32)
        return out, new_max, row_sum * correction + probs.sum(-1)

    return jax.lax.fori_loop(0, k.shape[1] // chunk, add_chunk, carry)


def _softmax_start(q):
    """The empty online-softmax carry for queries q."""
    b, q_len, h, d = q.shape
    return (jnp.zeros((b, h, q_len, d), jnp.float32), jnp.full((b, h, q_len), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, q_len), jnp.float32))


def _softmax_end(carry, dtype):
    """(attention output (batch, q_len, heads, head_dim), log-sum-exp of each row) from the carry."""
    out, row_max, row_sum = carry
    return (out / row_sum[..., None]).transpose(0, 2, 1, 3).astype(dtype), row_max + jnp.log(row_sum)


def chunked_attention(q, k, v, kv_len=None):
    """Softmax attention that never holds the whole score matrix: the ring's online softmax and
    flash backward on one device, CHUNKED_KEYS keys at a time (memory: one queries × chunk logits
    tile per head; the backward recomputes each tile from the saved log-sum-exp)."""
    chunk = min(CHUNKED_KEYS, k.shape[1])
    padded = _round_up(k.shape[1], chunk)
    if padded != k.shape[1]:
        kv_len = k.shape[1] if kv_len is None else kv_len
        k, v = _pad_length(k, padded), _pad_length(v, padded)
    return _flash(q, k, v, kv_len, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, kv_len, chunk):
    return _flash_fwd(q, k, v, kv_len, chunk)[0]


def _flash_fwd(q, k, v, kv_len, chunk):
    out, lse = _softmax_end(_online_softmax(q, k, v, 0, kv_len, chunk, _softmax_start(q)), q.dtype)
    return out, (q, k, v, out, lse)


def _flash_bwd(kv_len, chunk, residuals, d_out):
    q, k, v, out, lse = residuals
    d_out, delta = _output_grads(d_out, out)
    dq, dk, dv = _block_grads(q, k, v, 0, kv_len, chunk, d_out, lse, delta, jnp.zeros(q.shape, jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _output_grads(d_out, out):
    """The output gradient in float32 and delta = rowsum(dO ∘ O) (batch, heads, queries) of the backward."""
    d_out = d_out.astype(jnp.float32)
    return d_out, jnp.einsum("bqhd,bqhd->bhq", d_out, out.astype(jnp.float32))


def _block_grads(q, k_blk, v_blk, kv_start, kv_len, chunk, d_out, lse, delta, dq):
    """Flash-attention backward of queries q against one K/V block (its first key at global position
    `kv_start`), `chunk` keys at a time: dq plus this block's contribution, and the block's dK, dV."""
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

    def add_chunk(c, carry):
        dq, dk, dv = carry
        k_c, v_c = _chunk(k_blk, c, chunk), _chunk(v_blk, c, chunk)
        probs = jnp.exp(_logits(q, k_c, kv_start + c * chunk, kv_len) - lse[..., None])
        d_logits = probs * (f32("bqhd,bkhd->bhqk", d_out, v_c) - delta[..., None]) * q.shape[-1] ** -0.5
        # Each chunk of the block's dK, dV is written once, by its own step.
        dk = jax.lax.dynamic_update_slice_in_dim(dk, f32("bhqk,bqhd->bkhd", d_logits, q), c * chunk, axis=1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, f32("bhqk,bqhd->bkhd", probs, d_out), c * chunk, axis=1)
        return dq + f32("bhqk,bkhd->bqhd", d_logits, k_c), dk, dv

    zeros = tuple(jnp.zeros(t.shape, jnp.float32) for t in (k_blk, v_blk))
    return jax.lax.fori_loop(0, k_blk.shape[1] // chunk, add_chunk, (dq, *zeros))


def _ring_fwd(q, k, v, kv_len, axis, chunk):
    """Online softmax over the K/V blocks as they come round; saves only q, k, v, out and the LSE.

    Each step sends its K/V block on before computing with it, so the transfer runs under the compute.
    """
    n, me, block = jax.lax.axis_size(axis), jax.lax.axis_index(axis), k.shape[1]
    carry = _softmax_start(q)
    kv = (k, v)
    for step in range(n):
        next_kv = _shift(axis, *kv) if step < n - 1 else None
        carry = _online_softmax(q, *kv, ((me - step) % n) * block, kv_len, chunk, carry)
        kv = next_kv
    out, lse = _softmax_end(carry, q.dtype)
    return out, (q, k, v, out, lse)


def _ring_bwd(kv_len, axis, chunk, residuals, d_out):
    """Flash-attention backward on the ring. K/V blocks go round as in the forward (sent before the
    compute); each step's dK/dV of its block is sent on after the compute and added to the next
    device's own contribution once that is computed, so both transfers run under compute."""
    q, k, v, out, lse = residuals
    n, me, block = jax.lax.axis_size(axis), jax.lax.axis_index(axis), k.shape[1]
    d_out, delta = _output_grads(d_out, out)
    dq = jnp.zeros(q.shape, jnp.float32)
    kv = (k, v)
    for step in range(n):
        next_kv = _shift(axis, *kv) if step < n - 1 else None
        dq, dk, dv = _block_grads(q, *kv, ((me - step) % n) * block, kv_len, chunk, d_out, lse, delta, dq)
        if step:  # the earlier steps' gradient of this block, which arrived during this step's compute
            dk, dv = dk + dk_in, dv + dv_in
        dk_in, dv_in = _shift(axis, dk, dv)
        kv = next_kv
    # After n hops each block's gradient is home.
    return dq.astype(q.dtype), dk_in.astype(k.dtype), dv_in.astype(v.dtype)


ring_shard.defvjp(_ring_fwd, _ring_bwd)


def _sharded(fn, q, k, v, q_axes, kv_axes):
    """Runs fn on each device's blocks of q, k, v as laid out by the logical rules."""
    q_spec, kv_spec = logical_to_spec(q_axes), logical_to_spec(kv_axes)
    return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(q, k, v)


def _context_parallel(scheme, kernel: Callable, q, k, v, axis: str):
    """Pads the sequence to whole shards (and ring chunks) and runs `scheme` on each device's shard."""
    length, shards = q.shape[1], jax.sharding.get_abstract_mesh().shape[axis]
    chunk = min(RING_CHUNK, -(-length // shards))
    padded = _round_up(length, shards * chunk if scheme == "ring" else shards)
    kv_len = None if padded == length else length
    if scheme == "ring":
        shard_fn = lambda q, k, v: ring_shard(q, k, v, kv_len, axis, chunk)
    else:
        shard_fn = lambda q, k, v: ulysses_shard(q, k, v, kv_len, axis, kernel)
    q, k, v = (_pad_length(t, padded) for t in (q, k, v))
    return _sharded(shard_fn, q, k, v, QKV_AXES, QKV_AXES)[:, :length]


KERNELS = {"xla": xla_attention, "chunked": chunked_attention, "splash": splash_attention, "cudnn": cudnn_attention}

# Backend name → (context-parallel scheme or None, per-device kernel).
BACKENDS = {
    "xla": (None, "xla"),
    "chunked": (None, "chunked"),  # key-chunked XLA: the memory-safe choice off TPU/GPU (sampling)
    "splash": (None, "splash"),
    "cudnn": (None, "cudnn"),
    "ulysses": ("ulysses", "xla"),
    "ulysses_splash": ("ulysses", "splash"),
    "ring": ("ring", "xla"),  # ring has its own kernel; cross-attention uses xla
}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, backend: str = "xla", *, cross: bool = False,
              splash_blocks: SplashBlocks = SplashBlocks()) -> jax.Array:
    """Multi-head attention without mask (Wan attends to every token, padded text included).

    q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, heads, head_dim). `cross`: k, v are the
    text tokens, replicated over the context axis (never context-parallel). `splash_blocks`: the tiles
    of the splash kernels (`splash`, `ulysses_splash`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {sorted(BACKENDS)}")
    scheme, kernel_name = BACKENDS[backend]
    kernel = KERNELS[kernel_name]
    if kernel is splash_attention:
        kernel = functools.partial(splash_attention, blocks=splash_blocks)
    kv_axes = TEXT_KV_AXES if cross else QKV_AXES
    q = constrain(q, QKV_AXES)
    k, v = constrain(k, kv_axes), constrain(v, kv_axes)
    if jax.sharding.get_abstract_mesh().empty or not spmd.get_logical_axis_rules():
        return kernel(q, k, v)  # one device
    context_axis = logical_to_spec(QKV_AXES)[1]
    if scheme is not None and not cross and context_axis is not None:
        if not isinstance(context_axis, str):
            raise ValueError(f"context parallelism needs act_length on one mesh axis; the rules give {context_axis}")
        return _context_parallel(scheme, kernel, q, k, v, context_axis)
    if kernel is xla_attention:
        return xla_attention(q, k, v)  # XLA's partitioner (GSPMD) splits the einsums
    # A Pallas / cuDNN kernel on each device's batch and heads: whole sequences for self-attention,
    # the device's query shard against the whole text for cross-attention.
    q_axes, kv_axes = (QKV_AXES, TEXT_KV_AXES) if cross else (WHOLE_SEQUENCE_AXES, WHOLE_SEQUENCE_AXES)
    return _sharded(kernel, q, k, v, q_axes, kv_axes)
