"""The features task and its reply: a batch of images (or of a stage's maps) through stages of a network.

A features task names a "network" blob put earlier and runs its stages [s0, s1) on one batch:
    task_id: int (idempotent: running it twice gives the same rows)
    network_id: str, the id of a "network" blob (`Blob.network`)
    stages:  [s0, s1], 0 <= s0 < s1 <= the network's stage count; s1 = the count means "then flatten"
    ids:     [int, ...] the batch's dataset ids (at most MAX_BATCH, distinct), in order; none only for an
             array of 0 images (the coordinator found every image of the batch bad)
    input:   {"array": <wire dict>}: images (n, H, W[, C]) float32 when s0 = 0, else maps (n, C, H, W)
             float32 as stage s0 - 1 made them; or {"dataset": <rmidl.datasets Dataset.to_dict() of the
             batch's view>} (s0 = 0 only): the worker reads the files itself (same host or shared files)
    output:  "inline" (the result in the reply) | "bulk" (kept for one fetch over the bulk channel)
Its reply (`FeaturesReply`): task_id, seconds, ids (those computed, in order: a dataset read with skip_bad
leaves bad images out), bad ([[id, reason], ...] for those), timings ({stage: seconds}: LOAD when the worker
read the files, CNP<i>, CNP<i>.conv/.act/.pool, FLAT), and the result as a correlate reply carries it:
features (len(ids), F) float32 when s1 is the stage count, else the maps stage s1 - 1 made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from rmidl.errors import ShapeError
from rmidl.remote.records import (
    OUTPUTS,
    RESULT_KEYS,
    Result,
    WireRecord,
    check_blob_id,
    check_fields,
    check_int,
    check_number,
    check_pair,
    result_from_wire,
    result_to_wire,
)
from rmidl.remote.wire import pack, unpack

__all__ = ["MAX_BATCH", "FeaturesReply", "FeaturesTask"]

MAX_BATCH = 1 << 16
"""Most images one features task may carry (a batch is sized for memory long before this)."""
MAX_REASON = 500
"""Characters of a bad image's reason kept in a reply."""


def _ids(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_BATCH:
        raise ShapeError(f"{what} must be a list of at most {MAX_BATCH} image ids")
    ids = tuple(check_int(v, what) for v in value)
    if min(ids, default=0) < 0 or len(set(ids)) != len(ids):
        raise ShapeError(f"{what} must be distinct non-negative image ids")
    return ids


@dataclass(frozen=True)
class FeaturesReply:
    """The reply of `features` (see the module docstring)."""

    task_id: int
    seconds: float
    ids: tuple[int, ...]
    timings: Mapping[str, float] = field(default_factory=dict)
    bad: tuple[tuple[int, str], ...] = ()
    result: Result = None

    def to_wire(self) -> WireRecord:
        return {"task_id": self.task_id, "seconds": self.seconds, "ids": list(self.ids),
                "timings": dict(self.timings), "bad": [[i, why[:MAX_REASON]] for i, why in self.bad],
                **result_to_wire(self.result)}

    @classmethod
    def from_wire(cls, data: object, *, max_bytes: int) -> FeaturesReply:
        required = {"task_id", "seconds", "ids", "timings", "bad"}
        record = check_fields(data, "features reply", required, RESULT_KEYS)
        ids = _ids(record["ids"], "features reply ids")
        timings = record["timings"]
        if not isinstance(timings, dict) or not all(isinstance(k, str) for k in timings):
            raise ShapeError("features reply timings must map stage names to seconds")
        bad_record = record["bad"]
        if not isinstance(bad_record, list) or not all(
                isinstance(b, (list, tuple)) and len(b) == 2 and isinstance(b[1], str) for b in bad_record):
            raise ShapeError("features reply bad must be a list of [image id, reason]")
        bad = tuple((check_int(i, "features reply bad id"), str(why)[:MAX_REASON]) for i, why in bad_record)
        seconds = check_number(record["seconds"], "features reply seconds", non_negative=True)
        spent = {k: check_number(v, f"features reply timing {k!r}", non_negative=True)
                 for k, v in timings.items()}
        return cls(check_int(record["task_id"], "task_id"), seconds, ids, spent, bad,
                   result_from_wire(record, "features reply", max_bytes))


@dataclass(frozen=True)
class FeaturesTask:
    """One batch through stages [s0, s1) of a network blob (see the module docstring)."""

    METHOD: ClassVar[str] = "features"
    task_id: int
    network_id: str
    stages: tuple[int, int]
    ids: tuple[int, ...]
    source: np.ndarray | dict[str, Any]
    """Images or maps, or a dataset description the worker reads the batch from."""
    output: str = "inline"

    def to_wire(self) -> WireRecord:
        source = {"array": pack(self.source)} if isinstance(self.source, np.ndarray) else {
            "dataset": self.source}
        return {"task_id": self.task_id, "network_id": self.network_id, "stages": list(self.stages),
                "ids": list(self.ids), "input": source, "output": self.output}

    @classmethod
    def from_wire(cls, data: object, *, max_bytes: int) -> FeaturesTask:
        """The task a wire dict describes; ShapeError or BankError name the bad field."""
        record = check_fields(data, "features task",
                              {"task_id", "network_id", "stages", "ids", "input", "output"})
        task_id = check_int(record["task_id"], "task_id")
        network_id = check_blob_id(record["network_id"])
        stages = check_pair(record["stages"], "stages")
        if not 0 <= stages[0] < stages[1]:
            raise ShapeError(f"task {task_id}: stages [{stages[0]}, {stages[1]}) are empty or negative")
        ids = _ids(record["ids"], f"task {task_id}: ids")
        source_record = record["input"]
        if not (isinstance(source_record, dict) and len(source_record) == 1
                and next(iter(source_record)) in ("array", "dataset")):
            raise ShapeError(f"task {task_id}: input must be {{'array': ...}} or {{'dataset': ...}}")
        source: np.ndarray | dict[str, Any]
        if "dataset" in source_record:
            if stages[0] != 0:
                raise ShapeError(f"task {task_id}: a dataset input only enters stage 0, not {stages[0]}")
            source = source_record["dataset"]
            if not isinstance(source, dict) or not ids:
                raise ShapeError(f"task {task_id}: a dataset input is a description (dict) of some images")
        else:
            source = unpack(source_record["array"], max_bytes=max_bytes)
            if source.ndim not in (3, 4) or source.shape[0] != len(ids):
                raise ShapeError(f"task {task_id}: input of shape {source.shape} does not hold the "
                                 f"{len(ids)} images or maps its ids name")
        output = record["output"]
        if output not in OUTPUTS:
            raise ShapeError(f"task {task_id}: output {output!r} is not 'inline' or 'bulk'")
        return cls(task_id, network_id, stages, ids, source, output)

    def parse_reply(self, data: object, *, max_bytes: int) -> FeaturesReply:
        reply = FeaturesReply.from_wire(data, max_bytes=max_bytes)
        if reply.task_id != self.task_id:
            raise ShapeError(f"reply to task {self.task_id} names task {reply.task_id}")
        kept = set(reply.ids) | {i for i, _ in reply.bad}
        if kept != set(self.ids) or len(reply.ids) + len(reply.bad) != len(self.ids):
            raise ShapeError(f"reply to task {self.task_id} accounts for other images than its batch")
        return reply
