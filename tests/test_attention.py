"""Every attention backend computes the reference (`xla`, one device) forward and backward."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from recam_jax import sharding, train
from recam_jax.models import attention as attn
from recam_jax.models.dit import WanDiT, dit_config
from tests.conftest import tiny_config

TOLERANCE = 1e-5  # relative L2 error in float32


def qkv(batch, q_len, kv_len, heads, head_dim=8, seed=0):
    rng = np.random.default_rng(seed)
    shape = lambda n: (batch, n, heads, head_dim)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (shape(q_len), shape(kv_len), shape(kv_len)))


def loss_and_grads(backend, cross=False):
    """A nonlinear loss of the attention output and its gradients w.r.t. q, k and v."""
    loss = lambda q, k, v: jnp.sum(jnp.sin(attn.attention(q, k, v, backend, cross=cross)))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def relative_errors(got, ref):
    return [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]


@pytest.mark.parametrize("sizes, backend, length, collective", [
    ({"context": 8}, "ring", 16, "collective-permute"),
    ({"context": 8}, "ring", 13, "collective-permute"),  # padded to 16, padding masked
    ({"context": 8}, "ulysses", 13, "all-to-all"),
    ({"context": 4, "tensor": 2}, "ring", 13, "collective-permute"),
    ({"context": 4, "tensor": 2}, "ulysses", 13, "all-to-all"),
    ({"data": 2, "fsdp": 2, "context": 2}, "ring", 13, "collective-permute"),
    ({"data": 2, "fsdp": 2, "context": 2}, "ulysses", 16, "all-to-all"),
])
def test_context_parallel_self_attention_matches_reference(sizes, backend, length, collective):
    assert_self_attention_matches_reference(sizes, backend, length, collective)


def test_ring_attention_in_several_chunks_per_block(monkeypatch):
    monkeypatch.setattr(attn, "RING_CHUNK", 2)  # 13 tokens on 2 shards: 8-token blocks of 4 chunks, 3 padded
    assert_self_attention_matches_reference({"context": 2, "fsdp": 4}, "ring", 13, "collective-permute")


def assert_self_attention_matches_reference(sizes, backend, length, collective):
    """Forward and q/k/v gradients on the mesh equal one device's xla; `collective` is in the HLO."""
    q, k, v = qkv(4, length, length, heads=8)
    reference = loss_and_grads("xla")(q, k, v)
    with jax.set_mesh(sharding.make_mesh(sizes)), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        step = jax.jit(loss_and_grads(backend))
        assert collective in step.lower(q, k, v).compile().as_text()  # really split over `context`
        got = step(q, k, v)
    assert max(relative_errors(got, reference)) <= TOLERANCE


def test_cross_attention_keeps_the_text_whole_on_context_parallel_meshes():
    q, k, v = qkv(4, 13, 7, heads=8)
    reference = loss_and_grads("xla", cross=True)(q, k, v)
    with jax.set_mesh(sharding.make_mesh({"context": 8})), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        step = jax.jit(loss_and_grads("ring", cross=True))
        assert "collective-permute" not in step.lower(q, k, v).compile().as_text()
        got = step(q, k, v)
    assert max(relative_errors(got, reference)) <= TOLERANCE


def test_ulysses_rejects_heads_not_divisible_by_context():
    q, k, v = qkv(1, 16, 16, heads=12)  # the 1.3B's 12 heads on 8 context shards
    with jax.set_mesh(sharding.make_mesh({"context": 8})), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        with pytest.raises(ValueError, match=r"heads per device \(12\) divisible by the 'context' mesh axis size \(8\)"):
            jax.jit(lambda q, k, v: attn.attention(q, k, v, "ulysses"))(q, k, v)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        attn.attention(*qkv(1, 4, 4, heads=2), "flash")


SMALL_TILES = attn.SplashBlocks(*[128] * 6)


@pytest.mark.parametrize("q_len, kv_len, cross", [(300, 300, False), (200, 7, True)])
def test_splash_matches_reference_in_interpret_mode(q_len, kv_len, cross):
    """Pallas interpret mode on CPU; 128-token tiles so 300 tokens span 3 tiles with masked padding."""
    q, k, v = qkv(2, q_len, kv_len, heads=2)
    loss = lambda q, k, v: jnp.sum(jnp.sin(attn.attention(q, k, v, "splash", cross=cross, splash_blocks=SMALL_TILES)))
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert max(relative_errors(got, loss_and_grads("xla", cross)(q, k, v))) <= TOLERANCE


def test_splash_block_sizes_reach_the_kernels(monkeypatch):
    """Different forward, dK/dV and dQ tiles: the kernel gets them, the sequences pad to a multiple of
    every tile (300 queries → 768 for tiles 256 and 384), and the result is still the reference."""
    made = []
    make = attn.splash.make_splash_mha
    monkeypatch.setattr(attn.splash, "make_splash_mha", lambda mask, **kw: made.append((mask.shape, kw["block_sizes"]))
                        or make(mask, **kw))
    blocks = attn.SplashBlocks(q=256, kv=128, q_dkv=128, kv_dkv=256, q_dq=384, kv_dq=128)
    q, k, v = qkv(1, 300, 300, heads=2)
    loss = lambda q, k, v: jnp.sum(jnp.sin(attn.attention(q, k, v, "splash", splash_blocks=blocks)))
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert max(relative_errors(got, loss_and_grads("xla")(q, k, v))) <= TOLERANCE
    (shape, sizes), = made
    assert shape == (2, 768, 512)
    assert (sizes.block_q, sizes.block_kv, sizes.block_q_dkv, sizes.block_kv_dkv, sizes.block_q_dq,
            sizes.block_kv_dq) == (256, 128, 128, 256, 384, 128)


def test_splash_block_sizes_come_from_the_config_and_are_checked():
    config = tiny_config(**{"model.splash_blocks.q": 1024, "model.splash_blocks.kv_dq": 256})
    assert train.model_config(config).splash_blocks == attn.SplashBlocks(q=1024, kv_dq=256)
    with pytest.raises(ValueError, match=r"multiples of 128; got \{'kv': 100\}"):
        attn.SplashBlocks(kv=100)


def tpu_topology(name, num_slices=1):
    """A TPU topology description for AOT compilation, or a skip when libtpu is unavailable."""
    from jax.experimental import topologies
    # Compiling touches no chip: do not wait on the one-process libtpu lock another job may hold.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=num_slices)
    except Exception as error:  # libtpu missing or unable to describe the topology
        pytest.skip(f"cannot describe TPU topology {name} (is libtpu installed?): {error}")


@pytest.mark.parametrize("attention, sizes, expected", [
    # The compiled Mosaic kernel (a custom call), not an interpreted XLA fallback, whose metadata also says "splash".
    ("splash", {"fsdp": 2, "tensor": 2}, ["tpu_custom_call"]),
    ("ulysses_splash", {"context": 2, "fsdp": 2}, ["tpu_custom_call", "all-to-all"]),
    ("ring", {"context": 4}, ["collective-permute"]),
])
def test_tiny_dit_forward_backward_compiles_for_a_tpu_topology(attention, sizes, expected):
    topology = tpu_topology("v5p:2x2x1")
    mesh = sharding.make_mesh(sizes, devices=topology.devices)
    model = nnx.eval_shape(lambda: WanDiT(dit_config("tiny", dim=256, num_heads=2, attention=attention),
                                          rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(model)
    batch = (jax.ShapeDtypeStruct((4, 4, 16, 16, 16), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.float32),
             jax.ShapeDtypeStruct((4, 16, 32), jnp.float32), jax.ShapeDtypeStruct((4, 2, 12), jnp.float32))

    def grads(state, *inputs):
        return jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(*inputs) ** 2))(state)

    # Default precision: the tests' "highest" would ask Mosaic for fp32-precision bf16 matmuls, which it refuses.
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES), jax.default_matmul_precision("default"):
        shardings = sharding.param_shardings(abstract_state, mesh)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        batch_sharding = sharding.batch_sharding(mesh)
        batch = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding) for x in batch]
        compiled = jax.jit(grads).lower(state, *batch).compile()
    assert all(op in compiled.as_text() for op in expected)
    memory = compiled.memory_analysis()
    print(f"per-chip bytes: arguments {memory.argument_size_in_bytes}, outputs {memory.output_size_in_bytes}, "
          f"temporaries {memory.temp_size_in_bytes}")
    assert memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes > 0


@pytest.mark.parametrize("q_len, kv_len, cross", [(13, 13, False), (5, 7, True)])
def test_chunked_matches_reference_without_the_whole_score_matrix(q_len, kv_len, cross, monkeypatch):
    """4-key chunks: 13 keys span 4 chunks, the last padded and masked; no (q × k) logits tensor in the HLO."""
    monkeypatch.setattr(attn, "CHUNKED_KEYS", 4)
    q, k, v = qkv(2, q_len, kv_len, heads=2)
    step = jax.jit(loss_and_grads("chunked", cross))
    assert f"tensor<2x2x{q_len}x{kv_len}xf32>" not in step.lower(q, k, v).as_text()
    assert max(relative_errors(step(q, k, v), loss_and_grads("xla", cross)(q, k, v))) <= TOLERANCE


def test_chunked_gradient_recomputes_its_tiles_instead_of_keeping_them():
    """Differentiating the chunk loop must not keep every logits tile (together the whole score
    matrix, stacked by the loop): the compiled gradient's temporaries stay well below its size."""
    length = 8192
    q = jax.ShapeDtypeStruct((1, length, 1, 64), jnp.float32)
    grads = jax.grad(lambda q, k, v: attn.chunked_attention(q, k, v).sum(), argnums=(0, 1, 2))
    temporaries = jax.jit(grads).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
    assert temporaries < 0.6 * length * length * 4  # kept tiles: > 2× the f32 scores


# Ops that do work a transfer can hide under, in a scheduled TPU HLO (a `while` is a loop of them).
COMPUTE_OPS = {"fusion", "convolution", "custom-call", "while", "dot"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\((.*)$")


def permutes_without_compute(hlo_text: str) -> list[str]:
    """The collective-permute-starts of a scheduled HLO module whose -done follows with no compute op
    in between (within a computation, instructions are listed in their scheduled order)."""
    exposed, in_flight = [], {}  # start name → whether compute has run since it was issued
    for line in hlo_text.splitlines():
        if not line.startswith(" "):  # a computation's header or closing brace
            in_flight = {}
            continue
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        name, op, operands = match.groups()
        if op == "collective-permute-start":
            in_flight[name] = False
        elif op == "collective-permute-done":
            start = re.match(r"%([^,)\s]+)", operands).group(1)
            if not in_flight.pop(start):
                exposed.append(start)
        elif op in COMPUTE_OPS:
            in_flight = dict.fromkeys(in_flight, True)
    return exposed


def test_ring_sends_overlap_compute_in_the_compiled_tpu_program():
    """Forward and backward of ring attention (with q/k/v projections) for v5p on context 4: every
    K/V and dK/dV transfer is issued before compute that runs while it travels."""
    topology = tpu_topology("v5p:2x2x1")
    mesh = sharding.make_mesh({"context": 4}, devices=topology.devices)

    def loss(x, w):
        q, k, v = (jnp.einsum("bld,dhe->blhe", x, w[i]) for i in range(3))
        return jnp.sum(jnp.sin(attn.attention(q, k, v, "ring").astype(jnp.float32)))

    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        tokens = NamedSharding(mesh, sharding.logical_to_spec(("act_batch", "act_length", None)))
        x = jax.ShapeDtypeStruct((1, 4096, 512), jnp.bfloat16, sharding=tokens)
        w = jax.ShapeDtypeStruct((3, 512, 4, 128), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
        hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    # 3 forward hops of K and V, 4 backward hops of dK and dV (the backward's K/V hops are the forward's).
    assert hlo.count("collective-permute-start(") >= 14
    assert permutes_without_compute(hlo) == []
