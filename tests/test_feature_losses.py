"""attention, relational and fitnet against hand-computed values on small tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import kdforge
from kdforge import ModelOutputs, StepOutputs


def step(student_feats: dict, teacher_feats: dict, s_logits=None, t_logits=None) -> StepOutputs:
    s_logits = s_logits if s_logits is not None else torch.zeros(1, 2)
    t_logits = t_logits if t_logits is not None else torch.zeros(1, 2)
    teacher = ModelOutputs(t_logits, teacher_feats)
    return StepOutputs(student=ModelOutputs(s_logits, student_feats), teacher=teacher, teachers=[teacher])


# -- attention -------------------------------------------------------------------------------
# student map: 2 channels over 2 positions, c0 = [1, 2], c1 = [3, 0]; teacher: 1 channel [0, 1].
FS = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
FT = torch.tensor([[[[0.0, 1.0]]]])
# x^2 per position: [1+9, 4+0] -> mean [5, 2] (sum [10, 4]); both normalize to [5, 2]/sqrt(29).
A_S = [5 / math.sqrt(29), 2 / math.sqrt(29)]
A_T = [0.0, 1.0]


def attention(**params):
    return kdforge.create("loss", "attention", student_taps=["s"], teacher_taps=["t"], **params)


def test_attention_code_mode_by_hand() -> None:
    expected = ((A_S[0] - A_T[0]) ** 2 + (A_S[1] - A_T[1]) ** 2) / 2
    assert attention()(step({"s": FS}, {"t": FT})).item() == pytest.approx(expected, rel=1e-6)


def test_attention_paper_mode_by_hand() -> None:
    expected = math.sqrt((A_S[0] - A_T[0]) ** 2 + (A_S[1] - A_T[1]) ** 2)
    assert attention(mode="paper")(step({"s": FS}, {"t": FT})).item() == pytest.approx(expected, rel=1e-6)


def test_attention_p_is_the_power() -> None:
    # p = 4: per position [1+81, 16+0] / 2 = [41, 8]
    norm = math.sqrt(41**2 + 8**2)
    expected = ((41 / norm) ** 2 + (8 / norm - 1) ** 2) / 2
    assert attention(p=4)(step({"s": FS}, {"t": FT})).item() == pytest.approx(expected, rel=1e-6)


def test_attention_pairs_weights_and_batch_mean() -> None:
    loss = kdforge.create("loss", "attention", student_taps=["a", "b"], teacher_taps=["x", "y"],
                          pair_weights=[2.0, 0.5], mode="paper")
    other_s = torch.tensor([[[[0.0, 3.0]]]])
    other_t = torch.tensor([[[[4.0, 0.0]]]])
    # batch of two samples for pair (a, x): FS vs FT, and a sample with identical maps (loss 0)
    pair1 = math.sqrt((A_S[0] - A_T[0]) ** 2 + (A_S[1] - A_T[1]) ** 2)
    batch_s, batch_t = torch.cat([FS, FS]), torch.cat([FT, FS[:, :1] * 0 + FS.pow(2).mean(1, keepdim=True).sqrt()])
    expected = 2.0 * (pair1 + 0.0) / 2 + 0.5 * math.sqrt(2.0)  # pair 2: [0, 1] vs [1, 0]
    value = loss(step({"a": batch_s, "b": torch.cat([other_s, other_s])},
                      {"x": batch_t, "y": torch.cat([other_t, other_t])}, torch.zeros(2, 2), torch.zeros(2, 2)))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_attention_pools_the_larger_map() -> None:
    big = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    small = torch.nn.functional.avg_pool2d(big, 2)
    # pooled student equals the teacher map: loss 0; without pooling: a clear error
    assert attention()(step({"s": big}, {"t": small})).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="spatial sizes differ"):
        attention(pool=False)(step({"s": big}, {"t": small}))


def test_attention_taps_must_pair_up() -> None:
    with pytest.raises(kdforge.RecipeError, match="same length"):
        kdforge.create("loss", "attention", student_taps=["a", "b"], teacher_taps=["x"])


# -- relational ------------------------------------------------------------------------------
def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_by_hand(s: list[list[float]], t: list[list[float]], wd: float, wa: float) -> float:
    n = len(s)

    def dist(e):
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        positive = [v for row in d for v in row if v > 0]
        mean = sum(positive) / len(positive)
        return [[v / mean for v in row] for row in d]

    def angles(e):
        out = []
        for j, i, k in itertools.product(range(n), repeat=3):
            u = [a - b for a, b in zip(e[i], e[j])]
            v = [a - b for a, b in zip(e[k], e[j])]
            nu, nv = math.hypot(*u), math.hypot(*v)
            out.append(0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v)) / (nu * nv))
        return out

    ds, dt = dist(s), dist(t)
    d_term = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / (n * n)
    a_term = sum(smooth_l1(a - b) for a, b in zip(angles(s), angles(t))) / n**3
    return wd * d_term + wa * a_term


S_PTS = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
T_PTS = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]


def test_relational_distance_term_on_a_3_4_5_triangle() -> None:
    # student distances 3, 4, 5 (mean 4) -> 0.75, 1, 1.25; teacher 1, 1, sqrt2 (mean (2+sqrt2)/3)
    m = (2 + math.sqrt(2)) / 3
    diffs = [0.75 - 1 / m, 1 - 1 / m, 1.25 - math.sqrt(2) / m]
    expected = 25 * 2 * sum(0.5 * d * d for d in diffs) / 9
    loss = kdforge.create("loss", "relational", angle_weight=0)
    value = loss(step({}, {}, torch.tensor(S_PTS), torch.tensor(T_PTS)))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert value.item() == pytest.approx(0.0870317, rel=1e-4)


def test_relational_angle_term_by_hand() -> None:
    # right angle at the origin in both: the only difference is at the other two anchors
    loss = kdforge.create("loss", "relational", distance_weight=0)
    value = loss(step({}, {}, torch.tensor(S_PTS), torch.tensor(T_PTS)))
    assert value.item() == pytest.approx(rkd_by_hand(S_PTS, T_PTS, 0, 50), rel=1e-5)
    # at anchor (3,0): cos between (-3,0) and (-3,4) is 3/5 (teacher: 1/sqrt2), at (0,4) it is 4/5;
    # each appears twice (i, k and k, i); every other triplet agrees
    assert rkd_by_hand(S_PTS, T_PTS, 0, 50) == pytest.approx(
        50 * 2 * (smooth_l1(3 / 5 - 1 / math.sqrt(2)) + smooth_l1(4 / 5 - 1 / math.sqrt(2))) / 27, rel=1e-9)


def test_relational_on_random_features_and_taps() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 2, 3), torch.randn(5, 4)
    loss = kdforge.create("loss", "relational", student_tap="emb", teacher_tap="pool")
    assert loss.student_taps == ["emb"] and loss.teacher_taps == ["pool"]
    value = loss(step({"emb": s}, {"pool": t}))
    expected = rkd_by_hand(s.flatten(1).tolist(), t.tolist(), 25, 50)
    assert value.item() == pytest.approx(expected, rel=1e-4)


def test_relational_gradient_reaches_the_student_only() -> None:
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    kdforge.create("loss", "relational")(step({}, {}, s, t)).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


# -- fitnet ----------------------------------------------------------------------------------
def test_fitnet_linear_connector_by_hand() -> None:
    loss = kdforge.create("loss", "fitnet", student_tap="s", teacher_tap="t")
    s = torch.tensor([[1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[3.0, 4.0, 5.0]])
    loss(step({"s": s}, {"t": t}))  # first call builds the connector from the shapes
    assert isinstance(loss.connector, torch.nn.Linear)
    assert tuple(loss.connector.weight.shape) == (3, 2)
    with torch.no_grad():
        loss.connector.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        loss.connector.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    # hint = [1.5, 2, 2] vs [3, 4, 5]: squared errors 2.25, 4, 9
    value = loss(step({"s": s}, {"t": t}))
    assert value.item() == pytest.approx((2.25 + 4 + 9) / 3)
    value.backward()
    assert s.grad is not None and loss.connector.weight.grad is not None
    # d/dW of mean (Ws + b - t)^2 = 2/3 (Ws + b - t) s^T
    err = torch.tensor([1.5 - 3, 2 - 4, 2 - 5])
    assert torch.allclose(loss.connector.weight.grad, 2 / 3 * err[:, None] * torch.tensor([[1.0, 2.0]]))


def test_fitnet_conv_connector_maps_channels_and_pools() -> None:
    loss = kdforge.create("loss", "fitnet", student_tap="s", teacher_tap="t")
    s = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = torch.randn(2, 6, 4, 4)
    value = loss(step({"s": s}, {"t": t}, torch.zeros(2, 2), torch.zeros(2, 2)))
    conv, bn = loss.connector
    assert isinstance(conv, torch.nn.Conv2d) and (conv.in_channels, conv.out_channels, conv.kernel_size) == (4, 6, (1, 1))
    assert isinstance(bn, torch.nn.BatchNorm2d)
    hint = torch.nn.functional.adaptive_avg_pool2d(loss.connector(s), 4)
    assert value.item() == pytest.approx(torch.nn.functional.mse_loss(hint, t).item(), rel=1e-5)
    value.backward()
    assert s.grad.abs().sum() > 0 and conv.weight.grad.abs().sum() > 0


def test_fitnet_refuses_shapes_it_cannot_connect() -> None:
    loss = kdforge.create("loss", "fitnet", student_tap="s", teacher_tap="t")
    with pytest.raises(ValueError, match="cannot connect"):
        loss(step({"s": torch.randn(2, 4, 3, 3)}, {"t": torch.randn(2, 5)}))


def test_feature_losses_compute_in_float32_under_bf16() -> None:
    fs, ft = FS.to(torch.bfloat16), FT.to(torch.bfloat16)
    value = attention()(step({"s": fs}, {"t": ft}))
    assert value.dtype == torch.float32
    rkd = kdforge.create("loss", "relational")(step({}, {}, torch.tensor(S_PTS).bfloat16(), torch.tensor(T_PTS).bfloat16()))
    assert rkd.dtype == torch.float32
