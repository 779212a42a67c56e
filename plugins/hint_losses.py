"""Hint-based distillation on feature taps: ``vid``, ``nst``, ``ft`` (with ``ft_paraphraser``), ``ab``, ``fsp``, ``ofd``.

Every loss here declares ``student_taps`` / ``teacher_taps`` and reads the tapped
features from ``out.student.features`` / ``out.teacher.features``. Trainable parts
(regressors, connectors, translators) are built on the first call from the tapped
shapes, on the features' device, and trained with the student. The teacher side never
gets a gradient. Loss math runs in float32 under any autocast.

A tap may be a *sum* of module outputs, written ``"a + b"``: the pre-activation output
of a residual block that no single module returns (``"layer3.4.bn2 + layer3.3"`` is the
last block of a CIFAR ResNet stage before its final ReLU: its residual branch plus its
input). The modules of a sum must return tensors of one shape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdforge import RecipeError, RunContext, StepOutputs, full_precision, hookimpl, load_weights, save_weights

TapList = Annotated[list[str], Field(min_length=1)]
PairWeights = list[Annotated[float, Field(ge=0.0)]] | None
PARAPHRASER_FILE = "ft_paraphraser.safetensors"
PARAPHRASER_CONFIG = "ft_paraphraser.json"


# -- taps -------------------------------------------------------------------------------
def tap_parts(spec: str) -> list[str]:
    """The module names of a tap spec: ``"a"`` -> ``["a"]``, ``"a + b"`` -> ``["a", "b"]``."""
    parts = [p.strip() for p in str(spec).split("+")]
    if not all(parts):
        raise ValueError(f"tap {spec!r} has an empty term; write a module name or 'a + b'")
    return parts


def tap_modules(specs: Sequence[str | None]) -> list[str]:
    """Every module name the specs read, each once, in order (the loss's ``*_taps`` attribute)."""
    names: list[str] = []
    for spec in specs:
        if spec:
            names += [p for p in tap_parts(spec) if p not in names]
    return names


def read_tap(features: dict[str, torch.Tensor], spec: str, side: str) -> torch.Tensor:
    """The tapped feature named by ``spec`` (the sum of its modules' outputs for ``"a + b"``)."""
    total = None
    for name in tap_parts(spec):
        try:
            value = features[name]
        except KeyError:
            raise ValueError(f"no {side} feature {name!r} was captured (taps seen: {sorted(features)})") from None
        if total is not None and value.shape != total.shape:
            raise ValueError(f"{side} tap {spec!r}: the terms have different shapes "
                             f"({tuple(total.shape)} and {name!r} {tuple(value.shape)})")
        total = value if total is None else total + value
    assert total is not None
    return total


def as_map(x: torch.Tensor, spec: str, side: str) -> torch.Tensor:
    """A feature as a (N, C, H, W) map: vectors (N, C) become (N, C, 1, 1)."""
    if x.ndim == 2:
        return x[:, :, None, None]
    if x.ndim != 4:
        raise ValueError(f"{side} tap {spec!r} has shape {tuple(x.shape)}; this loss needs (N, C, H, W) maps or (N, C) vectors")
    return x


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool whichever of two maps is larger to the other's H x W."""
    if a.shape[2:] == b.shape[2:]:
        return a, b
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    if tuple(a.shape[2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def matched_maps(fs: torch.Tensor, ft: torch.Tensor, s_tap: str, t_tap: str, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher maps of one H x W (pooled when ``pool``), or a ValueError naming both."""
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"batch sizes differ: student {s_tap!r} {tuple(fs.shape)} vs teacher {t_tap!r} {tuple(ft.shape)}")
    if fs.shape[2:] != ft.shape[2:]:
        if not pool:
            raise ValueError(f"spatial sizes differ: student {s_tap!r} {tuple(fs.shape)} vs teacher {t_tap!r} "
                             f"{tuple(ft.shape)}; set pool: true to pool the larger map")
        return pool_to_smaller(fs, ft)
    return fs, ft


def check_pairs(student_taps: Sequence[str], teacher_taps: Sequence[str], pair_weights: Sequence[float] | None,
                default: Sequence[float] | None = None) -> list[float]:
    """Validate tap lists paired by position; return one weight per pair."""
    if len(student_taps) != len(teacher_taps):
        raise ValueError(f"student_taps ({len(student_taps)}) and teacher_taps ({len(teacher_taps)}) "
                         "are paired by position and must have the same length")
    tap_modules(list(student_taps) + list(teacher_taps))  # refuses empty terms
    n = len(student_taps)
    if pair_weights is not None:
        if len(pair_weights) != n:
            raise ValueError(f"pair_weights needs one weight per tap pair ({n}), got {len(pair_weights)}")
        return [float(w) for w in pair_weights]
    return list(default) if default is not None else [1.0] * n


def halving_weights(n: int) -> list[float]:
    """``2^(i - n + 1)`` for pair i: the deepest pair weighs 1, each shallower one half the next."""
    return [2.0 ** (i - n + 1) for i in range(n)]


def conv_bn_connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv (He-normal, fan-out) + BatchNorm from student to teacher channels (OFD's / AB's connector)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / out_channels))
    bn = nn.BatchNorm2d(out_channels)
    return nn.Sequential(conv, bn)


def _pairs(loss: nn.Module) -> list[tuple[str, str, float]]:
    return list(zip(loss.student_specs, loss.teacher_specs, loss.pair_weights))


def _teacher_of(out: StepOutputs, name: str):
    if out.teacher is None:
        raise ValueError(f"the {name} loss needs a teacher")
    return out.teacher


class _PairedTaps(nn.Module):
    """Base for losses over student/teacher tap lists paired by position."""

    teacher_required = True

    def __init__(self, student_taps: Sequence[str], teacher_taps: Sequence[str],
                 pair_weights: Sequence[float] | None, default_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.pair_weights = check_pairs(student_taps, teacher_taps, pair_weights, default_weights)
        self.student_specs, self.teacher_specs = list(student_taps), list(teacher_taps)
        self.student_taps, self.teacher_taps = tap_modules(student_taps), tap_modules(teacher_taps)

    def maps(self, out: StepOutputs, name: str) -> list[tuple[str, str, float, torch.Tensor, torch.Tensor]]:
        """(student spec, teacher spec, weight, student map, detached teacher map) for every pair."""
        teacher = _teacher_of(out, name)
        result = []
        for s_spec, t_spec, weight in _pairs(self):
            fs = as_map(read_tap(out.student.features, s_spec, "student"), s_spec, "student")
            ft = as_map(read_tap(teacher.features, t_spec, "teacher"), t_spec, "teacher").detach()
            if fs.shape[0] != ft.shape[0]:
                raise ValueError(f"batch sizes differ: student {s_spec!r} {tuple(fs.shape)} vs teacher {t_spec!r} {tuple(ft.shape)}")
            result.append((s_spec, t_spec, weight, fs, ft))
        return result


# -- vid --------------------------------------------------------------------------------
def softplus_inverse(value: float) -> float:
    """x with softplus(x) = value (value > 0)."""
    return math.log(math.expm1(value))


@full_precision
def gaussian_nll(mean: torch.Tensor, target: torch.Tensor, raw_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over every entry of 0.5 * ((t - mu)^2 / var + log var), var_c = softplus(raw_c) + eps."""
    var = (F.softplus(raw_scale.float()) + eps).view(1, -1, 1, 1)
    return (0.5 * ((mean.float() - target.float()).pow(2) / var + var.log())).mean()


class VID(_PairedTaps):
    """Variational information distillation (Ahn et al. 2019): Gaussian NLL of teacher maps given the student's.

    Per pair: mu = regressor(F_s) (three 1x1 convs with ReLUs, built on the first call),
    var_c = softplus(alpha_c) + eps per teacher channel (alpha_c initialized so that var_c
    starts at ``init_pred_var``); loss = mean(0.5 * ((F_t - mu)^2 / var + log var)),
    summed over pairs with ``pair_weights``.
    """

    def __init__(
        self,
        student_taps: TapList,
        teacher_taps: TapList,
        pair_weights: PairWeights = None,
        mid_channels: Annotated[int, Field(ge=1)] | None = None,
        init_pred_var: Annotated[float, Field(gt=0.0)] = 5.0,
        eps: Annotated[float, Field(gt=0.0)] = 1e-5,
        pool: bool = True,
    ) -> None:
        super().__init__(student_taps, teacher_taps, pair_weights)
        if init_pred_var <= eps:
            raise ValueError(f"init_pred_var ({init_pred_var}) must be larger than eps ({eps})")
        self.mid_channels, self.init_pred_var, self.eps, self.pool = mid_channels, init_pred_var, eps, pool
        self.regressors = nn.ModuleList()
        self.raw_scales = nn.ParameterList()

    def _build(self, maps: list[tuple[Any, ...]]) -> None:
        for _, _, _, fs, ft in maps:
            c_s, c_t = fs.shape[1], ft.shape[1]
            mid = self.mid_channels or c_t
            regressor = nn.Sequential(
                nn.Conv2d(c_s, mid, 1, bias=False), nn.ReLU(),
                nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
                nn.Conv2d(mid, c_t, 1, bias=False),
            ).to(fs.device)
            self.regressors.append(regressor)
            start = softplus_inverse(self.init_pred_var - self.eps)
            self.raw_scales.append(nn.Parameter(torch.full((c_t,), start, device=fs.device)))

    def forward(self, out: StepOutputs) -> torch.Tensor:
        maps = self.maps(out, "vid")
        if not len(self.regressors):
            self._build(maps)
        total = out.student.logits.new_zeros((), dtype=torch.float32)
        for (s_spec, t_spec, weight, fs, ft), regressor, raw in zip(maps, self.regressors, self.raw_scales):
            if fs.shape[1] != regressor[0].in_channels or ft.shape[1] != raw.numel():
                raise ValueError(f"vid was built for {regressor[0].in_channels} -> {raw.numel()} channels, got student "
                                 f"{s_spec!r} {tuple(fs.shape)} and teacher {t_spec!r} {tuple(ft.shape)}")
            fs, ft = matched_maps(fs, ft, s_spec, t_spec, self.pool)
            total = total + weight * gaussian_nll(regressor(fs), ft, raw, self.eps)
        return total


# -- nst --------------------------------------------------------------------------------
@full_precision
def polynomial_mmd(fs: torch.Tensor, ft: torch.Tensor, degree: int, constant: float) -> torch.Tensor:
    """Squared MMD between the channels of (N, C, H, W) maps, each channel's H*W vector L2-normalized.

    k(x, y) = (x . y + c)^d; per sample mean k(t, t) + mean k(s, s) - 2 mean k(s, t) over all
    channel pairs, averaged over the batch. The teacher-teacher term is a constant.
    """
    s = F.normalize(fs.float().flatten(2), dim=2)
    t = F.normalize(ft.float().flatten(2), dim=2)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2) + constant).pow(degree).mean()

    return kernel(t, t).detach() + kernel(s, s) - 2.0 * kernel(s, t)


class NST(_PairedTaps):
    """Neuron selectivity transfer (Huang & Wang 2017): MMD between channel activation distributions.

    Each channel's H x W map is a sample; after L2 normalization, the squared MMD between
    the student's and the teacher's channels with the polynomial kernel
    k(x, y) = (x . y + c)^d (d = 2, c = 0 as the paper), summed over pairs.
    """

    def __init__(
        self,
        student_taps: TapList,
        teacher_taps: TapList,
        pair_weights: PairWeights = None,
        degree: Annotated[int, Field(ge=1)] = 2,
        constant: Annotated[float, Field(ge=0.0)] = 0.0,
        pool: bool = True,
    ) -> None:
        super().__init__(student_taps, teacher_taps, pair_weights)
        self.degree, self.constant, self.pool = degree, constant, pool

    def forward(self, out: StepOutputs) -> torch.Tensor:
        total = out.student.logits.new_zeros((), dtype=torch.float32)
        for s_spec, t_spec, weight, fs, ft in self.maps(out, "nst"):
            fs, ft = matched_maps(fs, ft, s_spec, t_spec, self.pool)
            total = total + weight * polynomial_mmd(fs, ft, self.degree, self.constant)
        return total


# -- ft ---------------------------------------------------------------------------------
def _conv_block(in_channels: int, out_channels: int, bn: bool, transposed: bool = False) -> list[nn.Module]:
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(in_channels, out_channels, 3, stride=1, padding=1)
    return [conv, *([nn.BatchNorm2d(out_channels)] if bn else []), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """FT's paraphraser: a convolutional autoencoder on a teacher map; its code is the *factor*.

    Encoder: 3x3 convs C -> C -> kC -> kC; decoder: 3x3 transposed convs kC -> kC -> C -> C;
    each followed by (BatchNorm and) LeakyReLU(0.1). ``k`` is the paraphrase rate.
    """

    def __init__(self, channels: int, rate: float = 0.5, batch_norm: bool = False) -> None:
        super().__init__()
        self.config = {"channels": int(channels), "rate": float(rate), "batch_norm": bool(batch_norm)}
        factor = factor_channels(channels, rate)
        self.encoder = nn.Sequential(*_conv_block(channels, channels, batch_norm),
                                     *_conv_block(channels, factor, batch_norm),
                                     *_conv_block(factor, factor, batch_norm))
        self.decoder = nn.Sequential(*_conv_block(factor, factor, batch_norm, True),
                                     *_conv_block(factor, channels, batch_norm, True),
                                     *_conv_block(channels, channels, batch_norm, True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factor, reconstruction) of a teacher map."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


def factor_channels(channels: int, rate: float) -> int:
    """Channels of the factor: ``int(channels * rate)``, at least 1."""
    return max(int(channels * rate), 1)


def translator(in_channels: int, out_channels: int, batch_norm: bool = True) -> nn.Sequential:
    """FT's translator on the student: the paraphraser's three encoder convs, student -> factor channels."""
    return nn.Sequential(*_conv_block(in_channels, in_channels, batch_norm),
                         *_conv_block(in_channels, out_channels, batch_norm),
                         *_conv_block(out_channels, out_channels, batch_norm))


@full_precision
def mse_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32."""
    return F.mse_loss(a.float(), b.float())


class FTParaphraser(nn.Module):
    """Stage 1 of factor transfer: train a paraphraser (autoencoder) to reconstruct one teacher map.

    loss = mean((decoder(encoder(F_t)) - F_t)^2). Nothing reaches the student: the run's
    student stays as initialized. At the end of the run the paraphraser is written to
    ``ft_paraphraser.safetensors`` (with ``ft_paraphraser.json``) in the run directory,
    where the stage-2 ``ft`` loss loads it (``paraphraser: <that run directory>``).
    """

    teacher_required = True

    def __init__(
        self,
        teacher_tap: str,
        rate: Annotated[float, Field(gt=0.0, le=4.0)] = 0.5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.teacher_tap, self.rate, self.batch_norm = teacher_tap, rate, batch_norm
        self.student_taps: list[str] = []
        self.teacher_taps = tap_modules([teacher_tap])
        self.paraphraser: Paraphraser | None = None

    def forward(self, out: StepOutputs) -> torch.Tensor:
        teacher = _teacher_of(out, "ft_paraphraser")
        ft = read_tap(teacher.features, self.teacher_tap, "teacher").detach()
        if ft.ndim != 4:
            raise ValueError(f"ft_paraphraser needs an (N, C, H, W) teacher map; {self.teacher_tap!r} has shape {tuple(ft.shape)}")
        if self.paraphraser is None:
            self.paraphraser = Paraphraser(ft.shape[1], self.rate, self.batch_norm).to(ft.device)
        _, reconstruction = self.paraphraser(ft)
        return mse_float32(reconstruction, ft)

    def export(self, student: nn.Module, run_dir: Path) -> None:
        """Write the paraphraser's weights and shape for the stage-2 ``ft`` loss."""
        if self.paraphraser is None:
            return
        save_weights(self.paraphraser, Path(run_dir) / PARAPHRASER_FILE)
        config = {"teacher_tap": self.teacher_tap, **self.paraphraser.config}
        (Path(run_dir) / PARAPHRASER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_paraphraser_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``ft_paraphraser.json`` of a stage-1 run, or ``None`` when it is not there (yet)."""
    path = Path(run_dir) / PARAPHRASER_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text())


@full_precision
def factor_distance(fs: torch.Tensor, ft: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    """FT's loss between student and teacher factors (N, C, H, W), in float32.

    paper: F^ = vec(F) / ||vec(F)||_2 per sample; mean over the batch of ||F^_s - F^_t||_p.
    code (RepDistiller): F^ = normalize(mean_c F^2) per sample; mean over entries of |F^_s - F^_t|^p.
    """
    fs, ft = fs.float(), ft.float()
    if mode == "paper":
        diff = F.normalize(fs.flatten(1), dim=1) - F.normalize(ft.flatten(1), dim=1)
        return torch.linalg.vector_norm(diff, ord=p, dim=1).mean()
    diff = F.normalize(fs.pow(2).mean(1).flatten(1), dim=1) - F.normalize(ft.pow(2).mean(1).flatten(1), dim=1)
    return diff.abs().pow(p).mean()


class FactorTransfer(nn.Module):
    """Factor transfer (Kim et al. 2018), stage 2: a translator on the student matches the paraphraser's factors.

    The paraphraser comes from a finished ``ft_paraphraser`` run (``paraphraser``: its run
    directory) and stays frozen; the translator (three 3x3 convs, student -> factor
    channels) is built on the first call and trained with the student.
    ``mode: paper``: mean over the batch of ||F^_s - F^_t||_p with F^ = vec(F)/||vec(F)||_2;
    ``mode: code``: RepDistiller's mean |normalize(mean_c F_s^2) - normalize(mean_c F_t^2)|^p.
    """

    teacher_required = True

    def __init__(
        self,
        student_tap: str,
        teacher_tap: str,
        paraphraser: str,
        p: Literal[1, 2] = 1,
        mode: Literal["paper", "code"] = "paper",
        translator_bn: bool = True,
        pool: bool = True,
    ) -> None:
        super().__init__()
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.student_taps, self.teacher_taps = tap_modules([student_tap]), tap_modules([teacher_tap])
        self.paraphraser_dir, self.p, self.mode, self.translator_bn, self.pool = paraphraser, p, mode, translator_bn, pool
        self.paraphraser: Paraphraser | None = None
        self.translator: nn.Module | None = None
        self.paraphraser_loaded = False

    # the frozen paraphraser stays in eval mode whatever the engine asks of the loss
    def train(self, mode: bool = True) -> "FactorTransfer":
        super().train(mode)
        if self.paraphraser is not None:
            self.paraphraser.eval()
        return self

    def _build_paraphraser(self, channels: int, device: torch.device) -> None:
        config = read_paraphraser_config(self.paraphraser_dir) or {}
        rate, bn = config.get("rate", 0.5), config.get("batch_norm", False)
        self.paraphraser = Paraphraser(config.get("channels", channels), rate, bn).to(device)
        self.paraphraser.requires_grad_(False).eval()
        if config:
            self.load_paraphraser()

    def load_paraphraser(self) -> None:
        """Load the stage-1 paraphraser from ``paraphraser`` (its run directory) into this loss."""
        directory = Path(self.paraphraser_dir)
        config = read_paraphraser_config(directory)
        weights = directory / PARAPHRASER_FILE
        if config is None or not weights.is_file():
            raise RecipeError(f"ft: no paraphraser in {str(directory)!r} (needs {PARAPHRASER_FILE} and {PARAPHRASER_CONFIG}); "
                              "run the stage-1 recipe with the ft_paraphraser loss first")
        if config.get("teacher_tap") != self.teacher_tap:
            raise RecipeError(f"ft: the paraphraser in {str(directory)!r} was trained on teacher tap "
                              f"{config.get('teacher_tap')!r}, this loss taps {self.teacher_tap!r}")
        if self.paraphraser is None:
            return  # built (and loaded) on the first call
        if self.paraphraser.config != {k: config.get(k) for k in self.paraphraser.config}:
            raise RecipeError(f"ft: the paraphraser in {str(directory)!r} has shape {config}, "
                              f"but the teacher tap gives {self.paraphraser.config}")
        load_weights(self.paraphraser, weights)
        self.paraphraser.requires_grad_(False).eval()
        self.paraphraser_loaded = True

    def on_fit_start(self, run: RunContext) -> None:
        """Load the paraphraser before the first step (again after the dry run, which resets BatchNorm stats)."""
        self.load_paraphraser()

    def forward(self, out: StepOutputs) -> torch.Tensor:
        teacher = _teacher_of(out, "ft")
        fs = read_tap(out.student.features, self.student_tap, "student")
        ft = read_tap(teacher.features, self.teacher_tap, "teacher").detach()
        if fs.ndim != 4 or ft.ndim != 4:
            raise ValueError(f"ft needs (N, C, H, W) maps; got student {self.student_tap!r} {tuple(fs.shape)} "
                             f"and teacher {self.teacher_tap!r} {tuple(ft.shape)}")
        if self.paraphraser is None:
            self._build_paraphraser(ft.shape[1], ft.device)
        if ft.shape[1] != self.paraphraser.config["channels"]:
            raise ValueError(f"the paraphraser takes {self.paraphraser.config['channels']} channels, teacher "
                             f"{self.teacher_tap!r} has shape {tuple(ft.shape)}")
        factor_out = factor_channels(self.paraphraser.config["channels"], self.paraphraser.config["rate"])
        if self.translator is None:
            self.translator = translator(fs.shape[1], factor_out, self.translator_bn).to(fs.device)
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(ft)
        factor_s = self.translator(fs)
        factor_s, factor_t = matched_maps(factor_s, factor_t, self.student_tap, self.teacher_tap, self.pool)
        return factor_distance(factor_s, factor_t, self.p, self.mode)


# -- ab ---------------------------------------------------------------------------------
@full_precision
def boundary_hinge(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """AB's alternative squared hinge, summed over entries and averaged over the batch.

    Where the teacher neuron is active (t > 0): max(0, m - s)^2; where inactive: max(0, m + s)^2.
    """
    s, t = s.float(), t.float()
    active = t > 0
    per_entry = torch.where(active, F.relu(margin - s), F.relu(margin + s)).pow(2)
    return per_entry.sum() / s.shape[0]


class ActivationBoundary(_PairedTaps):
    """Activation-boundary transfer (Heo et al. 2019): the student's connector output must agree with
    the sign of the teacher's pre-ReLU response, by a margin.

    Per pair: r = connector(F_s) (1x1 conv + BN, built on the first call);
    loss = sum over entries of [t > 0] max(0, m - r)^2 + [t <= 0] max(0, m + r)^2, over the
    batch size, summed over pairs with ``pair_weights`` (default 2^(i - n + 1): the deepest
    pair 1, each shallower one half). Tap pre-ReLU values on both sides.
    """

    def __init__(
        self,
        student_taps: TapList,
        teacher_taps: TapList,
        pair_weights: PairWeights = None,
        margin: Annotated[float, Field(ge=0.0)] = 1.0,
        pool: bool = True,
    ) -> None:
        super().__init__(student_taps, teacher_taps, pair_weights, halving_weights(len(student_taps)))
        self.margin, self.pool = margin, pool
        self.connectors = nn.ModuleList()

    def forward(self, out: StepOutputs) -> torch.Tensor:
        maps = self.maps(out, "ab")
        if not len(self.connectors):
            for _, _, _, fs, ft in maps:
                self.connectors.append(conv_bn_connector(fs.shape[1], ft.shape[1]).to(fs.device))
        total = out.student.logits.new_zeros((), dtype=torch.float32)
        for (s_spec, t_spec, weight, fs, ft), connector in zip(maps, self.connectors):
            _check_connector(connector, fs, ft, s_spec, t_spec, "ab")
            r, ft = matched_maps(connector(fs), ft, s_spec, t_spec, self.pool)
            total = total + weight * boundary_hinge(r, ft, self.margin)
        return total


def _check_connector(connector: nn.Sequential, fs: torch.Tensor, ft: torch.Tensor, s_spec: str, t_spec: str,
                     name: str) -> None:
    conv = connector[0]
    if fs.shape[1] != conv.in_channels or ft.shape[1] != conv.out_channels:
        raise ValueError(f"{name} was built for {conv.in_channels} -> {conv.out_channels} channels, got student "
                         f"{s_spec!r} {tuple(fs.shape)} and teacher {t_spec!r} {tuple(ft.shape)}")


# -- fsp --------------------------------------------------------------------------------
@full_precision
def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """G_ij = sum over positions of F1_i * F2_j / (H * W), shape (N, C1, C2); the larger map is pooled first."""
    first, second = pool_to_smaller(first.float(), second.float())
    hw = first.shape[2] * first.shape[3]
    return first.flatten(2) @ second.flatten(2).transpose(1, 2) / hw


@full_precision
def fsp_distance(gs: torch.Tensor, gt: torch.Tensor, mode: str) -> torch.Tensor:
    """code: mean over entries of (G_s - G_t)^2; paper: mean over the batch of ||G_s - G_t||_F^2."""
    diff = (gs.float() - gt.float()).pow(2)
    return diff.mean() if mode == "code" else diff.flatten(1).sum(dim=1).mean()


class FSP(_PairedTaps):
    """Flow of solution procedure (Yim et al. 2017): match the Gram matrices between consecutive taps.

    ``student_taps`` / ``teacher_taps`` list layers in order; each consecutive pair (tap k,
    tap k+1) gives an FSP matrix G = F_k^T F_(k+1) / (H * W) (the larger map pooled to the
    smaller). loss = sum over the n - 1 pairs of w_k * distance(G_s,k, G_t,k). Student and
    teacher channels must match, unless ``connectors: true`` maps each student tap to the
    teacher's channels first (a 1x1 conv + BN: our addition).
    """

    def __init__(
        self,
        student_taps: Annotated[list[str], Field(min_length=2)],
        teacher_taps: Annotated[list[str], Field(min_length=2)],
        pair_weights: PairWeights = None,
        mode: Literal["code", "paper"] = "code",
        connectors: bool = False,
    ) -> None:
        check_pairs(student_taps, teacher_taps, None)
        n = len(student_taps) - 1
        if pair_weights is not None and len(pair_weights) != n:
            raise ValueError(f"pair_weights needs one weight per consecutive tap pair ({n} for {n + 1} taps), "
                             f"got {len(pair_weights)}")
        super().__init__(student_taps, teacher_taps, None)
        self.pair_weights = [float(w) for w in pair_weights] if pair_weights is not None else [1.0] * n
        self.mode, self.use_connectors = mode, connectors
        self.connectors = nn.ModuleList()

    def forward(self, out: StepOutputs) -> torch.Tensor:
        teacher = _teacher_of(out, "fsp")
        student_maps, teacher_maps = [], []
        for s_spec, t_spec in zip(self.student_specs, self.teacher_specs):
            fs = as_map(read_tap(out.student.features, s_spec, "student"), s_spec, "student")
            ft = as_map(read_tap(teacher.features, t_spec, "teacher"), t_spec, "teacher").detach()
            if not self.use_connectors and fs.shape[1] != ft.shape[1]:
                raise ValueError(f"fsp needs the same channels on both sides: student {s_spec!r} {tuple(fs.shape)} vs "
                                 f"teacher {t_spec!r} {tuple(ft.shape)}; set connectors: true to map the student's")
            student_maps.append(fs)
            teacher_maps.append(ft)
        if self.use_connectors:
            if not len(self.connectors):
                for fs, ft in zip(student_maps, teacher_maps):
                    self.connectors.append(conv_bn_connector(fs.shape[1], ft.shape[1]).to(fs.device))
            for i, connector in enumerate(self.connectors):
                _check_connector(connector, student_maps[i], teacher_maps[i], self.student_specs[i],
                                 self.teacher_specs[i], "fsp")
                student_maps[i] = connector(student_maps[i])
        total = out.student.logits.new_zeros((), dtype=torch.float32)
        for k, weight in enumerate(self.pair_weights):
            gs = fsp_matrix(student_maps[k], student_maps[k + 1])
            gt = fsp_matrix(teacher_maps[k], teacher_maps[k + 1])
            total = total + weight * fsp_distance(gs, gt, self.mode)
        return total


# -- ofd --------------------------------------------------------------------------------
def bn_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per channel E[x | x < 0] for x ~ N(bias, |weight|^2), the BatchNorm output's distribution.

    m = mu - sigma * phi(mu / sigma) / Phi(-mu / sigma); where Phi(-mu / sigma) <= 0.001
    (almost never negative) m = -3 sigma, as the paper's code. Computed in float64.
    """
    sigma = weight.detach().double().abs().clamp_min(1e-12)
    mu = bias.detach().double()
    z = mu / sigma
    tail = torch.special.ndtr(-z)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    expected = mu - sigma * density / tail.clamp_min(1e-300)
    return torch.where(tail > 1e-3, expected, -3.0 * sigma).float()


def batch_margin(ft: torch.Tensor) -> torch.Tensor:
    """The margin from the batch's per-channel mean and std of a teacher map (used until BN margins are set)."""
    x = ft.detach().double().transpose(0, 1).flatten(1)
    return bn_margin(x.std(dim=1, unbiased=False), x.mean(dim=1))


@full_precision
def partial_l2(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2: target t' = max(t, m); (s - t')^2 except where s <= t' and t' <= 0; sum / N."""
    s, t = s.float(), t.float()
    target = torch.maximum(t, margin.float().view(1, -1, 1, 1))
    keep = (s > target) | (target > 0)
    return ((s - target).pow(2) * keep).sum() / s.shape[0]


class OFD(_PairedTaps):
    """Overhaul of feature distillation (Heo et al. 2019): partial L2 between a connector(student) and the
    teacher's pre-ReLU map clamped below at a per-channel margin.

    margin_c = E[x | x < 0] for x ~ N(beta_c, gamma_c^2) of the teacher BatchNorm before the
    tap (``teacher_bns``; default: each teacher tap's first term, which must then be a
    BatchNorm). Target t' = max(t, margin); loss = sum over entries of (r - t')^2 except
    where r <= t' <= 0, over the batch size; r = connector(F_s) (1x1 conv + BN). Pairs are
    summed with ``pair_weights`` (default 2^-(n-1-i): the deepest pair 1).
    """

    def __init__(
        self,
        student_taps: TapList,
        teacher_taps: TapList,
        teacher_bns: list[str] | None = None,
        pair_weights: PairWeights = None,
        pool: bool = True,
    ) -> None:
        super().__init__(student_taps, teacher_taps, pair_weights, halving_weights(len(student_taps)))
        if teacher_bns is not None and len(teacher_bns) != len(teacher_taps):
            raise ValueError(f"teacher_bns needs one BatchNorm per teacher tap ({len(teacher_taps)}), got {len(teacher_bns)}")
        self.teacher_bns = list(teacher_bns) if teacher_bns is not None else [tap_parts(t)[0] for t in teacher_taps]
        self.pool = pool
        self.connectors = nn.ModuleList()
        # per pair, from the teacher's BatchNorms (set_margins, called at fit start); a fixed function of
        # the frozen teacher, so recomputed rather than checkpointed
        self.bn_margins: list[torch.Tensor] | None = None

    def set_margins(self, teacher: nn.Module) -> None:
        """Compute every pair's margin from the teacher's BatchNorm modules (``teacher_bns``)."""
        margins = []
        for name in self.teacher_bns:
            try:
                module = teacher.get_submodule(name)
            except AttributeError:
                raise RecipeError(f"ofd: teacher {type(teacher).__name__} has no module {name!r} (teacher_bns)") from None
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.weight is None:
                raise RecipeError(f"ofd: teacher module {name!r} is a {type(module).__name__}, not an affine BatchNorm; "
                                  "name the BatchNorm before each tapped pre-ReLU point in teacher_bns")
            margins.append(bn_margin(module.weight, module.bias))
        self.bn_margins = margins

    def on_fit_start(self, run: RunContext) -> None:
        """Margins from the teacher's BatchNorm statistics, before the first step."""
        if run.teacher is not None:
            self.set_margins(run.teacher)

    def _margin(self, i: int, t_spec: str, ft: torch.Tensor) -> torch.Tensor:
        if self.bn_margins is None:
            return batch_margin(ft).to(ft.device)
        margin = self.bn_margins[i]
        if margin.numel() != ft.shape[1]:
            raise ValueError(f"ofd: teacher BatchNorm {self.teacher_bns[i]!r} has {margin.numel()} channels, "
                             f"teacher tap {t_spec!r} has shape {tuple(ft.shape)}")
        if margin.device != ft.device:
            margin = self.bn_margins[i] = margin.to(ft.device)
        return margin

    def forward(self, out: StepOutputs) -> torch.Tensor:
        maps = self.maps(out, "ofd")
        if not len(self.connectors):
            for _, _, _, fs, ft in maps:
                self.connectors.append(conv_bn_connector(fs.shape[1], ft.shape[1]).to(fs.device))
        total = out.student.logits.new_zeros((), dtype=torch.float32)
        for i, ((s_spec, t_spec, weight, fs, ft), connector) in enumerate(zip(maps, self.connectors)):
            _check_connector(connector, fs, ft, s_spec, t_spec, "ofd")
            margin = self._margin(i, t_spec, ft)
            r, ft = matched_maps(connector(fs), ft, s_spec, t_spec, self.pool)
            total = total + weight * partial_l2(r, ft, margin)
        return total


@hookimpl
def register_losses(register) -> None:
    """Register ``vid``, ``nst``, ``ft``, ``ft_paraphraser``, ``ab``, ``fsp`` and ``ofd``."""
    register("vid", VID)
    register("nst", NST)
    register("ft", FactorTransfer)
    register("ft_paraphraser", FTParaphraser)
    register("ab", ActivationBoundary)
    register("fsp", FSP)
    register("ofd", OFD)
