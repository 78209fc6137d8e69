"""Multi-process (multi-host) runs: starting `jax.distributed` and moving arrays between
host numpy and global arrays.

Every process runs the same command. After `maybe_initialize`, `jax.devices()` lists the
devices of *all* processes, so `jaxrast.runtime.mesh.make_mesh` builds one global mesh; each
process then feeds only the shards its own devices hold (`put_global`), reads results
back with a collective gather (`host_array`), and only process 0 writes files (`is_main`).
All helpers are plain pass-throughs in a single process.

Where the settings come from (first match wins, per value):

1. the flags `--coordinator HOST:PORT`, `--num-processes N`, `--process-id I`;
2. the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`.

Whether to initialise at all:

* `JAXRAST_DISTRIBUTED=0` (or `--no-distributed`): never; one process, whatever else is set;
* any value from 1. or 2. with N > 1: yes, and all three must be known (unless `--distributed`);
* `--distributed` (or `JAXRAST_DISTRIBUTED=1`): yes; values not given are left to JAX's
  cluster detection (Cloud TPU VM metadata, SLURM, Open MPI);
* otherwise yes only when launched by `srun` or `mpirun` with more than one task (JAX then
  reads the launcher's variables); else a single process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_SWITCH = "JAXRAST_DISTRIBUTED"  # 1: like --distributed; 0: like --no-distributed
DEFAULT_TIMEOUT_S = 300.0

_FIX = ("start every process with the same --coordinator HOST:PORT (process 0's address) and "
        "--num-processes N, and its own --process-id 0..N-1 (or set JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID); on a TPU VM, under SLURM or Open MPI pass --distributed instead")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags shared by `jaxrast decode` and `jaxrast train`."""
    group = parser.add_argument_group("multi-process", "one process per host, each running the same command "
                                      "(see docs/multi-host.md)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help=f"address of process 0 (default: ${ENV_COORDINATOR})")
    group.add_argument("--num-processes", type=int, metavar="N",
                       help=f"number of processes (default: ${ENV_NUM_PROCESSES})")
    group.add_argument("--process-id", type=int, metavar="I", help=f"this process's rank (default: ${ENV_PROCESS_ID})")
    group.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                       help="--distributed: initialise jax.distributed, letting JAX detect unset values on a TPU VM, "
                            "SLURM or Open MPI; --no-distributed: run as one process whatever the environment says")
    group.add_argument("--distributed-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help=f"how long the processes wait for each other to start (default {DEFAULT_TIMEOUT_S:g}); "
                            "while waiting each says whom it waits for")


@dataclass(frozen=True)
class Settings:
    """What `jax.distributed.initialize` gets; None values are left to JAX's cluster detection."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer.") from None


def _switch(value: bool | None, environ: Mapping[str, str]) -> bool | None:
    """The flag if given, else JAXRAST_DISTRIBUTED (1/true/yes, 0/false/no), else None (auto)."""
    if value is not None:
        return value
    raw = environ.get(ENV_SWITCH, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_SWITCH}={raw!r}: use 1 (initialise jax.distributed), 0 (one process) or leave it unset.")


def _launched_with_several_tasks(environ: Mapping[str, str]) -> bool:
    """srun / mpirun started this process as one of several: JAX reads the rest itself."""
    slurm = _env_int(environ, "SLURM_STEP_NUM_TASKS") if "SLURM_PROCID" in environ else None
    ompi = _env_int(environ, "OMPI_COMM_WORLD_SIZE") if "OMPI_MCA_orte_hnp_uri" in environ else None
    return (slurm or 0) > 1 or (ompi or 0) > 1


def resolve(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings | None:
    """The settings to initialise with, or None for a single process (see the module docstring).

    Raises ValueError naming the fix for a half-configured setup.
    """
    environ = os.environ if environ is None else environ
    flag = lambda name: getattr(args, name, None) if args is not None else None  # noqa: E731
    switch = _switch(flag("distributed"), environ)
    if switch is False:
        return None
    coordinator = flag("coordinator") or environ.get(ENV_COORDINATOR, "").strip() or None
    num = flag("num_processes") if flag("num_processes") is not None else _env_int(environ, ENV_NUM_PROCESSES)
    pid = flag("process_id") if flag("process_id") is not None else _env_int(environ, ENV_PROCESS_ID)
    settings = Settings(coordinator, num, pid)
    if num is not None and num < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num}.")
    if num is not None and pid is not None and not 0 <= pid < num:
        raise ValueError(f"--process-id must be in 0..{num - 1} for {num} processes, got {pid}.")
    if switch:
        return settings
    if num == 1 and pid in (None, 0):
        return None  # explicitly one process: nothing to coordinate
    if num is None and coordinator is None and pid is None:
        return Settings() if _launched_with_several_tasks(environ) else None
    missing = [name for name, value in (("--coordinator HOST:PORT", coordinator), ("--num-processes N", num),
                                        ("--process-id I", pid)) if value is None]
    if missing:
        given = ", ".join(f"{k}={v}" for k, v in (("coordinator", coordinator), ("num_processes", num),
                                                   ("process_id", pid)) if v is not None)
        raise ValueError(f"multi-process setup is incomplete ({given}; missing {' and '.join(missing)}): {_FIX}.")
    return settings


def maybe_initialize(args: argparse.Namespace | None = None, *, timeout_s: float | None = None) -> bool:
    """Starts `jax.distributed` when `resolve` says so; returns whether this is a
    multi-process run. Call it before anything touches devices. A no-op when already
    initialised (a second command in the same process).

    While the processes wait for each other, each prints whom it waits for every few
    seconds; if they have not all started after `timeout_s` (default: the flag
    `--distributed-timeout`, else 300 s), the process stops with exit code 2 and a message
    saying so (JAX itself would abort with a stack trace)."""
    import jax

    if timeout_s is None:
        flag = getattr(args, "distributed_timeout", None)
        timeout_s = DEFAULT_TIMEOUT_S if flag is None else flag
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"--distributed-timeout must be a number of seconds > 0, got {timeout_s}.")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    settings = resolve(args)
    if settings is None:
        return False
    if not jax.config.jax_cpu_collectives_implementation:
        # CPU devices talk across processes only through a collectives library; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    waiting = _Waiting(settings, timeout_s)
    waiting.start()
    try:
        # JAX's own deadline is later than ours: the watchdog, not an abort in C++, reports a timeout
        jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id,
                                   initialization_timeout=int(math.ceil(timeout_s)) + 60)
    except ValueError as err:  # JAX's cluster detection found nothing to fill the gaps
        raise ValueError(f"jax.distributed could not start ({err}): {_FIX}.") from err
    finally:
        waiting.stop()
    return jax.process_count() > 1


class _Waiting:
    """While `jax.distributed.initialize` blocks: a line to stderr every `interval` seconds
    saying whom this process waits for; at `timeout_s`, a last line and exit code 2."""

    def __init__(self, settings: Settings, timeout_s: float, interval: float | None = None):
        self.settings, self.timeout_s = settings, timeout_s
        self.interval = interval if interval is not None else min(30.0, max(1.0, timeout_s / 10))
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="jaxrast-distributed-wait", daemon=True)

    def whom(self) -> tuple[str, str]:
        """(this process, what it waits for), e.g. ('process 0 of 2', 'process 1 to connect to 10.0.0.1:1234')."""
        s = self.settings
        where = s.coordinator or "the coordinator JAX detects"
        of = f" of {s.num_processes}" if s.num_processes else ""
        if s.process_id == 0 and s.num_processes:
            others = "process 1" if s.num_processes == 2 else f"processes 1..{s.num_processes - 1}"
            return f"process 0{of}", f"{others} to connect to {where}"
        me = f"process {s.process_id}" if s.process_id is not None else "this process"
        return f"{me}{of}", f"the coordinator (process 0) at {where} and the other processes"

    def start(self) -> None:
        self._start = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._done.set()

    def _watch(self) -> None:
        deadline = self._start + self.timeout_s
        while not self._done.wait(min(self.interval, max(0.0, deadline - time.monotonic()))):
            elapsed = time.monotonic() - self._start
            with self._lock:
                if self._done.is_set():
                    return
                me, target = self.whom()
                if elapsed >= self.timeout_s:
                    print(f"jaxrast: error: {me} gave up waiting for {target} after {self.timeout_s:g} s: not every "
                          "process started. Start all of them (each with the same --coordinator and "
                          "--num-processes, its own --process-id) or wait longer with --distributed-timeout SECONDS.",
                          file=sys.stderr, flush=True)
                    os._exit(2)  # the main thread is blocked inside the runtime; nothing was written yet
                print(f"jaxrast: {me} waiting for {target} ({elapsed:.0f} s of {self.timeout_s:g} s; "
                      "--distributed-timeout)", file=sys.stderr, flush=True)


def process_count() -> int:
    import jax
    return jax.process_count()


def is_main() -> bool:
    """Process 0: the one that writes files and prints summaries."""
    import jax
    return jax.process_index() == 0


def host_array(tree: Any) -> Any:
    """A pytree of (possibly multi-process) arrays as numpy on *every* process.

    Arrays spread over several processes are gathered with a collective, so every process
    must call this with the same arrays in the same order. Leaves that are already local
    (numpy, fully addressable arrays) are just copied to the host.
    """
    import jax
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:  # every process already holds it all (scalars, metrics)
                return np.asarray(x.addressable_data(0))
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)  # its host copy, started below

    # start every local copy before waiting on any: one by one, the engine's 12-array decode
    # output took ~1.6x as long to reach the host
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            x.copy_to_host_async()
    return jax.tree.map(one, tree)


def put_global(x: np.ndarray, sharding) -> Any:
    """A host array (the same on every process) as one global array on `sharding`; each
    process copies only the slices its own devices hold."""
    import jax

    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (e.g. a signal that reached only one)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.array(bool(flag)))))


def on_every_process(fn: Callable[[], Any], what: str) -> Any:
    """`fn()` on every process; if it fails on any, it fails on all. A user error seen by
    one process (a path that exists only on another host, a bad file) must stop the others
    too, instead of leaving them waiting in the next collective until the runtime's timeout."""
    try:
        result, error = fn(), None
    except Exception as err:  # noqa: BLE001 - re-raised below, after the others heard of it
        result, error = None, err
    if any_process(error is not None):
        if error is not None:
            raise error
        raise ValueError(f"{what} failed on another process (its error is in its own output); stopping here too.")
    return result


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-able `value`, on every process (other processes' `value` is ignored)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return value
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
    # the payload's shape must be the same everywhere: its length goes first
    size = int(multihost_utils.broadcast_one_to_all(np.array(data.size, np.int32)))
    if not is_main():
        data = np.zeros(size, np.uint8)
    data = multihost_utils.broadcast_one_to_all(data)
    return json.loads(np.asarray(data, np.uint8).tobytes().decode())
