"""Side-by-side training throughput: a hand-written loop, kdforge (teacher online and cached), torchdistill.

Every workload runs each way once as an untimed warm-up round (which also prints the first
steps' losses, so it is visibly the same work, and builds the teacher cache), then
``--rounds`` timed rounds, the order of the ways rotated each round. A round of a way is a
fresh run from the same initial weights over the same batches; it is timed after its
warm-up steps. The table gives samples/s min/median/max over the rounds and ratios between
the ways, each computed round by round. Results: ``<out>/bench.json`` and ``<out>/bench.png``.

Usage: python benchmarks/bench.py [--workloads ...] [--ways ...] [--rounds 3] [--steps 15]
       [--digits-epochs 10] [--threads N] [--out runs/bench] [--profile WORKLOAD ...]
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_report import format_table, paired_ratios, plot, way_summary  # noqa: E402
from bench_ways import (  # noqa: E402
    KdforgeWays, RoundResult, Unavailable, hand_written, run_round, torchdistill_version, way_runner,
)
from bench_workloads import (  # noqa: E402
    ROOT, WAYS, WORKLOADS, Reference, Workload, check_losses, cifar_workload, digits_workload,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    parser.add_argument("--ways", nargs="+", default=WAYS, choices=WAYS)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per way (after one warm-up round)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round on the CIFAR-shaped workloads "
                                                              "(after 3 warm-up steps)")
    parser.add_argument("--digits-epochs", type=int, default=10,
                        help="timed epochs (20 steps each) per round on digits, after one warm-up epoch")
    parser.add_argument("--digits-teacher-epochs", type=int, default=15,
                        help="epochs of recipes/digits/teacher.yaml for the digits teacher (trained once)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch.set_num_threads for every way (default: all cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--profile", nargs="*", default=[], choices=WORKLOADS,
                        help="after the rounds, cProfile one kdforge-online and one hand-written round of these")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.digits_epochs < 1 or args.threads < 1:
        parser.error("--rounds, --steps, --digits-epochs and --threads must be at least 1")
    return args


def note(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- the machine -------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' (with uncommitted changes)' if dirty else ''}"


def machine_info(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    import torchvision

    import kdforge

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "kdforge": f"{kdforge.__version__} at {git_revision()}", "torchdistill": torchdistill_version(),
        "load_average_start": list(os.getloadavg()),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


# -- workloads ---------------------------------------------------------------------------------
def digits_teacher(args: argparse.Namespace) -> Path:
    """The digits demo's teacher (recipes/digits/teacher.yaml), trained once under ``<out>/digits-teacher``."""
    import kdforge

    path = args.out / "digits-teacher"
    summary = path / "summary.json"
    wanted = args.digits_teacher_epochs
    if summary.exists() and json.loads(summary.read_text()).get("epochs") == wanted:
        return path
    note(f"training the digits teacher ({wanted} epochs of recipes/digits/teacher.yaml)")
    kdforge.run(ROOT / "recipes" / "digits" / "teacher.yaml",
                {"trainer.epochs": wanted, "trainer.progress_bar": False}, output_dir=path, overwrite=True)
    return path


def make_workload(name: str, args: argparse.Namespace) -> Workload:
    workload = (digits_workload(digits_teacher(args), args.digits_epochs) if name == "digits"
                else cifar_workload(name, args.steps))
    check_losses(workload.recipe)
    return workload


def result_entry(result: RoundResult) -> dict[str, Any]:
    entry = {"samples": result.samples, "seconds": round(result.seconds, 6),
             "samples_per_second": result.samples_per_second, **result.info}
    if result.cpu_seconds:
        entry.update(cpu_seconds=round(result.cpu_seconds, 6), cpu_samples_per_second=result.cpu_samples_per_second)
    return entry


def bench_workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The warm-up round and the timed rounds of every way on one workload."""
    workload = make_workload(name, args)
    workdir = args.out / "work"
    ref = Reference.build(workload) if {"hand-written", "torchdistill"} & set(args.ways) else None
    kd = KdforgeWays(workload, workdir)
    ways: dict[str, dict[str, Any]] = {w: {"rounds": [], "warnings": []} for w in args.ways}
    runners = {w: way_runner(w, ref, kd, workdir) for w in args.ways}
    note(f"{name}: {workload.timed_steps} timed steps per round after {workload.warmup_steps} warm-up steps "
         f"(batch 64, {args.threads} threads), derived from {workload.source}")
    for way in args.ways:
        try:
            result = run_round(runners[way], True, args.threads)
        except Unavailable as exc:
            ways[way]["skipped"] = str(exc)
            note(f"{name} {way}: skipped: {exc}")
            continue
        ways[way]["warmup_round"] = result_entry(result)
        ways[way]["first_losses"] = result.first_losses
        ways[way]["first_loss"] = result.first_losses[0] if result.first_losses else None
        if "warning" in result.info:
            ways[way]["warnings"].append(f"warm-up round: {result.info['warning']}")
        note(f"{name} warm-up {way}: first losses {', '.join(f'{v:.5f}' for v in result.first_losses)}")
    active = [w for w in args.ways if not ways[w].get("skipped")]
    for r in range(args.rounds):
        shift = r % max(len(active), 1)
        for way in active[shift:] + active[:shift]:
            result = run_round(runners[way], False, args.threads)
            ways[way]["rounds"].append(result_entry(result))
            if "warning" in result.info:
                ways[way]["warnings"].append(f"round {r + 1}: {result.info['warning']}")
            cpu = result.cpu_samples_per_second
            note(f"{name} round {r + 1}/{args.rounds} {way}: {result.samples_per_second:.1f} samples/s"
                 + (f" ({cpu:.1f} per CPU second)" if cpu else ""))
    for way in active:
        ways[way]["summary"] = way_summary(ways[way]["rounds"])
    entry: dict[str, Any] = {"source": workload.source, "timed_steps": workload.timed_steps,
                             "warmup_steps": workload.warmup_steps, "ways": ways,
                             "ratios": paired_ratios(name, {w: ways[w] for w in active})}
    cached = ways.get("kdforge-cached", {}).get("warmup_round")
    if cached and "cache" in cached:
        entry["cache_build"] = {**cached["cache"], "run_seconds": cached["run_seconds"]}
    check_same_work(entry)
    if name in args.profile:
        entry["profiles"] = profile(name, ref, kd, args)
    return entry


def check_same_work(entry: dict[str, Any]) -> None:
    """Warn when the KD ways' first losses differ: then they did not take the same first step."""
    ways = entry["ways"]
    base = ways.get("kdforge-online", {}).get("first_loss")
    for way in ("hand-written", "torchdistill", "kdforge-cached"):
        other = ways.get(way, {}).get("first_loss")
        if base is None or other is None:
            continue
        # the cache stores the teacher's logits in float16: its loss agrees to about 1e-3
        tolerance = 5e-3 if way == "kdforge-cached" else 1e-4
        if abs(other - base) > tolerance * max(abs(base), 1e-12):
            ways[way]["warnings"].append(f"first loss {other:.6f} differs from kdforge-online's {base:.6f}: "
                                         f"not the same first step")


def profile(name: str, ref: Reference | None, kd: KdforgeWays, args: argparse.Namespace) -> dict[str, str]:
    """cProfile of one kdforge-online round and one hand-written round: the top functions by own time."""
    written = {}
    jobs = [("kdforge-online", lambda: kd.online(False))]
    if ref is not None:
        jobs.append(("hand-written", lambda: hand_written(ref, 0)))
    for way, job in jobs:
        torch.set_num_threads(args.threads)
        profiler = cProfile.Profile()
        profiler.enable()
        job()
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).strip_dirs()
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        path = args.out / f"profile-{name}-{way}.txt"
        path.write_text(text.getvalue())
        written[way] = str(path)
        note(f"profile of {name} {way}: {path}")
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table; write bench.json (and bench.png); return the results."""
    args = parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        note(f"the machine is busy (load average {load:.1f} on {os.cpu_count()} cores): wall-clock numbers will be "
             f"noisy, and slow with several threads; the CPU-time column, with --threads 1, is disturbed least")
    results: dict[str, Any] = {"meta": machine_info(args, argv), "workloads": {}}
    for name in args.workloads:
        results["workloads"][name] = bench_workload(name, args)
    meta = results["meta"]
    meta["load_average_end"] = list(os.getloadavg())
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    table = format_table(results)
    print(f"\n{meta['date']}  {meta['cpu']} ({meta['cores']} cores, {meta['threads']} threads)  torch {meta['torch']}  "
          f"kdforge {meta['kdforge']}  torchdistill {meta['torchdistill'] or 'not installed'}")
    print(f"{meta['command']}  ({meta['wall_seconds']:.0f} s; load average {meta['load_average_start'][0]:.1f} at the "
          f"start, {meta['load_average_end'][0]:.1f} at the end)\n")
    print(table)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    (args.out / "bench.txt").write_text(table + "\n")
    if not args.no_plot:
        print(f"\nwrote {args.out / 'bench.json'} and {plot(results, args.out / 'bench.png')}")
    return results


if __name__ == "__main__":
    main()
