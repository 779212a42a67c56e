"""Tests for tests/wandb_offline.py against runs written by the real wandb library.

wandb runs fully offline here: WANDB_MODE=offline, all wandb dirs inside tmp paths,
no git/code/stats/metadata/console capture, error reporting (Sentry) disabled.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest

wandb = pytest.importorskip("wandb")

try:  # tests/ is on sys.path under pytest's default "prepend" import mode
    import wandb_offline as wo
except ImportError:  # pragma: no cover - if tests/ ever becomes a package
    from tests import wandb_offline as wo


_CLEARED_ENV = (
    "WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_NAME", "WANDB_NOTES",
    "WANDB_TAGS", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE",
    "WANDB_SWEEP_ID", "WANDB_RUN_DIR", "WANDB_BASE_URL", "WANDB_CONSOLE",
)


def _offline_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Point every wandb location into ``root`` and make sure nothing goes online."""
    for name in _CLEARED_ENV:
        mp.delenv(name, raising=False)
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_ERROR_REPORTING", "false")
    mp.setenv("WANDB_DISABLE_GIT", "true")
    mp.setenv("WANDB_DISABLE_CODE", "true")
    mp.setenv("WANDB_DIR", str(root))
    for var, sub in (
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        mp.setenv(var, str(root / sub))


def _init(root: Path, **kwargs: Any):
    settings = wandb.Settings(
        console="off",
        x_disable_stats=True,
        x_disable_meta=True,
        x_disable_machine_info=True,
        x_save_requirements=False,
        disable_git=True,
        save_code=False,
    )
    return wandb.init(dir=str(root), mode="offline", settings=settings, **kwargs)


def _single_run_file(root: Path, run_id: str) -> Path:
    files = wo.find_run_files(root)
    assert len(files) == 1, files
    path = files[0]
    assert path.name == f"run-{run_id}.wandb"
    assert path.parent.name.startswith("offline-run-")
    assert path.parent.name.endswith(f"-{run_id}")
    return path


CONFIG = {
    "lr": 3e-4,
    "seed": 2**40 + 7,
    "student": {"arch": "mlp", "depth": 4, "dims": [256, 128], "act": {"name": "gelu"}},
    "teacher": "resnet18",
    "temperatures": [1.0, 4.0],
    "use_amp": False,
    "optional": None,
    "wrapped": {"value": 5},  # must not be unwrapped: it is a user dict
}
# (step, metrics) -- explicit, non-contiguous steps
LOGS = [
    (3, {"loss": 0.5, "acc": 0.1}),
    (5, {"loss": 1 / 3, "kd": {"temp": 4.0, "kl": 0.125}}),
    (9, {"loss": 0.123456789, "acc": 0.75}),
]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real offline wandb run shared by the read-only tests of this module."""
    root = tmp_path_factory.mktemp("wandb_run")
    with pytest.MonkeyPatch.context() as mp:
        _offline_env(mp, root)
        try:
            run = _init(
                root,
                project="kdforge-test",
                name="distill-small",
                tags=["kd", "offline"],
                config=CONFIG,
            )
            run.config.update({"epochs": 3})  # separate ConfigRecord after init
            for step, metrics in LOGS:
                run.log(metrics, step=step)
            run.summary["best_acc"] = 0.75
            run_id = run.id
            run.finish()
        finally:
            wandb.teardown()
    yield {"root": root, "run_id": run_id, "path": _single_run_file(root, run_id)}


def test_find_run_files(real_run: dict[str, Any], tmp_path: Path) -> None:
    root = real_run["root"]
    # the latest-run symlink must not produce a duplicate
    assert (root / "wandb" / "latest-run").is_symlink()
    assert wo.find_run_files(root) == [real_run["path"]]
    assert wo.find_run_files(str(root / "wandb")) == [real_run["path"]]
    assert wo.find_run_files(real_run["path"]) == [real_run["path"]]
    assert wo.find_run_files(tmp_path) == []


def test_read_records_raw(real_run: dict[str, Any]) -> None:
    records = wo.read_records(real_run["path"])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header"
    assert kinds.count("history") == len(LOGS)
    assert "run" in kinds and "exit" in kinds
    assert [r.num for r in records] == list(range(1, len(records) + 1))
    assert all(isinstance(r, wo.Record) for r in records)


def test_read_run_roundtrip(real_run: dict[str, Any]) -> None:
    data = wo.read_run(real_run["path"])
    assert set(data) == {"config", "history", "summary", "run"}

    assert data["run"] == {
        "project": "kdforge-test",
        "run_id": real_run["run_id"],
        "display_name": "distill-small",
        "tags": ["kd", "offline"],
    }

    assert data["config"] == {**CONFIG, "epochs": 3}
    assert "_wandb" not in data["config"]
    assert data["config"]["student"]["act"] == {"name": "gelu"}  # nested dicts stay nested

    history = data["history"]
    assert [row["_step"] for row in history] == [step for step, _ in LOGS]
    for row, (step, metrics) in zip(history, LOGS):
        user = {k: v for k, v in row.items() if not k.startswith("_")}
        assert user == metrics, (step, row)
        assert isinstance(row["_timestamp"], float)
        assert isinstance(row["_runtime"], (int, float))
    # exact float round trip (no rounding through text)
    assert history[1]["loss"] == 1 / 3
    assert history[2]["loss"] == 0.123456789

    summary = data["summary"]
    assert "_wandb" not in summary
    assert summary["best_acc"] == 0.75
    assert summary["_step"] == 9
    assert summary["loss"] == 0.123456789
    assert summary["acc"] == 0.75
    assert summary["kd"] == {"temp": 4.0, "kl": 0.125}


def test_multi_block_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run larger than several 32 KiB blocks, with records split into FIRST/MIDDLE/LAST."""
    _offline_env(monkeypatch, tmp_path)
    big = "".join(chr(ord("a") + i % 26) for i in range(100_000))  # > 3 blocks in one record
    try:
        run = _init(tmp_path, project="kdforge-big", tags=["early"], config={"blob": big})
        run.name = "renamed"  # later RunRecord updates
        run.tags = run.tags + ("late",)
        for step in range(250):
            run.log({"loss": 1.0 / (step + 1), "step_sq": step * step}, step=2 * step)
        run_id = run.id
        run.finish()
    finally:
        wandb.teardown()

    path = _single_run_file(tmp_path, run_id)
    raw = path.read_bytes()
    assert len(raw) > 4 * wo.BLOCK_SIZE
    # the record carrying the 100 kB config value is bigger than a block, so it must
    # have been split into FIRST/MIDDLE/LAST chunks by the writer
    sizes = [r.ByteSize() for r in wo.read_records(path) if r.WhichOneof("record_type") == "run"]
    assert max(sizes) > 3 * wo.BLOCK_SIZE

    data = wo.read_run(path)
    assert data["config"] == {"blob": big}
    assert data["run"] == {
        "project": "kdforge-big",
        "run_id": run_id,
        "display_name": "renamed",
        "tags": ["early", "late"],
    }
    assert [row["_step"] for row in data["history"]] == [2 * s for s in range(250)]
    assert [row["loss"] for row in data["history"]] == [1.0 / (s + 1) for s in range(250)]
    assert [row["step_sq"] for row in data["history"]] == [s * s for s in range(250)]
    assert data["summary"]["_step"] == 498


# --- block layout, independent of wandb's writer --------------------------------------


def _write_log(payloads: list[bytes]) -> bytes:
    """Minimal writer for the same format (mirrors wandb's old Python datastore)."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))

    def chunk(data: bytes, ctype: int) -> None:
        crc = zlib.crc32(bytes([ctype]) + data) & 0xFFFFFFFF
        out.extend(struct.pack("<IHB", crc, len(data), ctype) + data)

    for payload in payloads:
        left = wo.BLOCK_SIZE - len(out) % wo.BLOCK_SIZE
        if left < 7:
            out.extend(b"\x00" * left)
            left = wo.BLOCK_SIZE
        if len(payload) + 7 <= left:
            chunk(payload, 1)
            continue
        chunk(payload[: left - 7], 2)
        rest = payload[left - 7:]
        while len(rest) > wo.BLOCK_SIZE - 7:
            chunk(rest[: wo.BLOCK_SIZE - 7], 3)
            rest = rest[wo.BLOCK_SIZE - 7:]
        chunk(rest, 4)
    return bytes(out)


def test_block_layout_edge_cases() -> None:
    rng = random.Random(1234)
    payloads = [
        rng.randbytes(wo.BLOCK_SIZE - 7 - 7 - 3),  # leaves a 3-byte zero trailer
        b"",  # empty record
        rng.randbytes(wo.BLOCK_SIZE - 7 - 7),  # fills its block exactly (after the empty one)
        rng.randbytes(3 * wo.BLOCK_SIZE + 11),  # FIRST, MIDDLE, MIDDLE, LAST
        b"tail",
    ]
    data = _write_log(payloads)
    assert data[wo.BLOCK_SIZE - 3:wo.BLOCK_SIZE] == b"\x00\x00\x00"
    assert list(wo.iter_record_payloads(data)) == payloads


# --- error handling -------------------------------------------------------------------


def test_random_bytes_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "run-random.wandb"
    bad.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(wo.WandbLogError, match="not a wandb run log"):
        wo.read_records(bad)
    with pytest.raises(ValueError, match="bad header"):
        wo.read_run(bad)


def test_empty_and_short_files_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wandb"
    empty.write_bytes(b"")
    with pytest.raises(wo.WandbLogError, match="shorter than"):
        wo.read_records(empty)
    short = tmp_path / "short.wandb"
    short.write_bytes(b":W&B")
    with pytest.raises(wo.WandbLogError, match="shorter than"):
        wo.read_records(short)


def test_wrong_version_rejected(tmp_path: Path, real_run: dict[str, Any]) -> None:
    data = bytearray(real_run["path"].read_bytes())
    assert data[:7] == b":W&B\xe1\xbe\x00"
    data[6] = 1
    bad = tmp_path / "v1.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(wo.WandbLogError, match="unsupported wandb log version 1"):
        wo.read_records(bad)


def test_truncated_file_rejected(tmp_path: Path, real_run: dict[str, Any]) -> None:
    data = real_run["path"].read_bytes()
    n_records = len(wo.read_records(real_run["path"]))
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[:-5])  # cut inside the last record's payload
    with pytest.raises(wo.WandbLogError, match="truncated"):
        wo.read_records(cut)
    # a crashed / still-running log can be read up to the last complete record
    assert len(wo.read_records(cut, allow_truncated_tail=True)) == n_records - 1

    cut.write_bytes(data[:10])  # header + partial chunk header
    with pytest.raises(wo.WandbLogError, match="partial chunk header"):
        wo.read_records(cut)


def test_truncated_multi_chunk_record_rejected() -> None:
    data = _write_log([b"x" * (2 * wo.BLOCK_SIZE)])
    with pytest.raises(wo.WandbLogError, match="no LAST chunk"):
        list(wo.iter_record_payloads(data[: wo.BLOCK_SIZE]))  # ends right after FIRST


def test_corrupted_byte_rejected(tmp_path: Path, real_run: dict[str, Any]) -> None:
    data = bytearray(real_run["path"].read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "flipped.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(wo.WandbLogError, match="checksum mismatch|invalid chunk|crosses"):
        wo.read_records(bad)


def test_valid_framing_but_not_protobuf_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.wandb"
    bad.write_bytes(_write_log([b"\xff\xff\xff\xff\xff"]))
    with pytest.raises(wo.WandbLogError, match="not a valid wandb Record protobuf"):
        wo.read_records(bad)
