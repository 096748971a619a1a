"""Reading W&B offline run files back in tests: the ``run-*.wandb`` transaction log of wandb 0.31."""
import json
import struct
import time
import zlib
from pathlib import Path


def offline_run_file(wandb_dir):
    """The one ``run-*.wandb`` file under ``<wandb_dir>/wandb/offline-run-*/``."""
    files = sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def wandb_records(path):
    """Parse a W&B transaction log: a 7-byte header, then LevelDB-log framed protobuf ``Record``s.

    Blocks of 32 KiB; each chunk has a 7-byte header (CRC32 of type byte + data, length, type:
    1 full, 2 first, 3 middle, 4 last); a block tail shorter than a header is padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind == 0:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at offset {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_wandb_records(path, timeout=60.0):
    """The records of a finished run's log, once its ``exit`` record is in.

    wandb-core writes the log from its own process, buffered, and may still be flushing it when ``run.finish()``
    returns in the training process; a test that reads the file right away waits for the writer (up to
    ``timeout`` seconds), then parses what is there.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            records = wandb_records(path)
        except AssertionError:  # a chunk still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        time.sleep(0.1)
    return wandb_records(path)


def item_key(item):
    return item.key or "/".join(item.nested_key)


def wandb_history(records):
    """``{step: {key: value}}`` of the history records."""
    out = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item_key(i): json.loads(i.value_json) for i in record.history.item}
            out[row["_step"]] = row
    return out


def wandb_summary(records):
    """The final summary: later summary updates win."""
    out = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            out.update({item_key(i): json.loads(i.value_json) for i in record.summary.update})
    return out
