"""crd: the NCE objective and memory banks against a float64 reference, and an exact resume after a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import kdforge
from conftest import KDFORGE, ROOT, base_recipe, run_cli
from kdforge import ModelOutputs, StepOutputs
from kdforge.plugins.contrastive_losses import nce_loss

REL = 1e-5


def step(fs: torch.Tensor, ft: torch.Tensor, index: torch.Tensor | None) -> StepOutputs:
    t = ModelOutputs(torch.zeros(len(ft), 3), {"t": ft})
    return StepOutputs(student=ModelOutputs(torch.zeros(len(fs), 3), {"s": fs}), teacher=t, teachers=[t], index=index)


def crd(**params) -> torch.nn.Module:
    params = {"num_samples": 20, "student_tap": "s", "teacher_tap": "t", "feat_dim": 6, "nce_k": 7, **params}
    return kdforge.create("loss", "crd", **params)


def features(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, requires_grad=True), torch.randn(n, 9, generator=gen)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(loss, fs, ft, index, contrast, banks, z=None, objective="nce"):
    """float64 CRD: (loss, z_student, z_teacher, banks after the update), with explicit loops."""
    w_s, b_s = loss.embed_student.weight.detach().double().numpy(), loss.embed_student.bias.detach().double().numpy()
    w_t, b_t = loss.embed_teacher.weight.detach().double().numpy(), loss.embed_teacher.bias.detach().double().numpy()
    vs = unit(fs.detach().double().numpy() @ w_s.T + b_s)
    vt = unit(ft.detach().double().numpy() @ w_t.T + b_t)
    mem_s, mem_t = (b.double().numpy().copy() for b in banks)
    n, k1 = contrast.shape
    big_n, temp, eps = loss.num_samples, loss.nce_t, loss.eps
    s_scores = np.array([[math.exp(mem_t[contrast[i, j]] @ vs[i] / temp) for j in range(k1)] for i in range(n)])
    t_scores = np.array([[math.exp(mem_s[contrast[i, j]] @ vt[i] / temp) for j in range(k1)] for i in range(n)])
    if objective == "nce":
        z_s, z_t = z if z is not None else (s_scores.mean() * big_n, t_scores.mean() * big_n)
        total = 0.0
        for scores, zz in ((s_scores, z_s), (t_scores, z_t)):
            p = scores / zz
            noise = (k1 - 1) / big_n
            for i in range(n):
                total -= math.log(p[i, 0] / (p[i, 0] + noise + eps))
                for j in range(1, k1):
                    total -= math.log(noise / (p[i, j] + noise + eps))
        value = total / n
    else:
        z_s = z_t = None
        value = 0.0
        for scores in (s_scores, t_scores):
            logits = np.log(scores)
            value += np.mean([-(logits[i, 0] - math.log(np.exp(logits[i]).sum())) for i in range(n)])
    for mem, v in ((mem_s, vs), (mem_t, vt)):
        for i, row in enumerate(index.tolist()):
            moved = mem[row] * loss.nce_m + v[i] * (1 - loss.nce_m)
            mem[row] = moved / np.linalg.norm(moved)
    return value, z_s, z_t, (mem_s, mem_t)


def draw(loss, seed: int, index: torch.Tensor) -> torch.Tensor:
    """The contrast indices crd draws after torch.manual_seed(seed): uniform, the positive in column 0."""
    torch.manual_seed(seed)
    contrast = torch.randint(0, loss.num_samples, (len(index), loss.nce_k + 1))
    contrast[:, 0] = index
    return contrast


def test_crd_is_registered_and_gets_num_samples_from_the_engine() -> None:
    assert "crd" in {r.name for r in kdforge.list_plugins() if r.kind == "loss"}
    loss = kdforge.create("loss", "crd", num_samples=10)
    assert loss.nce_k == 16384 and loss.nce_t == 0.07 and loss.nce_m == 0.5 and loss.feat_dim == 128
    assert loss.memory_student.shape == loss.memory_teacher.shape == (10, 128)
    assert loss.z_student.item() == loss.z_teacher.item() == -1.0
    assert loss.student_taps == loss.teacher_taps == []  # the logits by default
    bound = 1 / math.sqrt(128 / 3)
    assert loss.memory_student.abs().max() <= bound


def test_nce_loss_by_hand() -> None:
    # one anchor, K = 1, N = 2: noise K/N = 0.5; scores 1.5 (positive) and 0.5 (negative)
    scores = torch.tensor([[1.5, 0.5]])
    expected = -(math.log(1.5 / 2.0) + math.log(0.5 / 1.0))
    assert nce_loss(scores, 2, 0.0).item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("objective", ["nce", "softmax"])
def test_crd_matches_a_float64_reference_over_two_steps(objective: str) -> None:
    loss = crd(objective=objective)
    fs, ft = features(1)
    index = torch.tensor([3, 0, 17, 9])
    loss(step(fs, ft, index))  # builds the heads, sets Z, moves the banks
    banks = (loss.memory_student.clone(), loss.memory_teacher.clone())
    z = (loss.z_student.item(), loss.z_teacher.item())
    # a second batch: Z stays what the first batch set
    fs2, ft2 = features(2)
    index2 = torch.tensor([5, 3, 11, 19])
    contrast = draw(loss, 7, index2)
    torch.manual_seed(7)
    value = loss(step(fs2, ft2, index2))
    expected, _, _, (mem_s, mem_t) = reference(loss, fs2, ft2, index2, contrast.numpy(), banks,
                                               z if objective == "nce" else None, objective)
    assert value.item() == pytest.approx(expected, rel=REL)
    assert np.allclose(loss.memory_student.double().numpy(), mem_s, rtol=1e-5, atol=1e-6)
    assert np.allclose(loss.memory_teacher.double().numpy(), mem_t, rtol=1e-5, atol=1e-6)
    if objective == "nce":
        assert (loss.z_student.item(), loss.z_teacher.item()) == z


def test_crd_estimates_z_on_the_first_batch() -> None:
    fs, ft = features(3)
    index = torch.tensor([1, 2, 3, 4])
    fresh = crd()
    fresh.embed_student, fresh.embed_teacher = torch.nn.Linear(5, 6), torch.nn.Linear(9, 6)
    banks = (fresh.memory_student.clone(), fresh.memory_teacher.clone())
    contrast = draw(fresh, 11, index)
    torch.manual_seed(11)
    value = fresh(step(fs, ft, index))
    expected, z_s, z_t, _ = reference(fresh, fs, ft, index, contrast.numpy(), banks)
    assert fresh.z_student.item() == pytest.approx(z_s, rel=REL)
    assert fresh.z_teacher.item() == pytest.approx(z_t, rel=REL)
    assert value.item() == pytest.approx(expected, rel=REL)


def test_crd_gradients_reach_the_student_and_both_heads_but_not_the_teacher() -> None:
    loss = crd()
    fs, ft = features(4)
    ft.requires_grad_(True)
    loss(step(fs, ft, torch.arange(4))).backward()
    assert ft.grad is None
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss.parameters())  # embed_student and embed_teacher
    assert not loss.memory_student.requires_grad and not loss.memory_teacher.requires_grad


def test_crd_index_and_shape_errors() -> None:
    loss = crd()
    fs, ft = features(5)
    with pytest.raises(ValueError, match=r"out\.index"):
        loss(step(fs, ft, None))
    with pytest.raises(ValueError, match="outside the memory bank of num_samples=20"):
        loss(step(fs, ft, torch.tensor([0, 1, 2, 20])))
    loss(step(fs, ft, torch.arange(4)))
    with pytest.raises(ValueError, match=r"built for 5-d student.*student s \(4, 7\)"):
        loss(step(torch.zeros(4, 7), ft, torch.arange(4)))
    with pytest.raises(ValueError, match="no teacher feature 'missing'"):
        crd(teacher_tap="missing")(step(fs, ft, torch.arange(4)))


def test_crd_keeps_float32_math_under_bf16_autocast() -> None:
    loss = crd()
    fs, ft = features(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(step(fs.bfloat16(), ft.bfloat16(), torch.arange(4)))
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    assert loss.memory_student.dtype == torch.float32


# -- resume: a run killed after epoch 1 and resumed ends with the same weights and memory banks ---------
def crd_recipe(tmp_path: Path, teacher: Path, epochs: int) -> dict:
    # a train split without labels: CRD (and KD) need none
    return base_recipe(
        tmp_path,
        data={"name": "synthetic", "params": {"shape": [1, 8, 8], "num_classes": 10, "train_size": 192,
                                              "eval_size": 32, "unlabeled": True}},
        teacher={"name": "checkpoint", "params": {"path": str(teacher)}},
        student={"name": "small_cnn", "params": {"channels": [8, 16]}},
        losses=[{"name": "kd", "weight": 0.5},
                {"name": "crd", "weight": 0.8, "params": {"student_tap": "pool", "teacher_tap": "pool", "nce_k": 64}}],
        optimizer={"name": "adamw", "params": {"lr": 0.003}},
        trainer={"epochs": epochs, "batch_size": 32, "progress_bar": False, "keep_checkpoints": 4},
    )


def final_state(run_dir: Path) -> tuple[dict, dict]:
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    return load_file(str(run_dir / "student.safetensors")), load_file(str(last / "model_1.safetensors"))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted_crd(tmp_path_factory: pytest.TempPathFactory, digits_teacher: Path) -> Path:
    out = tmp_path_factory.mktemp("crd-full")
    kdforge.run(crd_recipe(out, digits_teacher, 3))
    return out / "run"


@pytest.mark.slow
def test_crd_resumes_to_the_same_weights_and_banks(uninterrupted_crd: Path, tmp_path: Path, digits_teacher: Path) -> None:
    kdforge.run(crd_recipe(tmp_path, digits_teacher, 1))
    kdforge.run(crd_recipe(tmp_path, digits_teacher, 3), resume=True)
    student_a, loss_a = final_state(uninterrupted_crd)
    student_b, loss_b = final_state(tmp_path / "run")
    assert {"memory_student", "memory_teacher", "z_student", "z_teacher"} <= loss_a.keys()
    assert loss_a["z_student"].item() > 0  # estimated on the first batch, then kept
    assert_identical(student_a, student_b)
    assert_identical(loss_a, loss_b)
    # every training sample (none has a label) has been written into both banks: unit rows
    for bank in ("memory_student", "memory_teacher"):
        assert torch.allclose(loss_a[bank].norm(dim=1), torch.ones(192), atol=1e-5)


@pytest.mark.slow
def test_crd_sigkill_then_resume_equals_uninterrupted(uninterrupted_crd: Path, tmp_path: Path, digits_teacher: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(crd_recipe(tmp_path, digits_teacher, 3)))
    proc = subprocess.Popen([*KDFORGE, "run", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / "epoch-0001" / "kdforge_state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "summary.json").exists(), "killed before the end"
    result = run_cli("run", str(path), "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    student_a, loss_a = final_state(uninterrupted_crd)
    student_b, loss_b = final_state(tmp_path / "run")
    assert_identical(student_a, student_b)
    assert_identical(loss_a, loss_b)


@pytest.mark.slow
def test_crd_banks_take_every_process_samples_under_ddp(tmp_path: Path, digits_teacher: Path) -> None:
    from test_distributed import launch

    recipe = crd_recipe(tmp_path, digits_teacher, 1)
    recipe["data"]["params"]["train_size"] = 256
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = launch(path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["num_processes"] == 2
    _, loss_state = final_state(tmp_path / "run")
    # after one epoch each process saw half the samples; rank 0's banks (saved) hold all of them
    for bank in ("memory_student", "memory_teacher"):
        assert torch.allclose(loss_state[bank].norm(dim=1), torch.ones(256), atol=1e-5), bank
