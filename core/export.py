"""``kdforge export RUN_DIR --format onnx|torchscript|pt2|safetensors|hf``: the trained student as a deployable file.

Every export is checked before the command reports success: the exported file is loaded
back (ONNX in onnxruntime, TorchScript with ``torch.jit.load``, pt2 with
``torch.export.load``, safetensors into a freshly built student, ``hf`` with
``AutoModelForCausalLM.from_pretrained``) and run on real samples of the run's dataset at
the export batch size and at other batch sizes (the batch dimension is dynamic); the
largest absolute difference to the PyTorch student's outputs is reported, and one above
``--atol`` fails the command (exit 1). The run's extra models (``extra_models.json``,
recorded by plugins, such as the early exits of ``byot``) are exported too, one file each
beside the student's; a model that is ``Traceable`` is exported as its ``traceable()``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import RecipeError
from .report_data import SampleData, load_run, sample_batch

FORMATS = ("onnx", "torchscript", "pt2", "safetensors", "hf")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2", "safetensors": ".safetensors", "hf": ""}
EXPORT_BATCH = 2
CHECK_BATCHES = (EXPORT_BATCH, 1, 64)
DEFAULT_ATOL = 1e-4
INSTALL = "pip install 'kdforge[export]'"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


@dataclass
class ExportResult:
    """One exported file and its check."""

    model: str  # "student" or an extra model's name
    format: str
    path: str
    batch_sizes: list[int] = field(default_factory=list)
    max_abs_diff: float | None = None
    max_abs_output: float | None = None  # the student's largest |output| on the same batches (for scale)
    atol: float = DEFAULT_ATOL
    passed: bool = False
    note: str = ""


class ExportCheckFailed(Exception):
    """An exported model's outputs differ from the student's by more than the tolerance."""


def require(packages: tuple[str, ...], what: str) -> None:
    """A one-line ``RecipeError`` naming the missing packages and the install command."""
    import importlib.util

    missing = []
    for name in packages:
        try:
            found = sys.modules.get(name, True) is not None and importlib.util.find_spec(name) is not None
        except (ImportError, ValueError, AttributeError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise RecipeError(f"{what} needs {', '.join(packages)} (missing: {', '.join(missing)}): {INSTALL}")


# -- checking ---------------------------------------------------------------------------------
def tensor_inputs(sample: SampleData, size: int) -> torch.Tensor:
    """The model inputs of ``size`` samples, which must be one tensor for these formats."""
    inputs = sample.take(size).inputs
    if not isinstance(inputs, torch.Tensor):
        raise RecipeError(f"this task's inputs are a {type(inputs).__name__}, not one tensor; export supports models "
                          f"that take one tensor (a language model: --format hf)")
    return inputs


def max_difference(run_exported: Callable[[torch.Tensor], Any], reference: nn.Module, sample: SampleData,
                   batch_sizes: tuple[int, ...]) -> tuple[float, float]:
    """Largest absolute difference between the exported model's and the reference's outputs over the batches,
    and the reference's largest absolute output."""
    worst = scale = 0.0
    with torch.inference_mode():
        for size in batch_sizes:
            x = tensor_inputs(sample, size)
            expected = _logits(reference(x)).float()
            got = torch.as_tensor(_logits(run_exported(x))).float()
            if tuple(got.shape) != tuple(expected.shape):
                raise ExportCheckFailed(f"at batch {size} the export gives shape {tuple(got.shape)}, the student "
                                        f"{tuple(expected.shape)}")
            if got.numel():
                worst = max(worst, float((got - expected).abs().max()))
                scale = max(scale, float(expected.abs().max()))
    return worst, scale


def _logits(output: Any) -> Any:
    if isinstance(output, (list, tuple)):
        return output[0]
    return getattr(output, "logits", output)


@contextlib.contextmanager
def quiet() -> Any:
    """Silence exporters' progress lines and bars and deprecation warnings; replay them if the block fails."""
    buffer = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


def _dynamic_dims(x: torch.Tensor) -> dict[int, Any]:
    dims = {0: torch.export.Dim("batch", min=1)}
    if not x.dtype.is_floating_point and x.ndim == 2:  # token ids: the sequence length varies too
        dims[1] = torch.export.Dim("sequence", min=1)
    return dims


# -- the formats --------------------------------------------------------------------------------
def export_onnx(model: nn.Module, sample: SampleData, path: Path) -> Callable[[torch.Tensor], Any]:
    """``torch.onnx.export`` with the dynamo exporter and a dynamic batch; returns an onnxruntime runner."""
    import onnxruntime

    x = tensor_inputs(sample, EXPORT_BATCH)
    with quiet():
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=(_dynamic_dims(x),),
                          input_names=["inputs"], output_names=["logits"], optimize=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda inputs: session.run(None, {name: inputs.numpy()})[0]


def export_torchscript(model: nn.Module, sample: SampleData, path: Path) -> Callable[[torch.Tensor], Any]:
    """``torch.jit.trace`` (deprecated by torch in favour of torch.export: see pt2), then ``torch.jit.load``."""
    x = tensor_inputs(sample, EXPORT_BATCH)
    with quiet(), torch.inference_mode():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda inputs: loaded(inputs)


def export_pt2(model: nn.Module, sample: SampleData, path: Path) -> Callable[[torch.Tensor], Any]:
    """``torch.export.export`` with a dynamic batch, ``torch.export.save``, then ``torch.export.load``."""
    x = tensor_inputs(sample, EXPORT_BATCH)
    with quiet():
        program = torch.export.export(model, (x,), dynamic_shapes=(_dynamic_dims(x),))
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path)).module()
    return lambda inputs: loaded(inputs)


def export_safetensors(model: nn.Module, sample: SampleData, path: Path, rebuild: Callable[[], nn.Module],
                       metadata: dict[str, str]) -> Callable[[torch.Tensor], Any]:
    """The weights as safetensors with the model's spec in the header; checked by loading them into a rebuilt model."""
    from safetensors.torch import save_file

    from .io import atomic_path
    from .weights import load_weights

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    fresh = rebuild()
    load_weights(fresh, path)
    fresh.eval()
    return lambda inputs: fresh(inputs)


def save_pretrained(student: nn.Module, target: Path) -> None:
    """A language-model student's ``save_pretrained`` folder (LoRA adapters merged in)."""
    own = getattr(student, "save_pretrained", None)
    if callable(own):
        own(str(target))
        return
    hf = getattr(student, "hf", None)
    if hf is None or not callable(getattr(hf, "save_pretrained", None)):
        raise RecipeError(f"--format hf needs a student with save_pretrained (a Hugging Face model); this run's "
                          f"student is a {type(student).__name__}: use --format onnx, pt2, torchscript or safetensors")
    if getattr(student, "lora", False) and callable(getattr(hf, "merge_and_unload", None)):
        hf = copy.deepcopy(hf).merge_and_unload()
    hf.save_pretrained(str(target))


def export_hf(student: nn.Module, sample: SampleData, target: Path, run_dir: Path) -> Callable[[torch.Tensor], Any]:
    """``save_pretrained`` (and the run's tokenizer files), checked by ``AutoModelForCausalLM.from_pretrained``."""
    with quiet():
        save_pretrained(student, target)
    tokenizer = run_dir / "tokenizer"
    if tokenizer.is_dir():
        for item in tokenizer.iterdir():
            if item.is_file() and not (target / item.name).exists():
                shutil.copy2(item, target / item.name)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise RecipeError("checking an hf export needs transformers: pip install 'kdforge[lm]'") from None
    with quiet():
        loaded = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    return lambda inputs: loaded(input_ids=inputs, use_cache=False).logits


# -- the command ----------------------------------------------------------------------------------
def default_path(run_dir: Path, fmt: str) -> Path:
    """``<run>/export/student.<suffix>`` (``<run>/export/hf`` for hf)."""
    return run_dir / "export" / ("hf" if fmt == "hf" else f"student{SUFFIXES[fmt]}")


def extra_path(student_path: Path, name: str) -> Path:
    """``student.onnx`` -> ``student.<name>.onnx`` (beside the student's file)."""
    return student_path.with_name(f"{student_path.stem}.{name}{student_path.suffix}")


def extra_jobs(run_dir: Path) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, model to export, reference model)`` for each extra model the run recorded."""
    from .artifacts import extra_models
    from .extensions import Traceable

    jobs = []
    for extra in extra_models(run_dir):
        reference = extra.build(run_dir).eval()
        exported = extra.build(run_dir)
        exported = exported.traceable() if isinstance(exported, Traceable) else exported
        jobs.append((extra.name, exported.eval(), reference))
    return jobs


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, *, atol: float = DEFAULT_ATOL,
               extra_models: bool = True, batch_sizes: tuple[int, ...] = CHECK_BATCHES) -> list[ExportResult]:
    """Export a finished run's student (and its extra models) in ``fmt``; every file is checked (see the module doc)."""
    from .compose import load_student

    if fmt not in FORMATS:
        raise RecipeError(f"unknown --format {fmt!r} (valid: {', '.join(FORMATS)})")
    if not atol >= 0:
        raise RecipeError("--atol must be 0 or more")
    if fmt == "onnx":
        require(ONNX_PACKAGES, "ONNX export")
    run = load_run(run_dir)
    if not (run.path / "student.safetensors").is_file() or not run.recipe:
        raise RecipeError(f"{str(run_dir)!r} is not a finished run (no student.safetensors); export it once it ends")
    target = Path(out) if out is not None else default_path(run.path, fmt)
    if fmt != "hf" and target.is_dir():
        raise RecipeError(f"--out {str(target)!r} is a folder; name the file to write (e.g. {target / ('student' + SUFFIXES[fmt])})")
    if fmt == "hf" and target.exists() and not target.is_dir():
        raise RecipeError(f"--out {str(target)!r} is a file; --format hf writes a folder")
    student = load_student(run.path).eval()
    sample = sample_batch(run.recipe, max(batch_sizes))
    target.parent.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, nn.Module, nn.Module, Path]] = [("student", student, student, target)]
    if extra_models and fmt != "hf":
        jobs += [(name, model, reference, extra_path(target, name)) for name, model, reference in extra_jobs(run.path)]
    results = []
    for name, model, reference, path in jobs:
        result = ExportResult(name, fmt, str(path), list(batch_sizes), atol=atol)
        if fmt == "onnx":
            runner = export_onnx(model, sample, path)
        elif fmt == "torchscript":
            runner = export_torchscript(model, sample, path)
        elif fmt == "pt2":
            runner = export_pt2(model, sample, path)
        elif fmt == "safetensors":
            runner = export_safetensors(model, sample, path, _rebuilder(run.path, name, model),
                                        _metadata(run, name, reference))
        else:
            target.mkdir(parents=True, exist_ok=True)
            runner = export_hf(model, sample, path, run.path)
        result.max_abs_diff, result.max_abs_output = max_difference(runner, reference, sample, batch_sizes)
        result.passed = result.max_abs_diff <= atol
        results.append(result)
    return results


def _rebuilder(run_dir: Path, name: str, model: nn.Module) -> Callable[[], nn.Module]:
    from .compose import load_student

    if name == "student":
        return lambda: load_student(run_dir)
    return lambda: copy.deepcopy(model)  # an extra model: its structure, the weights come from the file


def _metadata(run: Any, name: str, reference: nn.Module) -> dict[str, str]:
    from . import __version__

    student = run.recipe.get("student") or {}
    meta = {"format": "pt", "kdforge.version": __version__, "kdforge.run": run.name,
            "kdforge.student": json.dumps(student, sort_keys=True, default=str)}
    if name != "student":
        meta["kdforge.extra_model"] = name
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``kdforge export``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="format",
                        help="onnx (dynamo exporter, checked in onnxruntime), torchscript, pt2 (torch.export), "
                             "safetensors (weights with the model spec), hf (save_pretrained, language models)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="file to write (hf: a folder); default <run>/export/student.<format>; the run's extra "
                             "models go beside it as <stem>.<model>.<format>")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help=f"largest absolute difference to the PyTorch outputs that passes (default {DEFAULT_ATOL:g})")
    parser.add_argument("--no-extra-models", dest="extra_models", action="store_false",
                        help="export only the student, not the extra models the run recorded (extra_models.json)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    """``kdforge export``: write and check the files; exit 1 when a check fails."""
    from .cli import emit, format_table

    try:
        results = export_run(args.run_dir, args.format, args.out, atol=args.atol, extra_models=args.extra_models)
    except ExportCheckFailed as exc:
        print(f"kdforge: export check failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        emit(json.dumps([asdict(r) for r in results], indent=2))
    else:
        rows = [[r.model, r.path, ", ".join(map(str, r.batch_sizes)), f"{r.max_abs_diff:.3g}", f"{r.max_abs_output:.3g}",
                 "ok" if r.passed else f"FAILED (> {r.atol:g})"] for r in results]
        emit(format_table(["model", "file", "batch sizes checked", "max abs diff", "max abs output", "check"], rows))
    failed = [r for r in results if not r.passed]
    for r in failed:
        print(f"kdforge: export check failed: {r.path}: outputs differ from the student's by up to "
              f"{r.max_abs_diff:.3g} (--atol {r.atol:g})", file=sys.stderr)
    return 1 if failed else 0
