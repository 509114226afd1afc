"""ReCamMaster on Wan2.1-T2V-14B at 480×832, 81 frames (21 + 21 latent frames).

    python -m recam_jax.train --config configs/wan14b.py --workdir /path/to/run \
        --config.init_from=/path/to/Wan2.1-T2V-14B/diffusion_pytorch_model.safetensors.index.json

Hardware: a TPU v5p-64 (32 chips): fsdp 16 × context 2 with all-to-all (Ulysses) splash attention,
63.77 GiB per chip in the AOT plan of docs/scale.md (scanned blocks, default rules; fsdp 32 alone
does not fit). Sharding parameters and Adam moments over context too (`sharding_rules=fsdp_context`)
halves them (4.95 → 2.53 GiB) but raises the temporaries more (58.74 → 62.57 GiB): 65.19 GiB in all,
so this config keeps the default rules.
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
    return c
