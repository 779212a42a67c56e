"""Malformed recipes and usage errors: exit code 2, one line naming the key, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import base_recipe, run_cli
from kdforge.cli import main


def write(tmp_path: Path, recipe: Any, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe), encoding="utf-8")
    return path


def expect_usage_error(capsys: pytest.CaptureFixture, argv: list[str], *fragments: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kdforge: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def with_(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    return base_recipe(tmp_path, **changes)


def loss_case(tmp_path: Path, losses: list[dict]) -> dict[str, Any]:
    return with_(tmp_path, losses=losses)


CASES = {
    "unknown top-level key": (lambda t: {**with_(t), "trainr": {}}, ["trainr", "Did you mean 'trainer'"]),
    "unknown trainer key": (lambda t: with_(t, trainer={"epochs": 1, "batchsize": 8}), ["trainer.batchsize", "batch_size"]),
    "missing student": (lambda t: {k: v for k, v in with_(t).items() if k != "student"}, ["student", "required"]),
    "zero epochs": (lambda t: with_(t, trainer={"epochs": 0}), ["trainer.epochs", "greater than or equal to 1"]),
    "epochs not a number": (lambda t: with_(t, trainer={"epochs": "many"}), ["trainer.epochs"]),
    "epochs is a bool": (lambda t: with_(t, trainer={"epochs": True}), ["trainer.epochs"]),
    "negative weight": (lambda t: loss_case(t, [{"name": "ce", "weight": -1}]), ["losses[0].weight"]),
    "nan weight": (lambda t: loss_case(t, [{"name": "ce", "weight": float("nan")}]), ["losses[0].weight", "finite"]),
    "no losses": (lambda t: loss_case(t, []), ["losses"]),
    "unknown loss": (lambda t: loss_case(t, [{"name": "kdd"}]), ["losses[0].name", "Did you mean 'kd'"]),
    "unknown loss param": (
        lambda t: with_(t, teacher={"name": "mlp"}, losses=[{"name": "kd", "params": {"temprature": 2}}]),
        ["losses[0].params.temprature", "temperature"],
    ),
    "temperature out of range": (
        lambda t: with_(t, teacher={"name": "mlp"}, losses=[{"name": "kd", "params": {"temperature": -1}}]),
        ["losses[0].params.temperature", "greater than 0"],
    ),
    "kd without a teacher": (lambda t: loss_case(t, [{"name": "kd"}]), ["losses[0]", "teacher"]),
    "unknown student": (lambda t: with_(t, student={"name": "mpl"}), ["student.name", "Did you mean 'mlp'"]),
    "unknown student param": (lambda t: with_(t, student={"name": "mlp", "params": {"hiden": [8]}}), ["student.params.hiden", "hidden"]),
    "unknown dataset": (lambda t: with_(t, data={"name": "digit"}), ["data.name", "digits"]),
    "dataset param out of range": (lambda t: with_(t, data={"name": "digits", "params": {"labeled": 99999}}), ["data", "labeled"]),
    "unknown optimizer": (lambda t: with_(t, optimizer={"name": "adamm"}), ["optimizer.name", "adam"]),
    "negative learning rate": (lambda t: with_(t, optimizer={"name": "sgd", "params": {"lr": -0.1}}), ["optimizer.params", "learning rate"]),
    "unknown optimizer param": (lambda t: with_(t, optimizer={"name": "sgd", "params": {"lr": 0.1, "momentun": 0.9}}), ["optimizer.params.momentun", "momentum"]),
    "unknown schedule": (
        lambda t: loss_case(t, [{"name": "ce", "weight": {"schedule": "cosin", "params": {"start": 1}}}]),
        ["losses[0].weight.schedule", "cosine"],
    ),
    "scheduled param missing a schedule param": (
        lambda t: with_(t, teacher={"name": "mlp"},
                        losses=[{"name": "kd", "params": {"temperature": {"schedule": "linear", "params": {"start": 4}}}}]),
        ["losses[0].params.temperature.params.end", "required"],
    ),
    "scheduled value out of the param's range": (
        lambda t: with_(t, teacher={"name": "mlp"},
                        losses=[{"name": "kd", "params": {"temperature": {"schedule": "constant", "params": {"value": -4}}}}]),
        ["losses[0].params.temperature", "greater than 0"],
    ),
    "temperature schedule leaves the range": (
        lambda t: with_(t, teacher={"name": "mlp"},
                        losses=[{"name": "kd", "params": {"temperature": {"schedule": "linear", "params": {"start": 8, "end": -2}}}}]),
        ["losses[0].params.temperature", "greater than 0"],
    ),
    "weight schedule goes negative": (
        lambda t: loss_case(t, [{"name": "ce", "weight": {"schedule": "linear", "params": {"start": 1, "end": -1}}}]),
        ["losses[0].weight", "below 0"],
    ),
    "schedule in a model param": (
        lambda t: with_(t, student={"name": "mlp", "params": {"dropout": {"schedule": "constant", "params": {"value": 0.1}}}}),
        ["student.params.dropout", "schedule"],
    ),
    "lbfgs": (lambda t: with_(t, optimizer={"name": "lbfgs"}), ["optimizer.name", "closure"]),
    "fp16 without a GPU": (lambda t: with_(t, trainer={"epochs": 1, "mixed_precision": "fp16"}), ["trainer.mixed_precision"]),
    "bad precision": (lambda t: with_(t, trainer={"epochs": 1, "mixed_precision": "fp8"}), ["trainer.mixed_precision"]),
    "wandb typo": (lambda t: with_(t, tracking={"wandb": {"projet": "x"}}), ["tracking.wandb.projet", "project"]),
    "missing teacher run": (
        lambda t: with_(t, teacher={"name": "checkpoint", "params": {"path": str(t / "nope")}}, losses=[{"name": "kd"}]),
        ["teacher", "nope"],
    ),
    "unknown torchvision arch": (
        lambda t: with_(t, student={"name": "torchvision", "params": {"arch": "resnet81"}}),
        ["student", "resnet18"],
    ),
    "wrong class count": (
        lambda t: with_(t, student={"name": "mlp", "params": {"num_classes": 5}}),
        ["student", "10 classes"],
    ),
    "input shape the model cannot take": (
        lambda t: with_(t, student={"name": "mlp", "params": {"input_shape": [3, 32, 32]}}),
        ["student", "(1, 8, 8)"],
    ),
    "name with a path separator": (lambda t: with_(t, name="../evil"), ["name"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_recipe(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    build, fragments = CASES[case]
    recipe = build(tmp_path)
    path = write(tmp_path, recipe)
    expect_usage_error(capsys, ["run", str(path)], *fragments)
    assert not (tmp_path / "run").exists(), "a failed validation must write nothing"


RAW_YAML = {
    "not yaml": ("data: [unclosed", ["not valid YAML", "line"]),
    "a list, not a mapping": ("- 1\n- 2\n", ["mapping"]),
    "empty file": ("", ["mapping"]),
    "duplicated key": ("name: a\nname: b\n", ["duplicated key 'name'"]),
    "python tag": ("name: !!python/object/apply:os.system ['echo pwned']\n", ["not valid YAML"]),
    "binary junk": ("\x00\x01\x02", ["recipe"]),
    "billion laughs": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)), ["expands to more than"]),
    "self-referential alias": ("data: &d\n  name: digits\n  params: *d\n", ["recursive"]),
}


@pytest.mark.parametrize("case", sorted(RAW_YAML))
def test_unparseable_recipe(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text, fragments = RAW_YAML[case]
    expect_usage_error(capsys, ["validate", str(write(tmp_path, text))], *fragments)


def test_missing_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_usage_error(capsys, ["run", str(tmp_path / "nope.yaml")], "does not exist")


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("trainer.epochs", ["key.path=value"]),
        ("=3", ["no key"]),
        ("losses.5.weight=1", ["losses[5]", "2 items"]),
        ("trainer.epochs=[", ["not valid YAML"]),
        ("seed.x=1", ["seed.x", "int"]),
        ("losses..weight=1", ["malformed"]),
        ("trainer.epochs=-3", ["trainer.epochs"]),
    ],
)
def test_bad_overrides(override: str, fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = with_(tmp_path, losses=[{"name": "ce"}, {"name": "ce", "weight": 0.5}])
    expect_usage_error(capsys, ["validate", str(write(tmp_path, recipe)), "--set", override], *fragments)


def test_overrides_reach_nested_keys_and_list_items(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = with_(tmp_path, losses=[{"name": "ce"}, {"name": "ce", "weight": 0.5}])
    path = write(tmp_path, recipe)
    assert main(["validate", str(path), "--set", "losses[1].weight=0.25", "--set", "trainer.epochs=3"]) == 0
    assert "3 epoch(s)" in capsys.readouterr().out
    # the override is applied, so an out-of-range value through it is caught
    expect_usage_error(capsys, ["validate", str(path), "--set", "losses.1.weight=-2"], "losses[1].weight")


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    expect_usage_error(capsys, ["frobnicate"], "invalid choice")
    expect_usage_error(capsys, ["run"], "RECIPE")
    expect_usage_error(capsys, ["compare", "/nonexistent-run"], "summary.json")


def test_yaml_no_means_no_mixed_precision(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = yaml.safe_dump(with_(tmp_path)).replace("progress_bar: false", "progress_bar: false\n  mixed_precision: no")
    assert "mixed_precision: no" in text
    assert main(["validate", str(write(tmp_path, text))]) == 0, capsys.readouterr().err


def test_existing_run_is_not_clobbered(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    expect_usage_error(capsys, ["run", str(write(tmp_path, with_(tmp_path)))], "output_dir", "--overwrite")
    assert (run_dir / "summary.json").read_text() == "{}"


def test_resume_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_usage_error(capsys, ["run", str(write(tmp_path, with_(tmp_path))), "--resume"], "--resume", "checkpoint")


def test_the_real_program_prints_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, loss_case(tmp_path, [{"name": "kdd"}]))
    result = run_cli("run", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "losses[0].name" in result.stderr and "'kd'" in result.stderr


def test_validate_accepts_the_shipped_recipes(capsys: pytest.CaptureFixture) -> None:
    root = Path(__file__).resolve().parent.parent / "recipes"
    recipes = sorted(p for p in root.rglob("*.yaml") if not p.name.startswith("sweep-"))  # sweep files are not recipes
    assert len(recipes) >= 5
    for recipe in recipes:
        assert main(["validate", str(recipe)]) == 0, (recipe, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"name": ".."}, ["name", "'.' or '..'"]),
        ({"optimizer": {"name": "sgd", "params": {"lr": {"schedule": "cosine", "params": {"start": -0.1}}}}},
         ["optimizer.params.lr", "below 0"]),
        ({"losses": [{"name": "ce", "weight": {"schedule": "progressive",
                                                "params": {"values": [1, -1, 1], "boundaries": [0.1, 0.2]}}}]},
         ["losses[0].weight", "below 0"]),
        ({"trainer": {"epochs": 1, "batch_size": 5000, "drop_last": True}}, ["trainer.batch_size", "no training batch"]),
    ],
)
def test_values_that_only_fail_later_are_caught_first(change: dict, fragments: list[str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    expect_usage_error(capsys, ["run", str(write(tmp_path, with_(tmp_path, **change)))], *fragments)


def test_yaml_merge_keys_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = yaml.safe_dump(with_(tmp_path)).replace("trainer:\n", "defaults: &d {epochs: 3}\ntrainer:\n  <<: *d\n")
    text = text.replace("  epochs: 2\n", "")
    expect_usage_error(capsys, ["validate", str(write(tmp_path, text))], "defaults", "unknown key")
    text = text.replace("defaults: &d {epochs: 3}\n", "").replace("  <<: *d\n", "  <<: {epochs: 3}\n")
    assert main(["validate", str(write(tmp_path, text))]) == 0, capsys.readouterr().err
    assert "3 epoch(s)" in capsys.readouterr().out


def test_create_takes_kind_and_name_as_keywords() -> None:
    import kdforge

    assert kdforge.create(kind="loss", name="kd", temperature=2.0).temperature == 2.0
