"""Token-level losses for language models: ``lm_ce``, ``token_kd`` (six divergences, chunked, sparse top-k,
on-policy), and hidden-state distillation ``hidden_mse``.

The ``language_modeling`` task hands losses logits ``(batch, seq, vocab)`` and targets
``(batch, seq)`` already aligned (``-100``: no target). Every loss here is a mean over the
target tokens of its micro-batch; the engine weighs micro-batches by their target tokens
in gradient accumulation, so a window's loss is the mean over all of its tokens.

Chunking: with ``chunk_size``, token rows are processed ``chunk_size`` at a time by an
autograd function that recomputes each chunk in the backward pass, so the extra memory
is one chunk's ``(chunk, vocab)`` float32 temporaries in both passes, and values and
gradients equal the unchunked ones.

Needs only torch (on-policy distillation builds a ``generator`` plugin, ``hf_generate``
by default, which needs transformers).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdforge import Batch, RunContext, StepOutputs, build_plugin, full_precision, hookimpl

from kdforge.plugins.lm_task import IGNORE_INDEX

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
DIVERGENCES: tuple[str, ...] = Divergence.__args__  # type: ignore[attr-defined]
TapList = Annotated[list[str], Field(min_length=1)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]

#: features a teacher may provide instead of logits: a sparse top-k view of its distribution
TOPK_LOG_PROBS, TOPK_INDICES, TOPK_TAIL = "topk_log_probs", "topk_indices", "topk_tail"


# -- divergences between distributions given as log-probabilities over the last dim -----------
def kl_from_log(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q) over the last dim; entries with p = 0 contribute 0."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(dim=-1)


def mixture_log(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b), exact at the endpoints."""
    if weight <= 0.0:
        return log_b
    if weight >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def divergence_rows(kind: str, log_t: torch.Tensor, log_s: torch.Tensor, beta: float = 0.5,
                    alpha: float = 0.1) -> torch.Tensor:
    """Per-row divergence between teacher ``log_t`` and student ``log_s`` log-probabilities (>= 0).

    - ``forward_kl``: KL(p_T || p_S); ``reverse_kl``: KL(p_S || p_T);
    - ``jsd`` (GKD's generalized JSD): beta * KL(p_T || M) + (1 - beta) * KL(p_S || M),
      M = beta * p_T + (1 - beta) * p_S; exactly forward KL at beta = 0, reverse KL at beta = 1;
    - ``skew_forward_kl`` (DistiLLM): KL(p_T || alpha p_T + (1 - alpha) p_S);
    - ``skew_reverse_kl`` (DistiLLM): KL(p_S || alpha p_S + (1 - alpha) p_T);
    - ``tvd``: total variation, 0.5 * sum |p_T - p_S|.
    """
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        value = kl_from_log(log_t, log_s)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        value = kl_from_log(log_s, log_t)
    elif kind == "jsd":
        log_m = mixture_log(log_t, log_s, beta)
        value = beta * kl_from_log(log_t, log_m) + (1.0 - beta) * kl_from_log(log_s, log_m)
    elif kind == "skew_forward_kl":
        value = kl_from_log(log_t, mixture_log(log_t, log_s, alpha))
    elif kind == "skew_reverse_kl":
        value = kl_from_log(log_s, mixture_log(log_s, log_t, alpha))
    elif kind == "tvd":
        return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(dim=-1)
    else:
        raise ValueError(f"unknown divergence {kind!r} (one of {', '.join(DIVERGENCES)})")
    return value.clamp_min(0.0)  # rounding can leave -1e-8 where p_T == p_S


# -- the sparse top-k view ----------------------------------------------------------------------
def sparsify(logits: torch.Tensor, k: int, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """A teacher's distribution at ``temperature`` as its ``k`` largest log-probabilities plus a tail bucket.

    Returns ``topk_log_probs`` (float16), ``topk_indices`` (int32) and ``topk_tail`` (float32,
    the log of the remaining mass), shaped ``(..., k)``, ``(..., k)`` and ``(...)``: what a teacher
    cache stores per token (``bytes_per_token(k)``) and hands back as teacher features.
    """
    scaled = logits.detach().float() / temperature
    lse = scaled.logsumexp(dim=-1, keepdim=True)
    values, indices = scaled.topk(min(k, scaled.shape[-1]), dim=-1)
    rest = scaled.scatter(-1, indices, float("-inf")).logsumexp(dim=-1)
    return {TOPK_LOG_PROBS: (values - lse).half(), TOPK_INDICES: indices.int(), TOPK_TAIL: rest - lse.squeeze(-1)}


def bytes_per_token(k: int, value_bytes: int = 2, index_bytes: int = 4, tail_bytes: int = 4) -> int:
    """Storage of one token's sparse teacher view: k values, k indices and the tail."""
    return k * (value_bytes + index_bytes) + tail_bytes


def _student_buckets(scaled: torch.Tensor, indices: torch.Tensor, tail: bool) -> torch.Tensor:
    """Student log-probabilities on ``indices`` plus (when ``tail``) the log of its own remaining mass."""
    lse = scaled.logsumexp(dim=-1, keepdim=True)
    picked = scaled.gather(-1, indices) - lse
    if not tail:
        return picked
    rest = scaled.scatter(-1, indices, float("-inf")).logsumexp(dim=-1, keepdim=True) - lse
    return torch.cat([picked, rest], dim=-1)


RowFn = Callable[..., torch.Tensor]


def dense_rows(kind: str, vocab: int, temperature: float, beta: float, alpha: float) -> RowFn:
    """Per-token divergence from student and teacher logit rows, over the first ``vocab`` entries."""
    def rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_s = F.log_softmax(student[:, :vocab].float() / temperature, dim=-1)
        log_t = F.log_softmax(teacher[:, :vocab].float() / temperature, dim=-1)
        return divergence_rows(kind, log_t, log_s, beta, alpha)

    return rows


def topk_rows(kind: str, vocab: int, temperature: float, beta: float, alpha: float, k: int) -> RowFn:
    """Per-token divergence on the teacher's top ``k`` tokens plus one tail bucket (no tail when k >= vocab)."""
    def rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = teacher[:, :vocab].float() / temperature
        kk = min(k, vocab)
        values, indices = t.topk(kk, dim=-1)
        lse = t.logsumexp(dim=-1, keepdim=True)
        log_t = values - lse
        tail = kk < vocab
        if tail:
            rest = t.scatter(-1, indices, float("-inf")).logsumexp(dim=-1, keepdim=True) - lse
            log_t = torch.cat([log_t, rest], dim=-1)
        log_s = _student_buckets(student[:, :vocab].float() / temperature, indices, tail)
        return divergence_rows(kind, log_t, log_s, beta, alpha)

    return rows


def cached_topk_rows(kind: str, vocab: int, temperature: float, beta: float, alpha: float) -> RowFn:
    """Per-token divergence against a stored sparse teacher view (``sparsify``'s three tensors)."""
    def rows(student: torch.Tensor, log_probs: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        log_t = torch.cat([log_probs.float(), tail.float().unsqueeze(-1)], dim=-1)
        log_s = _student_buckets(student[:, :vocab].float() / temperature, indices.long(), True)
        return divergence_rows(kind, log_t, log_s, beta, alpha)

    return rows


def ce_rows(vocab: int) -> RowFn:
    """Per-token cross-entropy with the target ids (clamped; masked rows are weighted 0)."""
    def rows(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student[:, :vocab].float(), targets.clamp_min(0), reduction="none")

    return rows


# -- chunked evaluation with recomputation in the backward pass --------------------------------
def _weighted(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # where, not a product: a masked row never contributes, even when its value is inf or nan
    return torch.where(weights > 0, values * weights, torch.zeros_like(values)).sum()


class _ChunkedRows(torch.autograd.Function):
    """sum_i w_i * row_fn(student_i, teacher_i), ``chunk`` rows at a time; the backward recomputes each chunk."""

    @staticmethod
    def forward(ctx: Any, row_fn: RowFn, chunk: int, student: torch.Tensor, weights: torch.Tensor,
                *teacher: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a in range(0, student.shape[0], chunk):
            b = a + chunk
            total = total + _weighted(row_fn(student[a:b], *[t[a:b] for t in teacher]), weights[a:b])
        ctx.row_fn, ctx.chunk = row_fn, chunk
        ctx.save_for_backward(student, weights, *teacher)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[Any, ...]:
        student, weights, *teacher = ctx.saved_tensors
        grad = torch.zeros_like(student)
        for a in range(0, student.shape[0], ctx.chunk):
            b = a + ctx.chunk
            with torch.enable_grad():
                piece = student[a:b].detach().requires_grad_(True)
                value = _weighted(ctx.row_fn(piece, *[t[a:b] for t in teacher]), weights[a:b])
                (piece_grad,) = torch.autograd.grad(value, piece)
            grad[a:b] = piece_grad * grad_total
        return (None, None, grad, None, *[None] * len(teacher))


def token_mean(row_fn: RowFn, student: torch.Tensor, mask: torch.Tensor, teacher: Sequence[torch.Tensor],
               chunk_size: int | None) -> torch.Tensor:
    """Mean of ``row_fn`` over the masked-in token rows (``student`` is ``(tokens, vocab)``), chunked or not.

    The mean divides by the count on the device (no host sync); a micro-batch without a
    target token gives 0, still attached to the graph.
    """
    weights = mask.float() / mask.sum().clamp_min(1).float()
    if chunk_size is None or chunk_size >= student.shape[0]:
        return _weighted(row_fn(student, *teacher), weights)
    return _ChunkedRows.apply(row_fn, int(chunk_size), student, weights, *teacher)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(batch, seq, ...)`` as ``(batch * seq, ...)`` (a view for contiguous tensors)."""
    return t.reshape(-1, *t.shape[2:])


def _check_targets(out: StepOutputs) -> torch.Tensor:
    targets = out.targets
    logits = out.student.logits
    if targets is None or logits.ndim != 3 or tuple(targets.shape) != tuple(logits.shape[:2]):
        got = None if targets is None else tuple(targets.shape)
        raise ValueError(f"needs logits (batch, seq, vocab) and targets (batch, seq) from the language_modeling task; "
                         f"got logits {tuple(logits.shape)} and targets {got}")
    return targets


# -- lm_ce --------------------------------------------------------------------------------------
class LMCrossEntropy(nn.Module):
    """Next-token cross-entropy with the labels: mean over the target tokens (``-100`` ignored), float32.

    ``chunk_size`` computes it over that many tokens at a time (one chunk's float32
    ``(chunk, vocab)`` log-softmax at once, in the forward and the backward pass). Samples a
    generator produced (a ``generated`` batch field, on-policy distillation) have no labels
    and are skipped.
    """

    def __init__(self, chunk_size: Annotated[int, Field(ge=1)] | None = None) -> None:
        super().__init__()
        self.chunk_size = chunk_size

    @full_precision
    def forward(self, out: StepOutputs) -> torch.Tensor:
        targets = _check_targets(out)
        logits = out.student.logits
        mask = targets != IGNORE_INDEX
        generated = out.batch.extras.get("generated") if out.batch is not None else None
        if generated is not None:
            generated = generated.bool()
            mask = mask & ~(generated if generated.ndim == 2 else generated.reshape(-1, 1))
        flat_targets = targets.reshape(-1)
        return token_mean(ce_rows(logits.shape[-1]), _rows(logits), mask.reshape(-1), [flat_targets], self.chunk_size)


# -- token_kd -----------------------------------------------------------------------------------
class TokenKD(nn.Module):
    """Token-level distillation: a divergence between teacher and student next-token distributions.

    Per token, ``divergence`` is summed over the vocabulary (``forward_kl``, ``reverse_kl``,
    ``jsd`` with ``beta``, ``skew_forward_kl`` / ``skew_reverse_kl`` with ``alpha``, ``tvd``)
    between softmax(z_T / temperature) and softmax(z_S / temperature) (no T^2 factor), then
    averaged over the target tokens. ``chunk_size`` bounds the extra memory to one chunk;
    ``top_k`` uses the teacher's k most likely tokens plus one tail bucket (the student is
    read on the same k tokens plus its own tail). A teacher whose features hold
    ``topk_log_probs`` / ``topk_indices`` / ``topk_tail`` (a cache, see ``sparsify``) is
    read from those instead of its logits.

    Vocabularies: when student and teacher logits differ in size only by rows beyond the
    tokenizer's ``num_classes`` (padding), both are trimmed to ``num_classes``; any other
    difference is an error naming both sizes.

    On-policy (GKD): with ``lmbda`` > 0, each training micro-batch is, with probability
    ``lmbda``, replaced by the student's own completions of its prompts (``generator``, a
    generator plugin, ``hf_generate`` by default), which the teacher then scores.
    """

    teacher_required = True

    def __init__(
        self,
        divergence: Divergence = "forward_kl",
        temperature: Annotated[float, Field(gt=0.0)] = 1.0,
        beta: Unit = 0.5,
        alpha: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1,
        chunk_size: Annotated[int, Field(ge=1)] | None = None,
        top_k: Annotated[int, Field(ge=1)] | None = None,
        lmbda: Unit = 0.0,
        generator: dict[str, Any] | None = None,
        num_classes: Annotated[int, Field(ge=1)] | None = None,
    ) -> None:
        super().__init__()
        self.divergence, self.temperature, self.beta, self.alpha = divergence, temperature, beta, alpha
        self.chunk_size, self.top_k, self.lmbda, self.num_classes = chunk_size, top_k, lmbda, num_classes
        self.generator = None
        if lmbda > 0.0:
            self.generator = build_plugin("generator", generator or {"name": "hf_generate"}, key=".generator")
        else:  # off-policy: no TransformsBatch, so the batches stay the data's own (and teacher.cache applies)
            self.transform_batch = None
        self._checked_targets = False

    # -- the vocabulary both sides are compared on -------------------------------------------
    def shared_vocab(self, student_vocab: int, teacher_vocab: int | None, targets: torch.Tensor) -> int:
        """The vocabulary size the divergence runs over (trimming padding rows), or a ``ValueError``."""
        if teacher_vocab is None or teacher_vocab == student_vocab:
            return student_vocab
        real = self.num_classes
        if real is None or min(student_vocab, teacher_vocab) < real:
            tokenizer = f" (the tokenizer has {real} tokens)" if real is not None else ""
            raise ValueError(f"student vocabulary {student_vocab} and teacher vocabulary {teacher_vocab} differ{tokenizer}; "
                             "token-level distillation needs the same tokenizer on both sides")
        if not self._checked_targets:
            labeled = targets[targets != IGNORE_INDEX]
            if labeled.numel() and int(labeled.max()) >= real:
                raise ValueError(f"trimming the vocabularies ({student_vocab} and {teacher_vocab}) to the tokenizer's "
                                 f"{real} tokens would drop target token {int(labeled.max())}")
            self._checked_targets = True
        return real

    def _teacher_view(self, out: StepOutputs, vocab_s: int, targets: torch.Tensor) -> tuple[RowFn, list[torch.Tensor], int]:
        t, beta, alpha, kind = float(self.temperature), float(self.beta), float(self.alpha), self.divergence
        features = out.teacher.features
        if TOPK_LOG_PROBS in features:
            cached = [features[TOPK_LOG_PROBS], features[TOPK_INDICES], features[TOPK_TAIL]]
            vocab = self.shared_vocab(vocab_s, None, targets)
            if not self._checked_targets:
                top = int(cached[1].max())
                if top >= vocab:
                    raise ValueError(f"the teacher's cached top-k holds token {top}, beyond the student's vocabulary of {vocab}")
                self._checked_targets = True
            return cached_topk_rows(kind, vocab, t, beta, alpha), [_rows(c) for c in cached], vocab
        teacher = out.teacher.logits.detach()
        if teacher.ndim != 3 or tuple(teacher.shape[:2]) != tuple(out.student.logits.shape[:2]):
            raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match student logits "
                             f"{tuple(out.student.logits.shape)} (batch, seq, vocab)")
        vocab = self.shared_vocab(vocab_s, teacher.shape[-1], targets)
        if self.top_k is not None:
            fn = topk_rows(kind, vocab, t, beta, alpha, int(self.top_k))
        else:
            fn = dense_rows(kind, vocab, t, beta, alpha)
        return fn, [_rows(teacher)], vocab

    @full_precision
    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher is None:
            raise ValueError("token_kd needs a teacher: add a `teacher` to the recipe")
        targets = _check_targets(out)
        student = out.student.logits
        fn, teacher, _ = self._teacher_view(out, student.shape[-1], targets)
        return token_mean(fn, _rows(student), targets.reshape(-1) != IGNORE_INDEX, teacher, self.chunk_size)

    def memory_estimate(self, out: StepOutputs, batch_size: int | None = None) -> dict[str, int]:
        """Bytes of this loss's largest transient: one chunk's float32 ``(rows, vocab)`` temporaries (``EstimatesMemory``).

        ``rows`` is ``chunk_size``, or every token of the batch when unchunked; ``batch_size``
        (the trainer's, for a dry-run batch of fewer samples) sets the batch's tokens to
        ``batch_size`` x the sequence length of ``out``. ``FLOAT32_COPIES`` such tensors are
        alive at the peak (measured by benchmarks/lm_memory.py). The logits' own gradient is
        not included.
        """
        logits = out.student.logits
        samples = int(logits.shape[0]) if batch_size is None else int(batch_size)
        tokens = samples * int(logits.shape[1])
        rows = tokens if self.chunk_size is None else min(int(self.chunk_size), tokens)
        vocab = int(logits.shape[-1])
        what = f"{rows:,} tokens x {vocab:,} float32, {self.divergence}"
        return {f"token_kd chunk ({what})": rows * vocab * 4 * FLOAT32_COPIES.get(self.divergence, 12)}

    # -- on-policy distillation ---------------------------------------------------------------
    def transform_batch(self, batch: Batch, run: RunContext) -> Batch:
        """With probability ``lmbda``, the batch with the student's own completions of its prompts."""
        if self.generator is None or float(torch.rand(())) >= float(self.lmbda):
            return batch
        student = run.student
        was_training = student.training
        student.eval()  # sample without dropout
        try:
            return self.generator.generate(student, batch)
        finally:
            student.train(was_training)


#: float32 (rows, vocab) tensors alive at token_kd's chunked peak, per divergence, rounded up from
#: benchmarks/lm_memory.py (512 tokens x 32k vocabulary, chunk 64: 7.25, 7.25, 11.5, 10.25, 10.25, 6.0)
FLOAT32_COPIES: dict[str, int] = {"forward_kl": 8, "reverse_kl": 8, "jsd": 12, "skew_forward_kl": 11,
                                  "skew_reverse_kl": 11, "tvd": 6}


# -- hidden_mse ---------------------------------------------------------------------------------
def _feature(features: Mapping[str, torch.Tensor], tap: str, side: str) -> torch.Tensor:
    try:
        return features[tap]
    except KeyError:
        raise ValueError(f"no {side} feature {tap!r} was captured (taps seen: {sorted(features)})") from None


@full_precision
def masked_token_mse(hint: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked-in tokens of the mean squared error over the hidden dimension, float32."""
    per_token = (hint.float() - target.float()).pow(2).mean(dim=-1)
    weights = mask.float() / mask.sum().clamp_min(1).float()
    return torch.where(weights > 0, per_token * weights, torch.zeros_like(per_token)).sum()


class HiddenMSE(nn.Module):
    """Hidden-state distillation: MSE between projected student and teacher block outputs, per token.

    Taps are transformer blocks (``transformer.h.1``), paired by position; a block's
    ``(batch, seq, hidden)`` output (the first tensor of the tuple Hugging Face blocks
    return) is projected by a learned linear layer to the teacher's width (as FitNet),
    and the squared error averaged over the hidden size and over the target tokens (the
    positions the logits are trained on). Projections are built on the first batch.
    """

    teacher_required = True

    def __init__(self, student_taps: TapList, teacher_taps: TapList,
                 pair_weights: list[Annotated[float, Field(ge=0.0)]] | None = None) -> None:
        super().__init__()
        if len(student_taps) != len(teacher_taps):
            raise ValueError(f"student_taps ({len(student_taps)}) and teacher_taps ({len(teacher_taps)}) are paired "
                             "by position and must have the same length")
        if pair_weights is not None and len(pair_weights) != len(student_taps):
            raise ValueError(f"pair_weights needs one weight per tap pair ({len(student_taps)}), got {len(pair_weights)}")
        self.student_taps, self.teacher_taps = list(student_taps), list(teacher_taps)
        self.pair_weights = list(pair_weights) if pair_weights is not None else [1.0] * len(student_taps)
        self.projections: nn.ModuleList | None = None

    def _build(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.projections = nn.ModuleList(nn.Linear(fs.shape[-1], ft.shape[-1]) for fs, ft in pairs)
        self.projections.to(pairs[0][0].device)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher is None:
            raise ValueError("hidden_mse needs a teacher")
        targets = _check_targets(out)
        pairs = []
        for s_tap, t_tap in zip(self.student_taps, self.teacher_taps):
            fs = _feature(out.student.features, s_tap, "student")
            ft = _feature(out.teacher.features, t_tap, "teacher").detach()
            if fs.ndim != 3 or ft.ndim != 3 or fs.shape[:2] != ft.shape[:2] or tuple(fs.shape[:2]) != tuple(targets.shape):
                raise ValueError(f"hidden_mse needs (batch, seq, hidden) features on the same tokens; got {s_tap} "
                                 f"{tuple(fs.shape)} and {t_tap} {tuple(ft.shape)} for targets {tuple(targets.shape)}")
            pairs.append((fs, ft))
        if self.projections is None:
            self._build(pairs)
        mask = targets != IGNORE_INDEX
        total = out.student.logits.new_zeros((), dtype=torch.float32)
        for (fs, ft), projection, weight in zip(pairs, self.projections, self.pair_weights):
            total = total + weight * masked_token_mse(projection(fs), ft, mask)
        return total


@hookimpl
def register_losses(register) -> None:
    """Register ``lm_ce``, ``token_kd`` and ``hidden_mse``."""
    register("lm_ce", LMCrossEntropy)
    register("token_kd", TokenKD)
    register("hidden_mse", HiddenMSE)
