"""The training loop: exact resume after SIGKILL, 2 processes under accelerate, atomic and
validated checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from common.training import (
    EMA,
    TrainConfig,
    Trainer,
    batch_indices,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "train_toy.py"
BIN = Path(sys.executable).parent


def _run(args, **kw):
    return subprocess.run(
        [sys.executable, str(TOY), *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw
    )


def _final_weights(out):
    ckpt = latest_checkpoint(out)
    return load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert _run(["--out", str(ref)]).returncode == 0

    proc = subprocess.Popen(
        [sys.executable, str(TOY), "--out", str(killed), "--sleep", "0.05"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "step_0000020" / "done").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = [int(p.name.split("_")[1]) for p in list_checkpoints(killed)]
    assert steps_done and max(steps_done) < 40, f"the run was not killed mid-way: {steps_done}"

    resumed = _run(["--out", str(killed)])
    assert resumed.returncode == 0, resumed.stderr
    info = json.loads((killed / "run.json").read_text())
    assert info["resumed_from"].endswith(f"step_{max(steps_done):07d}")
    (w_ref, e_ref), (w_res, e_res) = _final_weights(ref), _final_weights(killed)
    for k in w_ref:
        torch.testing.assert_close(w_res[k], w_ref[k], rtol=0, atol=0)
        torch.testing.assert_close(e_res[k], e_ref[k], rtol=0, atol=0)
    log_steps = [int(line.split(",")[0]) for line in (killed / "log.csv").read_text().splitlines()[1:]]
    assert log_steps == sorted(set(log_steps)), "the CSV log repeats or loses steps after a resume"


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(["--out", str(one), "--noise", "0"]).returncode == 0
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(TOY),
        "--out",
        str(two),
        "--noise",
        "0",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((two / "run.json").read_text())["world"] == 2
    # DDP averages the two half-batch gradients: the same update as one process on the whole batch
    (w1, _), (w2, _) = _final_weights(one), _final_weights(two)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)


def _toy_trainer(out, steps=6, resume=True, **cfg):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    data = [{"x": torch.randn(4), "y": torch.randn(1)} for _ in range(32)]
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, progress=False, log_every=1, **cfg)
    loss = lambda m, b, g: nn.functional.mse_loss(m(b["x"]), b["y"])  # noqa: E731
    return Trainer(model, data, loss, cfg, out, device="cpu", resume=resume)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    a = _toy_trainer(tmp_path / "a", grad_accum=1, grad_clip=None).fit()
    b = _toy_trainer(tmp_path / "b", grad_accum=4, grad_clip=None).fit()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _toy_trainer(tmp_path, steps=4, checkpoint_every=2, keep=3).fit()
    newest = latest_checkpoint(tmp_path)
    assert newest.name == "step_0000004"
    blob = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated, as by a full disk
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(newest, nn.Linear(4, 1))
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        t = _toy_trainer(tmp_path, steps=4, checkpoint_every=2, keep=3)
    assert t.resumed_from.name == "step_0000002" and t.step == 2
    assert (tmp_path / "checkpoints" / "step_0000002" / "model.safetensors").exists()


def test_interrupted_write_is_ignored_and_keep_is_honoured(tmp_path):
    _toy_trainer(tmp_path, steps=6, checkpoint_every=1, keep=2).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005", "step_0000006"]
    half = tmp_path / "checkpoints" / "step_0000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")  # no `done` marker: a crash mid-write
    assert latest_checkpoint(tmp_path).name == "step_0000006"


def test_explicit_resume_path_without_checkpoint_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        _toy_trainer(tmp_path / "run", resume=tmp_path / "empty")


def test_checkpoint_of_another_model_names_the_mismatch(tmp_path):
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path, 1, model, None, opt)
    with pytest.raises(
        ValueError,
        match=r"does not fit this model: bias has shape \(1,\) in the file but the "
        r"model expects \(2,\)",
    ):
        load_checkpoint(path, nn.Linear(4, 2))
    state = torch.load(path / "state.pt", weights_only=True)  # optimizer state needs no unpickling
    assert state["step"] == 1


def test_lr_schedule_and_batch_indices():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5) and lr_factor(100, cfg) == pytest.approx(0.0)
    idx = [batch_indices(s, 0, n=10, batch_size=5, grad_accum=1, seed=0) for s in range(2)]
    assert sorted(idx[0] + idx[1]) == list(range(10)), "one epoch visits every item once"
    shards = [
        batch_indices(3, 0, n=10, batch_size=4, grad_accum=1, seed=0, rank=r, world=2) for r in range(2)
    ]
    assert sorted(shards[0] + shards[1]) == sorted(
        batch_indices(3, 0, n=10, batch_size=4, grad_accum=1, seed=0)
    )
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(steps=1, mixed_precision="fp8")


def test_ema_follows_the_weights():
    model = nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    before = ema.shadow["weight"].clone()
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.5 * before + 0.5)


def test_resume_continues_the_log_and_step(tmp_path):
    _toy_trainer(tmp_path, steps=3).fit()
    t = _toy_trainer(tmp_path, steps=5)
    assert t.step == 3
    t.fit()
    steps = [int(line.split(",")[0]) for line in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5]
    shutil.rmtree(tmp_path / "checkpoints")


def test_time_budget_lowers_the_steps_and_a_resume_keeps_the_plan(tmp_path):
    def slow_trainer(resume=True):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        data = [{"x": torch.randn(4), "y": torch.randn(1)} for _ in range(32)]
        cfg = TrainConfig(
            steps=100_000,
            batch_size=8,
            lr=1e-2,
            progress=False,
            log_every=10,
            time_budget_s=1.0,
            warmup_steps=10,
            lr_schedule="cosine",
        )

        def loss(m, b, g):
            time.sleep(0.01)  # about 100 steps fit the 1 s budget
            return nn.functional.mse_loss(m(b["x"]), b["y"])

        return Trainer(model, data, loss, cfg, tmp_path, device="cpu", resume=resume)

    t = slow_trainer()
    t.fit()
    planned = t.cfg.steps
    assert 20 < planned < 100_000, planned  # lowered from the upper bound, after at least the timed steps
    assert t.step == planned
    # the LR schedule followed the lowered count: the cosine reached ~0 at the last step
    assert lr_factor(planned - 1, t.cfg) < 0.05
    resumed = slow_trainer()
    assert resumed.cfg.steps == planned and resumed.step == planned  # the same plan, nothing left to do
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainConfig(steps=10, time_budget_s=0)
