"""Self-distillation with auxiliary exits: ``byot`` (Zhang et al. 2019, "Be Your Own Teacher").

No external teacher. Shallow exits (a bottleneck + classifier each, owned by the loss)
sit on student taps; the student's own final classifier is the deepest exit and teaches
them. Every exit's accuracy is reported, and each shallow exit is exported as an
early-exit model that the ``early_exit`` plugin loads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdforge import (
    RUN_DIR,
    ExtraModel,
    RecipeError,
    StepOutputs,
    full_precision,
    hookimpl,
    load_student,
    load_weights,
    record_extra_model,
    save_weights,
)
from kdforge.plugins.losses import kd_divergence, masked_cross_entropy

EXPORT_DIR = "early_exits"


def pooled(x: torch.Tensor) -> torch.Tensor:
    """A feature as one vector per sample (global average pooling for maps)."""
    if x.ndim == 4:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)
    return x.flatten(1)


class ExitHead(nn.Module):
    """Bottleneck to the deepest feature's width, then a linear classifier."""

    def __init__(self, in_channels: int, width: int, num_classes: int, spatial: bool) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "width": width, "num_classes": num_classes, "spatial": spatial}
        if spatial:
            self.bottleneck = nn.Sequential(
                nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
        else:
            self.bottleneck = nn.Sequential(nn.Flatten(), nn.Linear(in_channels, width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hint = self.bottleneck(feature)
        return hint, self.classifier(hint)


@full_precision
def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||a - b||^2, in float32."""
    return (a.float() - b.float()).pow(2).sum(dim=1).mean()


def _head_key(tap: str) -> str:
    return tap.replace(".", "_")


class BeYourOwnTeacher(nn.Module):
    """BYOT: CE on every exit, KD from the deepest exit to each shallower one, and a feature hint.

    loss = CE(deep) + sum_i [(1 - alpha) CE(exit_i) + alpha T^2 KL(p_deep(T) || p_i(T))
                             + beta ||h_i - f_deep||^2]
    with h_i the exit's bottleneck output and f_deep the (pooled) ``deep_tap`` feature; the
    deepest outputs act as teacher (no gradient through them from these terms). ``taps``
    are the shallow exits, shallow to deep. The paper's alpha and lambda are ``alpha`` and
    ``beta`` here; defaults follow the authors' code (0.3, 0.03, T = 3).
    """

    def __init__(
        self,
        taps: Annotated[list[str], Field(min_length=1)],
        deep_tap: str,
        temperature: Annotated[float, Field(gt=0.0)] = 3.0,
        alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3,
        beta: Annotated[float, Field(ge=0.0)] = 0.03,
    ) -> None:
        super().__init__()
        self.taps, self.deep_tap = list(taps), deep_tap
        self.student_taps = [*self.taps, deep_tap]
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.heads = nn.ModuleDict()

    def _exits(self, out: StepOutputs) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        features = out.student.features
        missing = [t for t in self.student_taps if t not in features]
        if missing:
            raise ValueError(f"byot needs the student features {missing}")
        if not self.heads:
            width = pooled(features[self.deep_tap]).shape[1]
            num_classes = out.student.logits.shape[1]
            for tap in self.taps:
                f = features[tap]
                spatial = f.ndim == 4
                head = ExitHead(f.shape[1] if spatial else f[0].numel(), width, num_classes, spatial=spatial)
                self.heads[_head_key(tap)] = head.to(f.device)
        exits = []
        for tap in self.taps:
            hint, logits = self.heads[_head_key(tap)](features[tap])
            exits.append((tap, hint, logits))
        return exits

    def forward(self, out: StepOutputs) -> torch.Tensor:
        deep_logits = out.student.logits
        deep_feature = pooled(out.student.features[self.deep_tap]).float().detach() if self.deep_tap in out.student.features else None
        t = float(self.temperature)
        teacher_log_probs = F.log_softmax(deep_logits.detach().float() / t, dim=-1)
        total = masked_cross_entropy(deep_logits, out.targets)
        for _, hint, logits in self._exits(out):
            total = total + (1.0 - self.alpha) * masked_cross_entropy(logits, out.targets)
            total = total + self.alpha * kd_divergence(logits, teacher_log_probs, t)
            total = total + self.beta * squared_distance(hint, deep_feature)
        return total

    def eval_logits(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        """Each shallow exit's logits, by tap, so every exit's metrics are reported (``student/exits/<tap>/...``)."""
        return {tap: logits for tap, _, logits in self._exits(out)}

    def export(self, student: nn.Module, run_dir: Path) -> None:
        """Write each exit's head (weights and shape) under ``early_exits/`` for ``early_exit``, and record it
        as an extra model of the run (so ``kdforge profile`` and ``kdforge export`` include it)."""
        for tap in self.taps:
            head = self.heads[_head_key(tap)]
            save_weights(head, run_dir / EXPORT_DIR / f"{tap}.safetensors")
            (run_dir / EXPORT_DIR / f"{tap}.json").write_text(json.dumps({"tap": tap, **head.config}, indent=2))
            record_extra_model(run_dir, ExtraModel(name=f"exit-{tap}", plugin="early_exit", head=tap,
                                                   params={"path": RUN_DIR, "exit": tap}))


class ExitModel(nn.Module):
    """An early exit as a plain module: the backbone's first layers up to the tap, then the exit's head.

    Unlike ``EarlyExitModel`` (which stops the backbone by raising from a hook), it holds
    only the layers the exit runs, so exporters can trace it.
    """

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))[1]


class _CaptureTrunk(nn.Module):
    """Fallback trunk: runs the whole backbone and returns the tap's output (for backbones fx cannot trace)."""

    def __init__(self, backbone: nn.Module, tap: str) -> None:
        super().__init__()
        self.backbone, self.tap = backbone, tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.backbone.get_submodule(self.tap).register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.backbone(x)
        finally:
            handle.remove()
        return captured[0]


def cut_at(backbone: nn.Module, tap: str) -> nn.Module:
    """``backbone`` up to (and including) the module ``tap``, as an fx ``GraphModule`` (or the capture fallback)."""
    import torch.fx as fx

    class Tracer(fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return name == tap or super().is_leaf_module(module, name)

    try:
        graph = Tracer().trace(backbone)
    except Exception:  # noqa: BLE001 - data-dependent control flow: fall back to running it all
        return _CaptureTrunk(backbone, tap)
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == tap), None)
    if node is None:
        return _CaptureTrunk(backbone, tap)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (node,)
    module = fx.GraphModule(backbone, graph)
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()
    return module


class _ExitReached(Exception):
    def __init__(self, feature: torch.Tensor) -> None:
        super().__init__()
        self.feature = feature


class EarlyExitModel(nn.Module):
    """The student cut at a tap: runs the backbone only up to the exit, then the exit's head."""

    def __init__(self, backbone: nn.Module, tap: str, head: ExitHead) -> None:
        super().__init__()
        self.backbone, self.tap, self.head = backbone, tap, head
        self._traced = False
        self.backbone.get_submodule(tap).register_forward_hook(self._stop)

    @staticmethod
    def _stop(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        raise _ExitReached(output)  # skip the rest of the backbone

    def forward(self, inputs: Any) -> torch.Tensor:
        ran: set[nn.Module] | None = None
        handles = []
        if not self._traced:
            # First call: note which modules run before the exit; the rest never get a gradient,
            # so freeze them (DDP would otherwise wait forever for their gradients).
            ran = set()
            handles = [m.register_forward_pre_hook(lambda module, _args: ran.add(module)) for m in self.backbone.modules()]
        try:
            self.backbone(inputs)
        except _ExitReached as reached:
            return self.head(reached.feature)[1]
        finally:
            for handle in handles:
                handle.remove()
            if ran is not None:
                for module in self.backbone.modules():
                    if module not in ran:
                        module.requires_grad_(False)
                self._traced = True
        raise RuntimeError(f"the backbone never ran {self.tap!r}")

    def traceable(self) -> ExitModel:
        """The same exit as a plain module of only the layers it runs (what ``kdforge export`` writes)."""
        backbone = copy.deepcopy(self.backbone)
        backbone.get_submodule(self.tap)._forward_hooks.clear()  # the stop-here hook
        return ExitModel(cut_at(backbone, self.tap), copy.deepcopy(self.head))


def early_exit(path: str, exit: str) -> EarlyExitModel:
    """A shallow exit of a finished ``byot`` run (``path``) as a standalone model (student or teacher)."""
    meta_file = Path(path) / EXPORT_DIR / f"{exit}.json"
    if not meta_file.is_file():
        found = sorted(p.stem for p in (Path(path) / EXPORT_DIR).glob("*.json"))
        raise RecipeError(f"no exported exit {exit!r} in {path!r} (exits: {', '.join(found) or 'none'})")
    meta = json.loads(meta_file.read_text())
    backbone = load_student(path, key=".path")
    head = ExitHead(meta["in_channels"], meta["width"], meta["num_classes"], meta["spatial"])
    load_weights(head, meta_file.with_suffix(".safetensors"))
    return EarlyExitModel(backbone, exit, head)


@hookimpl
def register_losses(register) -> None:
    """Register ``byot``."""
    register("byot", BeYourOwnTeacher)


@hookimpl
def register_students(register) -> None:
    """Register ``early_exit``."""
    register("early_exit", early_exit)


@hookimpl
def register_teachers(register) -> None:
    """Register ``early_exit``."""
    register("early_exit", early_exit)
