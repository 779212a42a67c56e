"""vid, nst, ft (+ ft_paraphraser), ab, fsp and ofd: hand values, float64 references, gradients, errors, runs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import kdforge
from kdforge import ModelOutputs, StepOutputs
from kdforge.plugins.hint_losses import bn_margin, read_tap, tap_modules

REL = 1e-5


def step(student: dict, teacher: dict, n: int | None = None) -> StepOutputs:
    n = n or next(iter(student.values() or teacher.values())).shape[0]
    t = ModelOutputs(torch.zeros(n, 3), teacher)
    return StepOutputs(student=ModelOutputs(torch.zeros(n, 3, requires_grad=True), student), teacher=t, teachers=[t])


def randn(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def block_mean(x: np.ndarray, size: int) -> np.ndarray:
    """Adaptive average pooling of (N, C, H, W) to size x size when H, W are multiples of size."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


def conv1x1(x: np.ndarray, weight: torch.Tensor) -> np.ndarray:
    """A bias-free 1x1 convolution: out[n, o] = sum_c W[o, c] x[n, c]."""
    w = np64(weight)[:, :, 0, 0]
    out = np.zeros((x.shape[0], w.shape[0], *x.shape[2:]))
    for o in range(w.shape[0]):
        for c in range(w.shape[1]):
            out[:, o] += w[o, c] * x[:, c]
    return out


def batch_norm_train(x: np.ndarray, bn: torch.nn.BatchNorm2d) -> np.ndarray:
    """BatchNorm in training mode: batch mean and biased variance per channel."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + bn.eps) * np64(bn.weight)[None, :, None, None] + np64(bn.bias)[None, :, None, None]


def connector_np(x: np.ndarray, connector: torch.nn.Sequential) -> np.ndarray:
    return batch_norm_train(conv1x1(x, connector[0].weight), connector[1])


def assert_teacher_gets_no_gradient(loss: torch.nn.Module, sf: dict, tf: dict) -> None:
    tf = {k: v.clone().requires_grad_(True) for k, v in tf.items()}
    sf = {k: v.clone().detach().requires_grad_(True) for k, v in sf.items()}
    loss(step(sf, tf)).backward()
    assert all(v.grad is None for v in tf.values())
    assert any(v.grad is not None and v.grad.abs().sum() > 0 for v in sf.values())


def test_every_method_is_registered() -> None:
    names = {r.name for r in kdforge.list_plugins() if r.kind == "loss"}
    assert {"vid", "nst", "ft", "ft_paraphraser", "ab", "fsp", "ofd"} <= names


# -- tap sums -------------------------------------------------------------------------------
def test_a_tap_may_sum_modules() -> None:
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(read_tap({"x.bn2": a, "y": b}, "x.bn2 + y", "teacher"), a + b)
    assert tap_modules(["x.bn2 + y", "y", None, "z"]) == ["x.bn2", "y", "z"]
    loss = kdforge.create("loss", "ofd", student_taps=["s.bn + s.down"], teacher_taps=["t.bn2 + t.prev"])
    assert loss.student_taps == ["s.bn", "s.down"] and loss.teacher_taps == ["t.bn2", "t.prev"]
    assert loss.teacher_bns == ["t.bn2"]
    with pytest.raises(ValueError, match="different shapes"):
        read_tap({"x": a, "y": torch.ones(2, 4)}, "x + y", "teacher")
    with pytest.raises(ValueError, match="no teacher feature 'q'"):
        read_tap({"x": a}, "x + q", "teacher")
    with pytest.raises(kdforge.RecipeError, match="empty term"):
        kdforge.create("loss", "nst", student_taps=["a +"], teacher_taps=["b"])


@pytest.mark.parametrize("name", ["vid", "nst", "ab", "ofd"])
def test_taps_pair_up(name: str) -> None:
    with pytest.raises(kdforge.RecipeError, match="same length"):
        kdforge.create("loss", name, student_taps=["a", "b"], teacher_taps=["x"])
    with pytest.raises(kdforge.RecipeError, match="pair_weights"):
        kdforge.create("loss", name, student_taps=["a"], teacher_taps=["x"], pair_weights=[1.0, 2.0])


# -- vid ------------------------------------------------------------------------------------
def vid_reference(loss, fs: torch.Tensor, ft: torch.Tensor, i: int = 0) -> float:
    regressor, raw = loss.regressors[i], loss.raw_scales[i]
    mu = np.maximum(conv1x1(np64(fs), regressor[0].weight), 0)
    mu = np.maximum(conv1x1(mu, regressor[2].weight), 0)
    mu = conv1x1(mu, regressor[4].weight)
    t = np64(ft)
    total = 0.0
    for c in range(t.shape[1]):
        var = math.log1p(math.exp(float(raw[c].detach()))) + loss.eps
        total += (0.5 * ((t[:, c] - mu[:, c]) ** 2 / var + math.log(var))).sum()
    return total / t.size


def test_vid_by_hand_with_a_zero_regressor() -> None:
    loss = kdforge.create("loss", "vid", student_taps=["s"], teacher_taps=["t"])
    fs, ft = randn(2, 3, 2, 2, seed=1), torch.ones(2, 4, 2, 2)
    loss(step({"s": fs}, {"t": ft}))
    torch.nn.init.zeros_(loss.regressors[0][4].weight)
    # mu = 0, var = 5 (init_pred_var): 0.5 * (1 / 5 + ln 5) at every entry
    assert loss(step({"s": fs}, {"t": ft})).item() == pytest.approx(0.5 * (0.2 + math.log(5.0)), rel=REL)


def test_vid_matches_a_float64_reference() -> None:
    loss = kdforge.create("loss", "vid", student_taps=["a", "b"], teacher_taps=["x", "y"], pair_weights=[0.5, 2.0],
                          mid_channels=6, init_pred_var=2.0)
    fa, fb = randn(3, 4, 4, 4, seed=2), randn(3, 5, 2, 2, seed=3)
    fx, fy = randn(3, 7, 4, 4, seed=4), randn(3, 2, 2, 2, seed=5)
    value = loss(step({"a": fa, "b": fb}, {"x": fx, "y": fy}))
    with torch.no_grad():
        loss.raw_scales[1].copy_(randn(2, seed=6))
    value = loss(step({"a": fa, "b": fb}, {"x": fx, "y": fy}))
    expected = 0.5 * vid_reference(loss, fa, fx, 0) + 2.0 * vid_reference(loss, fb, fy, 1)
    assert value.item() == pytest.approx(expected, rel=REL)
    assert loss.regressors[0][0].out_channels == 6 and loss.regressors[0][4].out_channels == 7


def test_vid_pools_the_larger_map_and_builds_trainable_regressors() -> None:
    loss = kdforge.create("loss", "vid", student_taps=["s"], teacher_taps=["t"])
    assert not list(loss.parameters())  # built on the first call
    fs, ft = randn(2, 3, 4, 4, seed=7), randn(2, 5, 2, 2, seed=8)
    value = loss(step({"s": fs}, {"t": ft}))
    pooled = torch.nn.functional.avg_pool2d(fs, 2)
    assert value.item() == pytest.approx(vid_reference(loss, pooled, ft), rel=REL)
    value.backward()
    assert all(p.requires_grad and p.grad is not None for p in loss.parameters())
    # init: var starts at init_pred_var
    assert (torch.nn.functional.softplus(loss.raw_scales[0]) + loss.eps).tolist() == pytest.approx([5.0] * 5, rel=1e-6)
    assert_teacher_gets_no_gradient(loss, {"s": fs}, {"t": ft})


def test_vid_params_and_shape_errors() -> None:
    with pytest.raises(kdforge.RecipeError, match="larger than eps"):
        kdforge.create("loss", "vid", student_taps=["s"], teacher_taps=["t"], init_pred_var=1e-6)
    loss = kdforge.create("loss", "vid", student_taps=["s"], teacher_taps=["t"])
    with pytest.raises(ValueError, match=r"student tap 's' has shape \(2, 3, 4\)"):
        loss(step({"s": torch.zeros(2, 3, 4)}, {"t": torch.zeros(2, 3, 4, 4)}))
    loss(step({"s": torch.zeros(2, 3, 4, 4)}, {"t": torch.zeros(2, 5, 4, 4)}))
    with pytest.raises(ValueError, match=r"built for 3 -> 5 channels.*'s' \(2, 6, 4, 4\)"):
        loss(step({"s": torch.zeros(2, 6, 4, 4)}, {"t": torch.zeros(2, 5, 4, 4)}))
    no_pool = kdforge.create("loss", "vid", student_taps=["s"], teacher_taps=["t"], pool=False)
    with pytest.raises(ValueError, match="spatial sizes differ"):
        no_pool(step({"s": torch.zeros(2, 3, 4, 4)}, {"t": torch.zeros(2, 5, 2, 2)}))


# -- nst ------------------------------------------------------------------------------------
def nst_reference(fs: torch.Tensor, ft: torch.Tensor, degree: int = 2, c: float = 0.0) -> float:
    s, t = np64(fs).reshape(*fs.shape[:2], -1), np64(ft).reshape(*ft.shape[:2], -1)
    s = s / np.linalg.norm(s, axis=2, keepdims=True)
    t = t / np.linalg.norm(t, axis=2, keepdims=True)
    total = 0.0
    for n in range(s.shape[0]):
        k = lambda a, b: np.mean([(float(x @ y) + c) ** degree for x in a for y in b])  # noqa: E731
        total += k(t[n], t[n]) + k(s[n], s[n]) - 2 * k(s[n], t[n])
    return total / s.shape[0]


def test_nst_by_hand() -> None:
    loss = kdforge.create("loss", "nst", student_taps=["s"], teacher_taps=["t"])
    # one channel each, orthogonal unit maps: k(s,s) = k(t,t) = 1, k(s,t) = 0 -> MMD^2 = 2
    s, t = torch.tensor([[[[3.0, 0.0]]]]), torch.tensor([[[[0.0, 0.5]]]])
    assert loss(step({"s": s}, {"t": t})).item() == pytest.approx(2.0, rel=REL)
    # the same channels (any scale, any order): 0
    fs = randn(2, 3, 2, 2, seed=9)
    assert loss(step({"s": fs}, {"t": 4 * fs[:, [2, 0, 1]]})).item() == pytest.approx(0.0, abs=1e-6)


def test_nst_matches_a_float64_reference() -> None:
    loss = kdforge.create("loss", "nst", student_taps=["a", "b"], teacher_taps=["x", "y"], pair_weights=[1.0, 0.25])
    fa, fb, fx, fy = randn(3, 4, 4, 4, seed=10), randn(3, 2, 2, 2, seed=11), randn(3, 6, 2, 2, seed=12), randn(3, 5, 2, 2, seed=13)
    expected = nst_reference(torch.nn.functional.avg_pool2d(fa, 2), fx) + 0.25 * nst_reference(fb, fy)
    assert loss(step({"a": fa, "b": fb}, {"x": fx, "y": fy})).item() == pytest.approx(expected, rel=REL)
    cubic = kdforge.create("loss", "nst", student_taps=["b"], teacher_taps=["y"], degree=3, constant=0.5)
    assert cubic(step({"b": fb}, {"y": fy})).item() == pytest.approx(nst_reference(fb, fy, 3, 0.5), rel=REL)
    assert_teacher_gets_no_gradient(loss, {"a": fa, "b": fb}, {"x": fx, "y": fy})


# -- ab -------------------------------------------------------------------------------------
def ab_reference(r: np.ndarray, t: np.ndarray, margin: float) -> float:
    # RepDistiller's form of the same hinge: (r + m)^2 [r > -m, t <= 0] + (r - m)^2 [r <= m, t > 0]
    total = 0.0
    for rv, tv in zip(r.ravel(), t.ravel()):
        if tv <= 0 and rv > -margin:
            total += (rv + margin) ** 2
        elif tv > 0 and rv <= margin:
            total += (rv - margin) ** 2
    return total / r.shape[0]


def test_ab_by_hand() -> None:
    from kdforge.plugins.hint_losses import boundary_hinge

    r = torch.tensor([[2.0, 0.5, -2.0, 0.5]])
    t = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    # active & r >= m: 0; active & r = 0.5: (1 - 0.5)^2; inactive & r <= -m: 0; inactive & r = 0.5: (1 + 0.5)^2
    assert boundary_hinge(r, t, 1.0).item() == pytest.approx(0.25 + 2.25, rel=REL)


def test_ab_matches_a_float64_reference_with_its_connectors() -> None:
    loss = kdforge.create("loss", "ab", student_taps=["a", "b"], teacher_taps=["x", "y"], margin=0.7)
    assert loss.pair_weights == [0.5, 1.0]  # RepDistiller's 2^(i - n + 1)
    fa, fb, fx, fy = randn(4, 3, 4, 4, seed=14), randn(4, 2, 2, 2, seed=15), randn(4, 5, 4, 4, seed=16), randn(4, 6, 2, 2, seed=17)
    value = loss(step({"a": fa, "b": fb}, {"x": fx, "y": fy}))
    ra, rb = connector_np(np64(fa), loss.connectors[0]), connector_np(np64(fb), loss.connectors[1])
    expected = 0.5 * ab_reference(ra, np64(fx), 0.7) + ab_reference(rb, np64(fy), 0.7)
    assert value.item() == pytest.approx(expected, rel=REL)
    value.backward()
    assert all(p.grad is not None for p in loss.connectors.parameters())
    assert_teacher_gets_no_gradient(loss, {"a": fa, "b": fb}, {"x": fx, "y": fy})


# -- fsp ------------------------------------------------------------------------------------
def fsp_reference(maps: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for first, second in zip(maps, maps[1:]):
        size = min(first.shape[2], second.shape[2])
        first = block_mean(first, size) if first.shape[2] > size else first
        second = block_mean(second, size) if second.shape[2] > size else second
        n, c1, h, w = first.shape
        g = np.zeros((n, c1, second.shape[1]))
        for i in range(c1):
            for j in range(second.shape[1]):
                g[:, i, j] = (first[:, i] * second[:, j]).sum(axis=(1, 2)) / (h * w)
        out.append(g)
    return out


def test_fsp_by_hand() -> None:
    from kdforge.plugins.hint_losses import fsp_matrix

    a = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])   # 2 channels over 2 positions
    b = torch.tensor([[[[3.0, 1.0]]]])                 # 1 channel
    # G = [[(1*3 + 2*1)/2], [(0*3 + 1*1)/2]] = [[2.5], [0.5]]
    assert fsp_matrix(a, b).tolist() == [[[2.5], [0.5]]]


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_fsp_matches_a_float64_reference(mode: str) -> None:
    loss = kdforge.create("loss", "fsp", student_taps=["a", "b", "c"], teacher_taps=["x", "y", "z"],
                          pair_weights=[1.0, 3.0], mode=mode)
    s = [randn(3, 2, 4, 4, seed=18), randn(3, 3, 2, 2, seed=19), randn(3, 4, 1, 1, seed=20)]
    t = [randn(3, 2, 4, 4, seed=21), randn(3, 3, 2, 2, seed=22), randn(3, 4, 1, 1, seed=23)]
    value = loss(step(dict(zip("abc", s)), dict(zip("xyz", t))))
    gs, gt = fsp_reference([np64(x) for x in s]), fsp_reference([np64(x) for x in t])
    reduce = (lambda d: d.mean()) if mode == "code" else (lambda d: d.reshape(len(d), -1).sum(1).mean())
    expected = reduce((gs[0] - gt[0]) ** 2) + 3.0 * reduce((gs[1] - gt[1]) ** 2)
    assert value.item() == pytest.approx(expected, rel=REL)
    assert_teacher_gets_no_gradient(loss, dict(zip("abc", s)), dict(zip("xyz", t)))


def test_fsp_channels_must_match_unless_connected() -> None:
    s = {"a": randn(2, 2, 4, 4, seed=24), "b": randn(2, 3, 2, 2, seed=25)}
    t = {"x": randn(2, 4, 4, 4, seed=26), "y": randn(2, 6, 2, 2, seed=27)}
    plain = kdforge.create("loss", "fsp", student_taps=["a", "b"], teacher_taps=["x", "y"])
    with pytest.raises(ValueError, match=r"student 'a' \(2, 2, 4, 4\) vs teacher 'x' \(2, 4, 4, 4\).*connectors: true"):
        plain(step(s, t))
    connected = kdforge.create("loss", "fsp", student_taps=["a", "b"], teacher_taps=["x", "y"], connectors=True)
    value = connected(step(s, t))
    ca, cb = connector_np(np64(s["a"]), connected.connectors[0]), connector_np(np64(s["b"]), connected.connectors[1])
    gs, gt = fsp_reference([ca, cb]), fsp_reference([np64(t["x"]), np64(t["y"])])
    assert value.item() == pytest.approx(((gs[0] - gt[0]) ** 2).mean(), rel=REL)
    value.backward()
    assert all(p.grad is not None for p in connected.parameters())
    with pytest.raises(kdforge.RecipeError, match="one weight per consecutive tap pair"):
        kdforge.create("loss", "fsp", student_taps=["a", "b"], teacher_taps=["x", "y"], pair_weights=[1.0, 1.0])
    with pytest.raises(kdforge.RecipeError, match="at least 2"):
        kdforge.create("loss", "fsp", student_taps=["a"], teacher_taps=["x"])


# -- ofd ------------------------------------------------------------------------------------
def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def margin_reference(gamma: float, beta: float) -> float:
    s = abs(gamma)
    if normal_cdf(-beta / s) > 0.001:
        return -s * math.exp(-((beta / s) ** 2) / 2) / math.sqrt(2 * math.pi) / normal_cdf(-beta / s) + beta
    return -3 * s


def ofd_reference(r: np.ndarray, t: np.ndarray, margins: list[float]) -> float:
    # mdistiller's three-case form of the partial L2 with target max(t, m)
    total = 0.0
    for c, m in enumerate(margins):
        for rv, tv in zip(r[:, c].ravel(), t[:, c].ravel()):
            if tv <= m and rv > m:
                total += (rv - m) ** 2
            elif m < tv <= 0 and rv > tv:
                total += (rv - tv) ** 2
            elif tv > 0:
                total += (rv - tv) ** 2
    return total / r.shape[0]


def test_ofd_margin_is_the_expectation_of_the_negative_part() -> None:
    gamma, beta = torch.tensor([1.0, 2.0, -0.5, 0.1]), torch.tensor([0.0, -1.0, 0.3, 1.0])
    margins = bn_margin(gamma, beta)
    expected = [margin_reference(float(g), float(b)) for g, b in zip(gamma, beta)]
    assert margins.tolist() == pytest.approx(expected, rel=REL)
    # N(0, 1): E[x | x < 0] = -sqrt(2 / pi); almost never negative (mu = 10 sigma): -3 sigma
    assert margins[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=REL)
    assert margins[3].item() == pytest.approx(-0.3, rel=REL)
    # by Monte Carlo too
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0 - 1.0
    assert margins[1].item() == pytest.approx(x[x < 0].mean().item(), abs=5e-3)


class TinyTeacher(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([1.0, 0.5, 2.0]))
            self.bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def test_ofd_matches_a_float64_reference_with_bn_margins() -> None:
    loss = kdforge.create("loss", "ofd", student_taps=["s"], teacher_taps=["bn"])
    assert loss.teacher_bns == ["bn"] and loss.pair_weights == [1.0]
    teacher = TinyTeacher()
    loss.set_margins(teacher)
    fs, ft = randn(4, 2, 2, 2, seed=28), randn(4, 3, 2, 2, seed=29)
    value = loss(step({"s": fs}, {"bn": ft}))
    margins = [margin_reference(float(g), float(b)) for g, b in zip(teacher.bn.weight.detach(), teacher.bn.bias.detach())]
    expected = ofd_reference(connector_np(np64(fs), loss.connectors[0]), np64(ft), margins)
    assert value.item() == pytest.approx(expected, rel=REL)
    value.backward()
    assert all(p.grad is not None for p in loss.connectors.parameters())
    assert_teacher_gets_no_gradient(loss, {"s": fs}, {"bn": ft})


def test_ofd_pairs_weigh_half_per_level_and_margins_default_to_batch_statistics() -> None:
    from kdforge.plugins.hint_losses import batch_margin

    loss = kdforge.create("loss", "ofd", student_taps=["a", "b"], teacher_taps=["x", "y"])
    assert loss.pair_weights == [0.5, 1.0]
    fa, fb, fx, fy = randn(4, 2, 4, 4, seed=30), randn(4, 2, 2, 2, seed=31), randn(4, 3, 4, 4, seed=32), randn(4, 3, 2, 2, seed=33)
    value = loss(step({"a": fa, "b": fb}, {"x": fx, "y": fy}))  # before set_margins: from the batch
    ma, mb = batch_margin(fx).tolist(), batch_margin(fy).tolist()
    x = np64(fx).transpose(1, 0, 2, 3).reshape(3, -1)
    assert ma == pytest.approx([margin_reference(float(v.std()), float(v.mean())) for v in x], rel=REL)
    expected = (0.5 * ofd_reference(connector_np(np64(fa), loss.connectors[0]), np64(fx), ma)
                + ofd_reference(connector_np(np64(fb), loss.connectors[1]), np64(fy), mb))
    assert value.item() == pytest.approx(expected, rel=REL)


def test_ofd_teacher_bns_must_be_batchnorms() -> None:
    loss = kdforge.create("loss", "ofd", student_taps=["s"], teacher_taps=["conv"])
    with pytest.raises(kdforge.RecipeError, match="'conv' is a Conv2d, not an affine BatchNorm"):
        loss.set_margins(TinyTeacher())
    named = kdforge.create("loss", "ofd", student_taps=["s"], teacher_taps=["conv"], teacher_bns=["bn"])
    named.set_margins(TinyTeacher())
    with pytest.raises(kdforge.RecipeError, match="no module 'nope'"):
        kdforge.create("loss", "ofd", student_taps=["s"], teacher_taps=["t"], teacher_bns=["nope"]).set_margins(TinyTeacher())
    with pytest.raises(kdforge.RecipeError, match="one BatchNorm per teacher tap"):
        kdforge.create("loss", "ofd", student_taps=["s"], teacher_taps=["t"], teacher_bns=["a", "b"])
    with pytest.raises(ValueError, match=r"'bn' has 3 channels, teacher tap 'conv' has shape \(2, 5, 2, 2\)"):
        named(step({"s": torch.zeros(2, 2, 2, 2)}, {"conv": torch.zeros(2, 5, 2, 2)}))


# -- ft ---------------------------------------------------------------------------------------
def factor_reference(fs: np.ndarray, ft: np.ndarray, p: int, mode: str) -> float:
    if mode == "paper":
        total = 0.0
        for a, b in zip(fs.reshape(len(fs), -1), ft.reshape(len(ft), -1)):
            d = a / np.linalg.norm(a) - b / np.linalg.norm(b)
            total += (np.abs(d) ** p).sum() ** (1.0 / p)
        return total / len(fs)
    a, b = (fs ** 2).mean(1).reshape(len(fs), -1), (ft ** 2).mean(1).reshape(len(ft), -1)
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((np.abs(a - b) ** p).mean())


@pytest.mark.parametrize("mode", ["paper", "code"])
@pytest.mark.parametrize("p", [1, 2])
def test_factor_distance_matches_a_float64_reference(mode: str, p: int) -> None:
    from kdforge.plugins.hint_losses import factor_distance

    fs, ft = randn(3, 4, 2, 2, seed=34), randn(3, 4, 2, 2, seed=35)
    assert factor_distance(fs, ft, p, mode).item() == pytest.approx(factor_reference(np64(fs), np64(ft), p, mode), rel=REL)
    # by hand: unit vectors e1 and e2 of a 1-channel 2-position factor
    e1, e2 = torch.tensor([[[[2.0, 0.0]]]]), torch.tensor([[[[0.0, 3.0]]]])
    assert factor_distance(e1, e2, p, "paper").item() == pytest.approx(2.0 ** (1.0 / p), rel=REL)


def train_paraphraser(run_dir: Path, ft: torch.Tensor, tap: str = "t") -> torch.nn.Module:
    stage1 = kdforge.create("loss", "ft_paraphraser", teacher_tap=tap, rate=0.5)
    assert stage1.student_taps == [] and stage1.teacher_taps == [tap]
    value = stage1(step({}, {tap: ft}, n=len(ft)))
    value.backward()
    assert all(p.grad is not None for p in stage1.parameters())
    _, rec = stage1.paraphraser(ft)
    assert value.item() == pytest.approx(((np64(rec) - np64(ft)) ** 2).mean(), rel=REL)
    stage1.export(None, run_dir)
    return stage1.paraphraser


def test_ft_two_stages_through_the_run_directory(tmp_path: Path) -> None:
    ft_map, fs = randn(3, 4, 2, 2, seed=36), randn(3, 3, 4, 4, seed=37, grad=True)
    paraphraser = train_paraphraser(tmp_path, ft_map)
    config = json.loads((tmp_path / "ft_paraphraser.json").read_text())
    assert config == {"teacher_tap": "t", "channels": 4, "rate": 0.5, "batch_norm": False}
    loss = kdforge.create("loss", "ft", student_tap="s", teacher_tap="t", paraphraser=str(tmp_path))
    value = loss(step({"s": fs}, {"t": ft_map}))
    assert loss.paraphraser_loaded
    for a, b in zip(loss.paraphraser.state_dict().values(), paraphraser.state_dict().values()):
        assert torch.equal(a, b)
    factor_t = paraphraser.encoder(ft_map)
    factor_s = torch.nn.functional.avg_pool2d(loss.translator(fs), 2)
    assert value.item() == pytest.approx(factor_reference(np64(factor_s), np64(factor_t), 1, "paper"), rel=REL)
    value.backward()
    # the translator trains, the paraphraser is frozen and stays in eval mode
    assert all(p.grad is not None for p in loss.translator.parameters())
    assert all(not p.requires_grad and p.grad is None for p in loss.paraphraser.parameters())
    loss.train()
    assert loss.translator.training and not loss.paraphraser.training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss(step({"s": fs.bfloat16()}, {"t": ft_map.bfloat16()})).dtype == torch.float32
    assert_teacher_gets_no_gradient(loss, {"s": fs.detach()}, {"t": ft_map})


def test_ft_refuses_a_missing_or_mismatched_paraphraser(tmp_path: Path) -> None:
    ft_map = randn(2, 4, 2, 2, seed=38)
    missing = kdforge.create("loss", "ft", student_tap="s", teacher_tap="t", paraphraser=str(tmp_path / "none"))
    missing(step({"s": randn(2, 3, 2, 2, seed=39)}, {"t": ft_map}))  # the dry run builds a stand-in
    with pytest.raises(kdforge.RecipeError, match="no paraphraser in .*run the stage-1 recipe"):
        missing.on_fit_start(None)
    train_paraphraser(tmp_path, ft_map, tap="other")
    wrong_tap = kdforge.create("loss", "ft", student_tap="s", teacher_tap="t", paraphraser=str(tmp_path))
    with pytest.raises(kdforge.RecipeError, match="trained on teacher tap 'other'"):
        wrong_tap(step({"s": randn(2, 3, 2, 2, seed=40)}, {"t": ft_map}))
    with pytest.raises(ValueError, match=r"ft needs \(N, C, H, W\) maps"):
        missing(step({"s": torch.zeros(2, 3)}, {"t": ft_map}))


# -- all of them: float32 math under bf16 autocast ------------------------------------------------
CASES = [
    ("vid", {"student_taps": ["s"], "teacher_taps": ["t"]}),
    ("nst", {"student_taps": ["s"], "teacher_taps": ["t"]}),
    ("ab", {"student_taps": ["s"], "teacher_taps": ["t"]}),
    ("ofd", {"student_taps": ["s"], "teacher_taps": ["t"]}),
    ("fsp", {"student_taps": ["s", "s2"], "teacher_taps": ["t", "t2"], "connectors": True}),
]


@pytest.mark.parametrize("name,params", CASES, ids=[c[0] for c in CASES])
def test_bf16_autocast_keeps_the_math_float32(name: str, params: dict) -> None:
    loss = kdforge.create("loss", name, **params)
    sf = {"s": randn(4, 3, 4, 4, seed=41).bfloat16(), "s2": randn(4, 3, 2, 2, seed=42).bfloat16()}
    tf = {"t": randn(4, 5, 4, 4, seed=43).bfloat16(), "t2": randn(4, 2, 2, 2, seed=44).bfloat16()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(step(sf, tf))
    assert value.dtype == torch.float32
    # the same (now built) modules without autocast, on the same bf16-valued inputs in float32
    plain = copy.deepcopy(loss)
    full = plain(step({k: v.float() for k, v in sf.items()}, {k: v.float() for k, v in tf.items()}))
    # convolutions in connectors run in bf16 under autocast (rel. error ~1e-2); the loss math does not
    assert value.item() == pytest.approx(full.item(), rel=3e-2)


def test_parameter_free_losses_are_exact_under_bf16_autocast() -> None:
    fs, ft = randn(3, 4, 2, 2, seed=45).bfloat16(), randn(3, 6, 2, 2, seed=46).bfloat16()
    for name, params in [("nst", {"student_taps": ["s"], "teacher_taps": ["t"]}),
                         ("fsp", {"student_taps": ["s", "s"], "teacher_taps": ["t", "t"], "connectors": False})]:
        if name == "fsp":
            ft = randn(3, 4, 2, 2, seed=47).bfloat16()
        loss = kdforge.create("loss", name, **params)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(step({"s": fs}, {"t": ft}))
        full = loss(step({"s": fs.float()}, {"t": ft.float()}))
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(full.item(), rel=1e-6)


# -- end to end on digits -----------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def zoo_recipe(name: str, tmp_path: Path, teacher: Path, epochs: int = 1, **params) -> dict:
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "digits" / "zoo" / f"{name}.yaml").read_text())
    recipe["teacher"]["params"]["path"] = str(teacher)
    recipe["data"]["params"]["drop_unlabeled"] = True  # the 100 labeled digits: 2 steps an epoch
    recipe["trainer"].update(epochs=epochs, progress_bar=False)
    recipe["output_dir"] = str(tmp_path / name)
    for key, value in params.items():
        recipe["losses"][-1]["params"][key] = value
    return recipe


@pytest.mark.slow
def test_ft_recipes_train_in_two_stages(tmp_path: Path, digits_teacher: Path) -> None:
    stage1 = kdforge.run(zoo_recipe("ft-stage1", tmp_path, digits_teacher))
    assert (tmp_path / "ft-stage1" / "ft_paraphraser.safetensors").is_file()
    assert stage1["epochs"] == 1
    summary = kdforge.run(zoo_recipe("ft", tmp_path, digits_teacher, paraphraser=str(tmp_path / "ft-stage1")))
    assert summary["student/accuracy"] is not None and summary["epochs"] == 1


@pytest.mark.slow
def test_ofd_recipe_trains_with_the_teachers_bn_margins(tmp_path: Path, digits_teacher: Path) -> None:
    summary = kdforge.run(zoo_recipe("ofd", tmp_path, digits_teacher))
    assert summary["student/accuracy"] is not None
    teacher = kdforge.load_student(digits_teacher)
    loss = kdforge.create("loss", "ofd", student_taps=["features.0.1", "features.1.1"],
                          teacher_taps=["features.0.1", "features.1.1"])
    loss.set_margins(teacher)
    bn = teacher.get_submodule("features.1.1")
    assert loss.bn_margins[1].tolist() == pytest.approx(
        [margin_reference(float(g), float(b)) for g, b in zip(bn.weight.detach(), bn.bias.detach())], rel=REL)
