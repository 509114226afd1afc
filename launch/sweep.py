"""Expands a grid of config overrides into trainer commands, checking every key against the config
first, so a typo fails here rather than hours later on a pod.

    python -m launch.sweep --config configs/base.py --workdir gs://bucket/sweep1 \
        --grid optimizer.learning_rate=1e-4,3e-4 --grid flow.shift=3,5

prints one command per combination (workdir suffixed with the values); pipe them to your launcher.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import shlex


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2` strings → {key: [v1, v2]}."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid {item!r} is not key=value1,value2,...")
        grid[key] = values.split(",")
    return grid


def check_keys(config, keys) -> None:
    """Every dotted key must name an existing field (the trainer's config is locked the same way)."""
    for key in keys:
        node = config
        for name in key.split("."):
            if not hasattr(node, "keys") or name not in node.keys():
                raise KeyError(f"--grid key {key!r}: the config has no field {name!r}")
            node = node[name]


def expand(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, in a stable order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def commands(config_path: str, workdir: str, grid: dict[str, list[str]]) -> list[str]:
    check_keys(load_config(config_path), grid)
    lines = []
    for combination in expand(grid):
        suffix = "_".join(f"{k.split('.')[-1]}{v}" for k, v in combination.items())
        overrides = [f"--config.{k}={v}" for k, v in combination.items()]
        argv = ["python", "-m", "recam_jax.train", "--config", config_path, "--workdir", f"{workdir}/{suffix}",
                *overrides]
        lines.append(shlex.join(argv))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--grid", action="append", default=[], help="key=value1,value2,...")
    args = parser.parse_args()
    print("\n".join(commands(args.config, args.workdir, parse_grid(args.grid))))


if __name__ == "__main__":
    main()
