"""The gradient task and its reply: one step's shards of data-parallel training (rmidl.dataparallel).

A gradient task asks a worker for `rmidl.dataparallel.compute_shard` of some shards of one step, at the
weights of a "weights" blob and with the data of "shard" blobs put earlier (rmidl.remote.blobs). Every
part is a pure function of (weights, shard data, plan, spec, step, shard), so a task may run anywhere,
twice, or after its worker died: the same bits come back. The records sit beside contract.py's
correlate records and follow the same rules (one to_wire / from_wire pair, every field checked).

Wire form of a gradient task (`GradientTask`), every key required, no other key allowed:
    task_id: int
    step:    [epoch, index, number]  (rmidl.dataparallel.Step)
    shards:  [[shard id, blob id], ...] ascending shard ids, each the id of a "shard" blob
    weights: blob id of the "weights" blob of this step
    spec:    {"sizes", "activation", "output"} (rmidl.mlp.MLPSpec.to_dict)
    plan:    {"seed", "samples", "shards", "steps"} (rmidl.dataparallel.ShardPlan.to_dict)
    output:  "inline" | "bulk" | {"shm": <ShmRef of a (plan shards, parameters) float64 block>}
Its reply (`GradientReply`): task_id, seconds (computing, in the worker), shards (the ids, in order),
loss_sums, counts and correct (one per shard), and the float64 gradient sums as one (shards, parameters)
array: "result" (a wire dict) for "inline", or "ticket", "nbytes", "shape", "dtype" for "bulk"; for
shared memory nothing more (row s of the block holds shard s's gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rmidl.dataparallel import ShardPlan, Step
from rmidl.errors import OptionError, ShapeError
from rmidl.mlp import MLPSpec
from rmidl.remote.records import (
    OUTPUTS,
    RESULT_KEYS,
    BulkTicket,
    Result,
    ShmRef,
    WireRecord,
    check_blob_id,
    check_fields,
    check_int,
    check_number,
    result_from_wire,
    result_to_wire,
)

__all__ = ["REPLY_FRAMING", "GradientReply", "GradientTask"]

REPLY_FRAMING = 4096
"""Bytes a gradient reply adds to its gradients (per-shard figures, keys, Pyro5's header): an inline
reply of n gradient bytes needs n + REPLY_FRAMING <= max_message_size at both ends."""


def _list(value: object, what: str, length: int | None = None) -> list:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        size = "a list" if length is None else f"a list of {length}"
        raise ShapeError(f"{what} must be {size}, got {value!r}")
    return list(value)


@dataclass(frozen=True)
class GradientReply:
    """The reply of `gradient` (see the module docstring): per-shard sums; gradients as one array."""

    task_id: int
    seconds: float
    shards: tuple[int, ...]
    loss_sums: tuple[float, ...]
    counts: tuple[int, ...]
    correct: tuple[int, ...]
    result: Result = None
    """(len(shards), parameters) float64: row i is the gradient sum of shards[i]."""

    def to_wire(self) -> WireRecord:
        return {"task_id": self.task_id, "seconds": self.seconds, "shards": list(self.shards),
                "loss_sums": list(self.loss_sums), "counts": list(self.counts), "correct": list(self.correct),
                **result_to_wire(self.result)}

    @classmethod
    def from_wire(cls, data: object, *, max_bytes: int) -> GradientReply:
        what = "gradient reply"
        record = check_fields(data, what, {"task_id", "seconds", "shards", "loss_sums", "counts", "correct"},
                         RESULT_KEYS)
        shards = tuple(check_int(s, f"{what} shard") for s in _list(record["shards"], f"{what} shards"))
        k = len(shards)
        losses = tuple(check_number(v, f"{what} loss")
                       for v in _list(record["loss_sums"], f"{what} loss_sums", k))
        counts = tuple(check_int(v, f"{what} count") for v in _list(record["counts"], f"{what} counts", k))
        correct = tuple(check_int(v, f"{what} correct")
                        for v in _list(record["correct"], f"{what} correct", k))
        seconds = check_number(record["seconds"], f"{what} seconds")
        return cls(check_int(record["task_id"], "task_id"), seconds, shards, losses, counts, correct,
                   result_from_wire(record, what, max_bytes))


@dataclass(frozen=True)
class GradientTask:
    """Some shards of one training step (see the module docstring)."""

    METHOD: ClassVar[str] = "gradient"
    task_id: int
    step: Step
    shards: tuple[tuple[int, str], ...]
    """(shard id, "shard" blob id) pairs, ascending shard ids."""
    weights_id: str
    spec: MLPSpec
    plan: ShardPlan
    output: str | ShmRef = "inline"
    """"inline", "bulk", or a shared (plan.shards, parameters) float64 block written at rows `shard_ids`."""

    def __post_init__(self) -> None:
        ids = [shard for shard, _ in self.shards]
        if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.plan.shards:
            raise ShapeError(f"gradient task {self.task_id}: shards {ids} must be ascending ids of the "
                             f"plan's {self.plan.shards} shards")
        step = self.step
        if step.epoch < 0 or not 0 <= step.index < self.plan.steps or step.number < 0:
            raise ShapeError(f"gradient task {self.task_id}: step {step} is outside the plan's "
                             f"{self.plan.steps} steps per epoch")
        block = (self.plan.shards, self.spec.parameter_count)
        if isinstance(self.output, ShmRef):
            if (self.output.shape, self.output.dtype) != (block, "float64"):
                raise ShapeError(f"gradient task {self.task_id}: shared output {self.output.shape} "
                                 f"{self.output.dtype} is not {block} float64")
        elif self.output not in OUTPUTS:
            raise ShapeError(f"gradient task {self.task_id}: output {self.output!r} is not inline, bulk "
                             "or shm")

    @property
    def shard_ids(self) -> tuple[int, ...]:
        return tuple(shard for shard, _ in self.shards)

    @property
    def result_shape(self) -> tuple[int, int]:
        return len(self.shards), self.spec.parameter_count

    def to_wire(self) -> WireRecord:
        step = self.step
        return {"task_id": self.task_id, "step": [step.epoch, step.index, step.number],
                "shards": [[shard, blob_id] for shard, blob_id in self.shards], "weights": self.weights_id,
                "spec": self.spec.to_dict(), "plan": self.plan.to_dict(),
                "output": {"shm": self.output.to_wire()} if isinstance(self.output, ShmRef) else self.output}

    @classmethod
    def from_wire(cls, data: object) -> GradientTask:
        """The task a wire dict describes; ShapeError, BankError, OptionError name the bad field."""
        record = check_fields(data, "gradient task", {"task_id", "step", "shards", "weights", "spec", "plan",
                                                 "output"})
        task_id = check_int(record["task_id"], "task_id")
        what = f"gradient task {task_id}"
        epoch, index, number = (check_int(v, f"{what} step")
                                for v in _list(record["step"], f"{what} step", 3))
        shards = []
        for pair in _list(record["shards"], f"{what} shards"):
            shard, blob_id = _list(pair, f"{what} shard entry", 2)
            shards.append((check_int(shard, f"{what} shard id"), check_blob_id(blob_id)))
        spec, plan = record["spec"], record["plan"]
        if not isinstance(spec, dict) or not isinstance(spec.get("sizes"), list):
            raise OptionError(f"{what}: spec {spec!r} is not a dict with a list of sizes")
        if not isinstance(plan, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                 for v in plan.values()):
            raise OptionError(f"{what}: plan {plan!r} is not a dict of whole numbers")
        output = record["output"]
        if isinstance(output, dict) and set(output) == {"shm"}:
            output = ShmRef.from_wire(output["shm"], f"{what}: output")
        elif not isinstance(output, str):
            raise ShapeError(f"{what}: output {output!r} is not inline, bulk or shm")
        return cls(task_id, Step(epoch, index, number), tuple(shards), check_blob_id(record["weights"]),
                   MLPSpec.from_dict(spec), ShardPlan.from_dict(plan), output)

    def parse_reply(self, data: object, *, max_bytes: int) -> GradientReply:
        """The reply, checked against this task: same task and shards, a (shards, parameters) float64."""
        reply = GradientReply.from_wire(data, max_bytes=max_bytes)
        if reply.task_id != self.task_id or reply.shards != self.shard_ids:
            raise ShapeError(f"reply to gradient task {self.task_id} (shards {list(self.shard_ids)}) names "
                             f"task {reply.task_id} (shards {list(reply.shards)})")
        result = reply.result
        if isinstance(self.output, ShmRef):
            if result is not None:
                raise ShapeError(f"reply to gradient task {self.task_id} holds gradients besides the shared "
                                 "block they were to be written into")
            return reply
        shape = result.shape if isinstance(result, BulkTicket) else getattr(result, "shape", None)
        dtype = result.dtype if isinstance(result, BulkTicket) else getattr(result, "dtype", None)
        if tuple(shape or ()) != self.result_shape or str(dtype) != "float64":
            raise ShapeError(f"reply to gradient task {self.task_id} holds gradients {shape} {dtype}, "
                             f"expected {self.result_shape} float64")
        return reply

