"""What a W&B offline run file (<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb) holds: the
history rows that reached the disk (engine/reporting/wandb_log.py asks, on resume, which rows a killed run
persisted; the tests read runs back).

wandb 0.31 has no Python reader of its own any more (the file is written by its Go service), so
this reads the framing the format has kept since 2020 (a LevelDB-style log: a 7-byte file header
':W&B' + magic 0xBEE1 + version 0, then 32 KiB blocks of records, each with a 7-byte header: crc32,
length, type FULL/FIRST/MIDDLE/LAST) and parses each record with wandb's own protobuf classes.
A file that ends inside a record (its writer was killed) yields the records before it.
"""
import glob
import json
import os
import struct

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < HEADER:
        return
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path} is not a W&B run file of the known format (header {data[:HEADER]!r})")
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        space = BLOCK - pos % BLOCK
        if space < HEADER:  # the rest of a block too small for a record header is padding
            pos += space
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        if len(chunk) < length:
            break  # cut off by a kill
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            yield parts + chunk
        else:
            break  # zero padding at the end of a file written so far


def read_run(path: str) -> dict:
    """{'run_id', 'project', 'tags', 'config': {key: value}, 'history': [{key: value}, ...]}."""
    from wandb.proto import wandb_internal_pb2 as pb
    run = {"history": [], "config": {}}
    for raw in raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(run_id=record.run.run_id, project=record.run.project, tags=list(record.run.tags))
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in record.history.item})
    return run


def offline_run_files(wandb_dir: str, run_id: str):
    """The offline run files of run `run_id` under <dir>/wandb, oldest first (one per process)."""
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb")))
