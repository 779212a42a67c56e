"""The compression report: how much smaller and faster the student is than its teacher (``kdforge profile``).

For the teacher, the student and the extra models (``extra_models.json``) of a finished run:
parameters, size of the weights on disk, FLOPs per sample (``torch.utils.flop_counter``),
CPU latency at batch 1 and batch 64 (median of timed runs after warm-up runs), throughput,
and the run's headline metric; then the ratios ("8.2x smaller, 5.1x faster, -1.3 points").
Models run through the run's task (``task.forward``) on real samples of the run's dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .console import metric_text
from .errors import RecipeError
from .report_data import RunData, SampleData, load_run, sample_batch

BATCH_SIZES = (1, 64)
DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 5


@dataclass
class ModelProfile:
    """Measurements of one model (``role``: teacher, student, or an extra model's name)."""

    role: str
    params: int
    size_bytes: int
    flops_per_sample: float | None
    latency_ms: dict[str, float] = field(default_factory=dict)  # batch size -> median milliseconds
    throughput: dict[str, float] = field(default_factory=dict)  # batch size -> samples per second
    metric: str = "accuracy"
    metric_value: float | None = None


@dataclass
class CompressionReport:
    """A run's profiles, the ratios of teacher to student, and how they were measured."""

    run_dir: str
    name: str
    models: list[ModelProfile]
    ratios: dict[str, Any]
    headline: str | None
    threads: int
    repeats: int
    warmup: int
    inputs: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON data."""
        return asdict(self)

    def model(self, role: str) -> ModelProfile | None:
        """The profile of ``role`` (``None`` when the run has none)."""
        return next((m for m in self.models if m.role == role), None)


# -- measuring ---------------------------------------------------------------------------
def weights_size(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict written as safetensors (what it takes on disk)."""
    from .weights import save_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_weights(state, path)
        return path.stat().st_size


def used_state(model: nn.Module, run: Any) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the modules that ``run()`` calls (an early exit skips the rest)."""
    ran: set[nn.Module] = set()
    handles = [m.register_forward_pre_hook(lambda module, _args: ran.add(module)) for m in model.modules()]
    try:
        with torch.inference_mode():
            run()
    finally:
        for handle in handles:
            handle.remove()
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if module in ran:
            prefix = f"{name}." if name else ""
            for key, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if value is not None:
                    state[prefix + key] = value.detach()
    return state


def count_flops(model: nn.Module, task: Any, batch: Any) -> float | None:
    """FLOPs of one forward pass per sample, as ``torch.utils.flop_counter`` counts them (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            task.forward(model, batch)
    except Exception:  # noqa: BLE001 - an operator the counter cannot follow: report no number, not a crash
        return None
    return counter.get_total_flops() / max(batch.size, 1)


def median_latencies(models: list[nn.Module], task: Any, batch: Any, repeats: int, warmup: int) -> list[float]:
    """Median wall time of ``task.forward(model, batch)`` per model, in milliseconds, warm-up runs excluded.

    The models take turns within each repetition, so a load that comes and goes on the
    machine slows all of them alike and their ratios stay fair.
    """
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for model, spent in zip(models, times):
                start = time.perf_counter()
                task.forward(model, batch)
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    spent.append(elapsed)
    return [1000.0 * statistics.median(spent) for spent in times]


@dataclass
class Candidate:
    """A model to profile: its role, the weights that count for it, and its metric."""

    role: str
    model: nn.Module
    state: dict[str, torch.Tensor] | None = None  # None: the whole state dict
    size_bytes: int | None = None  # None: measured by writing the weights as safetensors
    metric_value: float | None = None


def profile_models(candidates: list[Candidate], sample: SampleData, *, repeats: int = DEFAULT_REPEATS,
                   warmup: int = DEFAULT_WARMUP, batch_sizes: tuple[int, ...] = BATCH_SIZES,
                   metric: str = "accuracy") -> list[ModelProfile]:
    """Measure models on the run's samples (CPU, eval mode, no gradients); latencies interleaved."""
    task = sample.task
    profiles = []
    for c in candidates:
        c.model = c.model.to("cpu").eval()
        if c.state is None:
            weights, params = c.model.state_dict(), sum(p.numel() for p in c.model.parameters())
        else:  # only the modules that ran (an early exit): the names are those of the full model
            named = {n for n, _ in c.model.named_parameters()}
            weights, params = c.state, sum(v.numel() for k, v in c.state.items() if k in named)
        size = c.size_bytes if c.size_bytes is not None else weights_size(weights)
        profiles.append(ModelProfile(c.role, int(params), int(size), count_flops(c.model, task, sample.take(1)),
                                     metric=metric, metric_value=c.metric_value))
    for size in batch_sizes:
        batch = sample.take(size)
        for profile, ms in zip(profiles, median_latencies([c.model for c in candidates], task, batch, repeats, warmup)):
            profile.latency_ms[str(size)] = ms
            profile.throughput[str(size)] = size / (ms / 1000.0) if ms > 0 else float("inf")
    return profiles


# -- a run's report ----------------------------------------------------------------------
def _metric_value(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def profile_run(run_dir: str | Path, *, repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP,
                batch_sizes: tuple[int, ...] = BATCH_SIZES, extra_models: bool = True, threads: int | None = 1) -> CompressionReport:
    """The compression report of a finished run (student alone when the run had no teacher).

    ``threads``: torch CPU threads while measuring (``None``/0: torch's own setting).
    """
    with torch_threads(threads):
        return _profile_run(run_dir, repeats, warmup, batch_sizes, extra_models)


def _profile_run(run_dir: str | Path, repeats: int, warmup: int, batch_sizes: tuple[int, ...],
                 extra_models: bool) -> CompressionReport:
    from .compose import load_student, load_teacher

    if repeats < 1 or warmup < 0:
        raise RecipeError("--repeats must be at least 1 and --warmup at least 0")
    run = load_run(run_dir)
    if not (run.path / "student.safetensors").is_file() or not run.recipe:
        raise RecipeError(f"{str(run_dir)!r} is not a finished run (no student.safetensors); profile it once it ends")
    notes: list[str] = []
    sample = sample_batch(run.recipe, max(batch_sizes))
    metric = run.headline
    candidates: list[Candidate] = []
    if run.has_teacher:
        try:
            teacher = load_teacher(run.path)
        except RecipeError as exc:
            notes.append(f"teacher not profiled: {exc}")
        else:
            candidates.append(Candidate("teacher", teacher, metric_value=_metric_value(run.summary.get(f"teacher/{metric}"))))
    candidates.append(Candidate("student", load_student(run.path), size_bytes=(run.path / "student.safetensors").stat().st_size,
                                metric_value=_metric_value(run.summary.get(f"student/{metric}"))))
    if extra_models:
        from .artifacts import extra_model_metric, extra_models as recorded

        for extra in recorded(run.path):
            model = extra.build(run.path)
            batch = sample.take(1)
            state = used_state(model, lambda: sample.task.forward(model, batch))
            candidates.append(Candidate(extra.name, model, state=state,
                                        metric_value=extra_model_metric(run.summary, extra, metric)))
    models = profile_models(candidates, sample, repeats=repeats, warmup=warmup, batch_sizes=batch_sizes, metric=metric)
    ratios = compression_ratios(models, metric, batch_sizes)
    return CompressionReport(str(run_dir), run.name, models, ratios, headline_sentence(ratios, metric), torch.get_num_threads(),
                             repeats, warmup, sample.source, notes)


def compression_ratios(models: list[ModelProfile], metric: str, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> dict[str, Any]:
    """Teacher over student for size, parameters, FLOPs and latency; the metric's difference (student - teacher)."""
    teacher = next((m for m in models if m.role == "teacher"), None)
    student = next((m for m in models if m.role == "student"), None)
    if teacher is None or student is None:
        return {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ratios: dict[str, Any] = {
        "params": ratio(teacher.params, student.params),
        "size": ratio(teacher.size_bytes, student.size_bytes),
        "flops": ratio(teacher.flops_per_sample, student.flops_per_sample),
        "speedup": {str(b): ratio(teacher.latency_ms.get(str(b)), student.latency_ms.get(str(b))) for b in batch_sizes},
    }
    if teacher.metric_value is not None and student.metric_value is not None:
        delta = student.metric_value - teacher.metric_value
        points = "accuracy" in metric
        ratios["metric_delta"] = 100.0 * delta if points else delta
        ratios["metric_delta_unit"] = "points" if points else metric
    return ratios


def headline_sentence(ratios: dict[str, Any], metric: str) -> str | None:
    """ "8.2x smaller, 5.1x faster at batch 1 (3.0x at batch 64), -1.3 points of accuracy" from the ratios."""
    if not ratios:
        return None
    parts = []
    if ratios.get("size"):
        parts.append(f"{ratios['size']:.1f}x smaller")
    speed = ratios.get("speedup") or {}
    sizes = sorted(speed, key=int)
    if sizes and speed[sizes[0]]:
        text = f"{speed[sizes[0]]:.1f}x faster at batch {sizes[0]}"
        rest = [f"{speed[b]:.1f}x at batch {b}" for b in sizes[1:] if speed[b]]
        parts.append(text + (f" ({', '.join(rest)})" if rest else ""))
    if ratios.get("flops"):
        parts.append(f"{ratios['flops']:.1f}x fewer FLOPs")
    if "metric_delta" in ratios:
        unit = ratios["metric_delta_unit"]
        parts.append(f"{ratios['metric_delta']:+.1f} points of {metric}" if unit == "points"
                     else f"{ratios['metric_delta']:+.4g} {metric}")
    return ", ".join(parts)


# -- formatting ---------------------------------------------------------------------------
def human_bytes(size: float) -> str:
    """``80176`` -> ``"78.3 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def human_count(value: float | None, unit: str = "") -> str:
    """``1.23e6`` -> ``"1.23 M"`` (k, M, G, T)."""
    if value is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}".rstrip()
    return f"{value:.3g} {unit}".rstrip()


def format_metric(value: float | None, metric: str) -> str:
    """Accuracy-like metrics in percent, others with four significant digits ("-" when missing)."""
    return metric_text(metric, value, missing="-")


def table_rows(report: CompressionReport) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the compression table (one row per model, then the ratio row)."""
    sizes = sorted({b for m in report.models for b in m.latency_ms}, key=int)
    metric = report.models[0].metric if report.models else "accuracy"
    headers = ["model", "params", "size", "FLOPs/sample"] + [f"latency b{b}" for b in sizes] + \
        [f"throughput b{sizes[-1]}" if sizes else "throughput", metric]
    rows = []
    for m in report.models:
        row = [m.role, f"{m.params:,}", human_bytes(m.size_bytes), human_count(m.flops_per_sample)]
        row += [f"{m.latency_ms[b]:.3f} ms" for b in sizes]
        row += [f"{m.throughput[sizes[-1]]:,.0f}/s" if sizes else "-", format_metric(m.metric_value, m.metric)]
        rows.append(row)
    r = report.ratios
    if r:
        speed = r.get("speedup") or {}
        row = ["teacher / student", _times(r.get("params")), _times(r.get("size")), _times(r.get("flops"))]
        row += [_times(speed.get(b)) for b in sizes]
        row += [_times(speed.get(sizes[-1])) if sizes else "-"]
        delta = r.get("metric_delta")
        row += ["-" if delta is None else (f"{delta:+.2f} pts" if r.get("metric_delta_unit") == "points" else f"{delta:+.4g}")]
        rows.append(row)
    return headers, rows


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def format_report(report: CompressionReport) -> str:
    """The compression report as text: the table, the ratios sentence and how it was measured."""
    from .cli import format_table

    headers, rows = table_rows(report)
    lines = [f"{report.name} ({report.run_dir})", format_table(headers, rows)]
    if report.headline:
        lines += ["", f"student vs teacher: {report.headline}"]
    lines += ["", f"CPU, {report.threads} thread(s); latency: median of {report.repeats} runs after {report.warmup} "
                  f"warm-up runs, on samples of the {report.inputs}; size: weights as safetensors; FLOPs: "
                  f"torch.utils.flop_counter (a multiply-add counts 2)"]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``kdforge profile``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"timed runs per batch size; the median is reported (default {DEFAULT_REPEATS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed runs before timing (default {DEFAULT_WARMUP})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads while measuring (default 1, as torch.utils.benchmark: steadier on a "
                             "busy machine; 0: torch's own setting)")
    parser.add_argument("--no-extra-models", dest="extra_models", action="store_false",
                        help="profile only the teacher and the student, not the run's extra models (extra_models.json)")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for a block (``None`` or 0: leave torch's setting), restored after."""
    if threads is not None and threads < 0:
        raise RecipeError("--threads must be 0 (torch's own setting) or more")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(args: argparse.Namespace) -> int:
    """``kdforge profile``: print the compression report of a run."""
    from .cli import emit

    report = profile_run(args.run_dir, repeats=args.repeats, warmup=args.warmup, extra_models=args.extra_models, threads=args.threads)
    if args.json:
        from .cli import finite

        emit(json.dumps(finite(report.to_dict()), indent=2, allow_nan=False))
    else:
        emit(format_report(report))
    return 0
