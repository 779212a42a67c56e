"""Smoke run of the benchmark harness (benchmarks/bench.py) on digits, so it cannot rot.

One warm-up round and one timed round of one epoch each, one thread. torchdistill runs
only where it is installed (the `bench` extra); the PNG only where matplotlib is.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for name in ("bench", "bench_ways", "bench_workloads", "bench_report"):
        sys.modules.pop(name, None)
    import bench as module

    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the harness sets it for the whole process


def test_bench_smoke_on_digits(bench, tmp_path):
    from bench_ways import cache_support
    from bench_workloads import digits_workload

    ways = ["hand-written", "kdforge-online"]
    if cache_support(digits_workload(tmp_path / "teacher", 1), tmp_path / "cache") is None:
        ways.append("kdforge-cached")
    if importlib.util.find_spec("torchdistill") is not None:
        ways.append("torchdistill")
    plots = importlib.util.find_spec("matplotlib") is not None
    results = bench.main(["--workloads", "digits", "--ways", *ways, "--rounds", "1", "--digits-epochs", "1",
                          "--digits-teacher-epochs", "1", "--threads", "1", "--out", str(tmp_path),
                          *([] if plots else ["--no-plot"])])

    entry = results["workloads"]["digits"]
    assert set(entry["ways"]) == set(ways)
    for way, data in entry["ways"].items():
        assert not data.get("skipped"), way
        assert [r["samples"] for r in data["rounds"]] == [1257], way  # the timed epoch, all of it
        assert data["summary"]["samples_per_second"]["median"] > 0
        assert len(data["first_losses"]) == 3
        assert not data["warnings"], (way, data["warnings"])
    # the same first steps: kdforge's models, data and batch order, the same loss
    reference = entry["ways"]["kdforge-online"]["first_losses"]
    for way in {"hand-written", "torchdistill"} & set(ways):
        assert entry["ways"][way]["first_losses"] == pytest.approx(reference, rel=1e-5), way
    if "kdforge-cached" in ways:  # float16 teacher logits
        assert entry["ways"]["kdforge-cached"]["first_losses"] == pytest.approx(reference, rel=5e-3)
        assert entry["cache_build"]["status"] == "built"
        assert entry["ways"]["kdforge-cached"]["rounds"][0]["cache"]["status"] == "reused"
        assert "cached/online" in entry["ratios"]
    assert entry["ratios"]["online/hand"]["median"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["workloads"]["digits"]["ratios"]
    assert "kdforge online / hand-written" in (tmp_path / "bench.txt").read_text()
    if plots:
        assert (tmp_path / "bench.png").stat().st_size > 10_000
