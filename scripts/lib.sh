# shellcheck shell=bash
# Shared by the launch scripts under scripts/: strict mode, `--dry-run` handling and `run`.
# Dry runs (DRY_RUN=1 or --dry-run) print each command, quoted so it can be pasted into a
# shell, instead of running it. Source with the script's arguments: `source lib.sh "$@"`;
# the arguments other than --dry-run are left in ARGS.
set -euo pipefail

: "${DRY_RUN:=0}"
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done

# quote ARG...: the arguments as one string a POSIX shell splits back into them
# (single quotes only where needed, so printed commands stay readable).
quote() {
  local arg out=() sq="'"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//$sq/$sq\\$sq$sq}'")
    fi
  done
  printf '%s' "${out[*]}"
}

# run CMD ARG...: runs the command, or prints it (quoted) on a dry run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(quote "$@")"
  else
    "$@"
  fi
}
