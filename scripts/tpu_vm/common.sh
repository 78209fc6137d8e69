# shellcheck shell=bash disable=SC2034
# (SC2034: the variables set here are used by the scripts that source this file.)
# Sourced by every script in scripts/tpu_vm/ with its arguments: settings from the
# environment and the `tpu_ssh` / `tpu_scp` helpers, on top of ../lib.sh (`--dry-run`,
# `run`, `quote`, ARGS).
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" "$@"

# A slice name picks the accelerator type, the TPU VM image and a zone that offers it;
# each can still be set on its own. Check availability with
# `gcloud compute tpus accelerator-types list --zone=ZONE`.
: "${SLICE:=v4-8}"
case "$SLICE" in
  v4-*) slice_type="$SLICE" slice_version="tpu-ubuntu2204-base" slice_zone="us-central2-b" ;;
  v5e-*) slice_type="v5litepod-${SLICE#v5e-}" slice_version="v2-alpha-tpuv5-lite" slice_zone="us-west4-a" ;;
  v5p-*) slice_type="$SLICE" slice_version="v2-alpha-tpuv5" slice_zone="us-east5-a" ;;
  v6e-*) slice_type="$SLICE" slice_version="v2-alpha-tpuv6e" slice_zone="us-east5-b" ;;
  *) echo "unknown SLICE=$SLICE; use v4-N, v5e-N, v5p-N or v6e-N (or set ACCELERATOR_TYPE, RUNTIME_VERSION and ZONE)" >&2
     exit 2 ;;
esac
: "${TPU_NAME:=jaxrast-${SLICE}}"
: "${ACCELERATOR_TYPE:=$slice_type}"
: "${RUNTIME_VERSION:=$slice_version}"
: "${ZONE:=$slice_zone}"
: "${PROJECT:=}"              # empty: gcloud's configured project
: "${REMOTE_DIR:=jaxrast}"    # the checkout on every worker, relative to its home directory
: "${VENV:=jaxrast-venv}"     # the virtual environment on every worker, relative to home
: "${CKPT_DIR:=ckpts}"        # checkpoints copied from a local disk or GCS, relative to home

# Paths on the workers, for the sourcing scripts: $HOME is expanded there, not here.
R_VENV="\$HOME/$VENV"
R_REPO="\$HOME/$REMOTE_DIR"
R_CKPT="\$HOME/$CKPT_DIR"

GCLOUD_FLAGS=("--zone=$ZONE")
if [[ -n "$PROJECT" ]]; then GCLOUD_FLAGS+=("--project=$PROJECT"); fi

# tpu_ssh WORKER COMMAND: runs COMMAND (a string) on one worker or on all of them.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "--worker=$1" --command "$2"
}

# tpu_scp SRC DEST: copies a local file or directory to DEST (relative to home) on every worker.
tpu_scp() {
  run gcloud compute tpus tpu-vm scp "${GCLOUD_FLAGS[@]}" --worker=all --recurse "$1" "$TPU_NAME:$2"
}
