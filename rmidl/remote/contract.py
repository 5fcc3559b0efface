"""The remote contract of a ConvolutionWorker (the RMI interface), as a typing.Protocol.

Every value crosses Pyro5 with the msgpack serializer, so only dicts, lists, str, int, float, bool,
None and bytes travel. Arrays travel only as `rmidl.remote.wire` dicts (raw bytes + shape + dtype); nothing
else packs or unpacks them. Every method may raise the `rmidl.errors` classes named in its docstring,
which arrive at the caller as the same classes (see `rmidl.errors.register_with_pyro`).

A task asks for a *valid* correlation: the coordinator pads the image for the job's mode once and
flips kernels for true convolution, so workers know one operation. A task covers output rows
[r0, r1) and kernels [k0, k1) of the job; its input is the band of rows [r0, r1 + kh - 1).

Task dict (keys):
    task_id:  int, unique within a job (tasks are idempotent: running one twice writes the same values)
    bank_id:  str, a bank given earlier to `put_bank`
    kernels:  [k0, k1]
    rows:     [r0, r1], output rows (for bookkeeping and for the shared-memory slices)
    input:    either {"array": <wire dict of the input band (r1 - r0 + kh - 1, W, C)>}
              or {"shm": <shm dict of the whole padded image (H, W, C)>} - the worker slices the band
    output:   "inline" - return the result (k1 - k0, r1 - r0, OW) as a wire dict in the reply
              "bulk"   - keep it under a one-time ticket and fetch it over the bulk side channel
              {"shm": <shm dict of the whole output (K, OH, OW)>} - write out[k0:k1, r0:r1] in place
    engine:   optional, "auto" (default) or an engine of rmidl.kernels.ENGINES: the engine to run

shm dict: {"name": str, "shape": [..], "dtype": "float32" | "float64"} naming a
multiprocessing.shared_memory block the coordinator created on the worker's host.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["ConvolutionWorkerAPI", "TaskDict", "WireArray"]

WireArray = dict[str, Any]
TaskDict = dict[str, Any]


@runtime_checkable
class ConvolutionWorkerAPI(Protocol):
    """What a worker daemon serves (Pyro5 instance_mode "single"; every method is thread-safe)."""

    def ping(self) -> str:
        """Return "pong"; the cheapest liveness check."""
        ...

    def info(self) -> dict[str, Any]:
        """Describe the worker: name, host, hostname, host_id (same value = shared memory works), pid,
        cores, threads, version, gflops (measured engine rate), tasks_done, busy (tasks running), engines
        (tasks run per engine), banks
        (ids cached), bulk_port (side channel for "bulk" results, or None), max_message_size,
        memory_budget (bytes), shm_blocks (shared-memory blocks attached)."""
        ...

    def put_bank(self, bank_id: str, bank: WireArray) -> None:
        """Cache a (K, kh, kw, C) kernel bank under `bank_id` (LRU, bounded by count and bytes).
        Raises ShapeError, DTypeError, NonFiniteInput, BudgetExceeded."""
        ...

    def drop_bank(self, bank_id: str) -> bool:
        """Forget a bank; True if it was cached."""
        ...

    def correlate(self, task: TaskDict) -> dict[str, Any]:
        """Run one task (see the module docstring). Returns {"task_id", "seconds"} plus, for
        "inline", "result": wire dict; for "bulk", "ticket": str, "nbytes": int, "shape", "dtype".
        Raises BankError (unknown bank_id: put it again), ShapeError, DTypeError, KernelTooLarge,
        BudgetExceeded (the task alone is over a budget or, inline, over max_message_size); and, to be run
        again or elsewhere, ClusterError (memory held by other tasks' outputs) and WorkerLost (the worker
        shut down under the call)."""
        ...

    def release_shm(self, names: list[str]) -> int:
        """Unmap the shared-memory blocks with these names (the coordinator calls it when it closes its
        blocks: an unlinked block's memory is freed only once every process has unmapped it); returns
        how many were mapped. Unknown names are ignored. Raises ShapeError if `names` is not a list of
        str. Workers also bound their mapped blocks by count and by bytes (memory_budget)."""
        ...
