"""ReCamMaster on Wan2.1-T2V-14B at 480×832, 81 frames (21 + 21 latent frames).

    python -m recam_jax.train --config configs/wan14b.py --workdir /path/to/run \
        --config.init_from=/path/to/Wan2.1-T2V-14B/diffusion_pytorch_model.safetensors.index.json

Hardware: a TPU v5p-64 (32 chips): fsdp 16 × context 2 with all-to-all (Ulysses) splash attention,
53.5 GiB per chip in the AOT plan of docs/scale.md with unrolled blocks and the default rules (fsdp
32 alone does not fit). Parameters and Adam moments are sharded over context too (`fsdp_context`):
with the scanned blocks the planner on CPU devices shows it halving them and lowering temporaries;
its v5p-64 figure is not yet measured (with unrolled blocks it did not fit; docs/scale.md).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.variant = "14B"
    c.data.batch_size = 32
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.context = 2
    c.model.attention = "ulysses_splash"
    c.sharding_rules = "fsdp_context"
    return c
