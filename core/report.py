"""``kdforge report RUN_DIR... [--out DIR]``: a self-contained HTML page and PNG figures of one or more runs.

The page (``index.html``: inline CSS, no script, no remote resource) holds the comparison
table of the runs, each run's compression report (teacher vs student, ``kdforge profile``),
the figures (relative links to the PNG files written beside it) and each run's recipe.
``report.json`` holds the same tables for machines. Default output: ``<first run>/report/``.
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import statistics
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .report_data import RunData, load_run
from .report_figures import FIGURES, Figure, pyplot, write_figures

PAGE = "index.html"
DATA = "report.json"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1240px;
       padding: 0 1.5rem; color: #1b1f24; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; } h2 { font-size: 1.3rem; margin-top: 2.2rem;
     border-bottom: 1px solid #d0d7de; padding-bottom: 0.3rem; } h3 { font-size: 1.05rem; margin-top: 1.4rem; }
.meta { color: #57606a; font-size: 0.9rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.88rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fbfcfd; } tr.ratio td { font-weight: 600; background: #eef6ff; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px; margin-right: 0.4em;
          vertical-align: baseline; }
figure { margin: 1.2rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 0.88rem; max-width: 60rem; }
.headline { font-size: 1.05rem; background: #f0f7f0; border-left: 4px solid #2ca02c; padding: 0.4rem 0.8rem; }
.note { color: #9a6700; } pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
details { margin: 0.4rem 0; } summary { cursor: pointer; }
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``kdforge report``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (several: compared, curves overlaid)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for index.html, report.json and the figures (default: <first run>/report)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="leave out the compression report (no latency measurement)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed runs per batch size in the compression report (default 20)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads while measuring latency (default 1; 0: torch's own setting)")


def run(args: argparse.Namespace) -> int:
    """``kdforge report``: write the page and figures; print where."""
    from .cli import emit

    out = write_report(args.run_dirs, Path(args.out) if args.out else None, profile=args.profile, repeats=args.repeats,
                       threads=args.threads)
    figures = [name for name, _ in FIGURES if (out / name).is_file()]
    emit(f"wrote {out / PAGE} ({len(figures)} figures: {', '.join(figures)}; {DATA})")
    return 0


def write_report(run_dirs: list[str], out: Path | None = None, *, profile: bool = True, repeats: int = 20,
                 threads: int | None = 1) -> Path:
    """Write the report of ``run_dirs`` into ``out`` (default ``<first run>/report``); return ``out``."""
    pyplot()  # a missing matplotlib is reported before anything is read or written
    runs = [load_run(d) for d in run_dirs]
    seen: dict[str, str] = {}
    for d, r in zip(run_dirs, runs):
        where = str(r.path.resolve())
        if where in seen:
            raise RecipeError(f"{d!r} is given twice (as {seen[where]!r} too)")
        seen[where] = d
    out = out if out is not None else runs[0].path / "report"
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for name, _ in FIGURES:  # figures of an earlier report that this one may not draw (only ours)
        if (out / name).is_file():
            (out / name).unlink()
    figures = write_figures(runs, out)
    compression = [compression_of(r, repeats, threads) for r in runs] if profile else [None] * len(runs)
    data = {"runs": [run_record(r) for r in runs], "compression": compression,
            "figures": [{"file": f.path.name, "title": f.title, "width": f.size[0], "height": f.size[1],
                         "panels": f.panels} for f in figures]}
    from .cli import finite
    from .io import write_text_atomic

    write_text_atomic(out / DATA, json.dumps(finite(data), indent=2, allow_nan=False) + "\n")
    write_text_atomic(out / PAGE, render_page(runs, figures, compression if profile else None))
    return out


def compression_of(run: RunData, repeats: int, threads: int | None = 1) -> dict[str, Any] | None:
    """The run's compression report as data (``None`` for a run that has not finished)."""
    from .profiling import profile_run

    if not run.finished or not (run.path / "student.safetensors").is_file():
        return None
    try:
        report = profile_run(run.path, repeats=repeats, threads=threads)
    except RecipeError as exc:
        return {"error": str(exc)}
    return report.to_dict()


def run_record(run: RunData) -> dict[str, Any]:
    """One row of the comparison table, as data."""
    s = run.summary
    speeds = [v for _, v in zip(*run.train_series("train/samples_per_second"))]
    return {
        "run_dir": str(run.path), "name": run.name, "finished": run.finished, "task": s.get("task"),
        "metric": run.headline, "higher_is_better": run.higher_is_better,
        "student": run.final(f"student/{run.headline}"), "teacher": s.get(f"teacher/{run.headline}"),
        "student_params": s.get("student/params"), "teacher_params": s.get("teacher/params"),
        "size_bytes": s.get("student/size_bytes"), "epochs": s.get("epochs", len(run.evals)),
        "wall_seconds": s.get("wall_seconds"), "num_processes": s.get("num_processes"),
        "final_train_loss": (run.train_series("train/loss")[1] or [None])[-1],
        "median_samples_per_second": statistics.median(speeds) if speeds else None,
        "losses": [t for t in run.loss_terms()],
    }


# -- the page ----------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _table(headers: list[str], rows: list[list[str]], ratio_last: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="ratio"' if ratio_last and i == len(rows) - 1 else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def comparison_table(runs: list[RunData]) -> str:
    """The runs side by side: headline metric (student, teacher), size, length, speed."""
    from .profiling import format_metric, human_bytes
    from .report_figures import run_color

    rows = []
    for i, r in enumerate(runs):
        rec = run_record(r)
        name = f'<span class="swatch" style="background:{run_color(i)}"></span>{_e(r.name)}'
        if not r.finished:
            name += ' <span class="note">(unfinished)</span>'
        arrow = "" if r.higher_is_better else " (lower is better)"
        rows.append([
            name, _e(", ".join(rec["losses"]) or "-"), _e(f"{r.headline}{arrow}"),
            _e(format_metric(_num(rec["student"]), r.headline)), _e(format_metric(_num(rec["teacher"]), r.headline)),
            _e(f"{rec['student_params']:,}" if isinstance(rec["student_params"], int) else "-"),
            _e(human_bytes(rec["size_bytes"]) if isinstance(rec["size_bytes"], (int, float)) else "-"),
            _e(rec["epochs"]), _e(f"{rec['final_train_loss']:.4g}" if rec["final_train_loss"] is not None else "-"),
            _e(f"{rec['median_samples_per_second']:,.0f}" if rec["median_samples_per_second"] else "-"),
            _e(f"{rec['wall_seconds']:.1f}" if isinstance(rec["wall_seconds"], (int, float)) else "-"),
        ])
    headers = ["run", "loss terms", "metric", "student", "teacher", "student params", "student size", "epochs",
               "final train loss", "train samples/s", "seconds"]
    return _table(headers, rows)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compression_section(run: RunData, data: dict[str, Any] | None) -> str:
    """One run's compression table and its ratio sentence."""
    from .profiling import CompressionReport, ModelProfile, table_rows

    if data is None:
        return f"<p class='note'>{_e(run.name)}: not profiled (the run has not finished).</p>"
    if "error" in data:
        return f"<p class='note'>{_e(run.name)}: not profiled: {_e(data['error'])}</p>"
    report = CompressionReport(**{**data, "models": [ModelProfile(**m) for m in data["models"]]})
    headers, rows = table_rows(report)
    parts = [f"<h3>{_e(run.name)}</h3>", _table(headers, [[_e(c) for c in row] for row in rows], ratio_last=bool(report.ratios))]
    if report.headline:
        parts.append(f"<p class='headline'>Student vs teacher: <b>{_e(report.headline)}</b></p>")
    parts.append(f"<p class='meta'>CPU, {report.threads} thread(s); latency is the median of {report.repeats} runs "
                 f"after {report.warmup} warm-up runs on samples of the {_e(report.inputs)}; size is the weights as "
                 f"safetensors; FLOPs from torch.utils.flop_counter (a multiply-add counts 2).</p>")
    parts += [f"<p class='note'>{_e(n)}</p>" for n in report.notes]
    return "\n".join(parts)


def figure_block(figure: Figure) -> str:
    """An ``<figure>`` linking the PNG beside the page."""
    w, h = figure.size
    return (f'<figure><img src="{html.escape(figure.path.name)}" width="{w}" height="{h}" alt="{_e(figure.title)}">'
            f"<figcaption><b>{_e(figure.title)}.</b> {_e(figure.caption)}</figcaption></figure>")


def run_details(run: RunData) -> str:
    """A run's directory, recipe and summary, folded."""
    import yaml

    recipe = yaml.safe_dump(run.recipe, sort_keys=False) if run.recipe else "(no recipe.yaml)"
    summary = json.dumps(run.summary, indent=2, sort_keys=True, default=str) if run.summary else "(no summary.json yet)"
    return (f"<h3>{_e(run.name)}</h3><p class='meta'>{_e(run.path)}</p>"
            f"<details><summary>recipe.yaml (as it ran)</summary><pre>{_e(recipe)}</pre></details>"
            f"<details><summary>summary.json</summary><pre>{_e(summary)}</pre></details>")


def render_page(runs: list[RunData], figures: list[Figure], compression: list[dict[str, Any] | None] | None) -> str:
    """The whole HTML page (``compression`` ``None``: not profiled, no such section)."""
    from . import __version__

    title = "kdforge report: " + ", ".join(r.name for r in runs)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sections = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='meta'>Written {when} by kdforge {__version__}. Figures and "
        f"<a href=\"{DATA}\">{DATA}</a> are in this folder.</p>",
        "<h2>Runs</h2>", comparison_table(runs),
    ]
    if compression is not None:
        sections += ["<h2>Compression</h2>",
                     "<p>Teacher against student, measured on this machine's CPU (a run without a teacher: the "
                     "student alone). Ratios are teacher / student; the metric difference is student minus teacher.</p>"]
        sections += [compression_section(r, c) for r, c in zip(runs, compression)]
    sections += ["<h2>Figures</h2>"] + [figure_block(f) for f in figures]
    if not figures:
        sections.append("<p class='note'>No training records to plot yet.</p>")
    sections += ["<h2>Run details</h2>"] + [run_details(r) for r in runs] + ["</body></html>"]
    return "\n".join(sections) + "\n"
