"""The benchmark's summary: samples/s per way (min/median/max), side-by-side ratios, the table and the chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

#: (name, numerator way, denominator way, what it means, target, "min" if the target is a floor)
RATIOS = [
    ("online/hand", "kdforge-online", "hand-written", "kdforge online / hand-written (samples/s)", 0.97, "min"),
    ("cached/online", "kdforge-cached", "kdforge-online", "kdforge cached / kdforge online (samples/s)", None, None),
    ("cached-epoch/student-epoch", "student-only", "kdforge-cached",
     "KD epoch with the cache reused / student-only epoch (time)", 1.10, "max"),
    ("cached/torchdistill", "kdforge-cached", "torchdistill", "kdforge cached / torchdistill (samples/s)", None, "min"),
    ("online/torchdistill", "kdforge-online", "torchdistill", "kdforge online / torchdistill (samples/s)", None, None),
]
#: the issue's targets for kdforge cached / torchdistill, by workload
CACHED_VS_TORCHDISTILL = {"vgg16-mobilenet_v2": 2.5, "resnet50-resnet18": 1.5}


def spread(values: list[float]) -> dict[str, float]:
    """min, median and max of a list."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def way_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A way's timed rounds: samples/s (wall, and per CPU second) and ms per 64-sample step, min/median/max."""
    sps = [r["samples_per_second"] for r in rounds]
    summary = {"samples_per_second": spread(sps), "ms_per_64": spread([64_000 / v for v in sps])}
    cpu = [r.get("cpu_samples_per_second") for r in rounds]
    if all(cpu):
        summary["cpu_samples_per_second"] = spread(cpu)
    return summary


def _per_round(ways: dict[str, dict[str, Any]], way: str, key: str) -> list[float] | None:
    values = [r.get(key) for r in ways[way]["rounds"]]
    return values if values and all(values) else None


def paired_ratios(workload: str, ways: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each ratio round by round (ways of one round ran next to each other), then min/median/max."""
    out: dict[str, Any] = {}
    for name, top, bottom, meaning, target, kind in RATIOS:
        if top not in ways or bottom not in ways or not ways[top]["rounds"] or not ways[bottom]["rounds"]:
            continue
        a, b = _per_round(ways, top, "samples_per_second"), _per_round(ways, bottom, "samples_per_second")
        per_round = [x / y for x, y in zip(a, b)]
        if name == "cached/torchdistill":
            target = CACHED_VS_TORCHDISTILL.get(workload)
        entry: dict[str, Any] = {"meaning": meaning, "per_round": per_round, **spread(per_round)}
        a, b = _per_round(ways, top, "cpu_samples_per_second"), _per_round(ways, bottom, "cpu_samples_per_second")
        if a and b:
            cpu = [x / y for x, y in zip(a, b)]
            entry["cpu"] = {"per_round": cpu, **spread(cpu)}
        if target is not None:
            entry["target"] = target
            meets = (lambda v: v >= target) if kind == "min" else (lambda v: v <= target)
            entry["meets_target"] = meets(entry["median"])
            if "cpu" in entry:
                entry["cpu"]["meets_target"] = meets(entry["cpu"]["median"])
        out[name] = entry
    return out


def format_table(results: dict[str, Any]) -> str:
    """The printed table: samples/s per way, then the ratios of each workload."""
    lines = []
    header = (f"{'workload':20} {'way':16} {'first loss':>11} {'samples/s min':>14} {'median':>9} {'max':>9} "
              f"{'ms/step':>8} {'per CPU s':>10}")
    lines += [header, "-" * len(header)]
    for workload, entry in results["workloads"].items():
        for way, data in entry["ways"].items():
            if data.get("skipped"):
                lines.append(f"{workload:20} {way:16} skipped: {data['skipped']}")
                continue
            s, ms = data["summary"]["samples_per_second"], data["summary"]["ms_per_64"]["median"]
            first = data.get("first_loss")
            first_text = f"{first:11.5f}" if first is not None else f"{'-':>11}"
            cpu = data["summary"].get("cpu_samples_per_second", {}).get("median")
            cpu_text = f"{cpu:10.1f}" if cpu else f"{'-':>10}"
            lines.append(f"{workload:20} {way:16} {first_text} {s['min']:14.1f} {s['median']:9.1f} {s['max']:9.1f} "
                         f"{ms:8.1f} {cpu_text}")
        cache = entry.get("cache_build")
        if cache:
            lines.append(f"{workload:20} {'(cache build)':16} {'':>11} built in {cache.get('build_seconds', float('nan')):.2f} s "
                         f"({cache.get('bytes', 0) / 2**20:.2f} MiB); the build run took {cache['run_seconds']:.2f} s")
    lines += ["", f"{'workload':20} {'ratio, round by round':60} {'wall: median [min, max]':>24} "
                  f"{'CPU time':>9} {'target':>7}"]
    for workload, entry in results["workloads"].items():
        for name, r in entry["ratios"].items():
            target = r.get("target")
            bound = "" if target is None else (">=" if name != "cached-epoch/student-epoch" else "<=") + f"{target:g}"
            cpu = r.get("cpu")
            verdict = ""
            if target is not None:
                verdict = "  wall " + ("ok" if r["meets_target"] else "MISSED")
                if cpu:
                    verdict += ", CPU " + ("ok" if cpu["meets_target"] else "MISSED")
            cpu_text = f"{cpu['median']:9.3f}" if cpu else f"{'-':>9}"
            lines.append(f"{workload:20} {r['meaning']:60} {r['median']:7.3f} [{r['min']:.3f}, {r['max']:.3f}] "
                         f"{cpu_text} {bound:>7}{verdict}")
    warnings = [f"{w}/{way}: {msg}" for w, entry in results["workloads"].items()
                for way, data in entry["ways"].items() for msg in data.get("warnings", [])]
    if warnings:
        lines += ["", "warnings:", *[f"  {w}" for w in warnings]]
    return "\n".join(lines)


COLORS = {"hand-written": "#7f7f7f", "kdforge-online": "#1f77b4", "kdforge-cached": "#2ca02c",
          "torchdistill": "#d62728", "student-only": "#9467bd"}


def plot(results: dict[str, Any], path: Path) -> Path:
    """A bar chart per workload: median samples/s of each way, whiskers from min to max, CPU-time marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(max(7.5, 4.6 * len(workloads)), 5.2), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, workload in zip(axes[0], workloads):
        ways = {w: d for w, d in results["workloads"][workload]["ways"].items() if not d.get("skipped")}
        names = list(ways)
        sps = [ways[w]["summary"]["samples_per_second"] for w in names]
        medians = [s["median"] for s in sps]
        errors = [[m - s["min"] for m, s in zip(medians, sps)], [s["max"] - m for m, s in zip(medians, sps)]]
        bars = ax.bar(range(len(names)), medians, yerr=errors, capsize=4, color=[COLORS.get(w, "#333333") for w in names])
        for bar, name, value in zip(bars, names, medians):
            handles[name] = bar
            ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                        xytext=(0, 3), textcoords="offset points", fontsize=8)
        cpu = [ways[w]["summary"].get("cpu_samples_per_second", {}).get("median") for w in names]
        top = max((s["max"] for s in sps), default=1.0)
        if all(cpu):
            handles["per CPU second"] = ax.scatter(range(len(names)), cpu, marker="D", color="black", s=18, zorder=3)
            top = max(top, *cpu)
        ax.set_xticks(range(len(names)), [n.replace("-", "\n", 1) for n in names], fontsize=8)
        ax.set_title(workload, fontsize=10)
        ax.set_ylabel("training throughput (samples/s, higher is better)", fontsize=8)
        ax.set_ylim(0, top * 1.15)
        skipped = [w for w, d in results["workloads"][workload]["ways"].items() if d.get("skipped")]
        if skipped:
            ax.text(0.5, 0.98, "not run: " + ", ".join(skipped), transform=ax.transAxes, ha="center", va="top",
                    fontsize=7, color="#555555")
    meta = results["meta"]
    fig.suptitle(f"kdforge benchmark, batch 64, {meta['cpu']}, {meta['cores']} cores, {meta['threads']} thread(s), "
                 f"torch {meta['torch']}, {meta['date'][:10]}\n"
                 f"bars: median wall-clock samples/s over {meta['args']['rounds']} rounds (whiskers: min to max)\n"
                 f"diamonds: samples per CPU second of this process (median)", fontsize=9)
    order = [w for w in [*COLORS, "per CPU second"] if w in handles]
    fig.legend([handles[w] for w in order], order, loc="lower center", ncol=6 if len(workloads) > 1 else 3,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.09 if len(workloads) == 1 else 0.06, 1, 0.88))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
