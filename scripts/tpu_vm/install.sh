#!/usr/bin/env bash
# Installs jaxrast from this checkout (or JAXRAST_SPEC, any pip requirement) plus jax[tpu]
# into a virtual environment on every worker, then checks that each one sees the whole slice.
#   SLICE=v5e-16 TPU_NAME=my-tpu scripts/tpu_vm/install.sh [--dry-run]
# shellcheck source=scripts/tpu_vm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

: "${JAX_VERSION:=0.10.2}"      # must match the jax pin in pyproject.toml
: "${JAXRAST_SPEC:=}"           # e.g. "jaxrast @ git+https://..."; empty: copy this checkout
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
archive="${TMPDIR:-/tmp}/jaxrast-src.tar.gz"

setup="python3 -m venv $R_VENV && $R_VENV/bin/pip install -q -U pip"
if [[ -z "$JAXRAST_SPEC" ]]; then
  # The committed tree only: local edits and large untracked files stay behind.
  run git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
  tpu_scp "$archive" jaxrast-src.tar.gz
  package="mkdir -p $R_REPO && tar -xzf \$HOME/jaxrast-src.tar.gz -C $R_REPO && $R_VENV/bin/pip install -q -e $R_REPO"
else
  package="$R_VENV/bin/pip install -q $(quote "$JAXRAST_SPEC")"
fi
tpu="$R_VENV/bin/pip install -q $(quote "jax[tpu]==$JAX_VERSION")"
check="$R_VENV/bin/python -c $(quote 'import jax; print(f"worker {jax.process_index()}: {jax.local_device_count()} local of {jax.device_count()} devices")')"
tpu_ssh all "set -e; $setup; $package; $tpu; $check"
