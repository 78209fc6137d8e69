#!/usr/bin/env bash
# Runs the same jaxrast command on every worker at once. JAXRAST_DISTRIBUTED=1 makes decode and
# train call jax.distributed.initialize() with no arguments: JAX finds the other workers from
# the TPU VM metadata (and a single-host slice is simply one process).
#   scripts/tpu_vm/launch.sh [--dry-run] decode --config configs/tpu_vm/v5e-16_qwen2.5-32b_rast.yaml [--set n=4]
# DETACH=1 runs it in the background on each worker, logging to \$HOME/jaxrast-logs/; relative
# paths (configs, --out) are relative to the checkout on the workers.
# shellcheck source=scripts/tpu_vm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

: "${DETACH:=0}"
: "${LOG_NAME:=${ARGS[0]:-jaxrast}-$(date +%Y%m%d-%H%M%S)}"
if [[ ${#ARGS[@]} -eq 0 ]]; then
  echo "usage: $0 [--dry-run] COMMAND [ARGS...]   (COMMAND: decode, train, eval, ...)" >&2
  exit 2
fi
cmd="cd $R_REPO && HF_HUB_OFFLINE=1 JAXRAST_DISTRIBUTED=1 $R_VENV/bin/jaxrast $(quote "${ARGS[@]}")"
if [[ "$DETACH" == 1 ]]; then
  cmd="mkdir -p \$HOME/jaxrast-logs && ( $cmd ) > \$HOME/jaxrast-logs/$LOG_NAME.log 2>&1 < /dev/null & disown"
fi
tpu_ssh all "$cmd"
