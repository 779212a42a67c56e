"""The extra-model manifest (``extra_models.json``): what plugins record, report/profile/export read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import kdforge
from kdforge import RUN_DIR, ExtraModel, extra_model_metric, extra_models, record_extra_model


def test_recorded_models_round_trip_and_replace_by_name(tmp_path: Path) -> None:
    record_extra_model(tmp_path, ExtraModel(name="b-model", plugin="mlp", params={"hidden": 4}))
    record_extra_model(tmp_path, ExtraModel(name="a-model", plugin="early_exit", head="features.0",
                                            params={"path": RUN_DIR, "exit": "features.0"}))
    record_extra_model(tmp_path, ExtraModel(name="b-model", plugin="mlp", params={"hidden": 8}))
    models = extra_models(tmp_path)
    assert [(m.name, m.params) for m in models] == [("a-model", {"path": RUN_DIR, "exit": "features.0"}),
                                                    ("b-model", {"hidden": 8})]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_run_dir_placeholder_becomes_the_run_directory(tmp_path: Path) -> None:
    seen = {}

    def factory(path: str, width: int) -> nn.Module:
        seen["path"] = path
        return nn.Linear(width, 2)

    class Plugin:
        @kdforge.hookimpl
        def register_students(self, register) -> None:
            register("test_extra_model_factory", factory)

    kdforge.register_plugin(Plugin(), "test-extra-models")
    try:
        model = ExtraModel(name="m", plugin="test_extra_model_factory", params={"path": RUN_DIR, "width": 3})
        built = model.build(tmp_path / "moved-run")
    finally:
        kdforge.unregister_plugin("test-extra-models")
    assert seen["path"] == str(tmp_path / "moved-run")
    assert isinstance(built, nn.Linear) and built.in_features == 3


def test_metrics_come_from_the_head_it_reproduces() -> None:
    summary = {"student/exits/accuracy": {"features.0": 0.5, "features.1": 0.75}}
    assert extra_model_metric(summary, ExtraModel(name="e", plugin="p", head="features.1"), "accuracy") == 0.75
    assert extra_model_metric(summary, ExtraModel(name="e", plugin="p", head="other"), "accuracy") is None
    assert extra_model_metric(summary, ExtraModel(name="e", plugin="p"), "accuracy") is None


@pytest.mark.parametrize("name", ["", "../x", "a/b", "has space"])
def test_names_that_are_not_file_name_parts_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="extra model name"):
        record_extra_model(tmp_path, ExtraModel(name=name, plugin="mlp"))
    assert not (tmp_path / "extra_models.json").exists()


def test_params_that_are_not_json_are_refused_when_recorded(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        record_extra_model(tmp_path, ExtraModel(name="m", plugin="mlp", params={"t": torch.zeros(1)}))
    assert not (tmp_path / "extra_models.json").exists()


@pytest.mark.parametrize("text", ["{not json", '{"a": 1}', '[{"name": "m"}]', '[{"name": "m", "plugin": "p", "x": 1}]'])
def test_a_damaged_manifest_is_a_recipe_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "extra_models.json").write_text(text)
    with pytest.raises(kdforge.RecipeError, match="extra-model manifest"):
        extra_models(tmp_path)


def test_no_manifest_means_no_extra_models(tmp_path: Path) -> None:
    assert extra_models(tmp_path) == []
