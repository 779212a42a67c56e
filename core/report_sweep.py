"""The report of a sweep: the objective against each parameter (the "accuracy versus temperature" plot),
the optimization history, the best trials and every trial, in ``<output_dir>/report/``."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .console import metric_text
from .report_figures import DPI, Figure, _style_axes, figure_pixels, metric_title, pyplot, save_png

if TYPE_CHECKING:
    from .sweep import Param, Sweep

BEST_COLOR = "#d62728"
TRIAL_COLOR = "#1f77b4"
PRUNED_COLOR = "#7f7f7f"


def _scale(metric: str) -> tuple[float, str]:
    name = metric.partition("/")[2] or metric
    percent = "accuracy" in name
    return (100.0 if percent else 1.0), f"{_role(metric)}{metric_title(name)}{' (%)' if percent else ''}"


def _role(metric: str) -> str:
    role = metric.partition("/")[0]
    return f"{role} " if role in ("student", "teacher") and "/" in metric else ""


def _file_name(key: str) -> str:
    return "objective-vs-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") + ".png"


def _last_intermediate(record: dict[str, Any]) -> float | None:
    values = record.get("intermediate") or {}
    if not values:
        return None
    return values[max(values, key=int)]


def _new_figure(title: str) -> tuple[Any, Any, Any, tuple[int, int]]:
    plt = pyplot()
    width, height = figure_pixels(1)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=13, fontweight="bold")
    ax = fig.subplots()
    _style_axes(ax)
    return plt, fig, ax, (width, height)


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 4), fontsize=9, frameon=False)
    save_png(fig, path)
    plt.close(fig)


def parameter_figure(param: "Param", records: list[dict[str, Any]], metric: str, direction: str,
                     path: Path) -> Figure:
    """The objective of every trial against one parameter: complete trials, pruned ones at their last report, the best."""
    scale, ylabel = _scale(metric)
    name = metric_title(metric.partition("/")[2] or metric)
    title = f"{_role(metric).capitalize() or ''}{name} versus {param.label}"
    plt, fig, ax, size = _new_figure(title)
    categorical = param.kind == "choice"
    positions = {json.dumps(c): i for i, c in enumerate(param.choices)} if categorical else {}

    def x_of(value: Any) -> float:
        return float(positions[json.dumps(value)]) if categorical else float(value)

    done = [r for r in records if r["state"] == "complete" and r["value"] is not None and param.key in r["params"]]
    pruned = [r for r in records if r["state"] == "pruned" and _last_intermediate(r) is not None and param.key in r["params"]]
    if done:
        ax.scatter([x_of(r["params"][param.key]) for r in done], [scale * r["value"] for r in done], s=46,
                   color=TRIAL_COLOR, zorder=3, label=f"trial ({len(done)})", edgecolors="white", linewidths=0.6)
    if pruned:
        ax.scatter([x_of(r["params"][param.key]) for r in pruned], [scale * _last_intermediate(r) for r in pruned],
                   s=46, facecolors="none", edgecolors=PRUNED_COLOR, zorder=3, label=f"pruned, at its last report ({len(pruned)})")
    if done:
        best = (max if direction == "maximize" else min)(done, key=lambda r: r["value"])
        bx, by = x_of(best["params"][param.key]), scale * best["value"]
        ax.scatter([bx], [by], s=220, marker="*", color=BEST_COLOR, zorder=4, label="best trial")
        shown = f"{by:.2f}%" if scale == 100.0 else f"{by:.4g}"
        note = ax.text(0.02, 0.03 if direction == "maximize" else 0.97,
                       f"best: trial {best['number']}, {param.label} = {_fmt(best['params'][param.key])}, {shown}",
                       transform=ax.transAxes, fontsize=9, color=BEST_COLOR, va="bottom" if direction == "maximize" else "top",
                       bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "0.85"})
        note.set_in_layout(False)
    _param_axis(ax, param, "x")
    unit = " (log scale)" if param.log and not categorical else ""
    ax.set_xlabel(f"{param.label}{unit}" + (f"   [{param.key}]" if param.label != param.key else ""), fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.margins(y=0.12)
    if not done and not pruned:
        ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
    _save(plt, fig, ax, path)
    return Figure(path, title, f"Every trial's {metric} against {param.key}: filled dots are complete trials, hollow "
                  f"ones pruned trials at their last reported epoch, the star the best trial.", size, [title])


def history_figure(records: list[dict[str, Any]], metric: str, direction: str, path: Path) -> Figure:
    """The objective per trial number, and the best so far."""
    scale, ylabel = _scale(metric)
    plt, fig, ax, size = _new_figure("Optimization history")
    done = sorted((r for r in records if r["state"] == "complete" and r["value"] is not None), key=lambda r: r["number"])
    if done:
        ax.scatter([r["number"] for r in done], [scale * r["value"] for r in done], s=40, color=TRIAL_COLOR, zorder=3,
                   label="trial")
        best, xs, ys = None, [], []
        for r in done:
            if best is None or (r["value"] > best if direction == "maximize" else r["value"] < best):
                best = r["value"]
            xs.append(r["number"])
            ys.append(scale * best)
        ax.step(xs, ys, where="post", color=BEST_COLOR, linewidth=1.8, label="best so far")
    pruned = [r for r in records if r["state"] == "pruned" and _last_intermediate(r) is not None]
    if pruned:
        ax.scatter([r["number"] for r in pruned], [scale * _last_intermediate(r) for r in pruned], s=40,
                   facecolors="none", edgecolors=PRUNED_COLOR, label="pruned (last report)")
    ax.set_xlabel("trial number (in the order the study opened them)", fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _save(plt, fig, ax, path)
    return Figure(path, "Optimization history", f"{metric} of each trial by trial number, and the best value found "
                  f"so far (the sampler learns from the finished trials).", size, ["Optimization history"])


def pair_figure(a: "Param", b: "Param", records: list[dict[str, Any]], metric: str, path: Path) -> Figure:
    """Two parameters against each other, each complete trial colored by its objective."""
    scale, ylabel = _scale(metric)
    title = f"{a.label} and {b.label}"
    plt, fig, ax, size = _new_figure(title)
    done = [r for r in records if r["state"] == "complete" and r["value"] is not None]

    def axis(param: "Param") -> Any:
        if param.kind == "choice":
            index = {json.dumps(c): i for i, c in enumerate(param.choices)}
            return lambda v: index[json.dumps(v)]
        return float

    fa, fb = axis(a), axis(b)
    if done:
        points = ax.scatter([fa(r["params"][a.key]) for r in done], [fb(r["params"][b.key]) for r in done],
                            c=[scale * r["value"] for r in done], cmap="viridis", s=60, zorder=3, edgecolors="white")
        fig.colorbar(points, ax=ax, label=ylabel)
    _param_axis(ax, a, "x")
    _param_axis(ax, b, "y")
    ax.set_xlabel(a.label + (" (log scale)" if a.log else ""), fontsize=10)
    ax.set_ylabel(b.label + (" (log scale)" if b.log else ""), fontsize=10)
    _save(plt, fig, ax, path)
    return Figure(path, title, f"Complete trials by their values of {a.key} and {b.key}, colored by {metric}.", size,
                  [title])


def _param_axis(ax: Any, param: "Param", which: str) -> None:
    """Scale, limits (the whole range searched) and ticks of the axis ``which`` ("x" or "y") for a parameter."""
    from matplotlib.ticker import NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    set_scale, set_lim = (ax.set_xscale, ax.set_xlim) if which == "x" else (ax.set_yscale, ax.set_ylim)
    if param.kind == "choice":
        (ax.set_xticks if which == "x" else ax.set_yticks)(range(len(param.choices)), [_fmt(c) for c in param.choices])
        set_lim(-0.5, len(param.choices) - 0.5)
    elif param.log:
        set_scale("log")
        set_lim(float(param.low) / 1.2, float(param.high) * 1.2)
        axis.set_minor_formatter(NullFormatter())
    else:
        pad = 0.05 * (float(param.high) - float(param.low)) or 0.5
        set_lim(float(param.low) - pad, float(param.high) + pad)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_sweep_report(sweep: "Sweep", records: list[dict[str, Any]], metric: str, direction: str) -> Path:
    """``<output_dir>/report/``: index.html, sweep.json and the figures; returns the folder."""
    from .cli import finite
    from .io import write_text_atomic
    from .sweep import best_records, state_counts

    pyplot()
    out = sweep.output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("objective-vs-*.png"):  # parameters of an earlier version of the sweep
        stale.unlink()
    params = list(sweep.space.values())
    figures = [parameter_figure(p, records, metric, direction, out / _file_name(p.key)) for p in params]
    figures.append(history_figure(records, metric, direction, out / "history.png"))
    if len(params) >= 2:
        figures.append(pair_figure(params[0], params[1], records, metric, out / "pairs.png"))
    elif (out / "pairs.png").exists():
        (out / "pairs.png").unlink()
    best = best_records(records, direction, top=5)
    data = {"name": sweep.name, "recipe": str(sweep.recipe), "metric": metric, "direction": direction,
            "storage": sweep.storage_url(), "space": sweep.raw_space, "overrides": sweep.overrides,
            "trials": records, "best": best,
            "figures": [{"file": f.path.name, "title": f.title, "width": f.size[0], "height": f.size[1]} for f in figures]}
    write_text_atomic(out / "sweep.json", json.dumps(finite(data), indent=2, allow_nan=False, default=str) + "\n")
    write_text_atomic(out / "index.html", render(sweep, records, best, figures, metric, direction, state_counts(records)))
    return out


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _value(value: Any, metric: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "-"  # a failed or pruned trial's objective
    return metric_text(metric, value, missing="-")


def render(sweep: "Sweep", records: list[dict[str, Any]], best: list[dict[str, Any]], figures: list[Figure],
           metric: str, direction: str, counts: str) -> str:
    """The sweep's HTML page (inline CSS; links only to the figures and sweep.json beside it)."""
    from .report import CSS

    keys = list(sweep.space)
    labels = [sweep.space[k].label for k in keys]

    def table(rows: list[dict[str, Any]], ranked: bool) -> str:
        head = (["rank"] if ranked else []) + ["trial", "state"] + labels + [metric, "seconds", "rerun of", "run directory"]
        body = []
        for i, r in enumerate(rows, 1):
            cells = ([str(i)] if ranked else []) + [str(r["number"]), r["state"]]
            cells += [_fmt(r["params"].get(k)) for k in keys]
            shown = r["value"] if r["state"] == "complete" else _last_intermediate(r)
            value = _value(shown, metric) + (" (last report)" if r["state"] == "pruned" and shown is not None else "")
            cells += [value, f"{r['seconds']:.1f}" if isinstance(r.get("seconds"), (int, float)) else "-",
                      "-" if r.get("rerun_of") is None else str(r["rerun_of"]), r.get("run_dir") or "-"]
            body.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
        return ("<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"
                + "".join(body) + "</tbody></table>")

    space_rows = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(json.dumps(sweep.raw_space[k]))}</td></tr>" for k in keys)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>kdforge sweep: {_e(sweep.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>kdforge sweep: {_e(sweep.name)}</h1>",
        f"<p class='meta'>{_e(counts)}. Base recipe {_e(sweep.recipe)}; {_e(direction)} {_e(metric)}; "
        f"{_e(sweep.sampler)} sampler, {_e(sweep.pruner)} pruner; study in {_e(sweep.storage_url())}. "
        f"All trials as data: <a href=\"sweep.json\">sweep.json</a>.</p>",
        "<h2>Search space</h2><table><thead><tr><th>recipe key</th><th>values</th></tr></thead>"
        f"<tbody>{space_rows}</tbody></table>",
        "<h2>Best trials</h2>", table(best, True) if best else "<p class='note'>No complete trial yet.</p>",
        "<h2>Figures</h2>",
    ]
    for f in figures:
        parts.append(f'<figure><img src="{html.escape(f.path.name)}" width="{f.size[0]}" height="{f.size[1]}" '
                     f'alt="{_e(f.title)}"><figcaption><b>{_e(f.title)}.</b> {_e(f.caption)}</figcaption></figure>')
    parts += ["<h2>Every trial</h2>", table(sorted(records, key=lambda r: r["number"]), False), "</body></html>"]
    return "\n".join(parts) + "\n"


