"""Read back what an offline W&B run wrote: its config and its history rows.

An offline run keeps everything in one `run-<id>.wandb` file: the W&B header,
then LevelDB-log records (32 KiB blocks; each record a 7-byte header of crc32,
length and type, fragments joined across blocks), each a protobuf `Record`.
Reading it lets tests and tools check what W&B holds without a server.
"""

import json
import struct
from pathlib import Path

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


def read_run(run_dir: str) -> dict:
    """{"config": {...}, "history": [{"_step": n, key: value, ...}, ...], "group": ..., "name": ...}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {"config": {}, "history": [], "group": None, "name": None}
    for payload in _payloads(run_file(run_dir).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {"_step": record.history.step.num}
            for item in record.history.item:
                key = item.key or ".".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "run":
            out["group"] = record.run.run_group or out["group"]
            out["name"] = record.run.display_name or out["name"]
            for item in record.run.config.update:
                key = item.key or ".".join(item.nested_key)
                out["config"][key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                key = item.key or ".".join(item.nested_key)
                out["config"][key] = json.loads(item.value_json)
    return out
