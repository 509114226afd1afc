"""Per-chip memory of one 1.3B self-attention (forward + backward) per backend, AOT-compiled for TPU.

Run: `python benchmarks/attention_memory.py [--topology v5p:2x2x1] [--tokens 65520]` (needs libtpu;
no TPU: it compiles for a topology description). Prints a table of XLA's memory analysis; Pallas
FLOPs are invisible to cost_analysis, so no FLOPs are reported.
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling needs no chip, nor libtpu's lock

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from recam_jax import sharding  # noqa: E402
from recam_jax.models.attention import QKV_AXES, attention  # noqa: E402

HEADS, HEAD_DIM = 12, 128  # Wan2.1 1.3B


def compile_attention(backend, mesh, batch, tokens):
    """The compiled forward + backward of attention on bf16 q, k, v laid out by the default rules."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        spec = sharding.logical_to_spec(QKV_AXES)
        arg = jax.ShapeDtypeStruct((batch, tokens, HEADS, HEAD_DIM), jnp.bfloat16,
                                   sharding=jax.sharding.NamedSharding(mesh, spec))
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, backend).astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(arg, arg, arg).compile()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--tokens", type=int, default=65_520)
    args = parser.parse_args()
    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    n = len(devices)
    cases = [("xla", {"context": n}), ("splash", {"tensor": n}), ("ring", {"context": n}),
             ("ulysses", {"context": n}), ("ulysses_splash", {"context": n})]
    print(f"{args.topology}: {n} chips, batch 1, {args.tokens} tokens, {HEADS} heads × {HEAD_DIM}, bf16, fwd+bwd")
    print("| backend | mesh | temp GiB/chip | args GiB/chip | compile s |\n|---|---|---|---|---|")
    for backend, sizes in cases:
        mesh = sharding.make_mesh(sizes, devices=devices)
        start = time.perf_counter()
        try:
            memory = compile_attention(backend, mesh, 1, args.tokens).memory_analysis()
        except Exception as error:  # e.g. heads not divisible, or a kernel limit: report and go on
            print(f"| {backend} | {sizes} | failed: {str(error).splitlines()[0][:80]} | | |")
            continue
        print(f"| {backend} | {sizes} | {memory.temp_size_in_bytes / 2**30:.2f} | "
              f"{memory.argument_size_in_bytes / 2**30:.3f} | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()
