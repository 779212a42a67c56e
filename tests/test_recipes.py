"""Every shipped recipe is valid, and its models, taps and losses fit together (one dry-run batch).

Recipes that read CIFAR data or earlier runs are checked with stand-ins of the same shapes:
synthetic 32x32 data; for a ``checkpoint`` teacher an untrained copy of the model that the
recipe producing that run directory trains; for a tokenizer saved by an earlier run, one
trained on this recipe's text with the producing recipe's vocabulary size.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdforge.plugins.lm_data import TOKENIZER_DIR
from kdforge.plugins.lm_data import text as text_dataset
from kdforge.runner import validate_recipe_source as validate

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VOCAB_SIZE = inspect.signature(text_dataset).parameters["vocab_size"].default
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if not p.name.startswith("sweep-"))  # sweeps: not recipes
PRODUCERS = {}
for _path in RECIPES:
    _recipe = yaml.safe_load(_path.read_text())
    if _recipe.get("output_dir"):
        PRODUCERS[_recipe["output_dir"]] = _recipe


def stand_in(node: Any) -> Any:
    """Replace checkpoint teachers by an untrained model of the architecture they would load,
    and a tokenizer saved by an earlier run by one trained here with that run's vocabulary size."""
    if isinstance(node, dict):
        if node.get("name") == "checkpoint":
            return copy.deepcopy(PRODUCERS[node["params"]["path"]]["student"])
        tokenizer = Path(node["tokenizer"]) if isinstance(node.get("tokenizer"), str) else None
        if tokenizer is not None and tokenizer.parent.as_posix() in PRODUCERS:
            assert tokenizer.name == TOKENIZER_DIR, f"{tokenizer}: runs save their tokenizer in {TOKENIZER_DIR}/"
            producer = PRODUCERS[tokenizer.parent.as_posix()]["data"].get("params", {})
            assert "tokenizer" not in producer, "a tokenizer saved by a run that loaded one: point at the original"
            node = {k: v for k, v in node.items() if k != "tokenizer"}
            node["vocab_size"] = producer.get("vocab_size", DEFAULT_VOCAB_SIZE)
        return {k: stand_in(v) for k, v in node.items()}
    if isinstance(node, list):
        return [stand_in(v) for v in node]
    return node


def test_recipes_are_found() -> None:
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"digits/teacher.yaml", "digits/student.yaml", "digits/kd.yaml", "digits/attention.yaml",
            "digits/relational.yaml", "digits/fitnet.yaml", "digits/ensemble.yaml", "digits/byot.yaml",
            "digits/ema.yaml", "digits/born-again/gen2.yaml", "cifar100/kd-resnet8x4-from-resnet32x4.yaml",
            "cifar10/kd-resnet18-from-resnet50.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_dry_run(path: Path, tmp_path: Path) -> None:
    recipe = stand_in(yaml.safe_load(path.read_text()))
    if recipe["data"]["name"] in ("cifar10", "cifar100"):
        classes = 10 if recipe["data"]["name"] == "cifar10" else 100
        recipe["data"] = {"name": "synthetic", "params": {"shape": [3, 32, 32], "num_classes": classes,
                                                          "train_size": 8, "eval_size": 4}}
    recipe["output_dir"] = str(tmp_path / "never-written")
    validate(recipe, dry=True)
    assert not (tmp_path / "never-written").exists()
