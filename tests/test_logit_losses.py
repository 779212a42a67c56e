"""dkd, dist, ctkd, mlkd and kd's logit standardization against hand-computed values and
independent float64 re-implementations of the papers' formulas (plain numpy loops)."""

from __future__ import annotations

import json

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import kdforge
from kdforge import ModelOutputs, StepOutputs

REL = 1e-5


def step(student, teacher, targets=None, **fields) -> StepOutputs:
    s = student if isinstance(student, torch.Tensor) else torch.tensor(student, dtype=torch.float32)
    t = teacher if isinstance(teacher, torch.Tensor) else torch.tensor(teacher, dtype=torch.float32)
    y = None if targets is None else torch.as_tensor(targets)
    t_out = ModelOutputs(t)
    return StepOutputs(student=ModelOutputs(s), teacher=t_out, teachers=[t_out], targets=y, **fields)


def random_logits(n: int = 7, c: int = 6, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randn(n, c, generator=g) * scale


# -- float64 references, written from the papers' formulas --------------------------------
def softmax64(row, t: float = 1.0) -> np.ndarray:
    z = np.asarray(row, dtype=np.float64) / t
    e = np.exp(z - z.max())
    return e / e.sum()


def kl64(p, q) -> float:
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))


def standardize64(row) -> np.ndarray:
    z = np.asarray(row, dtype=np.float64)
    return (z - z.mean()) / (z.std(ddof=1) + 1e-7)


def kd64(student, teacher, t: float) -> float:
    return t * t * float(np.mean([kl64(softmax64(tr, t), softmax64(sr, t)) for sr, tr in zip(student, teacher)]))


def dkd64(student, teacher, targets, alpha: float, beta: float, t: float) -> float:
    terms = []
    for sr, tr, y in zip(student, teacher, targets):
        if y < 0:
            continue
        p_s, p_t = softmax64(sr, t), softmax64(tr, t)
        tckd = kl64([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        others = [k for k in range(len(sr)) if k != y]
        nt_s = p_s[others] / p_s[others].sum()
        nt_t = p_t[others] / p_t[others].sum()
        terms.append(t * t * (alpha * tckd + beta * kl64(nt_t, nt_s)))
    return float(np.sum(terms) / max(len(terms), 1))


def pearson64(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (math.sqrt((a * a).sum()) * math.sqrt((b * b).sum()) + 1e-8))


def dist64(student, teacher, beta: float, gamma: float, t: float) -> float:
    p_s = np.stack([softmax64(r, t) for r in student])
    p_t = np.stack([softmax64(r, t) for r in teacher])
    inter = 1 - np.mean([pearson64(p_s[i], p_t[i]) for i in range(len(p_s))])
    intra = 1 - np.mean([pearson64(p_s[:, k], p_t[:, k]) for k in range(p_s.shape[1])])
    return t * t * (beta * inter + gamma * intra)


def mlkd64(student, teacher, temperatures, wi=1.0, wc=1.0, wb=1.0) -> float:
    total = 0.0
    n, c = len(student), len(student[0])
    for t in temperatures:
        p_s = np.stack([softmax64(r, t) for r in student])
        p_t = np.stack([softmax64(r, t) for r in teacher])
        instance = t * t * np.mean([kl64(p_t[i], p_s[i]) for i in range(n)])
        class_level = sum((sum(p_t[b, i] * p_t[b, j] for b in range(n)) - sum(p_s[b, i] * p_s[b, j] for b in range(n))) ** 2
                          for i in range(c) for j in range(c)) / c
        batch_level = sum((float(p_t[a] @ p_t[b]) - float(p_s[a] @ p_s[b])) ** 2 for a in range(n) for b in range(n)) / n
        total += wi * instance + wc * class_level + wb * batch_level
    return float(total)


def loss(name: str, **params):
    return kdforge.create("loss", name, **params)


# -- registration --------------------------------------------------------------------------
def test_every_logit_loss_is_registered() -> None:
    names = {p.name for p in kdforge.list_plugins() if p.kind == "loss"}
    assert {"dkd", "dist", "ctkd", "mlkd", "kd"} <= names


# -- kd with logit standardization ----------------------------------------------------------
def test_kd_standardize_ignores_logit_scale_and_shift() -> None:
    # [1, 2, 3] and [2, 4, 6] + 5 standardize to the same vector: the loss vanishes
    plain = loss("kd", temperature=2.0)(step([[1.0, 2.0, 3.0]], [[7.0, 9.0, 11.0]]))
    standardized = loss("kd", temperature=2.0, standardize=True)(step([[1.0, 2.0, 3.0]], [[7.0, 9.0, 11.0]]))
    assert plain.item() > 0.1
    assert standardized.item() == pytest.approx(0.0, abs=1e-6)


def test_kd_standardize_by_hand() -> None:
    # student [0, 0, 3]: mean 1, unbiased std sqrt(3) -> [-1, -1, 2] / sqrt(3); teacher [1, 2, 3] -> [-1, 0, 1]
    s_std = np.array([-1.0, -1.0, 2.0]) / math.sqrt(3)
    t_std = np.array([-1.0, 0.0, 1.0])
    expected = 4.0 * kl64(softmax64(t_std, 2.0), softmax64(s_std, 2.0))
    value = loss("kd", temperature=2.0, standardize=True)(step([[0.0, 0.0, 3.0]], [[1.0, 2.0, 3.0]]))
    assert value.item() == pytest.approx(expected, rel=REL)


def test_kd_standardize_matches_the_formula_on_random_logits() -> None:
    s, t = random_logits()
    expected = kd64([standardize64(r) for r in s.tolist()], [standardize64(r) for r in t.tolist()], 2.0)
    assert loss("kd", temperature=2.0, standardize=True)(step(s, t)).item() == pytest.approx(expected, rel=REL)


def test_kd_without_standardize_is_unchanged() -> None:
    s, t = random_logits()
    assert loss("kd", temperature=3.0)(step(s, t)).item() == pytest.approx(kd64(s.tolist(), t.tolist(), 3.0), rel=REL)


# -- dkd ---------------------------------------------------------------------------------------
def test_dkd_by_hand_target_class_only() -> None:
    # teacher [ln 2, 0, 0] -> [1/2, 1/4, 1/4]; student uniform; target 0.
    # TCKD = KL([1/2, 1/2] || [1/3, 2/3]) = ln(1.125) / 2; the non-target parts agree: NCKD = 0.
    value = loss("dkd", temperature=1.0)(step([[0.0, 0.0, 0.0]], [[math.log(2), 0.0, 0.0]], [0]))
    assert value.item() == pytest.approx(0.5 * math.log(1.125), rel=REL)


def test_dkd_by_hand_with_both_terms_and_temperature() -> None:
    # teacher [0, ln 3, 0] -> [1/5, 3/5, 1/5], target 0: TCKD = KL([.2, .8] || [1/3, 2/3]),
    # NCKD = KL([3/4, 1/4] || [1/2, 1/2]); at T = 2 the logits are doubled and the loss is x4.
    tckd = 0.2 * math.log(0.6) + 0.8 * math.log(1.2)
    nckd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    value = loss("dkd", alpha=1.0, beta=8.0, temperature=2.0)(step([[0.0, 0.0, 0.0]], [[0.0, 2 * math.log(3), 0.0]], [0]))
    assert value.item() == pytest.approx(4.0 * (tckd + 8.0 * nckd), rel=REL)
    assert value.item() == pytest.approx(4.360753, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_dkd_matches_the_formula_on_random_logits(seed: int) -> None:
    s, t = random_logits(seed=seed)
    y = torch.tensor([0, 5, 2, 2, 1, 3, 4])
    expected = dkd64(s.tolist(), t.tolist(), y.tolist(), 0.7, 3.0, 4.0)
    value = loss("dkd", alpha=0.7, beta=3.0, temperature=4.0)(step(s, t, y))
    assert value.item() == pytest.approx(expected, rel=REL)


def test_dkd_decomposes_kd_as_the_paper_states() -> None:
    # Zhao et al. eq. (1)-(4): KD = TCKD + (1 - p_t^target) * NCKD, sample by sample
    s, t = random_logits(n=1, seed=3)
    p_target = softmax64(t[0].tolist(), 4.0)[2]
    tckd = loss("dkd", alpha=1.0, beta=0.0)(step(s, t, [2])).item()
    nckd = loss("dkd", alpha=0.0, beta=1.0)(step(s, t, [2])).item()
    assert tckd + (1 - p_target) * nckd == pytest.approx(kd64(s.tolist(), t.tolist(), 4.0), rel=REL)


def test_dkd_averages_over_labeled_samples_only() -> None:
    s, t = random_logits(n=4, seed=4)
    labeled_only = loss("dkd")(step(s[[1, 3]], t[[1, 3]], [2, 0])).item()
    mixed = loss("dkd")(step(s, t, [-1, 2, -1, 0])).item()
    assert mixed == pytest.approx(labeled_only, rel=REL)
    assert mixed == pytest.approx(dkd64(s.tolist(), t.tolist(), [-1, 2, -1, 0], 1.0, 8.0, 4.0), rel=REL)


def test_dkd_without_labels_is_an_attached_zero() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4)
    for targets in ([-1, -1, -1], None):
        value = loss("dkd")(step(s, t, targets))
        assert value.item() == 0.0 and value.requires_grad
        value.backward()
        assert torch.equal(s.grad, torch.zeros_like(s))


def test_dkd_gradient_reaches_the_student_only() -> None:
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4, requires_grad=True)
    loss("dkd")(step(s, t, [0, 1, 2, 3, -1])).backward()
    assert s.grad.abs().sum() > 0 and torch.equal(s.grad[4], torch.zeros(4))
    assert t.grad is None


def test_dkd_standardize_is_dkd_of_standardized_logits() -> None:
    s, t = random_logits(seed=5)
    y = [1, 0, 3, 2, 5, 4, 1]
    expected = dkd64([standardize64(r) for r in s.tolist()], [standardize64(r) for r in t.tolist()], y, 1.0, 8.0, 2.0)
    value = loss("dkd", temperature=2.0, standardize=True)(step(s, t, y))
    assert value.item() == pytest.approx(expected, rel=REL)


def test_dkd_refuses_bad_params_and_shapes() -> None:
    with pytest.raises(kdforge.RecipeError):
        loss("dkd", beta=-1.0)
    with pytest.raises(ValueError, match="same"):
        loss("dkd")(step(torch.zeros(2, 3), torch.zeros(2, 4), [0, 1]))
    with pytest.raises(ValueError, match="teacher"):
        loss("dkd")(StepOutputs(student=ModelOutputs(torch.zeros(2, 3)), targets=torch.tensor([0, 1])))


# -- dist --------------------------------------------------------------------------------------
def test_dist_by_hand() -> None:
    # 2 classes: a row's Pearson correlation is +1 for the same order, -1 for the opposite one:
    # rows (+1, -1) -> inter = 1. The teacher's columns are constant -> correlation 0 -> intra = 1.
    value = loss("dist", beta=1.0, gamma=2.0)(step([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]))
    assert value.item() == pytest.approx(1.0 + 2.0 * 1.0, rel=REL)


def test_dist_is_zero_for_identical_logits() -> None:
    s, _ = random_logits()
    assert loss("dist", temperature=4.0)(step(s, s.clone())).item() == pytest.approx(0.0, abs=1e-5)  # 16 x float32 rounding


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dist_matches_the_formula_on_random_logits(t: float) -> None:
    s, te = random_logits(seed=6)
    expected = dist64(s.tolist(), te.tolist(), 2.0, 0.5, t)
    assert loss("dist", beta=2.0, gamma=0.5, temperature=t)(step(s, te)).item() == pytest.approx(expected, rel=REL)


def test_dist_gradient_reaches_the_student_only() -> None:
    s, t = random_logits(seed=7)
    s.requires_grad_(True), t.requires_grad_(True)
    loss("dist")(step(s, t)).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


# -- ctkd --------------------------------------------------------------------------------------
def test_ctkd_starts_at_the_authors_temperature() -> None:
    ctkd = loss("ctkd")
    assert ctkd.temperature == pytest.approx(1.0 + 20.0 / (1.0 + math.exp(-1.0)), rel=1e-6)  # 15.6212
    s, t = random_logits(seed=8)
    value = ctkd(step(s, t, epoch=0, epochs=240))
    assert value.item() == pytest.approx(kd64(s.tolist(), t.tolist(), ctkd.temperature), rel=REL)


def test_ctkd_reversal_strength_follows_the_cosine_curriculum() -> None:
    ctkd = loss("ctkd", lambda_min=0.0, lambda_max=1.0, lambda_warmup=10 / 240)
    # the authors' CosineDecay(0, -1, 10) at epochs 1, 5, 10, 200 (1-based) -> strength 1 - cos ramp
    for epoch, expected in ((0, (1 - math.cos(math.pi / 10)) / 2), (4, 0.5), (9, 1.0), (199, 1.0)):
        assert ctkd.reversal_strength(epoch, 240) == pytest.approx(expected, abs=1e-9)


def test_ctkd_temperature_gradient_is_reversed_and_scaled() -> None:
    s, t = random_logits(seed=9)
    s.requires_grad_(True)
    ctkd = loss("ctkd", init=0.3)
    ctkd(step(s, t, epoch=4, epochs=240)).backward()  # strength 0.5
    reversed_grad, student_grad = ctkd.theta.grad.clone(), s.grad.clone()
    # the same loss with a plain (non-reversed) temperature, by hand
    theta = torch.tensor(0.3, requires_grad=True)
    s2 = s.detach().clone().requires_grad_(True)
    temp = 1.0 + 20.0 * torch.sigmoid(theta)
    plain = temp**2 * torch.nn.functional.kl_div(torch.log_softmax(s2 / temp, -1), torch.log_softmax(t / temp, -1),
                                                 reduction="batchmean", log_target=True)
    plain.backward()
    # dL/dtheta is a small difference of large terms: float32 summation order shows at 1e-5
    assert reversed_grad.item() == pytest.approx(-0.5 * theta.grad.item(), rel=2e-4)
    assert torch.allclose(student_grad, s2.grad, rtol=1e-5, atol=1e-8)


def test_ctkd_temperature_is_reported_at_the_end() -> None:
    ctkd = loss("ctkd", init=0.0)
    ctkd.on_epoch_end(None)
    summary = ctkd.on_fit_end(None)
    assert summary["ctkd/temperature"] == pytest.approx(11.0)
    assert summary["ctkd/temperature_by_epoch"] == [pytest.approx(11.0)]


def test_ctkd_refuses_an_inverted_lambda_range() -> None:
    with pytest.raises(kdforge.RecipeError, match="lambda_min"):
        loss("ctkd", lambda_min=1.0, lambda_max=0.5)


# -- mlkd --------------------------------------------------------------------------------------
def test_mlkd_by_hand() -> None:
    # one sample: teacher [ln 3, 0] -> [3/4, 1/4], student uniform; T = 1.
    # instance KL = .75 ln 1.5 + .25 ln .5; class: ||P_t^T P_t - P_s^T P_s||^2 / 2 = 0.140625 / 2;
    # batch: (0.625 - 0.5)^2 / 1.
    instance = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    value = loss("mlkd", temperatures=[1.0])(step([[0.0, 0.0]], [[math.log(3), 0.0]]))
    assert value.item() == pytest.approx(instance + 0.0703125 + 0.015625, rel=REL)


def test_mlkd_matches_the_formula_on_random_logits() -> None:
    s, t = random_logits(n=5, c=4, seed=10)
    expected = mlkd64(s.tolist(), t.tolist(), [2.0, 3.0, 4.0, 5.0, 6.0], 1.0, 0.5, 2.0)
    value = loss("mlkd", class_weight=0.5, batch_weight=2.0)(step(s, t))
    assert value.item() == pytest.approx(expected, rel=REL)


def test_mlkd_standardize_and_gradients() -> None:
    s, t = random_logits(n=5, c=4, seed=11)
    expected = mlkd64([standardize64(r) for r in s.tolist()], [standardize64(r) for r in t.tolist()], [2.0])
    s.requires_grad_(True), t.requires_grad_(True)
    value = loss("mlkd", temperatures=[2.0], standardize=True)(step(s, t))
    assert value.item() == pytest.approx(expected, rel=REL)
    value.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_mlkd_needs_a_temperature() -> None:
    with pytest.raises(kdforge.RecipeError):
        loss("mlkd", temperatures=[])


# -- mixed precision ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, params, reference", [
    ("dkd", {}, lambda s, t, y: dkd64(s, t, y, 1.0, 8.0, 4.0)),
    ("dist", {"temperature": 4.0}, lambda s, t, y: dist64(s, t, 1.0, 1.0, 4.0)),
    ("mlkd", {}, lambda s, t, y: mlkd64(s, t, [2.0, 3.0, 4.0, 5.0, 6.0])),
    ("kd", {"standardize": True, "temperature": 2.0},
     lambda s, t, y: kd64([standardize64(r) for r in s], [standardize64(r) for r in t], 2.0)),
    ("ctkd", {"init": 0.0}, lambda s, t, y: kd64(s, t, 11.0)),
])
def test_logit_losses_stay_float32_accurate_under_bf16_autocast(name, params, reference) -> None:
    s, t = (x.bfloat16() for x in random_logits(n=6, c=5, seed=12))
    y = [0, 1, 2, 3, 4, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(name, **params)(step(s, t, y))
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference(s.double().tolist(), t.double().tolist(), y), rel=REL)


# -- end to end -----------------------------------------------------------------------------------
def test_dkd_and_ctkd_train_on_digits(tmp_path: Path, digits_teacher: Path) -> None:
    from tests.conftest import base_recipe

    for name, params in (("dkd", {"temperature": 4.0}), ("ctkd", {})):
        recipe = base_recipe(
            tmp_path, name=f"test-{name}", data={"name": "digits", "params": {"labeled": 100}},
            teacher={"name": "checkpoint", "params": {"path": str(digits_teacher)}},
            student={"name": "small_cnn", "params": {"channels": [8, 16]}},
            losses=[{"name": "ce", "weight": 1.0}, {"name": name, "weight": 1.0, "params": params}],
            trainer={"epochs": 1, "batch_size": 64, "progress_bar": False},
            output_dir=str(tmp_path / name))
        summary = kdforge.run(recipe)
        assert summary["student/accuracy"] is not None
        if name == "ctkd":
            assert 1.0 <= summary["ctkd/temperature"] <= 21.0
            logged = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            temperatures = [r["train/ctkd/temperature"] for r in logged if "train/ctkd/temperature" in r]
            assert temperatures and all(1.0 <= t <= 21.0 for t in temperatures)  # logged at every interval
