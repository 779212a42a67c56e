"""The ``language_modeling`` task: next-token prediction, judged by token NLL, perplexity and accuracy.

Dataset items are Hugging Face style mappings: ``input_ids`` (a LongTensor ``(seq,)``),
optionally ``labels`` (same positions as ``input_ids``, ``-100`` = no loss, the Hugging
Face convention), ``attention_mask`` and any extra fields. The task shifts once: a batch's
``targets[b, t]`` is the token that ``logits[b, t]`` must predict (``labels[b, t + 1]``,
``-100`` at the last position), so losses see logits ``(batch, seq, vocab)`` and targets
``(batch, seq)`` already aligned. Needs only torch.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdforge import Batch, DataSplits, TaskBase, hookimpl

IGNORE_INDEX = -100
"""Label value of a position without a loss (prompt tokens, padding, the last position)."""

#: item keys the task reads; any other key of an item is passed on as an extra batch field
ITEM_KEYS = ("input_ids", "labels", "attention_mask")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the logits: ``labels`` shifted left by one, ``-100`` at the end."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    return targets


def lm_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             index: torch.Tensor | None = None, **extras: Any) -> Batch:
    """The task's ``Batch`` from unshifted Hugging Face style ``labels`` (``None``: every token is a label).

    Positions where ``attention_mask`` is 0 never carry a label. ``extras`` (e.g.
    ``prompt_length``) become extra batch fields. Generators and batch transforms build
    their batches with this, so the shift happens in one place.
    """
    input_ids = input_ids.long()
    labels = input_ids.clone() if labels is None else labels.long().clone()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        extras["attention_mask"] = attention_mask
    return Batch(input_ids, shift_labels(labels), index, extras)


def target_mask(targets: torch.Tensor) -> torch.Tensor:
    """Where a token is predicted (``targets != -100``)."""
    return targets != IGNORE_INDEX


class LanguageModeling(TaskBase):
    """Causal language modeling: token NLL, perplexity (the headline, lower is better) and next-token accuracy.

    Models are called as ``model(input_ids)`` or ``model(input_ids, attention_mask=...)``
    and return logits ``(batch, seq, vocab)`` (or an output with ``.logits``). ``vocab`` may
    exceed the tokenizer's ``num_classes`` (padding rows, as in Qwen), never fall short of it.
    A micro-batch weighs its number of target tokens in gradient accumulation, so every token
    of a window counts the same whatever micro-batch it sits in.
    """

    headline = "perplexity"
    higher_is_better = False

    def __init__(self, num_classes: Annotated[int, Field(ge=1)] | None = None) -> None:
        self.num_classes = num_classes

    def to_batch(self, item: Any) -> Batch:
        """A collated item (a mapping with ``input_ids``, or a bare LongTensor of token ids) as a ``Batch``."""
        if isinstance(item, torch.Tensor):
            return lm_batch(item)
        if not isinstance(item, Mapping) or "input_ids" not in item:
            keys = sorted(map(str, item)) if isinstance(item, Mapping) else type(item).__name__
            raise ValueError(f"language-modeling items are mappings with an 'input_ids' key "
                             f"(and optionally 'labels', 'attention_mask'), got {keys}")
        if "index" in item or "targets" in item or "inputs" in item:
            clash = next(k for k in ("index", "targets", "inputs") if k in item)
            raise ValueError(f"language-modeling items may not have a {clash!r} field "
                             "(the task builds inputs and targets from input_ids and labels; kdforge adds index)")
        extras = {k: v for k, v in item.items() if k not in ITEM_KEYS}
        return lm_batch(item["input_ids"], item.get("labels"), item.get("attention_mask"), **extras)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's logits ``(batch, seq, vocab)``."""
        mask = batch.extras.get("attention_mask")
        output = model(batch.inputs) if mask is None else model(batch.inputs, attention_mask=mask)
        logits = getattr(output, "logits", None)
        return logits if isinstance(logits, torch.Tensor) else output

    def check_outputs(self, logits: torch.Tensor, batch: Batch, splits: DataSplits) -> None:
        """Logits ``(batch, seq, vocab)`` with ``vocab`` >= the tokenizer's size; token ids within it."""
        vocab = splits.num_classes
        inputs = batch.inputs
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(inputs.shape):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"gives outputs of shape {got} for token ids of shape {tuple(inputs.shape)}; "
                             f"a language model returns logits (batch, seq, vocab)")
        if logits.shape[-1] < vocab:
            raise ValueError(f"gives logits over a vocabulary of {logits.shape[-1]} tokens, but the tokenizer has "
                             f"{vocab}: every token id needs a logit (set the model's vocab size to at least {vocab})")
        if inputs.numel() and int(inputs.max()) >= vocab:
            raise ValueError(f"is given token id {int(inputs.max())}, beyond the tokenizer's {vocab} tokens")
        targets = batch.targets
        if targets is not None and bool(target_mask(targets).any()):
            top = int(targets[target_mask(targets)].max())
            if top >= vocab:
                raise ValueError(f"has target token {top}, beyond the tokenizer's {vocab} tokens")

    def batch_weight(self, batch: Batch) -> torch.Tensor:
        """The batch's target tokens, as a device tensor (no host sync)."""
        return target_mask(batch.targets).sum()

    def has_labels(self, batch: Batch) -> bool:
        """Whether any position has a target token."""
        return batch.targets is not None and bool(target_mask(batch.targets).any())

    def eval_batch(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Summed token NLL (float32 log-softmax), target tokens, and tokens predicted right at top-1."""
        targets = batch.targets
        mask = target_mask(targets)
        flat = logits.float().reshape(-1, logits.shape[-1])
        nll = F.cross_entropy(flat, targets.reshape(-1).clamp_min(0), reduction="none")
        mask_flat = mask.reshape(-1)
        correct = flat.argmax(dim=-1).eq(targets.reshape(-1)) & mask_flat
        return {"nll": (nll * mask_flat).double().sum(), "tokens": mask_flat.sum(), "correct": correct.sum()}

    def eval_result(self, sums: Mapping[str, float]) -> dict[str, float | None]:
        """``token_nll`` (nats per token), ``perplexity`` = exp(token_nll), next-token ``accuracy``."""
        tokens = sums.get("tokens", 0.0)
        if not tokens:
            return {"perplexity": None, "token_nll": None, "accuracy": None}
        nll = sums["nll"] / tokens
        return {"perplexity": math.exp(min(nll, 700.0)), "token_nll": nll, "accuracy": sums["correct"] / tokens}


@hookimpl
def register_tasks(register) -> None:
    """Register ``language_modeling``."""
    register("language_modeling", LanguageModeling)
