#!/usr/bin/env bash
# Puts checkpoints on every worker (each process reads the slices of the tensors its devices hold).
#   scripts/tpu_vm/copy_checkpoints.sh [--dry-run] SOURCE...
# SOURCE is
#   hf:ORG/NAME    downloaded on every worker into its HuggingFace cache, so configs can name
#                  the hub id (launch.sh sets HF_HUB_OFFLINE=1: nothing is fetched at decode time)
#   gs://BUCKET/D  copied on every worker into $R_CKPT/D (TPU VMs can read GCS)
#   DIR            a local checkpoint directory, copied to $R_CKPT/ on every worker
# shellcheck source=scripts/tpu_vm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

if [[ ${#ARGS[@]} -eq 0 ]]; then
  echo "usage: $0 [--dry-run] hf:ORG/NAME | gs://BUCKET/DIR | LOCAL_DIR ..." >&2
  exit 2
fi
for src in "${ARGS[@]}"; do
  case "$src" in
    hf:*) tpu_ssh all "$R_VENV/bin/hf download $(quote "${src#hf:}")" ;;
    gs://*) tpu_ssh all "mkdir -p $R_CKPT && gcloud storage cp -r $(quote "$src") $R_CKPT/" ;;
    *)
      if [[ "$DRY_RUN" != 1 && ! -f "$src/config.json" ]]; then
        echo "$src has no config.json: pass a HuggingFace checkpoint directory" >&2
        exit 2
      fi
      tpu_ssh all "mkdir -p $R_CKPT"
      tpu_scp "${src%/}" "$CKPT_DIR/" ;;
  esac
done
