"""Self-distillation: the EMA teacher, BYOT exits, and born-again generations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kdforge
from conftest import base_recipe, run_cli
from kdforge import ModelOutputs, StepOutputs
from kdforge.plugins.ema import EMATeacher


def test_ema_update_math() -> None:
    student = torch.nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]]))
        student.bias.fill_(0.0)
    teacher = EMATeacher(decay=0.9, warmup=False)
    teacher.bind(student)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[3.0, -2.0]]))
        student.bias.fill_(1.0)
    teacher.update(student)
    # 0.9 * old + 0.1 * new
    assert torch.allclose(teacher.model.weight, torch.tensor([[1.2, 1.6]]))
    assert torch.allclose(teacher.model.bias, torch.tensor([0.1]))
    teacher.update(student)
    assert torch.allclose(teacher.model.weight, torch.tensor([[0.9 * 1.2 + 0.3, 0.9 * 1.6 - 0.2]]))
    assert int(teacher.num_updates) == 2
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ema_warmup_uses_a_smaller_decay_first() -> None:
    student = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(0.0)
    teacher = EMATeacher(decay=0.999, warmup=True)
    teacher.bind(student)
    with torch.no_grad():
        student.weight.fill_(1.0)
    teacher.update(student)  # n = 0: decay min(0.999, 1 - 1/1) = 0: the teacher takes the student
    assert teacher.model.weight.item() == pytest.approx(1.0)
    with torch.no_grad():
        student.weight.fill_(3.0)
    teacher.update(student)  # n = 1: decay 1/2, the running mean of the two
    assert teacher.model.weight.item() == pytest.approx(2.0)


def test_ema_default_is_a_plain_moving_average() -> None:
    student = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(0.0)
    teacher = kdforge.create("teacher", "ema", decay=0.99)
    teacher.bind(student)
    with torch.no_grad():
        student.weight.fill_(1.0)
    teacher.update(student)
    assert teacher.model.weight.item() == pytest.approx(0.01)


def ema_recipe(tmp_path: Path, epochs: int) -> dict:
    return base_recipe(
        tmp_path,
        data={"name": "digits", "params": {"labeled": 100}},
        teacher={"name": "ema", "params": {"decay": 0.95}},
        student={"name": "mlp", "params": {"hidden": [32], "dropout": 0.1}},
        losses=[{"name": "ce"}, {"name": "kd", "params": {"temperature": 2.0}}],
        trainer={"epochs": epochs, "batch_size": 64, "progress_bar": False, "keep_checkpoints": 5},
    )


def test_ema_teacher_follows_the_student_and_resumes_exactly(tmp_path: Path) -> None:
    full, split = tmp_path / "full", tmp_path / "split"
    summary = kdforge.run(ema_recipe(full, 3))
    assert summary["teacher/accuracy"] > 0.5  # evaluated at the end, not the random start
    metrics = [json.loads(x) for x in (full / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics if "teacher/accuracy" in m] == [1, 2, 3]
    kdforge.run(ema_recipe(split, 1))
    kdforge.run(ema_recipe(split, 3), resume=True)
    for name in ("teacher.safetensors", "model.safetensors"):
        a = load_file(str(full / "run/checkpoints/epoch-0003" / name))
        b = load_file(str(split / "run/checkpoints/epoch-0003" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    teacher = load_file(str(full / "run/checkpoints/epoch-0003/teacher.safetensors"))
    student = load_file(str(full / "run/checkpoints/epoch-0003/model.safetensors"))
    assert not torch.equal(teacher["model.head.weight"], student["head.weight"])  # an average, not a copy
    assert int(teacher["num_updates"]) == 3 * 20


BYOT = {"name": "byot", "params": {"taps": ["features.0"], "deep_tap": "pool"}}


def test_byot_heads_train_and_their_gradients_reach_the_backbone() -> None:
    student = kdforge.create("student", "small_cnn", num_classes=10, in_channels=1, input_shape=[1, 8, 8], channels=[4, 8])
    loss = kdforge.create("loss", "byot", taps=["features.0"], deep_tap="pool")
    from kdforge.taps import FeatureTaps

    taps = FeatureTaps(student, loss.student_taps)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, -1, 5])
    logits = student(x)
    value = loss(StepOutputs(student=ModelOutputs(logits, taps.take()), targets=y))
    head = loss.heads["features_0"]
    assert head.classifier.out_features == 10 and head.classifier.in_features == 8  # deepest width
    value.backward()
    assert head.classifier.weight.grad.abs().sum() > 0 and head.bottleneck[0].weight.grad.abs().sum() > 0
    # the exit's CE, KD and hint reach the first block; the final classifier gets its own CE
    assert student.features[0][0].weight.grad.abs().sum() > 0
    assert student.classifier.weight.grad.abs().sum() > 0


def test_byot_run_reports_every_exit_and_exports_early_exit_models(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, student={"name": "small_cnn", "params": {"channels": [8, 16]}}, losses=[BYOT],
                         trainer={"epochs": 3, "batch_size": 64, "progress_bar": False})
    summary = kdforge.run(recipe)
    exit_accuracy = summary["student/exits/accuracy"]["features.0"]
    assert summary["student/accuracy"] > 0.8 and exit_accuracy > 0.15  # 3 epochs; chance is 0.1
    assert "teacher/accuracy" not in summary
    # the exported exit, rebuilt by the early_exit plugin, scores what the run reported
    model = kdforge.create("student", "early_exit", path=str(tmp_path / "run"), exit="features.0").eval()
    splits = kdforge.create("dataset", "digits")
    inputs = torch.stack([splits.eval[i][0] for i in range(len(splits.eval))])
    labels = torch.tensor([splits.eval[i][1] for i in range(len(splits.eval))])
    with torch.no_grad():
        accuracy = (model(inputs).argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(exit_accuracy, abs=1e-6)  # one sample is 1/540


def test_early_exit_stops_the_backbone_at_the_exit(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, student={"name": "small_cnn", "params": {"channels": [8, 16]}}, losses=[BYOT],
                         trainer={"epochs": 1, "batch_size": 128, "progress_bar": False})
    kdforge.run(recipe)
    model = kdforge.create("teacher", "early_exit", path=str(tmp_path / "run"), exit="features.0")
    ran = []
    model.backbone.classifier.register_forward_hook(lambda *a: ran.append(True))
    model(torch.randn(2, 1, 8, 8))
    assert ran == []  # the deeper layers never ran
    with pytest.raises(kdforge.RecipeError, match="exits: features.0"):
        kdforge.create("student", "early_exit", path=str(tmp_path / "run"), exit="features.1")


def test_born_again_generations_with_one_command(tmp_path: Path) -> None:
    paths = []
    for gen in range(3):
        recipe = base_recipe(tmp_path, name=f"gen{gen}", output_dir=str(tmp_path / f"gen{gen}"),
                             trainer={"epochs": 2, "batch_size": 64, "progress_bar": False})
        if gen:
            recipe["teacher"] = {"name": "checkpoint", "params": {"path": str(tmp_path / f"gen{gen - 1}")}}
            recipe["losses"] = [{"name": "ce", "weight": 0.5}, {"name": "kd", "weight": 0.5}]
        path = tmp_path / f"gen{gen}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        paths.append(str(path))
    result = run_cli("run", *paths)
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [json.loads((tmp_path / f"gen{g}" / "summary.json").read_text()) for g in range(3)]
    # each generation's teacher is the previous generation
    assert summaries[1]["teacher/accuracy"] == summaries[0]["student/accuracy"]
    assert summaries[2]["teacher/accuracy"] == summaries[1]["student/accuracy"]


def test_a_bad_later_generation_costs_no_compute(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base_recipe(tmp_path)))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base_recipe(tmp_path, losses=[{"name": "kdd"}])))
    result = run_cli("run", str(good), str(bad))
    assert result.returncode == 2 and "losses[0].name" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_early_exit_student_trains_in_two_processes(tmp_path: Path) -> None:
    from test_distributed import launch

    recipe = base_recipe(tmp_path, student={"name": "small_cnn", "params": {"channels": [8, 16]}}, losses=[BYOT],
                         trainer={"epochs": 1, "batch_size": 128, "progress_bar": False})
    kdforge.run(recipe)
    follow = base_recipe(tmp_path, student={"name": "early_exit", "params": {"path": str(tmp_path / "run"), "exit": "features.0"}},
                         data={"name": "synthetic", "params": {"shape": [1, 8, 8], "train_size": 128, "eval_size": 32}},
                         trainer={"epochs": 1, "batch_size": 32, "progress_bar": False}, output_dir=str(tmp_path / "exit-run"))
    path = tmp_path / "exit.yaml"
    path.write_text(yaml.safe_dump(follow))
    result = launch(path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "exit-run/summary.json").read_text())["num_processes"] == 2
