#!/usr/bin/env bash
# Creates the TPU VM slice (all of its workers).
#   SLICE=v5e-16 TPU_NAME=my-tpu scripts/tpu_vm/create.sh [--dry-run] [extra gcloud flags, e.g. --spot]
# shellcheck source=scripts/tpu_vm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
  "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" ${ARGS[@]+"${ARGS[@]}"}
