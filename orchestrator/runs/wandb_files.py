"""Read back what offline W&B runs wrote: each attempt's config, summary and history, and a run's whole history.

An offline run keeps everything in one `run-<id>.wandb` file: the W&B header,
then LevelDB-log records (32 KiB blocks; each record a 7-byte header of crc32,
length and type, fragments joined across blocks), each a protobuf `Record`.
Reading it lets tests and tools check what W&B holds without a server.

A training run that was resumed (or rolled back after a loss spike) is one W&B run written by several
attempts, each its own offline folder under the same id (orchestrator/runs/dashboard.py). `read_history`
joins them as `wandb sync` followed by the run's rewinds gives them: each attempt's rows replace the
earlier attempts' rows from its first step on.
"""

import json
import struct
from pathlib import Path
from typing import Optional

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:  # zero-filled preallocation: the end of what was written
            return


def run_file(run_dir: str) -> Path:
    """The .wandb file of a run folder (wandb/offline-run-...)."""
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb in {run_dir}")
    return files[0]


def _put(target: dict, item) -> None:
    """An item of a record into a dict: {key: value}, or a media value (an image, a table) that W&B wrote one
    field at a time under nested keys, put back together as {key: {field: value}}."""
    value = json.loads(item.value_json)
    if item.key or len(item.nested_key) < 2:
        target[item.key or item.nested_key[0]] = value
        return
    for part in item.nested_key[:-1]:
        target = target.setdefault(part, {})
    target[item.nested_key[-1]] = value


def read_run(run_dir: str) -> dict:
    """{"config": {...}, "history": [{"_step": n, key: value, ...}, ...], "summary": {...}, "group": ...,
    "name": ..., "id": ..., "resume_from": step or None, "metrics": {key or glob: the key it is plotted against}}. A file cut short (its process killed) is read up to
    its last whole record."""
    from google.protobuf.message import DecodeError  # imported here: W&B's protobufs load only for a reader
    from wandb.proto import wandb_internal_pb2 as pb  # (likewise)

    out = {"config": {}, "history": [], "summary": {}, "group": None, "name": None, "id": None, "resume_from": None,
           "metrics": {}}
    for payload in _payloads(run_file(run_dir).read_bytes()):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError:  # the last record, half written
            break
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {"_step": record.history.step.num}
            for item in record.history.item:
                _put(row, item)
            out["history"].append(row)
        elif kind == "run":
            out["group"] = record.run.run_group or out["group"]
            out["name"] = record.run.display_name or out["name"]
            out["id"] = record.run.run_id or out["id"]
            if record.run.branch_point.run:
                out["resume_from"] = record.run.branch_point.value
            for item in record.run.config.update:
                _put(out["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _put(out["config"], item)
        elif kind == "summary":
            for item in record.summary.update:
                _put(out["summary"], item)
        elif kind == "metric":  # define_metric: a key (or glob) and the key it is plotted against
            out["metrics"][record.metric.name or record.metric.glob_name] = record.metric.step_metric or None
    return out


def finished(run_dir: str) -> bool:
    """Whether W&B wrote a run folder's exit record: its last one, after every row."""
    from google.protobuf.message import DecodeError  # imported here: W&B's protobufs load only for a reader
    from wandb.proto import wandb_internal_pb2 as pb  # (likewise)

    last = None
    try:
        for last in _payloads(run_file(run_dir).read_bytes()):
            pass
    except (FileNotFoundError, ValueError):
        return False
    record = pb.Record()
    try:
        record.ParseFromString(last or b"")
    except DecodeError:  # the last record, half written: not finished yet
        return False
    return record.WhichOneof("record_type") == "exit"


def attempts(wandb_dir: str, run_id: Optional[str] = None) -> list[dict]:
    """Every offline attempt under a run's wandb/ folder (of one W&B run id, if given), read, in the order they
    ran (the trident_attempt number each wrote in its config; the folder's time stamp for other runs)."""
    runs = []
    for folder in sorted(Path(wandb_dir).glob("offline-run-*")):
        try:
            run = read_run(str(folder))
        except (FileNotFoundError, ValueError):  # an attempt killed before W&B wrote its file
            continue
        # No id: killed before W&B wrote its run record, nothing of it reached W&B.
        if run["id"] is not None and run_id in (None, run["id"]):
            runs.append({**run, "folder": str(folder)})
    return sorted(runs, key=lambda r: (r["config"].get("trident_attempt", {}).get("number", 0), r["folder"]))


def read_history(wandb_dir: str, run_id: Optional[str] = None) -> list[dict]:
    """The run's history as its dashboard shows it: the attempts in order, each attempt's rows replacing the
    earlier attempts' rows from its first step on (trident_attempt.first_step). Each row says which attempt
    wrote it (`_attempt`)."""
    return join_attempts(attempts(wandb_dir, run_id))


def join_attempts(runs: list[dict]) -> list[dict]:
    """`attempts`' runs joined into one history (see read_history)."""
    rows: list[dict] = []
    for run in runs:
        attempt = run["config"].get("trident_attempt", {})
        first = attempt.get("first_step", 0)
        rows = [r for r in rows if r["_step"] < first] + [{**r, "_attempt": attempt.get("number")}
                                                          for r in run["history"]]
    return rows
