#!/usr/bin/env bash
# Deletes the TPU VM slice (billing stops; the workers' disks are gone).
#   TPU_NAME=my-tpu scripts/tpu_vm/delete.sh [--dry-run]
# shellcheck source=scripts/tpu_vm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
