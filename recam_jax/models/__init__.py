"""Flax NNX models: the Wan2.1 / ReCamMaster DiT and the Wan2.1 VAE."""
