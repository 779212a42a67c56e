"""Teacher ensembles: combination math against hand-computed values, and real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import kdforge
from conftest import base_recipe
from kdforge import ModelOutputs, StepOutputs
from kdforge.plugins.ensembles import TeacherEnsemble

Z1 = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]
Z2 = [[-1.0, 1.0, 0.0], [0.0, 2.0, 1.0]]
STUDENT = [[0.3, 0.2, 0.1], [1.0, -1.0, 0.0]]


def assert_close(actual, expected, rel: float) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(torch.as_tensor(actual).double(), expected, rtol=rel, atol=0), (actual, expected)


def softmax(z: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kd_from(p_rows: list[list[float]], t: float) -> float:
    """T^2 * mean_rows KL(p || softmax(student / T)), by hand."""
    total = 0.0
    for p, s in zip(p_rows, STUDENT):
        q = softmax(s, t)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return t * t * total / len(p_rows)


class Fixed(torch.nn.Module):
    """A 'teacher' that returns given logits."""

    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.register_buffer("z", torch.tensor(logits))

    def forward(self, x):  # noqa: ARG002
        return self.z


def combined(combine: str, targets=None, weights=None, members=(Z1, Z2)) -> ModelOutputs:
    ensemble = TeacherEnsemble([Fixed(z) for z in members], combine, weights)
    outputs = [ModelOutputs(torch.tensor(z)) for z in members]
    return ensemble.combine(outputs, None if targets is None else torch.tensor(targets))


def kd_value(view: ModelOutputs, t: float) -> float:
    kd = kdforge.create("loss", "kd", temperature=t)
    return kd(StepOutputs(student=ModelOutputs(torch.tensor(STUDENT)), teacher=view)).item()


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_mean_probs_is_the_mean_of_softened_distributions(t: float) -> None:
    view = combined("mean_probs")
    expected = [[(a + b) / 2 for a, b in zip(softmax(r1, t), softmax(r2, t))] for r1, r2 in zip(Z1, Z2)]
    assert_close(view.probs(t), expected, 1e-5)
    assert kd_value(view, t) == pytest.approx(kd_from(expected, t), rel=1e-4)


def test_mean_probs_is_not_the_softmax_of_mean_logits() -> None:
    t = 4.0
    of_mean_logits = [softmax([(a + b) / 2 for a, b in zip(r1, r2)], t) for r1, r2 in zip(Z1, Z2)]
    mean_probs = combined("mean_probs").probs(t)
    assert (mean_probs - torch.tensor(of_mean_logits)).abs().max() > 1e-3
    assert_close(combined("mean_logits").probs(t), of_mean_logits, 1e-5)
    assert kd_value(combined("mean_logits"), t) == pytest.approx(kd_from(of_mean_logits, t), rel=1e-4)


def test_weighted_mixture() -> None:
    t = 2.0
    expected = [[0.75 * a + 0.25 * b for a, b in zip(softmax(r1, t), softmax(r2, t))] for r1, r2 in zip(Z1, Z2)]
    assert_close(combined("weighted", weights=[3.0, 1.0]).probs(t), expected, 1e-5)


def test_confidence_weights_follow_each_teachers_loss_on_the_label() -> None:
    t, labels = 3.0, [0, -1]  # the second sample is unlabeled: equal weights
    ce1 = -math.log(softmax(Z1[0])[0])
    ce2 = -math.log(softmax(Z2[0])[0])
    # CA-MKD with K = 2: w_k = 1 - softmax(CE)_k, i.e. w_1 = e^{CE_2} / (e^{CE_1} + e^{CE_2})
    w1 = math.exp(ce2) / (math.exp(ce1) + math.exp(ce2))
    assert w1 > 0.5  # teacher 1 is right about sample 0, teacher 2 is not
    row0 = [w1 * a + (1 - w1) * b for a, b in zip(softmax(Z1[0], t), softmax(Z2[0], t))]
    row1 = [(a + b) / 2 for a, b in zip(softmax(Z1[1], t), softmax(Z2[1], t))]
    view = combined("confidence", targets=labels)
    assert_close(view.probs(t), [row0, row1], 1e-5)
    # without labels at all: the plain mean
    assert_close(combined("confidence").probs(t), combined("mean_probs").probs(t).tolist(), 1e-6)


@pytest.mark.parametrize("combine", ["mean_probs", "mean_logits", "weighted", "confidence"])
def test_identical_teachers_give_the_single_teacher_result(combine: str) -> None:
    weights = [2.0, 5.0] if combine == "weighted" else None
    view = combined(combine, targets=[1, 2], weights=weights, members=(Z1, Z1))
    single = ModelOutputs(torch.tensor(Z1))
    for t in (1.0, 4.0):
        assert kd_value(view, t) == pytest.approx(kd_value(single, t), rel=1e-5)
    assert view.logits.argmax(-1).tolist() == single.logits.argmax(-1).tolist()


def test_bad_ensemble_params(digits_teacher: Path) -> None:
    member = {"name": "checkpoint", "params": {"path": str(digits_teacher)}}
    with pytest.raises(kdforge.RecipeError, match="weights"):
        kdforge.create("teacher", "ensemble", teachers=[member, member], combine="weighted")
    with pytest.raises(kdforge.RecipeError, match=r"teachers\[1\].*unknown teacher 'checkpoint_': no installed plugin provides it\. Did you mean 'checkpoint'"):
        kdforge.create("teacher", "ensemble", teachers=[member, {"name": "checkpoint_"}])


def two_teachers(tmp_path: Path, digits_teacher: Path) -> Path:
    """A second teacher of another architecture (MLP), trained briefly."""
    out = tmp_path / "mlp-teacher"
    kdforge.run(base_recipe(tmp_path, student={"name": "mlp", "params": {"hidden": [128]}},
                            trainer={"epochs": 3, "batch_size": 64, "progress_bar": False}), output_dir=out)
    return out


def test_ensemble_run_with_per_teacher_taps(tmp_path: Path, digits_teacher: Path) -> None:
    mlp_teacher = two_teachers(tmp_path, digits_teacher)
    seen: dict[str, list] = {}

    class Probe(torch.nn.Module):
        """Records what an ensemble hands a loss: per-teacher features under their own names."""

        teacher_taps = ["members.0.features.1", "members.1.hidden.0"]

        def forward(self, out: StepOutputs) -> torch.Tensor:
            seen["teachers"] = [sorted(t.features) for t in out.teachers]
            seen["combined"] = sorted(out.teacher.features)
            seen["shapes"] = [tuple(out.teachers[0].features["features.1"].shape), tuple(out.teachers[1].features["hidden.0"].shape)]
            return out.student.logits.sum() * 0.0

    class Plugin:
        @kdforge.hookimpl
        def register_losses(self, register):
            register("probe", Probe)

    plugin = Plugin()
    kdforge.register_plugin(plugin)
    try:
        recipe = base_recipe(
            tmp_path,
            data={"name": "digits", "params": {"labeled": 100}},
            teacher={"name": "ensemble", "params": {"combine": "mean_probs", "teachers": [
                {"name": "checkpoint", "params": {"path": str(digits_teacher)}},
                {"name": "checkpoint", "params": {"path": str(mlp_teacher)}}]}},
            losses=[{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}, {"name": "probe"}],
            trainer={"epochs": 3, "batch_size": 64, "progress_bar": False},
        )
        summary = kdforge.run(recipe, output_dir=tmp_path / "ens")
    finally:
        kdforge.unregister_plugin(plugin)
    assert seen["teachers"] == [["features.1"], ["hidden.0"]]
    assert seen["combined"] == ["members.0.features.1", "members.1.hidden.0"]
    assert seen["shapes"][0][1:] == (32, 2, 2) and seen["shapes"][1][1:] == (128,)
    members = summary["teacher/members/accuracy"]
    assert len(members) == 2 and all(a > 0.8 for a in members)
    assert summary["teacher/params"] == sum(json.loads((d / "summary.json").read_text())["student/params"]
                                            for d in (digits_teacher, mlp_teacher))
    assert summary["student/accuracy"] > 0.8


@pytest.mark.slow
def test_two_processes_with_an_ensemble(tmp_path: Path, digits_teacher: Path) -> None:
    from test_distributed import launch

    recipe = base_recipe(
        tmp_path,
        data={"name": "synthetic", "params": {"shape": [1, 8, 8], "num_classes": 10, "train_size": 256, "eval_size": 64}},
        teacher={"name": "ensemble", "params": {"combine": "confidence", "teachers": [
            {"name": "checkpoint", "params": {"path": str(digits_teacher)}},
            {"name": "small_cnn", "params": {"channels": [4]}}]}},
        losses=[{"name": "ce", "weight": 0.5}, {"name": "kd", "weight": 0.5}],
        trainer={"epochs": 1, "batch_size": 32, "progress_bar": False},
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = launch(path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["train/samples_seen_per_process"] == [128, 128]
    assert len(summary["teacher/members/accuracy"]) == 2
