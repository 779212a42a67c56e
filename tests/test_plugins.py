"""Plugin discovery through real entry points: built-ins, an installed third-party package,
broken plugins isolated, name collisions, KDFORGE_LOAD_PLUGINS, and the listing."""

from __future__ import annotations

import json
import textwrap
import types
from pathlib import Path

import pytest

import kdforge
from conftest import run_cli
from kdforge import hookspecs
from kdforge.registry import KIND_HOOKS

BUILTINS = {
    ("loss", "ce"), ("loss", "kd"),
    ("schedule", "constant"), ("schedule", "linear"), ("schedule", "cosine"), ("schedule", "step"), ("schedule", "progressive"),
    ("student", "torchvision"), ("student", "mlp"), ("student", "small_cnn"),
    ("teacher", "torchvision"), ("teacher", "mlp"), ("teacher", "small_cnn"), ("teacher", "checkpoint"),
    ("dataset", "digits"), ("dataset", "cifar10"), ("dataset", "cifar100"), ("dataset", "image_folder"), ("dataset", "synthetic"),
}


def make_distribution(root: Path, dist: str, module: str, source: str, version: str = "1.0") -> Path:
    """A real installed distribution (dist-info with entry_points.txt) under ``root``, for PYTHONPATH."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[kdforge]\n{module} = {module}\n", encoding="utf-8")
    return root


def plugins_json(env: dict[str, str] | None = None) -> tuple[list[dict], str]:
    result = run_cli("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_every_builtin_is_listed_with_provider_and_version() -> None:
    records, stderr = plugins_json()
    found = {(r["kind"], r["name"]): r for r in records}
    assert BUILTINS <= set(found)
    for key in BUILTINS:
        assert found[key]["provider"] == "kdforge"
        assert found[key]["version"] == kdforge.__version__
        assert found[key]["status"] == "ok"
    assert "warning" not in stderr


def test_installed_third_party_package_is_discovered() -> None:
    # tests/fixtures/kdforge-logit-l1 is pip-installed by `make test`.
    records, _ = plugins_json()
    found = {(r["kind"], r["name"]): r for r in records}
    assert found[("loss", "logit_l1")]["provider"] == "kdforge-logit-l1"
    assert found[("loss", "logit_l1")]["version"] == "0.3.1"
    assert found[("schedule", "triangle")]["status"] == "ok"


def test_plugins_table_lists_kinds_and_descriptions() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0
    assert "kd" in result.stdout and "Hinton" in result.stdout and "kdforge-logit-l1" in result.stdout


BROKEN_SOURCES = {
    "import error": ("raise ImportError('no such dependency: frobnitz')", "frobnitz"),
    "hook raises": (
        """
        import kdforge
        @kdforge.hookimpl
        def register_losses(register):
            raise RuntimeError('boom in hook')
        """,
        "boom in hook",
    ),
    "non-callable factory": (
        """
        import kdforge
        @kdforge.hookimpl
        def register_losses(register):
            register('half_done', 42)
        """,
        "not callable",
    ),
    "misspelled hook": (
        """
        import kdforge
        @kdforge.hookimpl
        def register_loss(register):
            register('x', object)
        """,
        "register_losses",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SOURCES))
def test_a_broken_plugin_is_reported_and_isolated(case: str, tmp_path: Path) -> None:
    source, message = BROKEN_SOURCES[case]
    root = make_distribution(tmp_path / "site", "kdforge-broken", "kdforge_broken", source)
    env = {"PYTHONPATH": str(root)}
    records, stderr = plugins_json(env)
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1
    assert failed[0]["provider"] == "kdforge-broken" and message in failed[0]["error"]
    assert "kdforge-broken" in stderr and "warning" in stderr
    ok = {(r["kind"], r["name"]) for r in records if r["status"] == "ok"}
    assert BUILTINS <= ok and ("loss", "logit_l1") in ok
    assert ("loss", "half_done") not in ok
    # a recipe that does not use it still validates
    result = run_cli("validate", "recipes/digits/student.yaml", env=env)
    assert result.returncode == 0, result.stderr


def test_a_factory_that_fails_only_fails_the_recipe_that_uses_it(tmp_path: Path) -> None:
    source = """
        import kdforge, torch
        def exploding(scale: float = 1.0):
            raise RuntimeError('connector weights missing')
        @kdforge.hookimpl
        def register_losses(register):
            register('exploding', exploding)
    """
    root = make_distribution(tmp_path / "site", "kdforge-exploding", "kdforge_exploding", source)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        (Path("recipes/digits/student.yaml").read_text() + "\n")
        .replace("- {name: ce, weight: 1.0}", "- {name: ce, weight: 1.0}\n  - {name: exploding}")
        .replace("output_dir: runs/digits-student", f"output_dir: {tmp_path / 'run'}")
    )
    result = run_cli("run", str(recipe), env={"PYTHONPATH": str(root)})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "exploding" in result.stderr and "kdforge-exploding" in result.stderr
    assert "connector weights missing" in result.stderr


def test_a_name_collision_names_both_providers(tmp_path: Path) -> None:
    source = """
        import kdforge
        def make(): return None
        @kdforge.hookimpl
        def register_losses(register):
            register('dup', make)
    """
    site = tmp_path / "site"
    make_distribution(site, "kdforge-one", "kdforge_one", source)
    make_distribution(site, "kdforge-two", "kdforge_two", source)
    env = {"PYTHONPATH": str(site)}
    records, stderr = plugins_json(env)
    dups = [r for r in records if r["name"] == "dup"]
    assert {r["provider"] for r in dups} == {"kdforge-one", "kdforge-two"}
    assert all(r["status"] == "conflict" for r in dups)
    assert "kdforge-one" in dups[0]["error"] and "kdforge-two" in dups[0]["error"]
    assert "dup" in stderr
    # restricting the loaded plugins resolves it
    records, _ = plugins_json({**env, "KDFORGE_LOAD_PLUGINS": "kdforge-one"})
    assert [r["status"] for r in records if r["name"] == "dup"] == ["ok"]


def test_collision_with_a_builtin_is_an_error_on_use() -> None:
    plugin = types.SimpleNamespace()

    @kdforge.hookimpl
    def register_losses(register):
        register("kd", lambda: None)

    plugin.register_losses = register_losses
    kdforge.register_plugin(plugin, name="shadow")
    try:
        with pytest.raises(kdforge.PluginError, match="registered by both kdforge"):
            kdforge.create("loss", "kd")
    finally:
        kdforge.unregister_plugin(plugin)
    assert kdforge.create("loss", "kd").temperature == 4.0


def test_load_plugins_env_limits_third_party_plugins() -> None:
    records, _ = plugins_json({"KDFORGE_LOAD_PLUGINS": ""})
    names = {(r["kind"], r["name"]) for r in records}
    assert BUILTINS <= names and ("loss", "logit_l1") not in names
    records, _ = plugins_json({"KDFORGE_LOAD_PLUGINS": "kdforge-logit-l1"})
    assert ("loss", "logit_l1") in {(r["kind"], r["name"]) for r in records}
    records, _ = plugins_json({"KDFORGE_LOAD_PLUGINS": "someone_else"})
    assert ("loss", "logit_l1") not in {(r["kind"], r["name"]) for r in records}


def test_register_plugin_for_one_test_and_unregister_after() -> None:
    class Plugin:
        @kdforge.hookimpl
        def register_schedules(self, register):
            register("halfway", lambda: (lambda p: 0.5))

    plugin = Plugin()
    kdforge.register_plugin(plugin)
    try:
        assert kdforge.create("schedule", "halfway")(0.9) == 0.5
        assert any(r.name == "halfway" for r in kdforge.list_plugins())
    finally:
        kdforge.unregister_plugin(plugin)
    with pytest.raises(kdforge.PluginError, match="unknown schedule 'halfway'"):
        kdforge.create("schedule", "halfway")


def test_list_plugins_records_work_as_mappings_and_objects() -> None:
    record = next(r for r in kdforge.list_plugins() if r.name == "kd")
    assert record.kind == record["kind"] == "loss"
    assert dict(record)["provider"] == "kdforge"
    assert set(record.to_dict()) >= {"kind", "name", "provider", "version", "status"}


def test_unknown_kind_and_name_get_suggestions() -> None:
    with pytest.raises(kdforge.PluginError, match="Did you mean 'loss'"):
        kdforge.create("los", "kd")
    with pytest.raises(kdforge.PluginError, match="Did you mean 'cosine'"):
        kdforge.create("schedule", "cosin")


def test_every_hook_has_a_docstring_a_kind_and_documentation() -> None:
    specs = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert sorted(specs) == sorted(KIND_HOOKS.values())
    docs = (Path(__file__).resolve().parent.parent / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    for name in specs:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name
        assert name in docs, f"{name} is not documented in docs/writing-plugins.md"


def test_a_recipe_using_a_plugin_that_failed_to_load_names_it(tmp_path: Path) -> None:
    root = make_distribution(tmp_path / "site", "kdforge-broken", "kdforge_broken",
                             "raise ImportError('no such dependency: frobnitz')")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(Path("recipes/digits/student.yaml").read_text().replace("{name: ce, weight: 1.0}", "{name: fancy_loss}"))
    result = run_cli("validate", str(recipe), env={"PYTHONPATH": str(root)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "unknown loss 'fancy_loss'" in last and "kdforge-broken" in last and "frobnitz" in last


def test_a_dist_info_without_a_name_does_not_stop_the_engine(tmp_path: Path) -> None:
    site = tmp_path / "site"
    info = site / "nameless-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\n")
    (info / "entry_points.txt").write_text("[kdforge]\nbrk = nonexistent_module_xyz\n")
    records, stderr = plugins_json({"PYTHONPATH": str(site)})
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and "nonexistent_module_xyz" in failed[0]["error"]
    assert BUILTINS <= {(r["kind"], r["name"]) for r in records if r["status"] == "ok"}
