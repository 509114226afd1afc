#!/usr/bin/env bash
# Runs the trainer on every host of a Cloud TPU VM slice (one process per host; the processes find
# each other through jax.distributed.initialize, which recam_jax.train calls where JAX detects a
# cluster). WORKDIR must be a gs:// bucket every host reaches (the VM's service account needs access).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/base.py gs://bucket/runs/exp1 --config.mesh.fsdp=-1 ...
#
# Each host needs the repository at ~/recam_jax with its .venv (pip install -e . and jax[tpu]).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/recam_jax && .venv/bin/python -m recam_jax.train --config $config --workdir $workdir $*"
