"""The README's main job: the tiny ReCamMaster on the generated demo dataset, end to end on CPU.

    python -m data_pipeline.demo_data --out runs/demo/raw --prepare_to runs/demo/shards
    python -m recam_jax.train --config configs/demo.py --workdir runs/demo/train

The shards hold latents of the tiny random `demo` VAE (17 frames of 64×64 → 5 × 8 × 8 × 16) and
embeddings of a tiny random umT5 (width 32): the run shows the whole pipeline working, the loss
falling and a PyTorch checkpoint exported, not a useful model. A few minutes on 2 CPU cores.
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.data.source = "tfrecord"
    c.data.path = "runs/demo/shards"
    c.data.latent_shape = (5, 8, 8, 16)
    c.data.text_len = 16
    c.data.batch_size = 4
    c.sample_every = 100
    c.sample.vae = "demo"  # the random VAE the shards were encoded with: decodes them consistently
    return c
