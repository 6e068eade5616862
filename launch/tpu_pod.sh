#!/usr/bin/env bash
# Create (if needed) a Cloud TPU VM slice, install kardia_jax on every host, and run one job on all of
# them (JAX's multi-controller runtime: every host runs the same command).
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE CONFIG [JOB] [-- extra flags]
#   launch/tpu_pod.sh kardia-v5e32 us-west4-a v5litepod-32 configs/qwen7b_tpu.py train \
#       -- --config.workdir=gs://my-bucket/kardia/qwen7b
#
# JOB is sft or train (default train). Needs gcloud with a project set; the repo is copied from here.
set -euo pipefail
name=$1 zone=$2 accelerator=$3 config=$4 job=${5:-train}
shift $(( $# >= 5 ? 5 : 4 )); [ "${1:-}" = "--" ] && shift
extra=("$@")

if ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accelerator" \
    --version tpu-ubuntu2204-base
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$repo" --exclude=.git --exclude=runs -czf /tmp/kardia_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/kardia_jax.tgz "$name":~/ --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e; mkdir -p ~/kardia_jax && tar -xzf ~/kardia_jax.tgz -C ~/kardia_jax && cd ~/kardia_jax
  python3 -m pip install -q -e '.[tpu]'
  python3 -m kardia_jax.$job --config=$config ${extra[*]:-}
"
