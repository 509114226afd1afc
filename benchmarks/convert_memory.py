"""Peak host memory of `python -m recam_jax.convert`, per conversion direction, on a generated checkpoint.

    nice -n 10 python benchmarks/convert_memory.py [--dim 1024 --layers 8] [--code DIR] [--only orbax]

Writes a random bf16 ReCamMaster `.ckpt` (a few hundred MB) and the same weights as an orbax folder
saved from a scanned model (blocks stacked on a `layers` axis), then runs each conversion in its own
subprocess and prints a table: the input and output sizes, the process's RSS after its imports, its
peak RSS (VmHWM: pages of the mapped input count while the process holds them), the peak above the
imports as a multiple of the larger of the two files, and the subprocess's wall time (imports included);
with `--repeat N` each conversion runs N times and the table gives the range (threads make the
peaks vary by a few tens of MB).
`--code DIR` runs the conversions with another checkout's `recam_jax` (e.g. an older commit from
`git worktree add`) on the same files, for a before/after. `--only WORD` runs the conversions whose
name holds WORD (and the ones before them whose output they read).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's recam_jax writes the input, whichever `--code` converts it

# Runs in the child: RSS after importing (and starting) everything a conversion uses, the
# conversion, then the peak (Linux /proc).
CHILD = """
import sys
import jax, orbax.checkpoint, safetensors.torch, torch
from recam_jax import convert
jax.numpy.zeros(1).block_until_ready()

def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) // 1024

imported = status("VmRSS:")
convert.main(sys.argv[1:])
print("RSS_MB", imported, status("VmHWM:"))
"""


def size_mb(path: str) -> float:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20
    return os.path.getsize(path) / 2**20


def write_random_checkpoint(path: str, dim: int, layers: int) -> None:
    """A random bf16 model of this size, generated and written one tensor at a time."""
    import ml_dtypes
    import numpy as np

    from recam_jax import convert
    from recam_jax.models.dit import DiTConfig
    from recam_jax.torch_io import LazyTensor

    cfg = DiTConfig(dim=dim, ffn_dim=4 * dim, num_heads=dim // 128, num_layers=layers)
    _, flat = convert._param_state(convert.abstract_model(cfg))
    rng = np.random.default_rng(0)
    tensors = {}
    for w in convert.weight_table(cfg):
        shape = convert._torch_shape(flat[w.path].shape, w.kind)
        tensors[w.wan] = LazyTensor(shape, np.dtype(ml_dtypes.bfloat16), lambda shape=shape: (
            rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16))
    convert.write_pytorch(tensors, cfg, path, shift=5.0)


def write_scanned_orbax(ckpt: str, path: str, heads: int) -> None:
    """The checkpoint's weights, in bf16, as `save_orbax` writes them from a model with scanned blocks."""
    from recam_jax import convert

    model = convert.load_pytorch(ckpt, num_heads=heads, on_host=True, scan_layers=True, param_dtype="bfloat16")
    convert.save_orbax(model, path, shift=5.0)


def run(code: str, args: list[str]) -> tuple[int, int, float]:
    env = {**os.environ, "PYTHONPATH": code, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, cwd=code, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{args} failed:\n{result.stderr[-3000:]}")
    imported, peak = next(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("RSS_MB"))
    return int(imported), int(peak), time.perf_counter() - start


def span(values, form: str) -> str:
    """"low–high" of the runs' values (one value when they agree)."""
    low, high = form.format(min(values)), form.format(max(values))
    return low if low == high else f"{low}–{high}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--code", default=REPO, help="checkout whose recam_jax converts (default: this one)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each conversion (the table gives the range)")
    parser.add_argument("--only", default="", help="run only the conversions whose name holds this")
    args = parser.parse_args()
    heads = ["--num-heads", str(args.dim // 128)]  # spelled as every version of the CLI accepts it
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "in.ckpt")
        write_random_checkpoint(ckpt, args.dim, args.layers)
        scanned = os.path.join(tmp, "scanned_params")
        write_scanned_orbax(ckpt, scanned, args.dim // 128)
        steps = [  # (name, input, output, extra flags); later steps read earlier outputs
            ("ckpt → ckpt", ckpt, os.path.join(tmp, "out.ckpt"), []),
            ("ckpt → safetensors", ckpt, os.path.join(tmp, "out.safetensors"), []),
            ("safetensors → ckpt", os.path.join(tmp, "out.safetensors"), os.path.join(tmp, "again.ckpt"), []),
            ("ckpt → diffusers folder", ckpt, os.path.join(tmp, "out_diffusers"), []),
            ("ckpt → orbax", ckpt, os.path.join(tmp, "params"), []),
            ("orbax → ckpt", os.path.join(tmp, "params"), os.path.join(tmp, "from_orbax.ckpt"), []),
            ("scanned orbax → ckpt", scanned, os.path.join(tmp, "from_scanned.ckpt"), []),
            ("ckpt → ckpt --dtype float32", ckpt, os.path.join(tmp, "fp32.ckpt"), ["--dtype", "float32"]),
            ("ckpt → orbax --dtype float32", ckpt, os.path.join(tmp, "fp32_params"), ["--dtype", "float32"]),
        ]
        print(f"recam_jax from {args.code}; DiT dim {args.dim}, {args.layers} layers, bf16 input")
        print("| conversion | input MB | output MB | RSS after imports MB | peak RSS MB | (peak − imports) / larger file | wall s |")
        print("|---|---|---|---|---|---|---|")
        wanted = [step for step in steps if args.only in step[0]]
        needed = {source for _, source, _, _ in wanted}
        for step in steps:
            name, source, target, flags = step
            if step not in wanted:
                if target in needed:  # the input of a wanted conversion
                    run(args.code, [source, target, *heads, *flags])
                continue
            runs = []
            for _ in range(args.repeat):
                shutil.rmtree(target, ignore_errors=True)  # each run writes a new folder (files are overwritten)
                runs.append(run(args.code, [source, target, *heads, *flags]))
            imported, peak, seconds = zip(*runs)
            larger = max(size_mb(source), size_mb(target))
            ratios = [(p - i) / larger for i, p in zip(imported, peak)]
            print(f"| {name} | {size_mb(source):.0f} | {size_mb(target):.0f} | {span(imported, '{}')} | "
                  f"{span(peak, '{}')} | {span(ratios, '{:.2f}×')} | {span(seconds, '{:.1f}')} |", flush=True)


if __name__ == "__main__":
    main()
