"""Typed extension points, lifecycle callbacks, the composition API, and what a plugin author hit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import kdforge
from conftest import base_recipe, run_cli


class _Plugin:
    """Registers whatever ``losses``/``teachers`` mappings it is given, for one test."""

    def __init__(self, losses: dict[str, Any] | None = None, teachers: dict[str, Any] | None = None) -> None:
        self.losses, self.teachers = losses or {}, teachers or {}

    @kdforge.hookimpl
    def register_losses(self, register):
        for name, factory in self.losses.items():
            register(name, factory)

    @kdforge.hookimpl
    def register_teachers(self, register):
        for name, factory in self.teachers.items():
            register(name, factory)


@pytest.fixture
def plugin():
    registered = []

    def add(**tables: Any) -> None:
        obj = _Plugin(**tables)
        kdforge.register_plugin(obj, name=f"ext-test-{len(registered)}")
        registered.append(obj)

    yield add
    for obj in registered:
        kdforge.unregister_plugin(obj)


# -- half-implemented protocols are errors that name the missing method ---------------------
class UpdateOnly(torch.nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))

    def update(self, student) -> None:  # no bind: half of FollowsStudent
        pass


class MembersOnly(UpdateOnly):
    update = None  # type: ignore[assignment]
    members = torch.nn.ModuleList()  # no combine: half of CompositeTeacher


class Typo(torch.nn.Module):
    def forward(self, out):
        return out.student.logits.sum() * 0

    def on_step_ends(self, run) -> None:  # misspelt callback
        pass


class NotCallableHeads(Typo):
    on_step_ends = None  # type: ignore[assignment]
    eval_logits = 3


class StringTaps(Typo):
    on_step_ends = None  # type: ignore[assignment]
    student_taps = "features.0"


@pytest.mark.parametrize(("kind", "name", "factory", "message"), [
    ("teacher", "update_only", UpdateOnly, "implements update of the FollowsStudent extension point but not bind"),
    ("teacher", "members_only", MembersOnly, "implements members of the CompositeTeacher extension point but not combine"),
    ("loss", "typo", Typo, "'on_step_ends', which is not a lifecycle callback. Did you mean 'on_step_end'"),
    ("loss", "heads", NotCallableHeads, "eval_logits must be a method"),
    ("loss", "string_taps", StringTaps, "student_taps must be a list of module names"),
])
def test_a_half_implemented_extension_point_names_what_is_missing(kind, name, factory, message, plugin) -> None:
    plugin(**{("losses" if kind == "loss" else "teachers"): {name: factory}})
    with pytest.raises(kdforge.PluginError, match=message):
        kdforge.create(kind, name)


# -- lifecycle callbacks and the step's position ----------------------------------------------
class Recorder(torch.nn.Module):
    """A loss that records what it sees and every callback."""

    def __init__(self) -> None:
        super().__init__()
        self.positions: list[tuple[int, int, int, int, float]] = []
        self.events: list[tuple[str, int, int]] = []

    def forward(self, out: kdforge.StepOutputs) -> torch.Tensor:
        if out.training:
            self.positions.append((out.step, out.epoch, out.total_steps, out.steps_per_epoch, out.progress))
        assert out.index is not None and out.batch.index is out.index
        return out.student.logits.float().sum() * 0.0

    def on_fit_start(self, run: kdforge.RunContext) -> None:
        self.events.append(("start", run.step, run.epoch))

    def on_step_end(self, run: kdforge.RunContext) -> None:
        self.events.append(("step", run.step, run.epoch))

    def on_epoch_end(self, run: kdforge.RunContext) -> None:
        self.events.append(("epoch", run.step, run.epoch))
        assert "student/accuracy" in run.metrics

    def on_fit_end(self, run: kdforge.RunContext) -> dict[str, Any]:
        self.events.append(("end", run.step, run.epoch))
        return {"recorder/steps": sum(1 for e in self.events if e[0] == "step")}


def test_callbacks_fire_in_order_and_losses_see_the_step_epoch_and_totals(tmp_path: Path, plugin) -> None:
    recorders: list[Recorder] = []

    def factory() -> Recorder:
        recorders.append(Recorder())
        return recorders[-1]

    plugin(losses={"recorder": factory})
    summary = kdforge.run(base_recipe(tmp_path, losses=[{"name": "ce"}, {"name": "recorder"}],
                                      trainer={"epochs": 2, "batch_size": 256, "progress_bar": False}))
    recorder = recorders[-1]
    assert recorder.positions[0][2:4] == (1, 1)  # the dry run's call, before the run's totals exist
    recorder.positions.pop(0)
    per_epoch = 5  # 1,257 samples at batch 256
    assert summary["train/steps"] == 2 * per_epoch and summary["recorder/steps"] == 2 * per_epoch
    assert [p[0] for p in recorder.positions] == list(range(2 * per_epoch))
    assert [p[1] for p in recorder.positions] == [0] * per_epoch + [1] * per_epoch
    assert {p[2:4] for p in recorder.positions} == {(2 * per_epoch, per_epoch)}
    assert recorder.positions[3][4] == pytest.approx(3 / 10)
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["start"] + ["step"] * 5 + ["epoch"] + ["step"] * 5 + ["epoch", "end"]
    assert recorder.events[-2] == ("epoch", 10, 1)


# -- the composition API -----------------------------------------------------------------------
def _ensemble_spec(teacher: Path) -> dict[str, Any]:
    member = {"name": "checkpoint", "params": {"path": str(teacher)}}
    return {"name": "ensemble", "params": {"teachers": [member, member]}}


class Sharpened(kdforge.TeacherWrapper):
    """The doc example: any teacher, with its logits multiplied by ``factor``."""

    def __init__(self, teacher: dict, factor: float = 2.0, num_classes: int | None = None,
                 in_channels: int | None = None, input_shape: list[int] | None = None) -> None:
        context = kdforge.BuildContext(num_classes, in_channels, tuple(input_shape) if input_shape else None)
        super().__init__(kdforge.build_teacher(teacher, context, key=".teacher"))
        self.factor = factor

    def forward(self, inputs):
        return self.factor * self.inner(inputs)

    def combine(self, outputs, targets):
        """Around a teacher of several members: the engine runs the members, then this."""
        view = self.inner.combine(outputs, targets)
        return kdforge.ModelOutputs(self.factor * view.logits, view.features,
                                    lambda t: view.log_probs(t / self.factor))  # sharper = a lower temperature


class CountTeachers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def forward(self, out: kdforge.StepOutputs) -> torch.Tensor:
        self.seen.add(len(out.teachers))
        return out.student.logits.float().sum() * 0.0


def test_a_wrapping_teacher_passes_on_what_it_wraps(tmp_path: Path, digits_teacher: Path, plugin) -> None:
    counters: list[CountTeachers] = []
    plugin(teachers={"sharpened": Sharpened},
           losses={"count_teachers": lambda: counters.append(CountTeachers()) or counters[-1]})
    # around an ensemble: still a CompositeTeacher, both members reach the losses
    kdforge.run(base_recipe(tmp_path / "ens", teacher={"name": "sharpened", "params": {"teacher": _ensemble_spec(digits_teacher)}},
                            losses=[{"name": "kd"}, {"name": "count_teachers"}],
                            trainer={"epochs": 1, "batch_size": 256, "progress_bar": False}))
    assert counters[-1].seen == {2}
    # around ema: still follows the student (updated, checkpointed, exported)
    summary = kdforge.run(base_recipe(tmp_path / "ema", teacher={"name": "sharpened", "params": {"teacher": {"name": "ema", "params": {"decay": 0.5}}}},
                                      losses=[{"name": "ce"}, {"name": "kd"}],
                                      trainer={"epochs": 1, "batch_size": 256, "progress_bar": False}))
    weights = load_file(str(tmp_path / "ema/run/teacher.safetensors"))
    assert "inner.num_updates" in weights and int(weights["inner.num_updates"]) == summary["train/steps"]
    # a wrapper that changes forward but not combine around an ensemble would be skipped in training
    class ForwardOnly(kdforge.TeacherWrapper):
        def __init__(self, teacher: dict, num_classes: int | None = None, in_channels: int | None = None,
                     input_shape: list[int] | None = None) -> None:
            context = kdforge.BuildContext(num_classes, in_channels, tuple(input_shape) if input_shape else None)
            super().__init__(kdforge.build_teacher(teacher, context, key=".teacher"))

        def forward(self, inputs):
            return 2 * self.inner(inputs)

    plugin(teachers={"forward_only": ForwardOnly})
    with pytest.raises(kdforge.PluginError, match="overrides forward but not combine"):
        kdforge.validate(base_recipe(tmp_path / "fo", teacher={"name": "forward_only", "params": {
            "teacher": _ensemble_spec(digits_teacher)}}, losses=[{"name": "kd"}]), dry_run=True)
    # an error inside the wrapped teacher names the whole path
    with pytest.raises(kdforge.RecipeError, match=r"^teacher\.params\.teacher\.params\.path: no run directory"):
        kdforge.validate(base_recipe(tmp_path / "bad", teacher={"name": "sharpened", "params": {"teacher": {
            "name": "checkpoint", "params": {"path": str(tmp_path / "nowhere")}}}}), dry_run=True)


def test_taps_inside_a_member_that_renames_them(tmp_path: Path, digits_teacher: Path, plugin) -> None:
    class Renamed(kdforge.TeacherWrapper):
        """A checkpoint teacher whose tap names are the inner model's."""

        def __init__(self, path: str) -> None:
            super().__init__(kdforge.load_student(path))

    plugin(teachers={"renamed": Renamed})
    member = {"name": "renamed", "params": {"path": str(digits_teacher)}}
    recipe = base_recipe(tmp_path, teacher={"name": "ensemble", "params": {"teachers": [member, member]}},
                         losses=[{"name": "ce"}, {"name": "relational", "params": {"student_tap": "hidden.0",
                                                                                    "teacher_tap": "members.1.pool"}}],
                         trainer={"epochs": 1, "progress_bar": False})
    kdforge.validate(recipe, dry_run=True)  # members.1.pool is the inner model's pool, through the wrapper
    recipe["losses"][1]["params"]["teacher_tap"] = "members.1.pol"
    with pytest.raises(kdforge.RecipeError) as info:
        kdforge.validate(recipe, dry_run=True)
    assert "members.1.pool" in str(info.value) and "inner" not in str(info.value)


def test_load_teacher_rebuilds_an_ensemble_and_an_ema_as_they_ended(tmp_path: Path, digits_teacher: Path) -> None:
    kdforge.run(base_recipe(tmp_path / "ens", teacher=_ensemble_spec(digits_teacher),
                            losses=[{"name": "kd"}], trainer={"epochs": 1, "batch_size": 256, "progress_bar": False}))
    ensemble = kdforge.load_teacher(tmp_path / "ens/run")
    assert isinstance(ensemble, kdforge.CompositeTeacher) and len(ensemble.members) == 2
    summary = kdforge.run(base_recipe(tmp_path / "ema", teacher={"name": "ema", "params": {"decay": 0.9}},
                                      losses=[{"name": "ce"}, {"name": "kd"}],
                                      trainer={"epochs": 2, "batch_size": 256, "progress_bar": False}))
    ema = kdforge.load_teacher(tmp_path / "ema/run")
    assert isinstance(ema, kdforge.FollowsStudent)
    saved = load_file(str(tmp_path / "ema/run/teacher.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in ema.state_dict().items())
    student = kdforge.load_student(tmp_path / "ema/run")
    differs = any(not torch.equal(a, b) for a, b in zip(ema.model.parameters(), student.parameters()))
    assert differs  # the average, not the student
    from kdforge.plugins.datasets import digits

    inputs, targets = next(iter(torch.utils.data.DataLoader(digits().eval, batch_size=540)))
    accuracy = (ema.eval()(inputs).argmax(1) == targets).sum().item() / len(targets)
    assert accuracy == pytest.approx(summary["teacher/accuracy"], abs=1e-9)


# -- what a plugin author hit -------------------------------------------------------------------
class NeedsALabel(torch.nn.Module):
    """Fails on a batch without a single label, as a careless label-dependent loss would."""

    def forward(self, out: kdforge.StepOutputs) -> torch.Tensor:
        labeled = out.targets >= 0
        if not bool(labeled.any()):
            raise ValueError("no labeled sample in this batch")
        return torch.nn.functional.cross_entropy(out.student.logits[labeled].float(), out.targets[labeled])


def test_the_dry_run_batch_holds_a_label_when_the_split_has_one(tmp_path: Path, plugin) -> None:
    from kdforge.plugins.datasets import digits

    train = digits(labeled=10).train
    assert all(train[i][1] == kdforge.UNLABELED for i in range(4))  # the first four are unlabeled
    plugin(losses={"needs_a_label": NeedsALabel})
    kdforge.validate(base_recipe(tmp_path, data={"name": "digits", "params": {"labeled": 10}},
                                 losses=[{"name": "needs_a_label"}]), dry_run=True)


def test_a_name_no_package_provides_says_so_and_names_what_was_filtered_out(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_recipe(tmp_path, losses=[{"name": "weighted_mse"}])))
    result = run_cli("validate", str(path), env={"KDFORGE_LOAD_PLUGINS": "kdforge-logit-l1"})
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "unknown loss 'weighted_mse': no installed plugin provides it" in line
    assert "KDFORGE_LOAD_PLUGINS='kdforge-logit-l1' left out kdforge-regression (regression)" in line
    with pytest.raises(kdforge.PluginError, match=r"unknown loss 'dkdd': no installed plugin provides it\. Did you mean"):
        kdforge.create("loss", "dkdd")


def test_a_schedule_on_a_choice_param_says_the_value_came_from_the_schedule(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, teacher={"name": "mlp"}, losses=[{"name": "attention", "params": {
        "student_taps": ["hidden.0"], "teacher_taps": ["hidden.0"], "mode": {"schedule": "constant", "params": {"value": 8.0}}}}])
    with pytest.raises(kdforge.RecipeError) as info:
        kdforge.validate(recipe)
    text = str(info.value)
    assert text.startswith("losses[0].params.mode: schedule 'constant' gives 8 at progress 0")
    assert "'code' or 'paper'" in text


def test_set_with_nothing_after_the_equals_sign_deletes_the_key(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path)
    recipe["trainer"]["log_every"] = 3
    loaded = kdforge.validate(recipe, ["trainer.log_every="])
    assert loaded.trainer.log_every == 20  # back to the default
    assert kdforge.validate(recipe, ["trainer.max_grad_norm=null"]).trainer.max_grad_norm is None
    with pytest.raises(kdforge.RecipeError, match=r"trainer\.nope: no such key to delete"):
        kdforge.validate(recipe, ["trainer.nope="])


def test_an_unavailable_plugin_is_listed_with_the_way_to_get_it(plugin) -> None:
    plugin(losses={"needs_extra": kdforge.unavailable("needs the fancy extra: pip install 'kdforge[fancy]'")})
    record = next(r for r in kdforge.list_plugins() if r.name == "needs_extra")
    assert record.status == "unavailable" and "pip install" in record.error
    with pytest.raises(kdforge.PluginError, match=r"needs the fancy extra"):
        kdforge.create("loss", "needs_extra")


def test_the_public_names_are_importable_and_documented() -> None:
    docs = "\n".join(p.read_text(encoding="utf-8") for p in Path(__file__).resolve().parent.parent.joinpath("docs").glob("*.md"))
    undocumented = [name for name in kdforge.__all__ if not name.startswith("__") and f"{name}" not in docs]
    assert undocumented == []
    assert json.loads(json.dumps(sorted(kdforge.__all__)))  # plain strings


def test_what_a_dataset_reports_in_info_reaches_the_summary(tmp_path: Path, plugin) -> None:
    from kdforge.plugins.datasets import digits

    class WithInfo:
        @kdforge.hookimpl
        def register_datasets(self, register):
            def reporting() -> kdforge.DataSplits:
                splits = digits()
                splits.info = {"skipped_files": {"train": 2, "eval": 0}, "tokenizer": object()}
                return splits

            register("reporting_digits", reporting)

    obj = WithInfo()
    kdforge.register_plugin(obj, name="info-test")
    try:
        summary = kdforge.run(base_recipe(tmp_path, data={"name": "reporting_digits"},
                                          trainer={"epochs": 1, "batch_size": 256, "progress_bar": False}))
    finally:
        kdforge.unregister_plugin(obj)
    assert summary["data/skipped_files"] == {"train": 2, "eval": 0}
    assert "data/tokenizer" not in summary  # not JSON: left out


# -- review findings -------------------------------------------------------------------------------
class TripleEval(torch.utils.data.Dataset):
    """Eval items that are 3-tuples: a mismatch only the eval split has."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.zeros(1, 8, 8), 0, i


def test_the_dry_run_checks_the_eval_split_too(tmp_path: Path) -> None:
    from kdforge.plugins.datasets import digits

    class Plugin:
        @kdforge.hookimpl
        def register_datasets(self, register):
            def odd_eval() -> kdforge.DataSplits:
                splits = digits()
                splits.eval = TripleEval()
                return splits

            register("odd_eval", odd_eval)

    obj = Plugin()
    kdforge.register_plugin(obj, name="odd-eval-test")
    try:
        with pytest.raises(kdforge.RecipeError, match=r"^data: dataset 'odd_eval' \(eval split\): its items are 3-tuples"):
            kdforge.validate(base_recipe(tmp_path, data={"name": "odd_eval"}), dry_run=True)
    finally:
        kdforge.unregister_plugin(obj)


class OldStyleHeads(torch.nn.Module):
    """A loss written against kdforge 0.1: an extra head whose name has no slash."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(10, 10)

    def forward(self, out: kdforge.StepOutputs) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head(out.student.logits.float()), out.targets.clamp_min(0))

    def eval_logits(self, out: kdforge.StepOutputs) -> dict[str, torch.Tensor]:
        return {"aux": self.head(out.student.logits.float())}


def test_extra_heads_keep_the_keys_of_kdforge_0_1(tmp_path: Path, plugin) -> None:
    plugin(losses={"old_heads": OldStyleHeads})
    summary = kdforge.run(base_recipe(tmp_path, losses=[{"name": "ce"}, {"name": "old_heads"}],
                                      trainer={"epochs": 2, "batch_size": 256, "progress_bar": False}))
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "student/accuracy" in r]
    assert all("student/exits/aux/accuracy" in r for r in evals)
    assert summary["student/exits/accuracy"] == {"aux": evals[-1]["student/exits/aux/accuracy"]}


def test_a_resumed_finished_run_keeps_its_head_metrics(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, student={"name": "small_cnn", "params": {"channels": [8, 16]}},
                         losses=[{"name": "byot", "params": {"taps": ["features.0"], "deep_tap": "features.1"}}],
                         trainer={"epochs": 1, "batch_size": 256, "progress_bar": False})
    first = kdforge.run(recipe)
    again = kdforge.run(recipe, resume=True)  # nothing left to train: export and summary again
    assert again["student/exits/accuracy"] == first["student/exits/accuracy"]
    assert first["student/exits/accuracy"]["features.0"] is not None


def test_load_teacher_refuses_a_teacher_whose_run_was_retrained(tmp_path: Path, digits_teacher: Path) -> None:
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(digits_teacher, teacher)
    kdforge.run(base_recipe(tmp_path, teacher={"name": "checkpoint", "params": {"path": str(teacher)}},
                            losses=[{"name": "kd"}], trainer={"epochs": 1, "batch_size": 256, "progress_bar": False}))
    assert isinstance(kdforge.load_teacher(tmp_path / "run"), torch.nn.Module)
    weights = load_file(str(teacher / "student.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v + 0.01 for k, v in weights.items()}, str(teacher / "student.safetensors"))  # "retrained"
    with pytest.raises(kdforge.RecipeError, match="not the one that run distilled from"):
        kdforge.load_teacher(tmp_path / "run")


def test_float_class_indices_are_still_accepted(tmp_path: Path) -> None:
    from kdforge.plugins.datasets import digits

    class FloatTargets(torch.utils.data.Dataset):
        def __init__(self, base) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, i: int):
            x, y = self.base[i]
            return x, float(y)  # 3.0 for class 3, as from a float numpy array

    class Plugin:
        @kdforge.hookimpl
        def register_datasets(self, register):
            def float_digits() -> kdforge.DataSplits:
                splits = digits()
                return kdforge.DataSplits(FloatTargets(splits.train), FloatTargets(splits.eval), 10, (1, 8, 8))

            register("float_digits", float_digits)

    obj = Plugin()
    kdforge.register_plugin(obj, name="float-test")
    try:
        summary = kdforge.run(base_recipe(tmp_path, data={"name": "float_digits"},
                                          trainer={"epochs": 2, "batch_size": 128, "progress_bar": False}))
    finally:
        kdforge.unregister_plugin(obj)
    assert summary["student/accuracy"] > 0.5


def test_a_mapping_item_without_inputs_is_the_inputs_as_a_whole() -> None:
    task = kdforge.TaskBase()
    batch = task.to_batch({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)})
    assert set(batch.inputs) == {"input_ids", "attention_mask"} and batch.targets is None
    from kdforge.tasks import BatchError

    with pytest.raises(BatchError, match="'targets' without 'inputs'"):
        task.to_batch({"x": torch.ones(2), "targets": torch.ones(2)})


class WrongHeadline(kdforge.TaskBase):
    headline = "acuracy"

    def eval_result(self, sums):
        return {"accuracy": None}


def test_a_task_whose_headline_is_not_one_of_its_metrics_is_refused(tmp_path: Path) -> None:
    class Plugin:
        @kdforge.hookimpl
        def register_tasks(self, register):
            register("wrong_headline", WrongHeadline)

    obj = Plugin()
    kdforge.register_plugin(obj, name="headline-test")
    try:
        with pytest.raises(kdforge.RecipeError, match=r"^task: task 'wrong_headline' leads with 'acuracy'"):
            kdforge.validate(base_recipe(tmp_path, task={"name": "wrong_headline"}), dry_run=True)
    finally:
        kdforge.unregister_plugin(obj)
