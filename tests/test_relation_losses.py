"""pkt, sp and cc against hand-computed values and independent float64 re-implementations
(plain loops over sample pairs) of the papers' formulas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import kdforge
from kdforge import ModelOutputs, StepOutputs

REL = 1e-5


def step(student_feats: dict, teacher_feats: dict, s_logits=None, t_logits=None) -> StepOutputs:
    n = next(iter(student_feats.values())).shape[0] if student_feats else (s_logits.shape[0] if s_logits is not None else 1)
    s_logits = s_logits if s_logits is not None else torch.zeros(n, 3)
    t_logits = t_logits if t_logits is not None else torch.zeros(n, 3)
    teacher = ModelOutputs(t_logits, teacher_feats)
    return StepOutputs(student=ModelOutputs(s_logits, student_feats), teacher=teacher, teachers=[teacher])


def loss(name: str, **params):
    return kdforge.create("loss", name, **params)


def rows64(x) -> list[np.ndarray]:
    return [np.asarray(r, dtype=np.float64).ravel() for r in (x.tolist() if isinstance(x, torch.Tensor) else x)]


# -- float64 references ------------------------------------------------------------------------
def pkt64(student, teacher, eps: float = 1e-7) -> float:
    """Passalis & Tefas: p(j|i) from the kernel (cos + 1)/2, KL(p_t || p_s) averaged over the n^2 entries."""
    def conditional(rows):
        n = len(rows)
        k = [[(float(rows[i] @ rows[j]) / ((np.linalg.norm(rows[i]) + eps) * (np.linalg.norm(rows[j]) + eps)) + 1) / 2
              for j in range(n)] for i in range(n)]
        return [[k[i][j] / sum(k[i]) for j in range(n)] for i in range(n)]

    p_s, p_t = conditional(rows64(student)), conditional(rows64(teacher))
    n = len(p_s)
    return sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def sp64(student, teacher) -> float:
    """Tung & Mori: G = F F^T, rows L2-normalized, ||G_s - G_t||_F^2 / b^2."""
    def gram(rows):
        g = [[float(a @ b) for b in rows] for a in rows]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    g_s, g_t = gram(rows64(student)), gram(rows64(teacher))
    n = len(g_s)
    return sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def cc64(student, teacher, gamma: float, order: int, normalize: bool = True) -> float:
    """Peng et al.: Taylor series of exp(-gamma ||x - y||^2) on unit embeddings, ||K_s - K_t||_F^2 / n^2."""
    def kernel(rows):
        if normalize:
            rows = [r / np.linalg.norm(r) for r in rows]
        return [[math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * float(a @ b) ** p
                                            for p in range(order + 1)) for b in rows] for a in rows]

    k_s, k_t = kernel(rows64(student)), kernel(rows64(teacher))
    n = len(k_s)
    return sum((k_s[i][j] - k_t[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


E1, E2 = [1.0, 0.0], [0.0, 1.0]


def test_every_relation_loss_is_registered() -> None:
    names = {p.name for p in kdforge.list_plugins() if p.kind == "loss"}
    assert {"pkt", "sp", "cc"} <= names


# -- pkt ---------------------------------------------------------------------------------------
def test_pkt_by_hand() -> None:
    # student rows e1, e2 (cos 0): kernel [[1, .5], [.5, 1]] -> rows [2/3, 1/3]; teacher e1, e1: rows [1/2, 1/2].
    # Each row's KL is (ln(3/4) + ln(3/2)) / 2 = ln(1.125) / 2; the mean over 4 entries is ln(1.125) / 4.
    value = loss("pkt")(step({}, {}, torch.tensor([E1, E2]), torch.tensor([E1, E1])))
    assert value.item() == pytest.approx(math.log(1.125) / 4, rel=1e-5)


def test_pkt_matches_the_formula_on_random_features() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 3, 2, 2), torch.randn(6, 10)
    pkt = loss("pkt", student_tap="emb", teacher_tap="pool")
    assert pkt.student_taps == ["emb"] and pkt.teacher_taps == ["pool"]
    assert pkt(step({"emb": s}, {"pool": t})).item() == pytest.approx(pkt64(s.flatten(1), t), rel=REL)


def test_pkt_defaults_to_the_logits_and_detaches_the_teacher() -> None:
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4, requires_grad=True)
    pkt = loss("pkt")
    assert pkt.student_taps == [] and pkt.teacher_taps == []
    value = pkt(step({}, {}, s, t))
    assert value.item() == pytest.approx(pkt64(s.detach(), t.detach()), rel=REL)
    value.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


# -- sp ----------------------------------------------------------------------------------------
def test_sp_by_hand() -> None:
    # student e1, e2: G = I; teacher e1, e1: G = ones -> rows [1, 1] / sqrt 2.
    # ||diff||^2 = 2 (1 - 1/sqrt 2)^2 + 2 * (1/2); divided by b^2 = 4.
    expected = (2 * (1 - 1 / math.sqrt(2)) ** 2 + 1.0) / 4
    sp = loss("sp", student_taps=["s"], teacher_taps=["t"])
    value = sp(step({"s": torch.tensor([E1, E2])}, {"t": torch.tensor([E1, E1])}))
    assert value.item() == pytest.approx(expected, rel=REL)
    assert value.item() == pytest.approx(0.2928932, rel=1e-6)


def test_sp_matches_the_formula_on_random_maps_with_pair_weights() -> None:
    torch.manual_seed(1)
    s1, t1 = torch.randn(5, 4, 3, 3), torch.randn(5, 8, 2, 2)
    s2, t2 = torch.randn(5, 6), torch.randn(5, 16, 1, 1)
    sp = loss("sp", student_taps=["a", "b"], teacher_taps=["x", "y"], pair_weights=[2.0, 0.5])
    expected = 2.0 * sp64(s1.flatten(1), t1.flatten(1)) + 0.5 * sp64(s2, t2.flatten(1))
    assert sp(step({"a": s1, "b": s2}, {"x": t1, "y": t2})).item() == pytest.approx(expected, rel=REL)


def test_sp_gradient_reaches_the_student_only() -> None:
    s = torch.randn(4, 3, 2, 2, requires_grad=True)
    t = torch.randn(4, 5, 2, 2, requires_grad=True)
    loss("sp", student_taps=["s"], teacher_taps=["t"])(step({"s": s}, {"t": t})).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_sp_taps_must_pair_up_and_be_captured() -> None:
    with pytest.raises(kdforge.RecipeError, match="same length"):
        loss("sp", student_taps=["a", "b"], teacher_taps=["x"])
    with pytest.raises(kdforge.RecipeError, match="pair_weights"):
        loss("sp", student_taps=["a"], teacher_taps=["x"], pair_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="no teacher feature 'x'"):
        loss("sp", student_taps=["a"], teacher_taps=["x"])(step({"a": torch.ones(2, 2)}, {"y": torch.ones(2, 2)}))


# -- cc ----------------------------------------------------------------------------------------
def test_cc_by_hand() -> None:
    # unit rows, gamma = 0.5, order 2: k(d) = e^-1 (1 + d + d^2 / 2). Student e1, e2 (d = 0 off the
    # diagonal), teacher e1, e1 (d = 1): the two off-diagonal entries differ by e^-1 (1 - 2.5).
    expected = 2 * (1.5 / math.e) ** 2 / 4
    cc = loss("cc", embed_dim=None, gamma=0.5, order=2)
    assert cc(step({}, {}, torch.tensor([E1, E2]), torch.tensor([E1, E1]))).item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("order, normalize", [(2, True), (3, False), (0, True)])
def test_cc_matches_the_formula_on_random_features(order: int, normalize: bool) -> None:
    torch.manual_seed(2)
    s, t = torch.randn(6, 5) * 0.5, torch.randn(6, 9) * 0.5
    cc = loss("cc", student_tap="s", teacher_tap="t", embed_dim=None, gamma=0.4, order=order, normalize=normalize)
    assert cc(step({"s": s}, {"t": t})).item() == pytest.approx(cc64(s, t, 0.4, order, normalize), rel=REL)


def test_cc_taylor_series_approaches_the_gaussian_kernel() -> None:
    from kdforge.plugins.relation_losses import taylor_rbf

    torch.manual_seed(3)
    e = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    exact = torch.exp(-0.4 * torch.cdist(e, e).pow(2))
    assert torch.allclose(taylor_rbf(e, 0.4, 8), exact, atol=1e-8)
    assert not torch.allclose(taylor_rbf(e, 0.4, 1), exact, atol=1e-3)


def test_cc_embeddings_student_trained_teacher_fixed() -> None:
    torch.manual_seed(4)
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 9, requires_grad=True)
    cc = loss("cc", student_tap="s", teacher_tap="t", embed_dim=3)
    value = cc(step({"s": s}, {"t": t}))
    assert (cc.embed_student.in_features, cc.embed_student.out_features) == (5, 3)
    assert (cc.embed_teacher.in_features, cc.embed_teacher.out_features) == (9, 3)
    with torch.no_grad():
        e_s, e_t = cc.embed_student(s), cc.embed_teacher(t)
    assert value.item() == pytest.approx(cc64(e_s, e_t, 0.4, 2), rel=REL)
    value.backward()
    assert s.grad.abs().sum() > 0 and cc.embed_student.weight.grad.abs().sum() > 0
    assert t.grad is None and cc.embed_teacher.weight.grad is None
    assert not cc.embed_teacher.weight.requires_grad

    learned = loss("cc", student_tap="s", teacher_tap="t", embed_dim=3, learn_teacher_embedding=True)
    learned(step({"s": s}, {"t": t})).backward()
    assert learned.embed_teacher.weight.grad.abs().sum() > 0 and t.grad is None


# -- mixed precision ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, params, reference", [
    ("pkt", {"student_tap": "s", "teacher_tap": "t"}, pkt64),
    ("sp", {"student_taps": ["s"], "teacher_taps": ["t"]}, sp64),
    ("cc", {"student_tap": "s", "teacher_tap": "t", "embed_dim": None}, lambda s, t: cc64(s, t, 0.4, 2)),
])
def test_relation_losses_stay_float32_accurate_under_bf16_autocast(name, params, reference) -> None:
    torch.manual_seed(5)
    s, t = torch.randn(6, 8).bfloat16(), torch.randn(6, 12).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(name, **params)(step({"s": s}, {"t": t}))
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference(s.double(), t.double()), rel=REL)


def test_cc_with_embeddings_runs_under_bf16_autocast() -> None:
    s, t = torch.randn(6, 8).bfloat16(), torch.randn(6, 12).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss("cc", student_tap="s", teacher_tap="t", embed_dim=4)(step({"s": s}, {"t": t}))
    assert value.dtype == torch.float32 and torch.isfinite(value)


# -- end to end -----------------------------------------------------------------------------------
def test_sp_and_cc_train_on_digits(tmp_path: Path, digits_teacher: Path) -> None:
    from tests.conftest import base_recipe

    terms = {"sp": {"student_taps": ["features.1"], "teacher_taps": ["features.1"]},
             "cc": {"student_tap": "pool", "teacher_tap": "pool", "embed_dim": 16}}
    for name, params in terms.items():
        recipe = base_recipe(
            tmp_path, name=f"test-{name}", data={"name": "digits", "params": {"labeled": 100}},
            teacher={"name": "checkpoint", "params": {"path": str(digits_teacher)}},
            student={"name": "small_cnn", "params": {"channels": [8, 16]}},
            losses=[{"name": "ce", "weight": 1.0}, {"name": name, "weight": 10.0, "params": params}],
            trainer={"epochs": 1, "batch_size": 64, "progress_bar": False},
            output_dir=str(tmp_path / name))
        assert kdforge.run(recipe)["student/accuracy"] is not None
