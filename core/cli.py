"""The ``kdforge`` command line: run, validate, plugins, cache, compare; report, profile, export, sweep.

Exit codes: 0 done; 2 a recipe or usage error (one line, no traceback); 1 a failure
while running.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from .errors import RecipeError, TrainingStopped

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _rank0() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 (as the rest of kdforge's errors)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise RecipeError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kdforge`` program."""
    parser = _Parser(prog="kdforge", description="Plugin-based knowledge distillation for PyTorch.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    def add_recipe_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a recipe value (parsed as YAML); repeatable")

    run = sub.add_parser("run", help="train a recipe (several: one after another, in order)")
    run.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML file(s), run in order")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a recipe value (parsed as YAML); repeatable; applies to every recipe")
    run.add_argument("--output-dir", help="run directory (default: the recipe's output_dir, or runs/<name>)")
    run.add_argument("--resume", action="store_true", help="continue from the run directory's newest checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run in the run directory")
    output = run.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true", help="print nothing but errors (no bars, no summary)")
    output.add_argument("--json", action="store_true", help="print each run's summary as JSON (for machines)")

    validate = sub.add_parser("validate", help="check a recipe without training")
    add_recipe_args(validate)
    validate.add_argument("--dry-run", action="store_true",
                          help="also build data and models and push one batch through them")

    plugins = sub.add_parser("plugins", help="list the registered plugins")
    plugins.add_argument("--json", action="store_true", help="print JSON")

    cache = sub.add_parser("cache", help="list or clear teacher-output caches")
    cache_sub = cache.add_subparsers(dest="cache_command", parser_class=_Parser)
    for name, text in (("list", "list the caches in a cache folder"), ("clear", "delete caches (all, or by fingerprint)")):
        p = cache_sub.add_parser(name, help=text)
        p.add_argument("--dir", default=None, help="the cache folder (default: runs/.kdforge-cache)")
        if name == "list":
            p.add_argument("--json", action="store_true", help="print JSON")
        else:
            p.add_argument("fingerprints", nargs="*", metavar="FINGERPRINT", help="caches to delete (prefixes work)")
            p.add_argument("--all", action="store_true", help="delete every cache and unfinished build")

    compare = sub.add_parser("compare", help="compare finished runs side by side")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--json", action="store_true", help="print JSON")
    for name, (_, text) in TOOLS.items():
        sub.add_parser(name, help=text, add_help=False)  # listed here; parsed by tool_parser (imports on use)
    return parser


#: Commands whose modules import torch or an optional extra: their parsers are built only when called.
TOOLS = {
    "report": ("report", "an HTML page and PNG figures of one or more runs"),
    "profile": ("profiling", "size, FLOPs and CPU latency of a finished run's teacher and student"),
    "export": ("export", "export a finished run's student: onnx, torchscript, pt2, safetensors, hf"),
    "sweep": ("sweep", "a hyperparameter search over a recipe (Optuna), from a sweep file"),
}


def run_tool(name: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` with the tool's own parser and run it (``kdforge report ...``)."""
    import importlib

    module_name, text = TOOLS[name]
    module = importlib.import_module(f"kdforge.{module_name}")
    parser = _Parser(prog=f"kdforge {name}", description=text[0].upper() + text[1:] + ".")
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def _version() -> str:
    from . import __version__

    return f"kdforge {__version__}"


def cmd_run(args: argparse.Namespace) -> int:
    """``kdforge run``."""
    from .runner import run_recipe, validate_recipe_source as validate

    if args.resume and args.overwrite:
        raise RecipeError("--resume and --overwrite contradict each other: pass one of them")
    if len(args.recipes) > 1 and args.output_dir:
        raise RecipeError("--output-dir names one run directory; give each recipe its own output_dir instead")
    from .console import set_quiet, summary_lines

    set_quiet(args.quiet)
    resumes = [args.resume] * len(args.recipes)
    if len(args.recipes) > 1:
        resumes = plan_chain(args)
    for recipe, resume in zip(args.recipes, resumes):
        summary = run_recipe(recipe, args.overrides, output_dir=args.output_dir, resume=resume, overwrite=args.overwrite)
        if not _rank0() or args.quiet:
            continue
        if args.json:
            emit(json.dumps(finite(summary), indent=2, sort_keys=True, allow_nan=False))
        else:
            from .recipe import load_recipe

            run_dir = args.output_dir or load_recipe(recipe, args.overrides).run_dir()
            emit("\n".join(summary_lines(summary, run_dir)))
    return EXIT_OK


def plan_chain(args: argparse.Namespace) -> list[bool]:
    """Check every recipe of ``run A.yaml B.yaml ...`` and its run directory before the first one trains.

    Returns, per recipe, whether it resumes: with ``--resume``, a recipe whose run saved a
    checkpoint resumes and one that never started starts (a chain stopped halfway continues).
    """
    from . import checkpoint as ckpt
    from .runner import validate_recipe_source as validate

    seen: dict[str, str] = {}
    resumes = []
    for path in args.recipes:
        try:
            recipe = validate(path, args.overrides)
            run_dir = recipe.run_dir()
            where = str(run_dir.resolve())
            if where in seen:
                raise RecipeError(f"writes to {str(run_dir)!r}, as {seen[where]} does; give each recipe its own "
                                  f"output_dir", key="output_dir")
            seen[where] = path
            resume = args.resume and (ckpt.latest_checkpoint(run_dir) is not None or ckpt.holds_a_run(run_dir))
            ckpt.prepare_run_dir(run_dir, resume=resume, overwrite=args.overwrite)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None
        resumes.append(resume)
    return resumes


def cmd_validate(args: argparse.Namespace) -> int:
    """``kdforge validate``; with ``--dry-run``, also the memory estimate of a training batch."""
    from .runner import dry_run_recipe, validate_recipe_source as validate

    memory = None
    if args.dry_run:
        recipe, memory = dry_run_recipe(args.recipe, args.overrides)
    else:
        recipe = validate(args.recipe, args.overrides)
    emit(f"{args.recipe}: ok ({recipe.name}: {len(recipe.losses)} loss term(s), "
         f"{recipe.trainer.epochs} epoch(s){', one batch checked' if args.dry_run else ''})")
    if memory is not None:
        emit(format_memory(memory, recipe.trainer.batch_size))
    return EXIT_OK


def format_memory(lines: list[Any], batch_size: int) -> str:
    """The memory estimate as aligned lines with a total (``lines``: ``MemoryLine``s)."""
    from .profiling import human_bytes

    rows = [(line.label, human_bytes(line.bytes)) for line in lines]
    rows.append(("total", human_bytes(sum(line.bytes for line in lines))))
    width = max(len(label) for label, _ in rows)
    size_width = max(len(size) for _, size in rows)
    text = [f"memory estimate for a training batch of {batch_size} per process (activations not included):"]
    text += [f"  {label:<{width}}  {size:>{size_width}}" for label, size in rows]
    return "\n".join(text)


def cmd_plugins(args: argparse.Namespace) -> int:
    """``kdforge plugins``."""
    from .registry import list_plugins

    records = [r.to_dict() for r in list_plugins()]
    if args.json:
        emit(json.dumps(records, indent=2))
        return EXIT_OK
    rows = [[r["kind"], r["name"], r["provider"], r["version"] or "-", r["status"],
             r["error"] if r["status"] != "ok" else r["summary"]] for r in records]
    emit(format_table(["kind", "name", "provider", "version", "status", "description"], rows))
    return EXIT_OK


def format_table(headers: list[str], rows: list[list[Any]], max_width: int = 70) -> str:
    """A plain-text table with aligned columns."""
    def cell(v: Any) -> str:
        text = "-" if v is None else str(v)
        return text if len(text) <= max_width else text[: max_width - 3] + "..."

    table = [[cell(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    numeric = [all(_numberlike(r[i]) for r in table[1:]) and len(table) > 1 for i in range(len(headers))]

    def align(v: str, w: int, right: bool) -> str:
        return v.rjust(w) if right else v.ljust(w)

    lines = ["  ".join(align(v, w, right) for v, w, right in zip(r, widths, numeric)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


MAX_SUMMARY_BYTES = 16 << 20


def _numberlike(text: str) -> bool:
    """Whether a table cell shows a number (``97.04%``, ``4,810``, ``19.1 KiB``, ``-``): right-aligned."""
    import re

    return text == "-" or re.fullmatch(r"-?[\d,]+(\.\d+)?(%| KiB| MiB)?", text) is not None


def load_summary(run_dir: str) -> dict[str, Any]:
    """A finished run's summary.json (``RecipeError`` when there is none or it is not one)."""
    from .checkpoint import describe_file_error

    path = Path(run_dir) / "summary.json"
    problem = describe_file_error(path)
    if problem == "does not exist":
        raise RecipeError(f"{run_dir!r} holds no summary.json (not a finished kdforge run)")
    if problem is not None:
        raise RecipeError(f"{str(path)!r} {problem}")
    if path.stat().st_size > MAX_SUMMARY_BYTES:
        raise RecipeError(f"{str(path)!r} is {path.stat().st_size / 2**20:.0f} MiB: not a kdforge summary")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise RecipeError(f"{str(path)!r} is nested too deeply to be a kdforge summary") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise RecipeError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{str(path)!r} does not hold a summary mapping")
    return data


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by ``None``: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def headline_of(summary: dict[str, Any]) -> tuple[str, bool]:
    """The metric a run leads with and whether higher is better (accuracy for runs of kdforge 0.1)."""
    headline = summary.get("headline")
    if isinstance(headline, dict) and isinstance(headline.get("metric"), str):
        return headline["metric"], bool(headline.get("higher_is_better", True))
    return "accuracy", True


def _metric(value: Any, metric: str) -> str:
    from .console import metric_text

    return metric_text(metric, value, missing="-")


def cmd_compare(args: argparse.Namespace) -> int:
    """``kdforge compare``: the runs' headline metric, size and time side by side."""
    summaries = [(d, load_summary(d)) for d in args.run_dirs]
    if args.json:
        emit(json.dumps(finite([{"run_dir": d, **s} for d, s in summaries]), indent=2, sort_keys=True, allow_nan=False))
        return EXIT_OK
    metrics = list(dict.fromkeys(headline_of(s) for _, s in summaries))
    rows = []
    for run_dir, s in summaries:
        size = s.get("student/size_bytes")
        params = s.get("student/params")
        row = [s.get("name", Path(run_dir).name)]
        for metric, _ in metrics:
            row += [_metric(s.get(f"student/{metric}"), metric), _metric(s.get(f"teacher/{metric}"), metric)]
        row += [
            f"{params:,}" if isinstance(params, int) and not isinstance(params, bool) else "-",
            f"{size / 1024:.1f} KiB" if isinstance(size, (int, float)) else "-",
            s.get("epochs", "-"), f"{s['wall_seconds']:.1f}" if isinstance(s.get("wall_seconds"), (int, float)) else "-",
            s.get("num_processes", "-"),
        ]
        rows.append(row)
    names = {"accuracy": "acc"}
    headers = ["run"]
    for metric, higher in metrics:
        short = names.get(metric, metric)
        arrow = "" if metric == "accuracy" else (" (higher is better)" if higher else " (lower is better)")
        headers += [f"student {short}{arrow}", f"teacher {short}"]
    headers += ["student params", "size", "epochs", "seconds", "procs"]
    emit(format_table(headers, rows))
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    """``kdforge cache list|clear``."""
    from .cache import CACHE_DIR_NAME, clear_caches, list_caches

    root = Path(args.dir) if args.dir else Path("runs") / CACHE_DIR_NAME
    if args.cache_command == "list":
        caches = list_caches(root)
        if args.json:
            emit(json.dumps(caches, indent=2))
            return EXIT_OK
        rows = [[c["fingerprint"], c["teacher"], c["data"], c["samples"], c["views"], c["dtype"], c["top_k"] or "-",
                 f"{c['bytes'] / 2**20:.1f} MiB"] for c in caches]
        emit(format_table(["fingerprint", "teacher", "data", "samples", "views", "dtype", "top_k", "size"], rows)
             if rows else f"no caches in {root}")
        return EXIT_OK
    if args.cache_command == "clear":
        if not args.all and not args.fingerprints:
            raise RecipeError("name the caches to delete (kdforge cache list shows them), or pass --all")
        removed = clear_caches(root, None if args.all else args.fingerprints)
        emit(f"removed {len(removed)} cache(s) from {root}" + (f": {', '.join(removed)}" if removed else ""))
        return EXIT_OK
    raise RecipeError("kdforge cache needs a command: list or clear (see `kdforge cache --help`)")


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plugins": cmd_plugins, "compare": cmd_compare, "cache": cmd_cache}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kdforge`` and ``python -m kdforge``; returns the exit code."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv and argv[0] in TOOLS:
            return run_tool(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except StdoutError as exc:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches it, not even at exit
        if isinstance(exc.__cause__, BrokenPipeError):
            return 128 + 13  # the reader went away (`kdforge plugins | head`): quiet, as Unix tools killed by SIGPIPE
        print(f"kdforge: error: cannot write to standard output: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except RecipeError as exc:
        if _rank0():
            one_line = " ".join(str(exc).split())
            print(f"kdforge: error: {one_line}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as exc:
        print(f"kdforge: stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kdforge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - report a crash once, with its traceback, as exit 1
        return _crash(exc)
    finally:
        _shutdown_distributed()


class StdoutError(Exception):
    """Standard output is closed or full."""


def emit(text: str) -> None:
    """Print a command's output, flushed; a closed or full stdout becomes ``StdoutError``."""
    try:
        print(text, flush=True)
    except OSError as exc:
        raise StdoutError(exc.strerror or str(exc)) from exc


def _crash(exc: BaseException) -> int:
    """Report a crash once, with its traceback, as exit 1 (the failing process reports; it may not be rank 0)."""
    rank = os.environ.get("RANK")
    traceback.print_exception(exc)
    where = f" (process {rank})" if rank not in (None, "", "0") else ""
    print(f"kdforge: failed{where}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_FAILURE


def _shutdown_distributed() -> None:
    """Tear the process group down before exit: gloo's threads abort the process otherwise."""
    if "torch.distributed" not in sys.modules:
        return  # never imported: no process group (and no reason to import torch now)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
