"""Test-wide setup: CPU only, exact float32 matmuls, and paths to optional fixtures."""

import os

# Must precede the first jax import: CPU even where libtpu is installed, 8 fake devices for mesh tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "..", "shared", "fixtures", "recammaster_examples")


@pytest.fixture
def fixtures_dir():
    """The real ReCamMaster example data, when ../shared/fixtures is present."""
    if not os.path.isdir(FIXTURES):
        pytest.skip(f"optional fixtures not found at {FIXTURES}")
    return FIXTURES


def tiny_config(**fields):
    """configs/tiny.py logging every step, no eval, rare checkpoints; `fields` override (dotted keys)."""
    from configs import tiny

    config = tiny.get_config()
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 1000
    for dotted, value in fields.items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def read_metrics(workdir) -> list[dict]:
    """The records a training run wrote to WORKDIR/metrics.jsonl, in order."""
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
