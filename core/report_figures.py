"""The figures of ``kdforge report``: PNG files drawn with matplotlib (Agg backend, no display needed).

Every figure is a grid of panels of a fixed size (``PANEL_PX`` pixels each, at most
``MAX_COLUMNS`` per row) with one legend under the grid, so its pixel size follows from its
panel count alone (``figure_pixels``). Each run keeps its color in every figure; in a run's
lines the student is solid, its teacher dashed and extra heads (early exits, say) dotted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import RecipeError
from .extensions import EXTRA_HEADS_GROUP
from .report_data import RunData

DPI = 100
PANEL_INCHES = (6.0, 4.0)
LEGEND_INCHES = 0.6
MAX_COLUMNS = 2
PANEL_PX = (int(PANEL_INCHES[0] * DPI), int(PANEL_INCHES[1] * DPI))
#: one color per run, in the order the runs were given (matplotlib's tab10, colorblind-friendlier than the default cycle order)
RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
HEAD_STYLES = [":", (0, (5, 1, 1, 1)), (0, (1, 2)), (0, (3, 1, 1, 1, 1, 1))]
INSTALL = "pip install 'kdforge[report]'"


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or a one-line ``RecipeError`` naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise RecipeError(f"kdforge report draws its figures with matplotlib, which is not installed: {INSTALL}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> None:
    """Write a figure as PNG through a temporary file and a rename (two writers never leave a torn file)."""
    from .io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", metadata={"Software": "kdforge"})


def run_color(index: int) -> str:
    """The color of the run at ``index`` (cycling after ten runs)."""
    return RUN_COLORS[index % len(RUN_COLORS)]


def grid_shape(panels: int) -> tuple[int, int]:
    """``(rows, columns)`` of a figure with ``panels`` panels."""
    columns = min(max(panels, 1), MAX_COLUMNS)
    return math.ceil(max(panels, 1) / columns), columns


def figure_pixels(panels: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a figure with ``panels`` panels (legend strip included)."""
    rows, columns = grid_shape(panels)
    return columns * PANEL_PX[0], rows * PANEL_PX[1] + int(LEGEND_INCHES * DPI)


@dataclass
class Figure:
    """A figure written by the report: its file, title and pixel size."""

    path: Path
    title: str
    caption: str
    size: tuple[int, int]
    panels: list[str] = field(default_factory=list)


@dataclass
class Line:
    """One curve of a panel."""

    xs: Sequence[float]
    ys: Sequence[float]
    label: str
    color: str
    style: Any = "-"
    marker: str | None = None
    width: float = 1.8


@dataclass
class Panel:
    """One axes: its lines (or horizontal reference lines) and labels."""

    title: str
    ylabel: str
    lines: list[Line]
    xlabel: str = "epoch"
    percent: bool = False
    log_y: bool | None = None  # None: log when the positive values span more than two decades
    hlines: list[Line] | None = None
    secondary_steps: float | None = None  # steps per epoch: a top axis in optimizer steps


def _style_axes(ax: Any) -> None:
    ax.grid(True, alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9)


def _wants_log(panel: Panel) -> bool:
    if panel.log_y is not None:
        return panel.log_y
    values = [y for line in panel.lines for y in line.ys]
    if not values or min(values) <= 0:
        return False
    return max(values) / min(values) > 100


def draw(panels: list[Panel], title: str, path: Path) -> Figure:
    """Draw ``panels`` into one PNG at ``path`` (fixed pixel size, one shared legend below)."""
    plt = pyplot()
    rows, columns = grid_shape(len(panels))
    width, height = figure_pixels(len(panels))
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=13, fontweight="bold")
    axes = fig.subplots(rows, columns, squeeze=False)
    legend: dict[str, Any] = {}
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_visible(False)
            continue
        panel = panels[index]
        _style_axes(ax)
        scale = 100.0 if panel.percent else 1.0
        for line in panel.lines:
            handle, = ax.plot(line.xs, [scale * y for y in line.ys], linestyle=line.style, color=line.color,
                              marker=line.marker, markersize=3.5, linewidth=line.width, label=line.label)
            legend.setdefault(line.label, handle)
        for line in panel.hlines or []:
            handle = ax.axhline(scale * line.ys[0], linestyle=line.style, color=line.color, linewidth=line.width,
                                label=line.label, alpha=0.9)
            legend.setdefault(line.label, handle)
        if _wants_log(panel):
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel(panel.xlabel, fontsize=10)
        ax.set_ylabel(panel.ylabel, fontsize=10)
        if panel.secondary_steps:
            per_epoch = panel.secondary_steps
            top = ax.secondary_xaxis("top", functions=(lambda e: e * per_epoch, lambda s: s / per_epoch))
            top.set_xlabel("optimizer step", fontsize=9)
            top.tick_params(labelsize=8)
        if not panel.lines and not panel.hlines:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
    if legend:
        fig.legend(list(legend.values()), list(legend.keys()), loc="outside lower center",
                   ncols=min(len(legend), 4), fontsize=9, frameon=False)
    save_png(fig, path)
    plt.close(fig)
    return Figure(path, title, "", (width, height), [p.title for p in panels])


# -- the report's figures ----------------------------------------------------------------
def _labels(runs: list[RunData]) -> list[str]:
    """Run labels for legends (the run name; the directory too when two runs share a name)."""
    names = [r.name for r in runs]
    return [f"{r.name} ({r.path.name})" if names.count(r.name) > 1 else r.name for r in runs]


def _shared_steps(runs: list[RunData]) -> float | None:
    """Steps per epoch when every run has the same (a top axis in steps then reads right for all)."""
    values = {r.steps_per_epoch() for r in runs}
    return values.pop() if len(values) == 1 and None not in values else None


def _term_title(term: str) -> str:
    return "total loss (weighted sum of the terms)" if term == "" else f"{term} loss (unweighted)"


def loss_figure(runs: list[RunData], path: Path) -> Figure | None:
    """Training loss per term: the weighted total first, then each term, every run overlaid."""
    terms = [""] + list(dict.fromkeys(t for r in runs for t in r.loss_terms()))
    if not any(r.train for r in runs):
        return None
    steps = _shared_steps(runs)
    panels = []
    for term in terms:
        key = "train/loss" if term == "" else f"train/loss/{term}"
        lines = [Line(*r.train_series(key), label, run_color(i))
                 for i, (r, label) in enumerate(zip(runs, _labels(runs))) if r.train_series(key)[0]]
        if term and len(terms) == 2 and all(
                r.train_series(key)[1] == r.train_series("train/loss")[1] for r in runs if r.train_series(key)[0]):
            continue  # a single term equal to the total: the total panel shows it
        panels.append(Panel(_term_title(term), "loss (mean over the logging interval)", lines, secondary_steps=steps))
    figure = draw(panels, "Training loss", path)
    figure.caption = ("Training loss against training progress (fractional epochs; optimizer steps on top when the "
                      "runs share them), each point the mean over one logging interval. Terms are unweighted; "
                      "the total is the weighted sum that was minimized.")
    return figure


def _schedule_keys(run: RunData) -> list[str]:
    skip = ("train/loss", "train/samples_per_second", "train/lr", "train/grad_norm")
    return [k for k in run.train_keys() if not k.startswith(skip)]


def _schedule_title(key: str) -> tuple[str, str]:
    rest = key[len("train/"):]
    if rest.startswith("weight/"):
        return f"weight of the {rest[len('weight/'):]} term", "weight"
    term, _, param = rest.partition("/")
    return (f"{term}: {param}", param) if param else (rest, rest)


def schedule_figure(runs: list[RunData], path: Path) -> Figure | None:
    """Learning rate, scheduled loss weights and params (temperatures ...), gradient norm if logged."""
    if not any(r.train for r in runs):
        return None
    steps = _shared_steps(runs)
    labels = _labels(runs)

    def panel(key: str, title: str, ylabel: str, log_y: bool | None = None) -> Panel:
        lines = [Line(*r.train_series(key), label, run_color(i)) for i, (r, label) in enumerate(zip(runs, labels))
                 if r.train_series(key)[0]]
        return Panel(title, ylabel, lines, log_y=log_y, secondary_steps=steps)

    panels = [panel("train/lr", "learning rate (first parameter group)", "learning rate")]
    keys = list(dict.fromkeys(k for r in runs for k in _schedule_keys(r)))
    for key in sorted(keys, key=lambda k: not k.startswith("train/weight/")):  # weights, then params (stable)
        title, ylabel = _schedule_title(key)
        panels.append(panel(key, title, ylabel))
    if any("train/grad_norm" in r.train_keys() for r in runs):
        panels.append(panel("train/grad_norm", "gradient norm (before clipping)", "L2 norm"))
    if any("train/samples_per_second" in r.train_keys() for r in runs):
        panels.append(panel("train/samples_per_second", "training throughput (all processes)", "samples / second",
                            log_y=False))
    figure = draw(panels, "Learning rate, schedules and throughput", path)
    figure.caption = ("The learning rate, every scheduled loss weight and loss param (e.g. a temperature) and any "
                      "value a loss reports, as logged during training; then the training throughput. Constant "
                      "weights and params are not logged.")
    return figure


def _metric_keys(runs: list[RunData]) -> list[str]:
    metrics: dict[str, None] = {}
    for r in runs:
        metrics.setdefault(r.headline, None)
        for key in r.eval_keys():
            role, _, metric = key.partition("/")
            if role in ("student", "teacher") and "/" not in metric:
                metrics.setdefault(metric, None)
        for key in r.summary:
            role, _, metric = key.partition("/")
            if role == "teacher" and "/" not in metric and metric in metrics:
                metrics.setdefault(metric, None)
    return list(metrics)


def metric_title(metric: str) -> str:
    """``top5_accuracy`` -> ``top-5 accuracy``; ``accuracy`` -> ``top-1 accuracy``."""
    if metric == "accuracy":
        return "top-1 accuracy"
    if metric.startswith("top") and metric.endswith("_accuracy"):
        return f"top-{metric[3:-len('_accuracy')]} accuracy"
    return metric.replace("_", " ")


def metrics_figure(runs: list[RunData], path: Path) -> Figure | None:
    """Student (and teacher) metrics per epoch on the eval split; extra heads dotted."""
    metrics = [m for m in _metric_keys(runs) if any(r.eval_series(f"student/{m}")[0] for r in runs)]
    if not metrics:
        return None
    labels = _labels(runs)
    panels = []
    for metric in metrics:
        percent = "accuracy" in metric
        lines: list[Line] = []
        hlines: list[Line] = []
        for i, (r, label) in enumerate(zip(runs, labels)):
            color = run_color(i)
            xs, ys = r.eval_series(f"student/{metric}")
            marker = "o" if 0 < len(xs) <= 40 else None
            if xs:
                lines.append(Line(xs, ys, f"{label}: student" if r.has_teacher else label, color, "-", marker))
            txs, tys = r.eval_series(f"teacher/{metric}")
            if txs:  # a teacher that follows the student is evaluated every epoch
                lines.append(Line(txs, tys, f"{label}: teacher", color, "--", None, 1.4))
            elif isinstance(r.summary.get(f"teacher/{metric}"), (int, float)):
                hlines.append(Line([0], [float(r.summary[f"teacher/{metric}"])], f"{label}: teacher (before training)",
                                   color, "--", None, 1.2))
            group = f"student/{EXTRA_HEADS_GROUP}/"
            heads = sorted({k[len(group):].rpartition("/")[0] for k in r.eval_keys()
                            if k.startswith(group) and k.endswith(f"/{metric}")})
            for j, name in enumerate(heads):
                hxs, hys = r.eval_series(f"{group}{name}/{metric}")
                lines.append(Line(hxs, hys, f"{label}: head {name}", color, HEAD_STYLES[j % len(HEAD_STYLES)], None, 1.4))
        unit = " (%)" if percent else ""
        panels.append(Panel(f"{metric_title(metric)} on the eval split", f"{metric_title(metric)}{unit}", lines,
                            percent=percent, log_y=False, hlines=hlines))
    figure = draw(panels, "Evaluation metrics per epoch", path)
    figure.caption = ("The student's metrics on the eval split after every epoch (solid). Dashed: the teacher, "
                      "measured once before training (a horizontal line) or every epoch when it follows the "
                      "student. Dotted: the extra heads a loss evaluates (ExtraOutputs).")
    return figure


def tradeoff_figure(runs: list[RunData], path: Path) -> Figure | None:
    """Headline metric against student parameters, one point per run (several runs only)."""
    plt = pyplot()
    points = [(i, r) for i, r in enumerate(runs)
              if isinstance(r.summary.get("student/params"), int) and isinstance(r.final(f"student/{r.headline}"), (int, float))]
    if len(runs) < 2 or len(points) < 2 or len({r.headline for _, r in points}) != 1:
        return None
    metric = points[0][1].headline
    percent = "accuracy" in metric
    scale = 100.0 if percent else 1.0
    width, height = figure_pixels(1)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    fig.suptitle(f"{metric_title(metric)} against model size", fontsize=13, fontweight="bold")
    ax = fig.subplots()
    _style_axes(ax)
    labels = _labels(runs)
    handles = []
    for i, r in points:
        x, y = r.summary["student/params"], scale * float(r.final(f"student/{r.headline}"))
        handles.append(ax.scatter([x], [y], s=60, color=run_color(i), zorder=3, label=labels[i]))
        ax.annotate(labels[i], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("student parameters (log scale)", fontsize=10)
    ax.set_ylabel(f"final {metric_title(metric)}{' (%)' if percent else ''}", fontsize=10)
    ax.margins(x=0.25, y=0.15)
    fig.legend(handles, [labels[i] for i, _ in points], loc="outside lower center", ncols=min(len(points), 4),
               fontsize=9, frameon=False)
    save_png(fig, path)
    plt.close(fig)
    return Figure(path, "Accuracy against model size", "Each run's final headline metric against its student's "
                  "parameter count: up and to the left is better.", (width, height), [metric_title(metric)])


FIGURES: list[tuple[str, Callable[[list[RunData], Path], Figure | None]]] = [
    ("losses.png", loss_figure),
    ("schedules.png", schedule_figure),
    ("metrics.png", metrics_figure),
    ("tradeoff.png", tradeoff_figure),
]


def write_figures(runs: list[RunData], out: Path) -> list[Figure]:
    """Every figure that the runs have data for, written into ``out``."""
    figures = []
    for name, make in FIGURES:
        figure = make(runs, out / name)
        if figure is not None:
            figures.append(figure)
    return figures
