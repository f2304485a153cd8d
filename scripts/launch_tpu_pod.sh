#!/usr/bin/env bash
# Run one jaxpref training command on every worker of a Cloud TPU VM slice (v5e-16, v5p-128, ...).
#
# Run it from your own machine (or Cloud Shell), where `gcloud` is logged in; it starts
#   python -m jaxpref.train --config CONFIG [key=value ...]
# on all workers at once with `gcloud compute tpus tpu-vm ssh --worker=all`. Every worker runs the
# same command: JAX joins the workers into one job (JAXPREF_DISTRIBUTED=1 -> jax.distributed.initialize(),
# which reads the slice's topology from the TPU VM metadata), each worker reads its own slice of
# every global batch, process 0 writes logs and the exported model, all write checkpoint shards.
#
# Usage:
#   scripts/launch_tpu_pod.sh setup TPU_NAME ZONE            # once: copy this repo to every worker, install
#   scripts/launch_tpu_pod.sh train TPU_NAME ZONE CONFIG.yaml [key=value ...]
#   scripts/launch_tpu_pod.sh logs  TPU_NAME ZONE            # last lines of every worker's log (detached runs)
#   scripts/launch_tpu_pod.sh stop  TPU_NAME ZONE            # stop a detached run on every worker
#
# Environment (all optional):
#   PROJECT        gcloud project (default: gcloud's current one)
#   REMOTE_DIR     where the repo lives on the workers (default: jaxpref, i.e. ~/jaxpref)
#   DETACH=1       run under nohup and return; output goes to ~/jaxpref-train.log on every worker
#   HF_TOKEN       passed to the workers (gated models / private datasets on the Hugging Face hub)
#   EXTRA_ENV      more "NAME=value NAME2=value" pairs for the training processes
#   JAX_PKG        what `setup` installs for TPUs (default: "jax[tpu]==0.10.2" plus the repo's pins)
#
# output_dir must be one directory that every worker sees at the same path: orbax writes each
# worker's checkpoint shards there and process 0 finalises the step. On TPU VMs mount a GCS bucket
# with gcsfuse at the same path on all workers (jaxpref checks this at start and stops with a clear
# message otherwise): `MOUNT_BUCKET=my-bucket scripts/launch_tpu_pod.sh setup ...` mounts gs://my-bucket
# at /mnt/jaxpref (MOUNT_POINT) on every worker; then use output_dir=/mnt/jaxpref/runs/NAME.
set -euo pipefail

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
remote_dir=${REMOTE_DIR:-jaxpref}
gcloud_args=(compute tpus tpu-vm)
project_args=(--zone "$zone")
[[ -n "${PROJECT:-}" ]] && project_args+=(--project "$PROJECT")

on_all_workers() {  # run a shell command on every worker, in parallel
  gcloud "${gcloud_args[@]}" ssh "$tpu" "${project_args[@]}" --worker=all --command "$1"
}

case "$action" in
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tarball=$(mktemp -t jaxpref-XXXXXX.tar.gz)
    # the working tree without build outputs, virtual environments and run outputs
    tar -C "$repo" --exclude=.venv --exclude=.git --exclude=outputs --exclude=last_run_prepared -czf "$tarball" .
    gcloud "${gcloud_args[@]}" scp "$tarball" "$tpu:jaxpref.tar.gz" "${project_args[@]}" --worker=all
    rm -f "$tarball"
    jax_pkg=${JAX_PKG:-"jax[tpu]==0.10.2"}
    mount=""
    if [[ -n "${MOUNT_BUCKET:-}" ]]; then
      mp=${MOUNT_POINT:-/mnt/jaxpref}
      mount="sudo mkdir -p $mp && sudo chown \$(id -u):\$(id -g) $mp \
        && (mountpoint -q $mp || gcsfuse --implicit-dirs $MOUNT_BUCKET $mp)"
    fi
    on_all_workers "set -e; mkdir -p $remote_dir && tar -xzf jaxpref.tar.gz -C $remote_dir && cd $remote_dir \
      && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
      && .venv/bin/pip install -q '$jax_pkg' -e . ${mount:+&& $mount}"
    echo "setup done on every worker of $tpu: repo in ~/$remote_dir, venv in ~/$remote_dir/.venv"
    ;;
  train)
    [[ $# -ge 1 ]] || usage
    config=$1
    shift
    # the config travels with the command (the workers may not have your local copy)
    gcloud "${gcloud_args[@]}" scp "$config" "$tpu:$remote_dir/launch_config.yaml" "${project_args[@]}" --worker=all
    env_vars="JAXPREF_DISTRIBUTED=1 TOKENIZERS_PARALLELISM=false ${EXTRA_ENV:-}"
    [[ -n "${HF_TOKEN:-}" ]] && env_vars+=" HF_TOKEN=$HF_TOKEN"
    overrides=""
    for o in "$@"; do overrides+=" $(printf '%q' "$o")"; done
    cmd="cd $remote_dir && env $env_vars .venv/bin/python -m jaxpref.train --config launch_config.yaml --no_progress$overrides"
    if [[ "${DETACH:-0}" == 1 ]]; then
      on_all_workers "nohup bash -c $(printf '%q' "$cmd") > ~/jaxpref-train.log 2>&1 < /dev/null & echo started on \$(hostname)"
      echo "detached; follow with: $0 logs $tpu $zone"
    else
      on_all_workers "$cmd"
    fi
    ;;
  logs)
    on_all_workers "echo == \$(hostname); tail -n ${LINES:-20} ~/jaxpref-train.log"
    ;;
  stop)
    on_all_workers "pkill -f 'jaxpref.train --config launch_config.yaml' || true"
    ;;
  *)
    usage
    ;;
esac
