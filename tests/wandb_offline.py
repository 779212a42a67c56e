"""Minimal reader for wandb *offline* run logs (``run-<id>.wandb`` files).

wandb (0.31) writes an offline run as ``<dir>/wandb/offline-run-<ts>-<id>/run-<id>.wandb``
and no longer ships a Python reader for it (the old ``wandb.sdk.internal.datastore``
module is gone; reading/writing happens in the Go ``wandb-core`` binary,
package ``core/pkg/leveldb``).  The format is a LevelDB-style record log:

* file header, 7 bytes: ``struct.pack("<4sHB", b":W&B", 0xBEE1, 0)``
  (ident, magic, version), i.e. ``3a 57 26 42 e1 be 00``.  The header is part
  of the first block, so the first block holds only ``32768 - 7`` bytes of chunks.
* the file is split into 32 KiB (32768 byte) blocks; chunks never cross a block
  boundary.  If fewer than 7 bytes remain in a block they are zero padding.
* chunk := ``checksum:uint32 LE | length:uint16 LE | type:uint8 | payload[length]``
  with type FULL=1, FIRST=2, MIDDLE=3, LAST=4.  A record is either one FULL chunk
  or FIRST, MIDDLE*, LAST.
* checksum: standard CRC-32 (IEEE, ``zlib.crc32``) over the type byte followed by
  the payload, *not* masked CRC-32C as in upstream LevelDB.
* each reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

Only the Python standard library and wandb's shipped protobuf modules are used.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from google.protobuf.message import DecodeError
from wandb.proto.wandb_internal_pb2 import Record

__all__ = [
    "BLOCK_SIZE",
    "Record",
    "WandbLogError",
    "find_run_files",
    "iter_record_payloads",
    "read_records",
    "read_run",
]

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1  # zlib.crc32(b"Weights & Biases") & 0xFFFF
HEADER_VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")  # 7 bytes
CHUNK_HEADER = struct.Struct("<IHB")  # 7 bytes: checksum, length, type
BLOCK_SIZE = 32 * 1024

CHUNK_FULL = 1
CHUNK_FIRST = 2
CHUNK_MIDDLE = 3
CHUNK_LAST = 4
_CHUNK_NAMES = {CHUNK_FULL: "FULL", CHUNK_FIRST: "FIRST", CHUNK_MIDDLE: "MIDDLE", CHUNK_LAST: "LAST"}


class WandbLogError(ValueError):
    """Raised when a file is not a valid (or is a corrupt/truncated) wandb run log."""


def find_run_files(root: str | Path) -> list[Path]:
    """Return all ``run-*.wandb`` files under ``root`` (recursively), sorted.

    Directory symlinks (such as wandb's ``latest-run``) are not followed, so each
    run file is listed once.  If ``root`` is itself a run file it is returned alone.
    """
    root = Path(root)
    if root.is_file():
        return [root] if root.match("run-*.wandb") else []
    found: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            path = Path(dirpath, name)
            if path.match("run-*.wandb") and path.is_file():
                found.append(path)
    return sorted(found)


def _check_file_header(data: bytes, source: str) -> None:
    if len(data) < FILE_HEADER.size:
        raise WandbLogError(
            f"{source}: not a wandb run log: {len(data)} bytes, shorter than the "
            f"{FILE_HEADER.size}-byte ':W&B' header"
        )
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC:
        raise WandbLogError(
            f"{source}: not a wandb run log: bad header {data[:FILE_HEADER.size]!r} "
            f"(expected ident {HEADER_IDENT!r} and magic {HEADER_MAGIC:#06x})"
        )
    if version != HEADER_VERSION:
        raise WandbLogError(
            f"{source}: unsupported wandb log version {version} (expected {HEADER_VERSION})"
        )


def iter_record_payloads(
    data: bytes, *, source: str = "<bytes>", allow_truncated_tail: bool = False
) -> Iterator[bytes]:
    """Yield the raw (serialized protobuf) payload of each record in a wandb log.

    ``data`` is the complete file contents.  Raises :class:`WandbLogError` on a bad
    header, a checksum mismatch, an invalid chunk sequence or a truncated file.
    With ``allow_truncated_tail=True`` a partially written final record (e.g. from
    a run that is still being written or crashed) is silently dropped instead.
    """
    _check_file_header(data, source)
    size = len(data)
    pos = FILE_HEADER.size
    pending: list[bytes] | None = None  # chunks of a FIRST..LAST record in progress
    pending_start = 0

    def truncated(msg: str) -> WandbLogError | None:
        if allow_truncated_tail:
            return None
        return WandbLogError(f"{source}: truncated wandb log: {msg}")

    while True:
        block_end = (pos // BLOCK_SIZE + 1) * BLOCK_SIZE
        if pos >= size:
            if pending is not None:
                err = truncated(f"record starting at offset {pending_start} has no LAST chunk")
                if err:
                    raise err
            return
        if block_end - pos < CHUNK_HEADER.size:
            # Block trailer: too small for a chunk header, must be zero padding.
            trailer = data[pos:min(block_end, size)]
            if trailer.strip(b"\x00"):
                raise WandbLogError(f"{source}: non-zero block trailer at offset {pos}")
            pos = block_end
            continue
        if pos + CHUNK_HEADER.size > size:
            err = truncated(f"partial chunk header at offset {pos}")
            if err:
                raise err
            return
        checksum, length, ctype = CHUNK_HEADER.unpack_from(data, pos)
        if checksum == 0 and length == 0 and ctype == 0:
            if pending is not None:
                raise WandbLogError(
                    f"{source}: zeroed chunk at offset {pos} inside a multi-chunk record"
                )
            # Same as wandb-core's reader: a zeroed header means the rest of
            # the block is unused (pre-allocated); skip to the next block.
            if data[pos:min(block_end, size)].strip(b"\x00"):
                raise WandbLogError(f"{source}: invalid zero chunk header at offset {pos}")
            pos = block_end
            continue
        if ctype not in _CHUNK_NAMES:
            raise WandbLogError(f"{source}: invalid chunk type {ctype} at offset {pos}")
        end = pos + CHUNK_HEADER.size + length
        if end > block_end:
            raise WandbLogError(
                f"{source}: chunk at offset {pos} (length {length}) crosses the "
                f"{BLOCK_SIZE}-byte block boundary at {block_end}"
            )
        if end > size:
            err = truncated(f"chunk at offset {pos} needs {end - size} more bytes")
            if err:
                raise err
            return
        # CRC-32 over the type byte followed by the payload (contiguous in data).
        computed = zlib.crc32(data[pos + 6:end]) & 0xFFFFFFFF
        if computed != checksum:
            raise WandbLogError(
                f"{source}: checksum mismatch for chunk at offset {pos}: stored "
                f"{checksum:#010x}, computed {computed:#010x} (file corrupt?)"
            )
        payload = data[pos + CHUNK_HEADER.size:end]
        if ctype == CHUNK_FULL or ctype == CHUNK_FIRST:
            if pending is not None:
                raise WandbLogError(
                    f"{source}: {_CHUNK_NAMES[ctype]} chunk at offset {pos} while the "
                    f"record started at offset {pending_start} has no LAST chunk"
                )
            if ctype == CHUNK_FULL:
                yield payload
            else:
                pending, pending_start = [payload], pos
        else:  # MIDDLE or LAST
            if pending is None:
                raise WandbLogError(
                    f"{source}: {_CHUNK_NAMES[ctype]} chunk at offset {pos} without a FIRST chunk"
                )
            pending.append(payload)
            if ctype == CHUNK_LAST:
                yield b"".join(pending)
                pending = None
        pos = end


def read_records(path: str | Path, *, allow_truncated_tail: bool = False) -> list[Record]:
    """Read and parse every protobuf ``Record`` in a ``run-*.wandb`` file, in order.

    Raises :class:`WandbLogError` if the file is not a valid wandb log.
    """
    path = Path(path)
    data = path.read_bytes()
    records: list[Record] = []
    for index, payload in enumerate(
        iter_record_payloads(data, source=str(path), allow_truncated_tail=allow_truncated_tail)
    ):
        record = Record()
        try:
            record.ParseFromString(payload)
        except DecodeError as exc:
            raise WandbLogError(
                f"{path}: record #{index} ({len(payload)} bytes) is not a valid "
                f"wandb Record protobuf: {exc}"
            ) from exc
        records.append(record)
    return records


def _item_path(item: Any) -> list[str]:
    """Key path of a wandb ConfigItem/SummaryItem/HistoryItem (``nested_key`` or ``key``)."""
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _decode(item: Any, source: str) -> Any:
    try:
        return json.loads(item.value_json)
    except json.JSONDecodeError as exc:
        raise WandbLogError(
            f"{source}: invalid value_json for key {_item_path(item)}: {item.value_json!r}"
        ) from exc


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def _remove_path(target: dict[str, Any], path: list[str]) -> None:
    for key in path[:-1]:
        target = target.get(key)
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)


def _apply(target: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any], source: str) -> None:
    for item in updates:
        _set_path(target, _item_path(item), _decode(item, source))
    for item in removes:
        _remove_path(target, _item_path(item))


def read_run(path: str | Path) -> dict[str, Any]:
    """Read a ``run-*.wandb`` file into plain Python data.

    Returns ``{"config": ..., "history": [...], "summary": ..., "run": ...}`` where

    * ``config``: the run config (initial config plus later ``config`` updates),
      values JSON-decoded (nested dicts stay nested), wandb's ``_wandb`` key dropped;
    * ``history``: one dict per history record (i.e. per committed ``run.log`` step),
      values JSON-decoded, including wandb's ``_step``, ``_runtime`` and
      ``_timestamp``; metrics logged as nested dicts come back as nested dicts;
    * ``summary``: the final summary after applying all summary updates/removals,
      ``_wandb`` dropped;
    * ``run``: ``{"project", "run_id", "display_name", "tags"}`` from the run record(s).

    Raises :class:`WandbLogError` if the file is not a valid wandb log.
    """
    source = str(path)
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    run: dict[str, Any] | None = None

    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            rr = record.run
            if run is None:
                run = {
                    "project": rr.project,
                    "run_id": rr.run_id,
                    "display_name": rr.display_name,
                    "tags": list(rr.tags),
                }
            else:  # later run updates only carry the fields they change
                for key, value in (
                    ("project", rr.project),
                    ("run_id", rr.run_id),
                    ("display_name", rr.display_name),
                ):
                    if value:
                        run[key] = value
                if len(rr.tags):
                    run["tags"] = list(rr.tags)
            if rr.HasField("config"):
                _apply(config, rr.config.update, rr.config.remove, source)
            if rr.HasField("summary"):
                _apply(summary, rr.summary.update, rr.summary.remove, source)
        elif kind == "config":
            _apply(config, record.config.update, record.config.remove, source)
        elif kind == "summary":
            _apply(summary, record.summary.update, record.summary.remove, source)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_path(row, _item_path(item), _decode(item, source))
            if "_step" not in row and record.history.HasField("step"):
                row["_step"] = record.history.step.num
            history.append(row)

    if run is None:
        raise WandbLogError(f"{source}: wandb log contains no run record")
    config.pop("_wandb", None)
    summary.pop("_wandb", None)
    return {"config": config, "history": history, "summary": summary, "run": run}
