#!/usr/bin/env bash
# kardia_jax on a Cloud TPU slice, from this machine: check the config ahead of time, create the slice
# (a TPU VM or a queued resource), install the repository on every worker, run a job on all of them
# (JAX's multi-controller runtime: every worker runs the same command), stream worker 0's log, tear down.
#
#   launch/tpu_pod.sh COMMAND --name NAME --zone ZONE --config configs/qwen7b_tpu.py [options] [-- job flags]
#
# Commands:
#   aot        python -m kardia_jax.aot on this machine (needs libtpu here: pip install -e ".[tpu]")
#   create     the slice for the config's topology (--queued: through a queued resource; waits until ACTIVE)
#   install    copies this checkout (without .git and runs/) to every worker and pip-installs it with [tpu]
#   run        starts `python -m kardia_jax.<--job>` on every worker in the background, then streams worker 0's log
#   logs       streams worker 0's log of --job
#   teardown   deletes the slice (and its queued resource)
#   all        aot, create, install, run
#
# Options:
#   --name NAME              TPU VM name (the queued resource is NAME-qr)
#   --zone ZONE              e.g. us-west4-a (v5e), us-east5-a (v5p), us-east1-d (v6e)
#   --project PROJECT        default: gcloud's configured project
#   --config FILE            a config in configs/; its `topology` gives the accelerator type
#   --accelerator TYPE       instead of the one derived from the topology (e.g. v5litepod-32)
#   --version VERSION        TPU software version (default: the one for the chip generation)
#   --workdir gs://B/P       checkpoints, exports and metrics (required for run: every worker shares it)
#   --data SOURCE            data.source (default: the config's, hf://Jhcircle/KardiaBench; gated: set HF_TOKEN)
#   --job JOB                train (GRPO, default), sft or evaluate
#   --queued, --spot         create through a queued resource; spot capacity
#   --dry-run                print every command instead of running it
#
# HF_TOKEN, if set here, is passed to the workers' job (KardiaBench and some models are gated on the hub).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
command=${1:-}
[[ -n "$command" ]] && shift
name="" zone="" project="" config="" accelerator="" version="" workdir="" data="" job="train"
queued=0 spot=0 dry_run=0
extra=()

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

die() {
  echo "launch/tpu_pod.sh: $*" >&2
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --accelerator) accelerator=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --job) job=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# Runs a command, or prints it with --dry-run: one line, arguments with shell syntax in single quotes.
run() {
  if (( dry_run )); then
    local arg line="+"
    for arg in "$@"; do
      if [[ "$arg" =~ ^[][A-Za-z0-9_./:=@%+,~-]+$ ]]; then
        line+=" $arg"
      else
        line+=" '${arg//\'/\'\\\'\'}'"
      fi
    done
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

need() {
  local flag=$1 value=$2
  [[ -n "$value" ]] || die "$command needs --$flag"
}

# The config's TPU topology (e.g. v5e:4x8), read with the package's own config loader.
topology() {
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
    'import sys; from kardia_jax.config import load_file; print(load_file(sys.argv[1]).topology)' "$config"
}

# Cloud TPU accelerator type and software version of a topology: v5e:4x8 -> v5litepod-32 (chips), v5p:2x2x4
# -> v5p-32 (TensorCores: 2 per chip), v6e:2x4 -> v6e-8, v4:2x2x2 -> v4-16.
accelerator_of() {
  local generation=${1%%:*} shape=${1#*:} chips=1 dim
  IFS=x read -ra dims <<< "$shape"
  for dim in "${dims[@]}"; do chips=$(( chips * dim )); done
  case "$generation" in
    v5e|v5litepod) echo "v5litepod-$chips v2-alpha-tpuv5-lite" ;;
    v5p) echo "v5p-$(( 2 * chips )) v2-alpha-tpuv5" ;;
    v6e) echo "v6e-$chips v2-alpha-tpuv6e" ;;
    v4) echo "v4-$(( 2 * chips )) tpu-ubuntu2204-base" ;;
    *) die "topology $1: unknown TPU generation $generation (pass --accelerator and --version)" ;;
  esac
}

resolve_accelerator() {
  need config "$config"
  [[ -f "$config" ]] || die "--config $config: no such file"
  if [[ -z "$accelerator" || -z "$version" ]]; then
    local topo derived
    topo=$(topology) || die "cannot read the topology of $config (is kardia_jax importable here? pip install -e .)"
    [[ -n "$topo" ]] || die "$config has no topology; pass --accelerator and --version"
    derived=$(accelerator_of "$topo")
    accelerator=${accelerator:-${derived% *}}
    version=${version:-${derived#* }}
  fi
}

gcloud_tpu() {
  local args=(gcloud compute tpus "$@" --zone="$zone")
  [[ -n "$project" ]] && args+=(--project="$project")
  run "${args[@]}"
}

do_aot() {
  need config "$config"
  run python3 -m kardia_jax.aot --config="$config" "${extra[@]}"
}

do_create() {
  need name "$name"; need zone "$zone"; resolve_accelerator
  local capacity=()
  (( spot )) && capacity=(--spot)
  if (( queued )); then
    gcloud_tpu queued-resources create "$name-qr" --node-id="$name" --accelerator-type="$accelerator" \
      --runtime-version="$version" "${capacity[@]}"
    if (( dry_run )); then
      echo "# (waits until queued resource $name-qr is ACTIVE)"
    else
      until [[ "$(gcloud_tpu queued-resources describe "$name-qr" --format='value(state.state)')" == ACTIVE ]]; do
        echo "waiting for queued resource $name-qr ..." >&2
        sleep 60
      done
    fi
  else
    gcloud_tpu tpu-vm create "$name" --accelerator-type="$accelerator" --version="$version" "${capacity[@]}"
  fi
}

do_install() {
  need name "$name"; need zone "$zone"
  local archive=/tmp/kardia_jax_$name.tgz
  run tar -C "$repo" --exclude=.git --exclude=runs -czf "$archive" .
  gcloud_tpu tpu-vm scp "$archive" "$name:~/kardia_jax.tgz" --worker=all
  gcloud_tpu tpu-vm ssh "$name" --worker=all --command="set -e; rm -rf ~/kardia_jax; mkdir -p ~/kardia_jax; \
tar -xzf ~/kardia_jax.tgz -C ~/kardia_jax; cd ~/kardia_jax; python3 -m pip install -q -e '.[tpu]'"
}

# The job's command line on a worker (arguments quoted for the remote shell).
job_command() {
  local args=(python3 -m "kardia_jax.$job" --config="$config" --config.workdir="$workdir")
  [[ -n "$data" ]] && args+=(--config.data.source="$data")
  args+=("${extra[@]}")
  printf '%q ' "${args[@]}"
}

do_run() {
  need name "$name"; need zone "$zone"; need config "$config"; need workdir "$workdir"
  [[ "$workdir" == gs://* ]] || die "--workdir $workdir: the workers share it, so it must be gs://BUCKET/..."
  case "$job" in train|sft|evaluate) ;; *) die "--job $job: use train, sft or evaluate" ;; esac
  local token=""
  # The token reaches the workers' environment, never the printed command.
  [[ -n "${HF_TOKEN:-}" ]] && token="export HF_TOKEN=\$(cat ~/.kardia_hf_token); "
  if [[ -n "${HF_TOKEN:-}" ]]; then
    if (( dry_run )); then
      echo "# (writes \$HF_TOKEN to ~/.kardia_hf_token on every worker)"
    else
      printf '%s' "$HF_TOKEN" | gcloud_tpu tpu-vm ssh "$name" --worker=all \
        --command='umask 077; cat > ~/.kardia_hf_token'
    fi
  fi
  gcloud_tpu tpu-vm ssh "$name" --worker=all --command="cd ~/kardia_jax; ${token}nohup $(job_command)\
> ~/kardia_$job.log 2>&1 < /dev/null &"
  do_logs
}

do_logs() {
  need name "$name"; need zone "$zone"
  gcloud_tpu tpu-vm ssh "$name" --worker=0 --command="tail -n +1 -F ~/kardia_$job.log"
}

do_teardown() {
  need name "$name"; need zone "$zone"
  if (( queued )); then
    gcloud_tpu queued-resources delete "$name-qr" --force --quiet
  else
    gcloud_tpu tpu-vm delete "$name" --quiet
  fi
}

case "$command" in
  aot) do_aot ;;
  create) do_create ;;
  install) do_install ;;
  run) do_run ;;
  logs) do_logs ;;
  teardown) do_teardown ;;
  all) do_aot; do_create; do_install; do_run ;;
  -h|--help|"") usage 0 ;;
  *) die "unknown command $command (see --help)" ;;
esac
