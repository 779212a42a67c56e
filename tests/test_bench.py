"""Smoke run of the benchmark harness (benchmarks/bench.py) on digits, so it cannot rot.

One warm-up round and one timed round of one epoch each, one thread, all five ways.
torchdistill and matplotlib come with the `bench` extra, which `dev` includes: the test
needs them (a missing one is a failure, not a way quietly dropped).
"""

from __future__ import annotations

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
    from bench_ways import torchdistill_version
    from bench_workloads import WAYS

    assert torchdistill_version() == "1.1.5", "the `bench` extra (in `dev`) pins torchdistill 1.1.5"
    ways = list(WAYS)
    results = bench.main(["--workloads", "digits", "--ways", *ways, "--rounds", "1", "--digits-epochs", "1",
                          "--digits-teacher-epochs", "1", "--threads", "1", "--out", str(tmp_path)])

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
    for way in ("hand-written", "torchdistill"):
        assert entry["ways"][way]["first_losses"] == pytest.approx(reference, rel=1e-5), way
    # float16 teacher logits: close, not equal
    assert entry["ways"]["kdforge-cached"]["first_losses"] == pytest.approx(reference, rel=5e-3)
    # CE alone: another loss (the KD term is most of the KD loss here)
    assert entry["ways"]["student-only"]["first_losses"][0] != pytest.approx(reference[0], rel=1e-2)
    assert entry["cache_build"]["status"] == "built" and entry["cache_build"]["build_seconds"] > 0
    assert entry["ways"]["kdforge-cached"]["rounds"][0]["cache"]["status"] == "reused"
    assert set(entry["ratios"]) == {"online/hand", "cached/online", "cached-epoch/student-epoch",
                                    "cached/torchdistill", "online/torchdistill"}
    for name, ratio in entry["ratios"].items():
        assert ratio["min"] > 0 and ratio["per_round"] == [ratio["median"]], name
        assert ratio["cpu"]["median"] > 0, name
    assert "target" not in entry["ratios"]["cached/torchdistill"]  # its targets are for the CIFAR pairs
    assert json.loads((tmp_path / "bench.json").read_text())["workloads"]["digits"]["ratios"]
    table = (tmp_path / "bench.txt").read_text()
    for text in ("kdforge online / hand-written", "(cache build)", *ways):
        assert text in table, text
    assert "warnings:" not in table
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_kd_term_cost_times_its_three_steps(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("kd_term_cost", None)
    import kd_term_cost

    threads = torch.get_num_threads()
    try:
        medians = kd_term_cost.main(["--rounds", "1", "--steps", "3"])
    finally:
        torch.set_num_threads(threads)
    assert set(medians) == {"ce", "kd", "ce+kd"} and all(ms > 0 for ms in medians.values())
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[1:]] == ["ce", "kd", "ce+kd"]
