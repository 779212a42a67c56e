"""Multi-teacher ensembles: several teachers, one combined view for the losses.

The engine runs the members one after another under ``no_grad`` (keeping only their
logits and tapped features), then asks the ensemble to ``combine`` them: ``out.teacher``
is the combined view and ``out.teachers`` each member's own outputs. Tap a member's
module as ``members.<i>.<name>`` (e.g. ``members.0.layer3``); in ``out.teachers[i]`` the
feature appears under the member's own name (``layer3``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from kdforge import (
    UNLABELED,
    BuildContext,
    ModelOutputs,
    RecipeError,
    build_teacher,
    check_plugin,
    hookimpl,
)

Combine = Literal["mean_probs", "mean_logits", "weighted", "confidence"]


class TeacherSpec(BaseModel):
    """One member: any teacher plugin with its params (checked against the registry up front)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_teacher(self) -> "TeacherSpec":
        if self.name in ("ensemble", "ema"):
            raise ValueError(f"a {self.name!r} teacher cannot be an ensemble member")
        try:
            check_plugin("teacher", self.model_dump(), BuildContext.placeholder())
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        return self


def member_weights(outputs: list[ModelOutputs], combine: str, weights: torch.Tensor | None,
                   targets: torch.Tensor | None) -> torch.Tensor:
    """(N, K) per-sample weights of the K members, each row summing to 1.

    ``confidence`` (CA-MKD, Zhang et al. 2022): w_k = (1 - softmax_k(CE_k)) / (K - 1) with
    CE_k the member's cross-entropy on the label: lower loss, more weight. Unlabeled
    samples (and a split without labels) weigh every member equally.
    """
    n, k = outputs[0].logits.shape[0], len(outputs)
    device = outputs[0].logits.device
    uniform = torch.full((n, k), 1.0 / k, device=device)
    if combine == "weighted" and weights is not None:
        return (weights.to(device) / weights.sum()).expand(n, k)
    if combine != "confidence" or targets is None or k == 1:
        return uniform
    labels = targets.long().to(device)
    labeled = labels != UNLABELED
    ce = torch.stack([F.cross_entropy(o.logits.float(), labels.clamp_min(0), reduction="none") for o in outputs], dim=1)
    confident = (1.0 - torch.softmax(ce, dim=1)) / (k - 1)
    return torch.where(labeled[:, None], confident, uniform)


class TeacherEnsemble(nn.Module):
    """Several frozen teachers combined by ``mean_probs``, ``mean_logits``, ``weighted`` or ``confidence``.

    mean_probs (Hinton et al. 2015): p(T) = mean_k softmax(z_k / T), at whatever temperature
    the loss asks for (``ModelOutputs.log_probs(T)``); weighted and confidence: the same
    mixture with fixed or per-sample weights; mean_logits: softmax(mean_k z_k / T).
    The combined logits (used for the teacher's accuracy and by logit losses) are
    log p(1) for the mixtures and the mean logits for mean_logits.
    """

    def __init__(self, members: list[nn.Module], combine: Combine = "mean_probs",
                 weights: list[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combine_rule = combine
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32) if weights else torch.ones(0),
                             persistent=False)

    def combine(self, outputs: list[ModelOutputs], targets: torch.Tensor | None = None) -> ModelOutputs:
        """The combined view of the members' outputs (targets are used by ``confidence``)."""
        features = {f"members.{i}.{name}": value for i, o in enumerate(outputs) for name, value in o.features.items()}
        weights = self.weights if self.weights.numel() else None
        w = member_weights(outputs, self.combine_rule, weights, targets)
        if self.combine_rule == "mean_logits":
            logits = torch.stack([o.logits.float() for o in outputs], dim=1).mean(dim=1)
            return ModelOutputs(logits, features)
        log_w = torch.log(w.clamp_min(1e-30))

        def soften(temperature: float) -> torch.Tensor:
            member_log_probs = torch.stack([F.log_softmax(o.logits.float() / temperature, dim=-1) for o in outputs], dim=1)
            return torch.logsumexp(member_log_probs + log_w[:, :, None], dim=1)

        return ModelOutputs(soften(1.0), features, soften)

    def forward(self, inputs: Any) -> torch.Tensor:
        """Combined logits without labels (``confidence`` falls back to equal weights)."""
        return self.combine([ModelOutputs(member(inputs)) for member in self.members]).logits


def ensemble(
    teachers: Annotated[list[TeacherSpec], Field(min_length=1)],
    combine: Combine = "mean_probs",
    weights: list[Annotated[float, Field(gt=0.0)]] | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_shape: list[int] | None = None,
) -> TeacherEnsemble:
    """An ensemble of teachers (any teacher plugins, different architectures welcome).

    ``combine``: mean_probs (default), mean_logits, weighted (with ``weights``, one per
    teacher) or confidence (per-sample weights from each teacher's loss on the label).
    """
    if combine == "weighted" and (weights is None or len(weights) != len(teachers)):
        raise ValueError(f"combine: weighted needs `weights` with one entry per teacher ({len(teachers)})")
    if combine != "weighted" and weights is not None:
        raise ValueError("`weights` only apply to combine: weighted")
    context = BuildContext(num_classes, in_channels, tuple(input_shape) if input_shape is not None else None)
    members = []
    for i, raw in enumerate(teachers):
        key = f".teachers[{i}]"  # relative: kdforge prefixes where this ensemble sits in the recipe
        try:
            spec = raw if isinstance(raw, TeacherSpec) else TeacherSpec.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise RecipeError(f"{err['msg']} (a teacher is {{name, params}})", key=key) from None
        members.append(build_teacher(spec.model_dump(), context, key=key))
    return TeacherEnsemble(members, combine, weights)


@hookimpl
def register_teachers(register) -> None:
    """Register ``ensemble``."""
    register("ensemble", ensemble)
