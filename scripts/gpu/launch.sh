#!/usr/bin/env bash
# jaxrast on GPU machines: one process per host, each driving all of its host's GPUs.
#   scripts/gpu/launch.sh [--dry-run] decode --config configs/gpu/h100x8_qwen2.5-32b_rast.yaml
# Without HOSTS the command runs here as one process (a single box: nothing to coordinate).
# With HOSTS="gpu-0 gpu-1 ..." it starts the same command on every host over ssh, with the
# environment jax.distributed.initialize() reads: JAX_COORDINATOR_ADDRESS (the first host),
# JAX_NUM_PROCESSES and JAX_PROCESS_ID. Under SLURM, use `srun` instead (see docs/multi-host.md).
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" "$@"

: "${HOSTS:=}"                # space-separated host names, the coordinator first
: "${PORT:=8476}"             # a free port on the first host
: "${REMOTE_DIR:=jaxrast}"    # the checkout on every host (relative to home, or absolute)
: "${JAXRAST:=jaxrast}"       # the jaxrast executable on the hosts (e.g. .venv/bin/jaxrast)

if [[ ${#ARGS[@]} -eq 0 ]]; then
  echo "usage: [HOSTS='h0 h1'] $0 [--dry-run] COMMAND [ARGS...]   (COMMAND: decode, train, eval, ...)" >&2
  exit 2
fi
read -r -a hosts <<< "$HOSTS"
if [[ ${#hosts[@]} -eq 0 ]]; then
  run "$JAXRAST" "${ARGS[@]}"
  exit 0
fi

pids=()
for i in "${!hosts[@]}"; do
  env_vars="JAX_COORDINATOR_ADDRESS=${hosts[0]}:$PORT JAX_NUM_PROCESSES=${#hosts[@]} JAX_PROCESS_ID=$i"
  remote="cd $(quote "$REMOTE_DIR") && $env_vars $(quote "$JAXRAST" "${ARGS[@]}")"
  if [[ "$DRY_RUN" == 1 ]]; then
    run ssh "${hosts[$i]}" "$remote"
  else
    # shellcheck disable=SC2029  # the command string is built here on purpose
    ssh "${hosts[$i]}" "$remote" &
    pids+=("$!")
  fi
done
status=0
for pid in ${pids[@]+"${pids[@]}"}; do
  wait "$pid" || status=$?
done
exit "$status"
