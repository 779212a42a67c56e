"""reviewkd: HCL against float64 loops, the ABF review path against a functional re-implementation."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdforge
from kdforge import ModelOutputs, StepOutputs
from kdforge.plugins.review_losses import hierarchical_context_loss

REL = 1e-5


def step(student: dict, teacher: dict) -> StepOutputs:
    n = next(iter(student.values())).shape[0]
    t = ModelOutputs(torch.zeros(n, 3), teacher)
    return StepOutputs(student=ModelOutputs(torch.zeros(n, 3), student), teacher=t, teachers=[t])


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hcl_reference(fs: np.ndarray, ft: np.ndarray, levels=(4, 2, 1)) -> float:
    """Loops: full-resolution MSE weight 1, each pooled level l < H weight 1/2, 1/4, ...; normalized."""
    def mse(a, b):
        return float(((a - b) ** 2).mean())

    def pool(x, size):  # block means; H is a multiple of size in these tests
        n, c, h, w = x.shape
        out = np.zeros((n, c, size, size))
        for i in range(size):
            for j in range(size):
                out[:, :, i, j] = x[:, :, i * h // size:(i + 1) * h // size, j * w // size:(j + 1) * w // size].mean(axis=(2, 3))
        return out

    total, weight, norm = mse(fs, ft), 1.0, 1.0
    for level in levels:
        if level >= fs.shape[2]:
            continue
        weight /= 2
        total += weight * mse(pool(fs, level), pool(ft, level))
        norm += weight
    return total / norm


def test_reviewkd_is_registered() -> None:
    assert "reviewkd" in {r.name for r in kdforge.list_plugins() if r.kind == "loss"}


def test_hcl_by_hand() -> None:
    # a 2x2 map: full MSE and the 1x1 level (weight 1/2); 4 is not < 2 and 2 is not < 2
    fs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    ft = torch.zeros(1, 1, 2, 2)
    full, pooled = (1 + 4 + 9 + 16) / 4, 2.5 ** 2
    assert hierarchical_context_loss(fs, ft, [4, 2, 1]).item() == pytest.approx((full + 0.5 * pooled) / 1.5, rel=REL)
    # a 1x1 map: the full-resolution term alone
    assert hierarchical_context_loss(fs[..., :1, :1], ft[..., :1, :1], [4, 2, 1]).item() == pytest.approx(1.0, rel=REL)


@pytest.mark.parametrize("size", [8, 4, 2])
def test_hcl_matches_a_float64_reference(size: int) -> None:
    fs, ft = randn(3, 5, size, size, seed=size), randn(3, 5, size, size, seed=size + 1)
    expected = hcl_reference(fs.double().numpy(), ft.double().numpy())
    assert hierarchical_context_loss(fs, ft, [4, 2, 1]).item() == pytest.approx(expected, rel=REL)
    assert hierarchical_context_loss(fs, ft, [2]).item() == pytest.approx(
        hcl_reference(fs.double().numpy(), ft.double().numpy(), (2,)), rel=REL)


def bn_train(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.double().view(1, -1, 1, 1) + bn.bias.double().view(1, -1, 1, 1)


def review_reference(loss, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> float:
    """The review path in float64 with functional ops and the loss's weights (BatchNorm in training mode)."""
    student = [s.double() for s in student]
    teacher = [t.double() for t in teacher]
    total, residual = 0.0, None
    for i in reversed(range(len(student))):
        fusion = loss.fusions[i]
        x = bn_train(F.conv2d(student[i], fusion.reduce[0].weight.double()), fusion.reduce[1])
        if i < len(student) - 1:
            y = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            att = fusion.attention[0]
            z = torch.sigmoid(F.conv2d(torch.cat([x, y], 1), att.weight.double(), att.bias.double()))
            x = x * z[:, :1] + y * z[:, 1:]
        if x.shape[2:] != teacher[i].shape[2:]:
            x = F.interpolate(x, size=teacher[i].shape[2:], mode="nearest")
        residual = x
        out = bn_train(F.conv2d(x, fusion.output[0].weight.double(), padding=1), fusion.output[1])
        total += hcl_reference(out.detach().numpy(), teacher[i].numpy())
    return total


def shapes():
    # student: 2 stages + a pooled vector; teacher: more channels, a larger first map
    student = {"s1": randn(4, 3, 4, 4, seed=10), "s2": randn(4, 5, 2, 2, seed=11), "p": randn(4, 5, seed=12)}
    teacher = {"t1": randn(4, 6, 8, 8, seed=13), "t2": randn(4, 7, 2, 2, seed=14), "q": randn(4, 9, seed=15)}
    return student, teacher


def test_reviewkd_matches_a_float64_review_path() -> None:
    loss = kdforge.create("loss", "reviewkd", student_taps=["s1", "s2", "p"], teacher_taps=["t1", "t2", "q"])
    assert not list(loss.parameters())
    student, teacher = shapes()
    value = loss(step(student, teacher))
    assert len(loss.fusions) == 3
    assert [f.attention is not None for f in loss.fusions] == [True, True, False]  # the deepest level has nothing to fuse
    assert loss.fusions[0].reduce[0].out_channels == 5  # mid = min(512, deepest student channels)
    assert [f.output[0].out_channels for f in loss.fusions] == [6, 7, 9]
    expected = review_reference(loss, [student["s1"], student["s2"], student["p"][:, :, None, None]],
                                [teacher["t1"], teacher["t2"], teacher["q"][:, :, None, None]])
    assert value.item() == pytest.approx(expected, rel=REL)


def test_reviewkd_trains_its_fusions_and_not_the_teacher() -> None:
    loss = kdforge.create("loss", "reviewkd", student_taps=["s1", "s2", "p"], teacher_taps=["t1", "t2", "q"], mid_channels=4)
    student, teacher = shapes()
    student = {k: v.requires_grad_(True) for k, v in student.items()}
    teacher = {k: v.requires_grad_(True) for k, v in teacher.items()}
    loss(step(student, teacher)).backward()
    assert all(p.grad is not None for p in loss.parameters())
    assert all(v.grad is not None for v in student.values())
    assert all(v.grad is None for v in teacher.values())
    assert loss.fusions[0].reduce[0].out_channels == 4


def test_reviewkd_errors() -> None:
    with pytest.raises(kdforge.RecipeError, match="same length"):
        kdforge.create("loss", "reviewkd", student_taps=["a", "b"], teacher_taps=["x"])
    loss = kdforge.create("loss", "reviewkd", student_taps=["s1"], teacher_taps=["t1"])
    with pytest.raises(ValueError, match=r"student tap 's1' has shape \(2, 3, 4\)"):
        loss(step({"s1": torch.zeros(2, 3, 4)}, {"t1": torch.zeros(2, 3, 4, 4)}))
    loss(step({"s1": torch.zeros(2, 3, 4, 4)}, {"t1": torch.zeros(2, 6, 4, 4)}))
    with pytest.raises(ValueError, match=r"built for 3 -> 6 channels.*'t1' \(2, 8, 4, 4\)"):
        loss(step({"s1": torch.zeros(2, 3, 4, 4)}, {"t1": torch.zeros(2, 8, 4, 4)}))
    with pytest.raises(ValueError, match="no student feature 's1'"):
        kdforge.create("loss", "reviewkd", student_taps=["s1"], teacher_taps=["t1"])(step({"x": torch.zeros(2, 3)}, {}))


def test_reviewkd_keeps_float32_math_under_bf16_autocast() -> None:
    loss = kdforge.create("loss", "reviewkd", student_taps=["s1", "s2", "p"], teacher_taps=["t1", "t2", "q"])
    student, teacher = shapes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(step({k: v.bfloat16() for k, v in student.items()}, {k: v.bfloat16() for k, v in teacher.items()}))
    assert value.dtype == torch.float32
    plain = copy.deepcopy(loss)(step({k: v.bfloat16().float() for k, v in student.items()},
                                     {k: v.bfloat16().float() for k, v in teacher.items()}))
    assert value.item() == pytest.approx(plain.item(), rel=3e-2)  # the convolutions ran in bf16, the HCL did not


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_reviewkd_and_crd_digits_recipes_train(tmp_path: Path, digits_teacher: Path) -> None:
    from test_hint_losses import zoo_recipe

    import json
    import math

    for name in ("reviewkd", "crd"):
        summary = kdforge.run(zoo_recipe(name, tmp_path, digits_teacher))
        assert summary["epochs"] == 1 and summary["student/accuracy"] is not None
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        values = [r[f"train/loss/{name}"] for r in records if f"train/loss/{name}" in r]
        assert values and all(math.isfinite(v) for v in values)
