"""``kdforge export``: ONNX (dynamo exporter, checked in onnxruntime, dynamic batch), TorchScript, pt2,
safetensors, early exits per exit, language models through save_pretrained, and the failure paths."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import kdforge
from conftest import base_recipe, run_cli
from kdforge import RecipeError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A digits MLP, a CIFAR-architecture student (resnet8 on synthetic 3x32x32), and a byot run with one exit.

    (resnet8 rather than resnet8x4 to keep the test fast on two CPU cores: the same code, a quarter of the width;
    docs/export.md shows resnet8x4.)"""
    root = tmp_path_factory.mktemp("export-runs")
    kdforge.run(base_recipe(root, name="tiny-mlp", trainer={"epochs": 1, "batch_size": 128, "progress_bar": False},
                            output_dir=str(root / "mlp")))
    kdforge.run(base_recipe(root, name="tiny-resnet8",
                            data={"name": "synthetic", "params": {"shape": [3, 32, 32], "num_classes": 10,
                                                                  "train_size": 64, "eval_size": 32}},
                            student={"name": "resnet8"},
                            trainer={"epochs": 1, "batch_size": 64, "progress_bar": False},
                            output_dir=str(root / "resnet")))
    kdforge.run(base_recipe(root, name="tiny-byot", student={"name": "small_cnn", "params": {"channels": [8, 16]}},
                            losses=[{"name": "byot", "params": {"taps": ["features.0"], "deep_tap": "pool"}}],
                            trainer={"epochs": 1, "batch_size": 128, "progress_bar": False}, output_dir=str(root / "byot")))
    return {"mlp": root / "mlp", "resnet": root / "resnet", "byot": root / "byot"}


def export(*argv: str) -> int:
    from kdforge import export as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(list(argv)))


def onnx_outputs(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("which, shape", [("mlp", (1, 8, 8)), ("resnet", (3, 32, 32))])
def test_onnx_export_runs_in_onnxruntime_at_any_batch_size(runs: dict[str, Path], which: str, shape: tuple[int, ...],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert export(str(runs[which]), "--format", "onnx", "--json") == 0
    [result] = json.loads(capsys.readouterr().out)
    path = runs[which] / "export" / "student.onnx"
    assert result["path"] == str(path) and result["passed"] and result["batch_sizes"] == [2, 1, 64]
    assert 0 <= result["max_abs_diff"] < 1e-4 and result["max_abs_output"] > 0
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: a dynamic batch
    # checked here again, independently of the command: a batch size it did not try, random inputs
    student = kdforge.load_student(runs[which]).eval()
    x = torch.rand(5, *shape)
    with torch.no_grad():
        expected = student(x)
    got = onnx_outputs(path, x)
    assert got.shape == (5, 10)
    assert (got - expected).abs().max().item() < 1e-4


def test_early_exits_are_exported_per_exit_with_only_the_layers_they_run(runs: dict[str, Path], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deploy" / "model.onnx"
    assert export(str(runs["byot"]), "--format", "onnx", "--out", str(out), "--json") == 0
    results = json.loads(capsys.readouterr().out)
    exit_file = tmp_path / "deploy" / "model.exit-features.0.onnx"
    assert [(r["model"], r["path"]) for r in results] == [("student", str(out)), ("exit-features.0", str(exit_file))]
    assert all(r["passed"] for r in results)
    reference = kdforge.create("student", "early_exit", path=str(runs["byot"]), exit="features.0").eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        expected = reference(x)
    assert (onnx_outputs(exit_file, x) - expected).abs().max().item() < 1e-4
    full, cut = onnx.load(str(out)), onnx.load(str(exit_file))
    shapes = [{tuple(i.dims) for i in m.graph.initializer if len(i.dims) == 4} for m in (full, cut)]
    # the student: conv blocks 1 -> 8 and 8 -> 16 (3x3); the exit: the first block, then its head's 1x1 bottleneck
    assert shapes[0] == {(8, 1, 3, 3), (16, 8, 3, 3)}
    assert shapes[1] == {(8, 1, 3, 3), (16, 8, 1, 1)}


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("pt2", ".pt2"), ("safetensors", ".safetensors")])
def test_other_formats_load_back_and_match(runs: dict[str, Path], fmt: str, suffix: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert export(str(runs["byot"]), "--format", fmt, "--json") == 0
    results = json.loads(capsys.readouterr().out)
    assert [Path(r["path"]).name for r in results] == [f"student{suffix}", f"student.exit-features.0{suffix}"]
    assert all(r["passed"] and r["max_abs_diff"] < 1e-5 for r in results)
    student = kdforge.load_student(runs["byot"]).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        expected = student(x)
        path = runs["byot"] / "export" / f"student{suffix}"
        if fmt == "torchscript":
            got = torch.jit.load(str(path))(x)
        elif fmt == "pt2":
            got = torch.export.load(str(path)).module()(x)
        else:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            assert json.loads(meta["kdforge.student"])["name"] == "small_cnn" and meta["kdforge.run"] == "tiny-byot"
            fresh = kdforge.create("student", "small_cnn", num_classes=10, in_channels=1, input_shape=[1, 8, 8],
                                   channels=[8, 16], weights_path=str(path)).eval()
            got = fresh(x)
    assert torch.allclose(got, expected, atol=1e-6)


def test_a_difference_above_the_tolerance_fails_the_command(runs: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from kdforge import export as module

    real = module.export_onnx

    def off_by_a_little(model, sample, path):  # type: ignore[no-untyped-def]
        runner = real(model, sample, path)
        return lambda x: runner(x) + 1e-3

    monkeypatch.setattr(module, "export_onnx", off_by_a_little)
    assert export(str(runs["mlp"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--no-extra-models") == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "differ from the student's by up to 0.001" in captured.err
    assert export(str(runs["mlp"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--atol", "0.01") == 0


def test_language_model_students_export_through_save_pretrained(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text("".join(f"value_{j} = {i} * {j}\n" for j in range(40)))
    tiny = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}
    run_dir = tmp_path / "lm"
    kdforge.run({"name": "tiny-lm", "data": {"name": "text", "params": {
        "files": str(corpus / "*.txt"), "vocab_size": 300, "seq_len": 16, "eval_fraction": 0.2,
        "cache_dir": str(tmp_path / "cache")}},
        "student": {"name": "hf_causal_lm", "params": {"config": tiny}}, "losses": [{"name": "lm_ce"}],
        "trainer": {"epochs": 1, "batch_size": 16, "progress_bar": False}, "output_dir": str(run_dir)})
    out = tmp_path / "hf-out"
    assert export(str(run_dir), "--format", "hf", "--out", str(out), "--json") == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["passed"] and result["max_abs_diff"] < 1e-5
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 16))
    student = kdforge.load_student(run_dir).eval()
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(str(out))(input_ids=ids).logits, student(ids), atol=1e-5)


def test_errors(runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RecipeError, match="save_pretrained"):
        export(str(runs["mlp"]), "--format", "hf", "--out", str(tmp_path / "hf"))
    with pytest.raises(RecipeError, match="is a folder"):
        export(str(runs["mlp"]), "--format", "onnx", "--out", str(tmp_path))
    with pytest.raises(RecipeError, match="no run directory"):
        export(str(tmp_path / "missing"), "--format", "safetensors")
    with pytest.raises(RecipeError, match="--atol"):
        export(str(runs["mlp"]), "--format", "safetensors", "--atol", "-1")
    with pytest.raises(SystemExit):  # argparse: --format is required and has choices
        export(str(runs["mlp"]), "--format", "tflite")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(RecipeError, match=r"missing: onnxscript\): pip install 'kdforge\[export\]'"):
        export(str(runs["mlp"]), "--format", "onnx")


def test_cli_export(runs: dict[str, Path], tmp_path: Path) -> None:
    """Needs the lead's wiring: ``kdforge export`` as a subcommand."""
    out = tmp_path / "cli.onnx"
    result = run_cli("export", str(runs["mlp"]), "--format", "onnx", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and "ok" in result.stdout and "[torch.onnx]" not in result.stdout
    bad = run_cli("export", str(runs["mlp"]), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert bad.returncode == 2 and "save_pretrained" in bad.stderr
