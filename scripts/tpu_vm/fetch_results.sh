#!/usr/bin/env bash
# Copies outputs back from worker 0 (the only process that writes files).
#   scripts/tpu_vm/fetch_results.sh [--dry-run] REMOTE_PATH [LOCAL_DIR]   (REMOTE_PATH relative to the checkout)
# shellcheck source=scripts/tpu_vm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

if [[ ${#ARGS[@]} -eq 0 ]]; then
  echo "usage: $0 [--dry-run] REMOTE_PATH [LOCAL_DIR]" >&2
  exit 2
fi
run gcloud compute tpus tpu-vm scp "${GCLOUD_FLAGS[@]}" --worker=0 --recurse \
  "$TPU_NAME:$REMOTE_DIR/${ARGS[0]}" "${ARGS[1]:-.}"
