"""A tiny ReCamMaster that trains on a 2-core CPU in seconds per hundred steps (the README demo).

    python -m recam_jax.train --config configs/tiny.py --workdir runs/tiny

Random init and every parameter trainable (there is no pretrained Wan at this size), synthetic
latents of 4 + 4 frames at 8×8; the loss falls several-fold within 300 steps.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.steps = 300
    c.model.variant = "tiny"
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.model.attention = "xla"
    c.trainable = "all"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.end_learning_rate = 3e-4
    c.optimizer.warmup_steps = 20
    c.optimizer.schedule = "cosine"
    c.optimizer.decay_steps = 280
    c.data.batch_size = 8
    c.mesh.data = -1  # data parallel over whatever devices there are
    c.mesh.fsdp = 1
    c.data.latent_shape = (4, 8, 8, 16)
    c.data.text_len = 16
    c.data.text_dim = 32
    c.data.synthetic_examples = 64
    c.log_every = 25
    c.checkpoint_every = 100
    c.eval_every = 100
    c.peak_tflops_per_device = 1.0  # a nominal CPU figure; MFU on CPU is only illustrative
    return c
