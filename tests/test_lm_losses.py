"""Token-level LM losses: every divergence against a float64 numpy re-implementation, and their properties.

Properties: never negative; jsd at beta 0 / 1 is exactly forward / reverse KL; chunked equals
unchunked in value and gradient; -100 positions have no effect; the token mean is invariant to
how a window is split into micro-batches (with the engine's tokens_i / tokens_window weights);
top_k equal to the vocabulary equals dense; bf16 inputs are close to a float64 reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdforge
from kdforge import Batch, ModelOutputs, StepOutputs
from kdforge.plugins.lm_losses import (
    DIVERGENCES,
    TOPK_INDICES,
    TOPK_LOG_PROBS,
    TOPK_TAIL,
    bytes_per_token,
    sparsify,
)

FAST = settings(max_examples=25, deadline=None)


# -- an independent float64 reference (plain numpy, loops over tokens) ----------------------------
def _softmax64(z: np.ndarray, t: float) -> np.ndarray:
    z = z.astype(np.float64) / t
    e = np.exp(z - z.max())
    return e / e.sum()


def _kl64(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))


def reference_divergence(kind: str, p_t: np.ndarray, p_s: np.ndarray, beta: float, alpha: float) -> float:
    """The papers' formulas on probability vectors, float64."""
    if kind == "forward_kl":
        return _kl64(p_t, p_s)
    if kind == "reverse_kl":
        return _kl64(p_s, p_t)
    if kind == "jsd":
        if beta == 0.0:
            return _kl64(p_t, p_s)
        if beta == 1.0:
            return _kl64(p_s, p_t)
        m = beta * p_t + (1 - beta) * p_s
        return beta * _kl64(p_t, m) + (1 - beta) * _kl64(p_s, m)
    if kind == "skew_forward_kl":
        return _kl64(p_t, alpha * p_t + (1 - alpha) * p_s)
    if kind == "skew_reverse_kl":
        return _kl64(p_s, alpha * p_s + (1 - alpha) * p_t)
    if kind == "tvd":
        return 0.5 * float(np.abs(p_t - p_s).sum())
    raise AssertionError(kind)


def reference_loss(kind: str, student: np.ndarray, teacher: np.ndarray, targets: np.ndarray, temperature: float = 1.0,
                   beta: float = 0.5, alpha: float = 0.1, top_k: int | None = None) -> float:
    """Mean over tokens with a target of the per-token divergence (sparse teacher when ``top_k``)."""
    values = []
    for b in range(student.shape[0]):
        for s in range(student.shape[1]):
            if targets[b, s] == -100:
                continue
            p_t, p_s = _softmax64(teacher[b, s], temperature), _softmax64(student[b, s], temperature)
            if top_k is not None and top_k < len(p_t):
                top = np.argsort(-p_t, kind="stable")[:top_k]
                p_t = np.append(p_t[top], 1.0 - p_t[top].sum())
                p_s = np.append(p_s[top], 1.0 - p_s[top].sum())
            values.append(reference_divergence(kind, p_t, p_s, beta, alpha))
    return float(np.mean(values)) if values else 0.0


# -- helpers ----------------------------------------------------------------------------------------
def outputs(student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, **teacher_features) -> StepOutputs:
    batch = Batch(torch.zeros(targets.shape, dtype=torch.long), targets, torch.arange(targets.shape[0]))
    t_out = ModelOutputs(teacher, dict(teacher_features)) if teacher is not None or teacher_features else None
    return StepOutputs(student=ModelOutputs(student), teacher=t_out, teachers=[t_out] if t_out else [],
                       targets=targets, batch=batch, index=batch.index)


def random_case(seed: int, batch: int = 2, seq: int = 5, vocab: int = 11, scale: float = 3.0, masked: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=g) * scale
    teacher = torch.randn(batch, seq, vocab, generator=g) * scale
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    targets[torch.rand(batch, seq, generator=g) < masked] = -100
    targets[0, 0] = 1  # at least one target
    return student, teacher, targets


def kd(**params) -> torch.nn.Module:
    return kdforge.create("loss", "token_kd", **params)


def value_and_grad(loss: torch.nn.Module, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor):
    s = student.clone().requires_grad_(True)
    value = loss(outputs(s, teacher, targets))
    value.backward()
    return value.detach(), s.grad.detach()


# -- values against the reference ------------------------------------------------------------------
@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_divergence_matches_the_float64_reference(kind: str, temperature: float) -> None:
    student, teacher, targets = random_case(1)
    value = kd(divergence=kind, temperature=temperature, beta=0.3, alpha=0.2)(outputs(student, teacher, targets))
    expected = reference_loss(kind, student.numpy(), teacher.numpy(), targets.numpy(), temperature, beta=0.3, alpha=0.2)
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_each_gradient_matches_finite_differences_of_the_float64_reference(kind: str, chunk_size: int | None) -> None:
    """d loss / d student logits against central differences of the numpy formula (no autograd in the reference)."""
    student, teacher, targets = random_case(4, seq=3, vocab=7)
    params = {"temperature": 2.0, "beta": 0.3, "alpha": 0.2}
    _, grad = value_and_grad(kd(divergence=kind, chunk_size=chunk_size, **params), student, teacher, targets)
    s64, t64, y = student.numpy().astype(np.float64), teacher.numpy(), targets.numpy()
    expected, h = np.zeros_like(s64), 1e-6
    for i in np.ndindex(*s64.shape):
        up, down = s64.copy(), s64.copy()
        up[i] += h
        down[i] -= h
        expected[i] = (reference_loss(kind, up, t64, y, **params) - reference_loss(kind, down, t64, y, **params)) / (2 * h)
    assert np.abs(expected).max() > 1e-3  # a real gradient, not zeros on both sides
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-3, atol=2e-6)


def test_hand_computed_values() -> None:
    # one token, two classes: p_T = (0.8, 0.2), p_S = (0.5, 0.5)
    teacher = torch.log(torch.tensor([[[0.8, 0.2]]]))
    student = torch.zeros(1, 1, 2)
    targets = torch.tensor([[0]])
    forward = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    reverse = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    m = [0.5 * 0.8 + 0.5 * 0.5, 0.5 * 0.2 + 0.5 * 0.5]
    jsd = 0.5 * (0.8 * math.log(0.8 / m[0]) + 0.2 * math.log(0.2 / m[1])) + \
        0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    skew = [0.1 * 0.8 + 0.9 * 0.5, 0.1 * 0.2 + 0.9 * 0.5]
    skew_forward = 0.8 * math.log(0.8 / skew[0]) + 0.2 * math.log(0.2 / skew[1])
    rskew = [0.1 * 0.5 + 0.9 * 0.8, 0.1 * 0.5 + 0.9 * 0.2]
    skew_reverse = 0.5 * math.log(0.5 / rskew[0]) + 0.5 * math.log(0.5 / rskew[1])
    expected = {"forward_kl": forward, "reverse_kl": reverse, "jsd": jsd, "skew_forward_kl": skew_forward,
                "skew_reverse_kl": skew_reverse, "tvd": 0.3}
    for kind, value in expected.items():
        got = kd(divergence=kind, beta=0.5, alpha=0.1)(outputs(student, teacher, targets)).item()
        assert got == pytest.approx(value, rel=1e-5), kind


def test_temperature_softens_both_sides_without_a_t_squared_factor() -> None:
    student, teacher, targets = random_case(2)
    t = 3.0
    a = kd(temperature=t)(outputs(student, teacher, targets))
    b = kd(temperature=1.0)(outputs(student / t, teacher / t, targets))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


# -- properties ------------------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(DIVERGENCES), scale=st.floats(0.0, 20.0),
       beta=st.floats(0.0, 1.0), alpha=st.floats(0.0, 0.99))
def test_never_negative(seed: int, kind: str, scale: float, beta: float, alpha: float) -> None:
    student, teacher, targets = random_case(seed, scale=scale)
    if seed % 3 == 0:
        teacher = student.clone()  # equal distributions: exactly 0, never -1e-8
    assert kd(divergence=kind, beta=beta, alpha=alpha)(outputs(student, teacher, targets)).item() >= 0.0


@FAST
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_jsd_endpoints_are_forward_and_reverse_kl_exactly(seed: int, scale: float) -> None:
    student, teacher, targets = random_case(seed, scale=scale)
    out = outputs(student, teacher, targets)
    assert torch.equal(kd(divergence="jsd", beta=0.0)(out), kd(divergence="forward_kl")(out))
    assert torch.equal(kd(divergence="jsd", beta=1.0)(out), kd(divergence="reverse_kl")(out))


@FAST
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(DIVERGENCES), chunk=st.integers(1, 12),
       top_k=st.sampled_from([None, 1, 3, 11]))
def test_chunked_equals_unchunked_in_value_and_gradient(seed: int, kind: str, chunk: int, top_k: int | None) -> None:
    student, teacher, targets = random_case(seed, batch=2, seq=6)
    v0, g0 = value_and_grad(kd(divergence=kind, top_k=top_k), student, teacher, targets)
    v1, g1 = value_and_grad(kd(divergence=kind, top_k=top_k, chunk_size=chunk), student, teacher, targets)
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8)


@FAST
@given(seed=st.integers(0, 10_000), chunk=st.integers(1, 7))
def test_chunked_lm_ce_equals_cross_entropy(seed: int, chunk: int) -> None:
    student, _, targets = random_case(seed)
    ce = kdforge.create("loss", "lm_ce", chunk_size=chunk)
    s = student.clone().requires_grad_(True)
    value = ce(outputs(s, None, targets))
    value.backward()
    r = student.clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(r.reshape(-1, r.shape[-1]), targets.reshape(-1), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s.grad, r.grad, rtol=1e-6, atol=1e-8)


@FAST
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(DIVERGENCES), chunk=st.sampled_from([None, 3]))
def test_ignored_positions_have_no_effect(seed: int, kind: str, chunk: int | None) -> None:
    student, teacher, targets = random_case(seed, masked=0.5)
    masked = targets == -100
    other_s, other_t = student.clone(), teacher.clone()
    other_s[masked] = torch.randn_like(other_s[masked]) * 50
    other_t[masked] = torch.randn_like(other_t[masked]) * 50
    loss = kd(divergence=kind, chunk_size=chunk)
    v0, g0 = value_and_grad(loss, student, teacher, targets)
    v1, g1 = value_and_grad(loss, other_s, other_t, targets)
    torch.testing.assert_close(v1, v0)
    torch.testing.assert_close(g1, g0)
    assert float(g1[masked].abs().max()) == 0.0 if masked.any() else True


def test_a_micro_batch_without_targets_gives_an_attached_zero() -> None:
    student, teacher, targets = random_case(3)
    targets[:] = -100
    s = student.clone().requires_grad_(True)
    for loss in (kd(), kd(chunk_size=2), kdforge.create("loss", "lm_ce")):
        value = loss(outputs(s, teacher, targets))
        assert value.item() == 0.0 and value.requires_grad


@FAST
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(DIVERGENCES), split=st.integers(1, 5))
def test_the_window_mean_does_not_depend_on_how_it_is_split(seed: int, kind: str, split: int) -> None:
    """sum_i loss_i * tokens_i / tokens_window over micro-batches == the loss of the whole window (TRL #4719)."""
    student, teacher, targets = random_case(seed, batch=6, seq=7, masked=0.6)
    loss = kd(divergence=kind, chunk_size=4)
    whole, whole_grad = value_and_grad(loss, student, teacher, targets)
    s = student.clone().requires_grad_(True)
    tokens = (targets != -100).sum()
    total = torch.zeros(())
    for part in torch.arange(6).tensor_split(split):
        weight = (targets[part] != -100).sum() / tokens
        total = total + loss(outputs(s[part], teacher[part], targets[part])) * weight
    total.backward()
    torch.testing.assert_close(total.detach(), whole, rtol=1e-5, atol=1e-7)
    # float32 sums in another order: absolute slack relative to the largest gradient (seed 3, skew_reverse_kl: 1e-8)
    torch.testing.assert_close(s.grad, whole_grad, rtol=1e-5, atol=1e-5 * whole_grad.abs().max().item())


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_top_k_equal_to_the_vocabulary_equals_dense(kind: str) -> None:
    student, teacher, targets = random_case(4)
    v0, g0 = value_and_grad(kd(divergence=kind), student, teacher, targets)
    v1, g1 = value_and_grad(kd(divergence=kind, top_k=student.shape[-1]), student, teacher, targets)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_top_k_matches_the_reference_with_a_tail_bucket(kind: str) -> None:
    student, teacher, targets = random_case(5)
    value = kd(divergence=kind, top_k=3)(outputs(student, teacher, targets))
    expected = reference_loss(kind, student.numpy(), teacher.numpy(), targets.numpy(), top_k=3)
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_a_cached_sparse_teacher_gives_the_same_loss_as_top_k_on_logits() -> None:
    student, teacher, targets = random_case(6)
    cached = sparsify(teacher, 4, temperature=2.0)
    assert cached[TOPK_LOG_PROBS].dtype == torch.float16 and cached[TOPK_INDICES].dtype == torch.int32
    live = kd(top_k=4, temperature=2.0)(outputs(student, teacher, targets))
    from_cache = kd(temperature=2.0)(outputs(student, teacher, targets, **cached))
    assert from_cache.item() == pytest.approx(live.item(), rel=2e-3)  # fp16 log-probabilities
    assert bytes_per_token(64) == 64 * 2 + 64 * 4 + 4


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_bf16_logits_are_close_to_the_float64_reference(kind: str) -> None:
    """bf16 inputs: 1e-5 relative to a float64 reference on the same (rounded) values, 3e-2 to the unrounded ones."""
    student, teacher, targets = random_case(7, seq=16, vocab=64)
    s16, t16 = student.bfloat16(), teacher.bfloat16()
    value = kd(divergence=kind, chunk_size=5)(outputs(s16, t16, targets)).item()
    rounded = reference_loss(kind, s16.double().numpy(), t16.double().numpy(), targets.numpy())
    exact = reference_loss(kind, student.double().numpy(), teacher.double().numpy(), targets.numpy())
    assert value == pytest.approx(rounded, rel=1e-5)
    assert value == pytest.approx(exact, rel=3e-2)


def test_the_gradient_flows_to_the_student_only() -> None:
    student, teacher, targets = random_case(8)
    s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    kd(divergence="jsd", chunk_size=3)(outputs(s, t, targets)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# -- vocabularies ----------------------------------------------------------------------------------
def test_different_vocabularies_are_an_error_naming_both_sizes() -> None:
    student, teacher, targets = random_case(9, vocab=12)
    with pytest.raises(ValueError, match="student vocabulary 12 and teacher vocabulary 10 differ"):
        kd(num_classes=12)(outputs(student, teacher[..., :10], targets))


def test_padding_rows_beyond_the_tokenizer_are_trimmed() -> None:
    """Qwen's case: 151,936 vs 152,064 rows for a smaller real vocabulary; here 12 and 14 for 10 tokens."""
    student, teacher, targets = random_case(10, vocab=14)
    targets[targets >= 10] = 3
    value = kd(num_classes=10)(outputs(student[..., :12], teacher, targets))
    expected = kd()(outputs(student[..., :10], teacher[..., :10], targets))
    torch.testing.assert_close(value, expected)


def test_trimming_refuses_a_target_in_the_trimmed_rows() -> None:
    student, teacher, targets = random_case(11, vocab=14)
    targets[0, 0] = 11
    with pytest.raises(ValueError, match="would drop target token 11"):
        kd(num_classes=10)(outputs(student[..., :12], teacher, targets))


def test_params_are_validated() -> None:
    with pytest.raises(kdforge.RecipeError, match="divergence"):
        kd(divergence="kl")
    with pytest.raises(kdforge.RecipeError, match="beta"):
        kd(divergence="jsd", beta=1.5)
    with pytest.raises(kdforge.RecipeError, match="chunk_size"):
        kd(chunk_size=0)


def test_shape_errors_name_the_shapes() -> None:
    student, teacher, targets = random_case(12)
    with pytest.raises(ValueError, match="logits"):
        kd()(outputs(student[:, 0], teacher[:, 0], targets))


def test_memory_estimate_is_one_chunk() -> None:
    student, teacher, targets = random_case(13, batch=4, seq=8, vocab=100)
    out = outputs(student, teacher, targets)
    chunked = kd(chunk_size=8).memory_estimate(out)
    whole = kd().memory_estimate(out)
    (c,), (w,) = chunked.values(), whole.values()
    assert c * 4 == w and c % (8 * 100 * 4) == 0


# -- hidden_mse ------------------------------------------------------------------------------------
def test_hidden_mse_projects_and_masks_like_the_logits() -> None:
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 8, generator=g)
    targets = torch.tensor([[1, 2, -100, 3, -100], [-100, 4, 5, 6, -100]])
    loss = kdforge.create("loss", "hidden_mse", student_taps=["a"], teacher_taps=["b"])
    logits = torch.zeros(2, 5, 3, requires_grad=True)
    batch = Batch(torch.zeros(2, 5, dtype=torch.long), targets, torch.arange(2))
    out = StepOutputs(student=ModelOutputs(logits, {"a": fs}), teacher=ModelOutputs(torch.zeros(2, 5, 3), {"b": ft}),
                      targets=targets, batch=batch)
    value = loss(out)
    proj = loss.projections[0]
    mask = targets != -100
    expected = ((proj(fs) - ft)[mask] ** 2).mean()
    torch.testing.assert_close(value, expected)
    changed = ft.clone()
    changed[~mask] = 100.0
    out.teacher.features["b"] = changed
    torch.testing.assert_close(loss(out), expected)


def test_lm_ce_skips_the_target_tokens_a_generator_produced() -> None:
    student, _, targets = random_case(14, batch=3)
    out = outputs(student, None, targets)
    generated = torch.zeros_like(targets, dtype=torch.bool)
    generated[1, 2:] = True
    out.batch = out.batch.replace(generated=generated)
    value = kdforge.create("loss", "lm_ce")(out)
    kept = targets.masked_fill(generated, -100)
    expected = torch.nn.functional.cross_entropy(student.reshape(-1, 11), kept.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(value, expected)


def test_memory_estimate_can_be_asked_for_the_trainer_batch() -> None:
    student, teacher, targets = random_case(15, batch=2, seq=8, vocab=100)
    out = outputs(student, teacher, targets)
    (small,) = kd(chunk_size=64).memory_estimate(out).values()
    (full,) = kd(chunk_size=64).memory_estimate(out, batch_size=16).values()  # 16 x 8 tokens: a full chunk
    assert small == 16 * 100 * 4 * 8 and full == 64 * 100 * 4 * 8
