"""The teacher-output cache: exact reuse, replayed augmentation, identity and safety."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import kdforge
from conftest import base_recipe, run_cli


def kd_recipe(tmp_path: Path, teacher: Path, cache: dict | None, name: str = "run", **data_params) -> dict:
    recipe = base_recipe(
        tmp_path, data={"name": "digits", "params": {"labeled": 100, **data_params}},
        teacher={"name": "checkpoint", "params": {"path": str(teacher)}},
        student={"name": "mlp", "params": {"hidden": [32]}},
        losses=[{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}],
        optimizer={"name": "adamw", "params": {"lr": 0.003}},
        trainer={"epochs": 2, "batch_size": 64, "progress_bar": False},
        output_dir=str(tmp_path / name))
    if cache is not None:
        recipe["teacher"]["cache"] = {"dir": str(tmp_path / "cache"), **cache}
    return recipe


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student.safetensors"))


def test_a_float32_cache_gives_bit_identical_weights_and_is_reused(tmp_path: Path, digits_teacher: Path) -> None:
    online = kdforge.run(kd_recipe(tmp_path, digits_teacher, None, "online"))
    built = kdforge.run(kd_recipe(tmp_path, digits_teacher, {"dtype": "float32"}, "built"))
    reused = kdforge.run(kd_recipe(tmp_path, digits_teacher, {"dtype": "float32"}, "reused"))
    assert built["teacher/cache"]["status"] == "built" and built["teacher/cache"]["build_seconds"] > 0
    assert reused["teacher/cache"]["status"] == "reused" and reused["teacher/cache"]["build_seconds"] == 0
    assert reused["teacher/cache"]["fingerprint"] == built["teacher/cache"]["fingerprint"]
    a, b, c = weights(tmp_path / "online"), weights(tmp_path / "built"), weights(tmp_path / "reused")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert online["student/accuracy"] == built["student/accuracy"] == reused["student/accuracy"]
    # another student, a temperature sweep, another seed: the same teacher outputs, reused
    other = kd_recipe(tmp_path, digits_teacher, {"dtype": "float32"}, "other")
    other["student"]["params"]["hidden"] = [16]
    other["losses"][1]["params"]["temperature"] = 2.0
    other["seed"] = 3
    assert kdforge.run(other)["teacher/cache"]["status"] == "reused"


def test_what_changes_the_contents_changes_the_fingerprint(tmp_path: Path, digits_teacher: Path) -> None:
    prints = set()
    for cache in ({"dtype": "float16"}, {"dtype": "bfloat16"}, {"dtype": "float16", "top_k": 3}):
        prints.add(kdforge.run(kd_recipe(tmp_path, digits_teacher, cache, "r"), overwrite=True)["teacher/cache"]["fingerprint"])
    assert len(prints) == 3


def test_augmented_data_replays_the_stored_views_exactly(tmp_path: Path, digits_teacher: Path) -> None:
    from kdforge.cache import open_cache

    summary = kdforge.run(kd_recipe(tmp_path, digits_teacher, {"dtype": "float32", "views": 4}, shift=1))
    info = summary["teacher/cache"]
    assert info["views"] == 4 and info["status"] == "built"
    cache = open_cache(Path(info["path"]), info["fingerprint"])
    assert cache.params.shape == (1257, 4, 2) and np.abs(cache.params).max() <= 1
    assert len({tuple(cache.params[i, v]) for i in range(50) for v in range(4)}) > 1  # views differ
    # the stored outputs are the teacher's for exactly the replayed pixels
    from kdforge.plugins.datasets import digits

    train = digits(labeled=100, shift=1).train
    teacher = kdforge.load_student(digits_teacher).eval()
    for index, view in ((0, 0), (17, 3), (1256, 2)):
        image, _ = train.replay_augmented(index, torch.from_numpy(np.array(cache.params[index, view])))
        with torch.no_grad():
            expected = teacher(image.unsqueeze(0))[0]
        assert torch.allclose(torch.from_numpy(np.array(cache.arrays["logits"][index, view, 0])), expected, atol=1e-5)


def test_top_k_keeps_the_k_largest_and_the_tail_mass(tmp_path: Path, digits_teacher: Path) -> None:
    from kdforge.cache import BATCH_FIELD, open_cache, teacher_outputs_from_cache

    summary = kdforge.run(kd_recipe(tmp_path, digits_teacher, {"dtype": "float32", "top_k": 3}))
    info = summary["teacher/cache"]
    cache = open_cache(Path(info["path"]), info["fingerprint"])
    from kdforge.plugins.datasets import digits

    x, _ = digits(labeled=100).train[5]
    teacher = kdforge.load_student(digits_teacher).eval()
    with torch.no_grad():
        exact = torch.log_softmax(teacher(x.unsqueeze(0)), dim=-1)[0]
    row = {k: v.unsqueeze(0) for k, v in cache.row(5, 0).items()}
    batch = kdforge.Batch(x.unsqueeze(0), None, torch.tensor([5]), {BATCH_FIELD: row})
    view, _ = teacher_outputs_from_cache(teacher, batch, classes=10)
    approx = view.log_probs(1.0)[0]
    top = exact.topk(3).indices
    assert torch.allclose(approx[top], exact[top], atol=1e-5)  # the k largest: exact
    rest = torch.ones(10, dtype=torch.bool)
    rest[top] = False
    assert torch.allclose(approx[rest].exp().sum(), exact[rest].exp().sum(), atol=1e-5)  # the tail's mass


def test_an_ensemble_caches_each_member_and_combines_them(tmp_path: Path, digits_teacher: Path) -> None:
    member = {"name": "checkpoint", "params": {"path": str(digits_teacher)}}
    recipes = []
    for name, cache in (("online", None), ("cached", {"dtype": "float32"})):
        recipe = kd_recipe(tmp_path, digits_teacher, cache, name)
        recipe["teacher"] = {"name": "ensemble", "params": {"teachers": [member, member], "combine": "confidence"},
                             **({"cache": recipe["teacher"]["cache"]} if cache else {})}
        recipes.append(recipe)
    kdforge.run(recipes[0])
    summary = kdforge.run(recipes[1])
    assert summary["teacher/cache"]["bytes"] > 1257 * 2 * 10 * 4  # two members' outputs
    a, b = weights(tmp_path / "online"), weights(tmp_path / "cached")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("change", "key", "fragment"), [
    ("ema", "teacher.cache", "follows the student"),
    ("taps", "teacher.cache", "taps teacher features"),
    ("views", "teacher.cache.views", "not augmented"),
    ("dtype", "teacher.cache.dtype", "float32"),
])
def test_what_cannot_be_cached_is_a_recipe_error(change: str, key: str, fragment: str, tmp_path: Path,
                                                 digits_teacher: Path) -> None:
    recipe = kd_recipe(tmp_path, digits_teacher, {})
    if change == "ema":
        recipe["teacher"] = {"name": "ema", "cache": {"dir": str(tmp_path / "cache")}}
    elif change == "taps":
        recipe["losses"].append({"name": "relational", "params": {"student_tap": "hidden.0", "teacher_tap": "pool"}})
    elif change == "views":
        recipe["teacher"]["cache"]["views"] = 2
    else:
        recipe["teacher"]["cache"]["dtype"] = "float8"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"kdforge: error: {key}") and fragment in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_augmentation_that_cannot_be_replayed_is_refused(tmp_path: Path, digits_teacher: Path) -> None:
    from kdforge.plugins.datasets import digits

    class Jitter(torch.utils.data.Dataset):
        def __init__(self, base) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, i: int):
            x, y = self.base[i]
            return x + 0.01 * torch.randn_like(x), y

    class Plugin:
        @kdforge.hookimpl
        def register_datasets(self, register):
            def jittered() -> kdforge.DataSplits:
                splits = digits()
                return kdforge.DataSplits(Jitter(splits.train), splits.eval, 10, (1, 8, 8), random_transforms=True)

            register("jittered_digits", jittered)

    obj = Plugin()
    kdforge.register_plugin(obj, name="jitter-test")
    try:
        recipe = kd_recipe(tmp_path, digits_teacher, {})
        recipe["data"] = {"name": "jittered_digits"}
        with pytest.raises(kdforge.RecipeError, match=r"^teacher\.cache: dataset 'jittered_digits' augments .* cannot replay"):
            kdforge.run(recipe)
    finally:
        kdforge.unregister_plugin(obj)


def test_a_damaged_or_half_built_cache_is_never_used(tmp_path: Path, digits_teacher: Path, capfd) -> None:
    recipe = kd_recipe(tmp_path, digits_teacher, {"dtype": "float32"})
    first = kdforge.run(recipe)
    folder = Path(first["teacher/cache"]["path"])
    logits = folder / "logits.npy"
    data = bytearray(logits.read_bytes())
    data[-8:] = b"\x00" * 8  # a flipped tail
    logits.write_bytes(bytes(data))
    (tmp_path / "cache" / f".building-{folder.name}-dead").mkdir()  # a build that was killed
    again = kdforge.run(recipe, overwrite=True)
    assert again["teacher/cache"]["status"] == "built"
    assert "failed its check" in capfd.readouterr().out
    assert not list((tmp_path / "cache").glob(".building-*"))


def test_cache_list_and_clear(tmp_path: Path, digits_teacher: Path) -> None:
    summary = kdforge.run(kd_recipe(tmp_path, digits_teacher, {"dtype": "float16"}))
    listed = json.loads(run_cli("cache", "list", "--dir", str(tmp_path / "cache"), "--json").stdout)
    assert [c["fingerprint"] for c in listed] == [summary["teacher/cache"]["fingerprint"]]
    assert listed[0]["views"] == 1 and listed[0]["dtype"] == "float16" and listed[0]["samples"] == 1257
    refused = run_cli("cache", "clear", "--dir", str(tmp_path / "cache"))
    assert refused.returncode == 2 and "--all" in refused.stderr
    cleared = run_cli("cache", "clear", "--dir", str(tmp_path / "cache"), listed[0]["fingerprint"][:6])
    assert cleared.returncode == 0 and "removed 1" in cleared.stdout
    assert not any((tmp_path / "cache").iterdir()) or all(p.name.startswith(".lock") for p in (tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_two_processes_build_one_cache_identical_to_one_process(tmp_path: Path, digits_teacher: Path) -> None:
    from test_distributed import launch

    single = kdforge.run(kd_recipe(tmp_path / "one", digits_teacher, {"dtype": "float32", "views": 2}, shift=1))
    recipe = kd_recipe(tmp_path / "two", digits_teacher, {"dtype": "float32", "views": 2}, shift=1)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = launch(path)
    assert result.returncode == 0, result.stderr[-3000:]
    double = json.loads((tmp_path / "two/run/summary.json").read_text())
    assert double["teacher/cache"]["status"] == "built"
    assert double["teacher/cache"]["fingerprint"] == single["teacher/cache"]["fingerprint"]
    for name in ("logits", "params"):
        a = np.load(Path(single["teacher/cache"]["path"]) / f"{name}.npy")
        b = np.load(Path(double["teacher/cache"]["path"]) / f"{name}.npy")
        assert np.array_equal(a, b), name


def test_image_folders_with_augmentation_are_cached_as_replayed_views(tmp_path: Path) -> None:
    from test_data_faults import write_images

    write_images(tmp_path / "images", per_class=6)
    write_images(tmp_path / "images", split="val", per_class=2)
    data = {"name": "image_folder", "params": {"root": str(tmp_path / "images"), "image_size": 8}}
    teacher = base_recipe(tmp_path / "t", data=data, student={"name": "small_cnn", "params": {"channels": [8, 8]}},
                          trainer={"epochs": 1, "batch_size": 4, "progress_bar": False})
    kdforge.run(teacher)
    recipe = base_recipe(tmp_path / "s", data=data, teacher={"name": "checkpoint", "params": {"path": str(tmp_path / "t/run")},
                                                              "cache": {"views": 2, "dtype": "float32",
                                                                        "dir": str(tmp_path / "cache")}},
                         losses=[{"name": "kd"}], trainer={"epochs": 2, "batch_size": 4, "progress_bar": False})
    info = kdforge.run(recipe)["teacher/cache"]
    from kdforge.cache import open_cache

    cache = open_cache(Path(info["path"]), info["fingerprint"])
    assert cache.params.shape == (12, 2, 5)  # a crop box (top, left, height, width) and a flip per view
    from kdforge.plugins.datasets import image_folder

    train = image_folder(root=str(tmp_path / "images"), image_size=8).train
    replayed, _ = train.replay_augmented(3, torch.from_numpy(np.array(cache.params[3, 1])))
    model = kdforge.load_student(tmp_path / "t/run").eval()
    with torch.no_grad():
        expected = model(replayed.unsqueeze(0))[0]
    assert torch.allclose(torch.from_numpy(np.array(cache.arrays["logits"][3, 1, 0])), expected, atol=1e-5)


def test_quiet_hides_the_cache_build_bar(tmp_path: Path, digits_teacher: Path) -> None:
    recipe = kd_recipe(tmp_path, digits_teacher, {"dtype": "float16"})
    recipe["trainer"].update(progress_bar=True, epochs=1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    quiet = run_cli("run", "--quiet", str(path))
    assert quiet.returncode == 0, quiet.stderr
    assert "teacher cache" not in quiet.stderr and quiet.stderr.strip() == ""
    shutil.rmtree(tmp_path / "cache")
    loud = run_cli("run", "--overwrite", str(path))  # the bar is there without --quiet: the test can fail
    assert loud.returncode == 0 and "teacher cache" in loud.stderr
