"""``kdforge profile``: parameters, size, FLOPs, latency and the teacher/student ratios of a run."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import kdforge
from conftest import base_recipe, run_cli
from kdforge import RecipeError
from kdforge.profiling import (
    compression_ratios,
    count_flops,
    headline_sentence,
    median_latencies,
    profile_run,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny small_cnn teacher, an MLP distilled from it, and a byot run with one early exit."""
    root = tmp_path_factory.mktemp("profile-runs")
    teacher, kd, byot = root / "teacher", root / "kd", root / "byot"
    cnn = {"name": "small_cnn", "params": {"channels": [8, 16]}}
    kdforge.run(base_recipe(root, name="tiny-teacher", student=cnn, output_dir=str(teacher)))
    kdforge.run(base_recipe(root, name="tiny-kd", teacher={"name": "checkpoint", "params": {"path": str(teacher)}},
                            student={"name": "mlp", "params": {"hidden": [16]}},
                            losses=[{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
                            trainer={"epochs": 1, "batch_size": 128, "progress_bar": False}, output_dir=str(kd)))
    kdforge.run(base_recipe(root, name="tiny-byot", student=cnn,
                            losses=[{"name": "byot", "params": {"taps": ["features.0"], "deep_tap": "pool"}}],
                            trainer={"epochs": 1, "batch_size": 128, "progress_bar": False}, output_dir=str(byot)))
    return {"teacher": teacher, "kd": kd, "byot": byot}


def profile(*argv: str) -> int:
    from kdforge import profiling

    parser = argparse.ArgumentParser()
    profiling.add_arguments(parser)
    return profiling.run(parser.parse_args(list(argv)))


def test_teacher_and_student_numbers_against_the_run_and_hand_counts(runs: dict[str, Path]) -> None:
    report = profile_run(runs["kd"], repeats=3, warmup=1)
    summary = json.loads((runs["kd"] / "summary.json").read_text())
    teacher, student = report.model("teacher"), report.model("student")
    assert [m.role for m in report.models] == ["teacher", "student"]
    assert student.params == summary["student/params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert teacher.params == summary["teacher/params"]
    assert student.size_bytes == (runs["kd"] / "student.safetensors").stat().st_size == summary["student/size_bytes"]
    teacher_file = runs["teacher"] / "student.safetensors"
    assert teacher.size_bytes == teacher_file.stat().st_size  # the same weights, written the same way
    # an MLP 64 -> 16 -> 10: two matrix products, a multiply-add counting 2 (bias adds are not counted)
    assert student.flops_per_sample == 2 * (64 * 16 + 16 * 10)
    # small_cnn [8, 16] on 1x8x8: conv 1->8 at 8x8 (3x3), pool to 4x4, conv 8->16 at 4x4, pool, linear 16 -> 10
    assert teacher.flops_per_sample == 2 * (8 * 8 * 8 * 9 * 1 + 4 * 4 * 16 * 9 * 8 + 16 * 10)
    assert student.metric_value == summary["student/accuracy"] and teacher.metric_value == summary["teacher/accuracy"]
    for m in report.models:
        assert set(m.latency_ms) == {"1", "64"} and all(v > 0 for v in m.latency_ms.values())
        assert m.throughput["64"] == pytest.approx(64 / (m.latency_ms["64"] / 1000))
    r = report.ratios
    assert r["params"] == pytest.approx(teacher.params / student.params)
    assert r["size"] == pytest.approx(teacher.size_bytes / student.size_bytes)
    assert r["flops"] == pytest.approx(teacher.flops_per_sample / student.flops_per_sample)
    assert r["speedup"]["1"] == pytest.approx(teacher.latency_ms["1"] / student.latency_ms["1"])
    assert r["metric_delta"] == pytest.approx(100 * (summary["student/accuracy"] - summary["teacher/accuracy"]))
    assert r["metric_delta_unit"] == "points"
    assert re.fullmatch(r"\d+\.\dx smaller, \d+\.\dx faster at batch 1 \(\d+\.\dx at batch 64\), \d+\.\dx fewer FLOPs, "
                        r"[+-]\d+\.\d points of accuracy", report.headline), report.headline
    assert report.threads == 1 and report.inputs == "eval split"


def test_the_sentence_from_known_numbers() -> None:
    from kdforge.profiling import ModelProfile

    teacher = ModelProfile("teacher", 820, 8200, 5.0e6, {"1": 5.1, "64": 30.0}, {}, "accuracy", 0.95)
    student = ModelProfile("student", 100, 1000, 1.0e6, {"1": 1.0, "64": 10.0}, {}, "accuracy", 0.937)
    ratios = compression_ratios([teacher, student], "accuracy")
    assert headline_sentence(ratios, "accuracy") == ("8.2x smaller, 5.1x faster at batch 1 (3.0x at batch 64), "
                                                    "5.0x fewer FLOPs, -1.3 points of accuracy")
    loss_teacher = ModelProfile("teacher", 2, 2, None, {"1": 2.0}, {}, "perplexity", 10.0)
    loss_student = ModelProfile("student", 1, 1, None, {"1": 1.0}, {}, "perplexity", 12.5)
    assert headline_sentence(compression_ratios([loss_teacher, loss_student], "perplexity", (1,)), "perplexity") == \
        "2.0x smaller, 2.0x faster at batch 1, +2.5 perplexity"
    assert compression_ratios([student], "accuracy") == {} and headline_sentence({}, "accuracy") is None


def test_latency_is_the_median_of_the_timed_runs_after_the_warmup() -> None:
    class Slow(nn.Module):
        """Sleeps 50 ms on its first two calls (the warm-up), then 1 ms."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            time.sleep(0.05 if self.calls <= 2 else 0.001)
            return x

    class Task:
        def forward(self, model: nn.Module, batch: kdforge.Batch) -> torch.Tensor:
            return model(batch.inputs)

    model = Slow()
    [ms] = median_latencies([model], Task(), kdforge.Batch(torch.zeros(1)), repeats=5, warmup=2)
    assert model.calls == 7
    assert 1.0 <= ms < 20.0


def test_flops_follow_the_batch_and_unsupported_models_give_none() -> None:
    class Task:
        def forward(self, model: nn.Module, batch: kdforge.Batch) -> torch.Tensor:
            return model(batch.inputs)

    linear = nn.Linear(7, 3)
    assert count_flops(linear, Task(), kdforge.Batch(torch.zeros(5, 7))) == 2 * 7 * 3

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no")

    assert count_flops(Broken(), Task(), kdforge.Batch(torch.zeros(1, 7))) is None


def test_a_run_without_a_teacher_is_profiled_alone_and_early_exits_count_only_what_they_run(runs: dict[str, Path]) -> None:
    alone = profile_run(runs["teacher"], repeats=2, warmup=0)
    assert [m.role for m in alone.models] == ["student"] and alone.ratios == {} and alone.headline is None
    byot = profile_run(runs["byot"], repeats=2, warmup=0)
    assert [m.role for m in byot.models] == ["student", "exit-features.0"]
    exit_model = kdforge.create("student", "early_exit", path=str(runs["byot"]), exit="features.0")
    # the exit runs the first conv block and its own head, nothing of the rest of the backbone
    used = sum(p.numel() for p in exit_model.backbone.features[0].parameters()) + \
        sum(p.numel() for p in exit_model.head.parameters())
    student, exit_profile = byot.models
    assert exit_profile.params == used < student.params
    assert exit_profile.size_bytes < student.size_bytes
    assert exit_profile.flops_per_sample < student.flops_per_sample
    summary = json.loads((runs["byot"] / "summary.json").read_text())
    assert exit_profile.metric_value == summary["student/exits/accuracy"]["features.0"]
    assert [m.role for m in profile_run(runs["byot"], repeats=1, warmup=0, extra_models=False).models] == ["student"]


def test_command_prints_a_table_or_json(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert profile(str(runs["kd"]), "--repeats", "2", "--warmup", "0") == 0
    text = capsys.readouterr().out
    assert "teacher / student" in text and "x smaller" in text and "latency b64" in text
    assert profile(str(runs["kd"]), "--json", "--repeats", "2", "--threads", "0") == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["role"] for m in data["models"]] == ["teacher", "student"] and data["threads"] == torch.get_num_threads()
    assert torch.get_num_threads() >= 1


def test_errors(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no run directory"):
        profile(str(tmp_path / "missing"))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text('{"step": 1, "epoch": 1, "train/loss": 1.0}\n')
    with pytest.raises(RecipeError, match="not a finished run"):
        profile(str(unfinished))
    with pytest.raises(RecipeError, match="--repeats"):
        profile(str(runs["kd"]), "--repeats", "0")
    with pytest.raises(RecipeError, match="--threads"):
        profile(str(runs["kd"]), "--threads", "-1")


def test_cli_profile(runs: dict[str, Path]) -> None:
    """Needs the lead's wiring: ``kdforge profile`` as a subcommand."""
    result = run_cli("profile", str(runs["kd"]), "--json", "--repeats", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["ratios"]["params"] > 1
