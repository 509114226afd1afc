"""recam_jax: ReCamMaster (camera-controlled re-rendering of a video) on a Wan2.1 DiT, in JAX/Flax."""
