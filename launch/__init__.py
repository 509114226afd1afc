"""Launching the trainer: TPU pods, Slurm GPU clusters, sweeps."""
