"""One training loop for every chapter: AdamW, warm-up, clipping, accumulation, EMA, mixed precision,
atomic checkpoints and exact resume, under `accelerate` so one script runs on 1 CPU or N GPUs.

The loop is deliberately plain. A chapter supplies three things:

* ``model``: one ``nn.Module`` (wrap several in an ``nn.ModuleDict`` to train them jointly, as chapter 04
  trains the text encoder with the UNet);
* ``dataset``: a map-style dataset (``len`` and ``[i]``) and a ``collate`` function;
* ``loss_fn(model, batch, generator) -> loss`` or ``(loss, {"name": value, ...})``; ``generator`` is the
  only source of randomness the loss may use (noise, timesteps, caption dropout).

Exact resume is a design goal, not a hope. The batch at step ``s`` is a pure function of ``(seed, s)`` (a
fresh permutation of the dataset per epoch) and so is the loss's generator, so a run killed at any point
and resumed from its last checkpoint takes exactly the steps the uninterrupted run takes (the tests kill
a run with SIGKILL and compare the final weights).

Checkpoint layout (``out_dir/checkpoints/step_000100/``)::

    model.safetensors   the trained weights            ema.safetensors   their exponential moving average
    state.pt            optimizer, LR schedule, step   (plain tensors and numbers: ``weights_only=True``)
    done                written last; a folder without it is an interrupted write and is ignored

A checkpoint is written to a temporary folder and renamed into place, so a crash mid-write never leaves a
half checkpoint under a real name (the temporary folders of killed runs are removed by the next save); the
previous checkpoints are kept (``keep``), and a corrupt newest one is skipped with a warning in favour of the
one before it. A resume whose plan differs from the checkpoint's (``PLAN_FIELDS``: lr, batch size, schedule,
seed, ...) is refused with the differences named: the run's record would otherwise claim values it did not
use. ``steps`` may grow: an extended run is the same run.
"""

from __future__ import annotations

import copy
import csv
import functools
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.cli import atomic_write, remove_stale_tmp
from common.runtime import get_device
from common.viz import plot_loss_curves
from common.weights import check_state

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
# what a run is: a resume with any of these changed would train a different run and record it as this one
# (steps may grow: a resumed run can be extended; the time budget only lowers it)
PLAN_FIELDS = (
    "batch_size",
    "lr",
    "weight_decay",
    "betas",
    "warmup_steps",
    "lr_schedule",
    "grad_clip",
    "grad_accum",
    "ema_decay",
    "ema_start",
    "seed",
)


@dataclass
class TrainConfig:
    steps: int  # optimizer steps in the whole run (a resumed run stops at the same step)
    batch_size: int = 32  # global batch per optimizer step, split over processes and accumulation
    lr: float = 1e-4
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear warm-up from 0 to lr: Adam's early steps are noisy without it
    lr_schedule: str = "constant"  # "constant" or "cosine" (decays to 0 at `steps`)
    grad_clip: float | None = 1.0  # max global grad norm; diffusion losses have rare huge-gradient steps
    grad_accum: int = 1  # micro-batches per optimizer step, to fit a large batch in small memory
    ema_decay: float | None = 0.999  # EMA weights sample better than the raw ones; None turns it off
    ema_start: int = 0  # steps before the EMA starts following (it copies the weights until then)
    mixed_precision: str = "auto"  # "auto": bf16 on a GPU that supports it, fp32 elsewhere
    checkpoint_every: int = 0  # 0: only at the end
    keep: int = 2  # checkpoints kept on disk (the newest ones)
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    # Wall-clock budget of the training loop in seconds (None: run all `steps`). The trainer times its steps
    # and lowers `steps` so the loop ends within the budget; the LR schedule follows the lowered count, which
    # is written into the checkpoints, so a resumed run keeps the same plan. `steps` stays the upper bound.
    time_budget_s: float | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.grad_accum < 1 or self.batch_size < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0 seconds, got {self.time_budget_s}")


def plan_changes(saved: dict, cfg: TrainConfig, step: int = 0) -> list[str]:
    """The plan fields of ``cfg`` that differ from a checkpoint's saved config, as ``name old -> new``.
    A warm-up length that changes after both warm-ups ended
    (a run extended with more steps) changes nothing."""

    def norm(v):
        return tuple(v) if isinstance(v, (list, tuple)) else v

    now = asdict(cfg)
    changed = [k for k in PLAN_FIELDS if k in saved and norm(saved[k]) != norm(now[k])]
    if "warmup_steps" in changed and step >= max(saved["warmup_steps"], now["warmup_steps"]):
        changed.remove("warmup_steps")
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): linear warm-up,
    then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def batch_indices(
    step: int,
    micro: int,
    *,
    n: int,
    batch_size: int,
    grad_accum: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
) -> list[int]:
    """The dataset indices of one process's micro-batch: a pure function of (seed, step), so resume is exact.

    Each epoch is a fresh permutation; the global batch of a step is cut into ``grad_accum`` micro-batches,
    and each micro-batch into ``world`` equal shards.
    """
    start = step * batch_size + micro * (batch_size // grad_accum)
    size = batch_size // grad_accum
    out = []
    for pos in range(start, start + size):
        epoch, offset = divmod(pos, n)
        out.append(_epoch_permutation(n, seed, epoch)[offset])
    return out[rank::world]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


class EMA:
    """Exponential moving average of a module's floating-point tensors: theta_ema <- d
    theta_ema + (1 - d) theta."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {
            k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: nn.Module, copy_only: bool = False) -> None:
        d = 0.0 if copy_only else self.decay
        state = model.state_dict()
        keys = [k for k in self.shadow if k in state]
        shadow = [self.shadow[k] for k in keys]
        # one fused kernel per op for all tensors (a per-tensor loop costs ~2 launches a tensor on a GPU);
        # the same arithmetic as shadow.mul_(d).add_(v, alpha=1 - d), tensor by tensor
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, [state[k].detach().float() for k in keys], alpha=1.0 - d)

    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        model.load_state_dict(
            {k: self.shadow[k].to(state[k].dtype) if k in self.shadow else v for k, v in state.items()}
        )


# ----------------------------------------------------------------------------- checkpoints
def _complete(path: Path) -> bool:
    return (path / "done").exists() and (path / "model.safetensors").exists() and (path / "state.pt").exists()


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and _complete(p)),
        key=lambda p: int(p.name.split("_")[1]),
    )


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    extra: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write ``out_dir/checkpoints/step_{step}`` atomically, then drop all but the newest ``keep``."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    remove_stale_tmp(root, "step_*.tmp")  # the half-written checkpoints of killed runs
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.shadow.items()}, tmp / "ema.safetensors")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "extra": extra or {}}, tmp / "state.pt")
    for f in tmp.iterdir():  # flush the data before the rename makes it visible
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    (tmp / "done").write_text(str(step))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path, model: nn.Module, ema: EMA | None = None, optimizer: torch.optim.Optimizer | None = None
) -> dict:
    """Load one checkpoint folder into ``model`` (and ``ema``, ``optimizer``); returns its
    state dict (step, extra).

    Raises ``ValueError`` naming the file when it is missing, truncated or of another model's shape.
    """
    path = Path(path)
    if not _complete(path):
        raise ValueError(
            f"{path} is not a complete checkpoint (expected model.safetensors, state.pt and done)"
        )
    try:
        weights = load_file(path / "model.safetensors")
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        ema_weights = (
            load_file(path / "ema.safetensors")
            if ema is not None and (path / "ema.safetensors").exists()
            else None
        )
    except Exception as e:  # a truncated safetensors header or zip archive
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {e}") from e
    check_state(model.state_dict(), weights, f"checkpoint {path} does not fit this model")
    model.load_state_dict(weights)
    if ema is not None and ema_weights is not None:
        device = next(iter(ema.shadow.values())).device if ema.shadow else torch.device("cpu")
        ema.shadow = {k: v.float().to(device) for k, v in ema_weights.items()}
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


# ----------------------------------------------------------------------------- the loop
class Trainer:
    """Runs ``cfg.steps`` optimizer steps of ``loss_fn`` over ``dataset``; resumes from ``out_dir`` if it can.

    ``resume``: ``True`` resumes from the newest good checkpoint in ``out_dir`` when there is one (a fresh run
    otherwise); ``False`` starts fresh; a path resumes from that checkpoint folder and it is an error if the
    path holds none. ``callbacks`` are called as ``fn(trainer, step)`` every ``callback_every`` steps.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset,
        loss_fn: Callable,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        collate: Callable | None = None,
        device: str | torch.device | None = None,
        resume: bool | str | Path = True,
        callbacks: list[Callable] = (),
        callback_every: int = 0,
        params: list[nn.Parameter] | None = None,
    ):
        from accelerate import Accelerator  # imported here: a plain `import common.training` stays light

        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.dataset, self.loss_fn = dataset, loss_fn
        self.collate = collate or torch.utils.data.default_collate
        self.callbacks, self.callback_every = list(callbacks), callback_every
        device = get_device(device)
        precision = cfg.mixed_precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = Accelerator(
            cpu=device.type == "cpu", mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum
        )
        self.device = self.accelerator.device
        world = self.accelerator.num_processes
        if cfg.batch_size % (cfg.grad_accum * world):
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by grad_accum x processes "
                f"= {cfg.grad_accum} x {world}"
            )
        if len(dataset) < 1:
            raise ValueError("the dataset is empty")
        model.to(self.device)
        trainable = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        # fused=True: one kernel for the whole update on a GPU (the same arithmetic as
        # the default foreach path)
        optimizer = torch.optim.AdamW(
            trainable,
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.step = 0
        self._budget_fixed = False
        self.resumed_from = self._find_resume(resume)
        if self.resumed_from is not None:
            state = load_checkpoint(self.resumed_from, model, self.ema, optimizer)
            self.step = int(state["step"])
            saved = state.get("extra", {}).get("config", {})
            changed = plan_changes(saved, cfg, self.step)
            if changed:
                raise ValueError(
                    f"cannot resume from {self.resumed_from}: this command changes the run's "
                    f"{'; '.join(changed)}. Run it with the values the run used, or start a fresh run "
                    "(another output folder, or the script's no-resume option)"
                )
            if cfg.time_budget_s is not None and saved.get("time_budget_s") is not None:
                # the budgeted run being resumed already chose its step count (and its LR schedule)
                self.cfg = replace(cfg, steps=min(cfg.steps, int(saved["steps"])))
                self._budget_fixed = True
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.log_path = self.out_dir / "log.csv"

    def _find_resume(self, resume) -> Path | None:
        if resume is False:
            return None
        if resume is not True:  # an explicit path must hold a checkpoint
            path = Path(resume)
            ckpts = [path] if _complete(path) else list_checkpoints(path)
            if not ckpts:
                raise ValueError(
                    f"resume path {path} holds no complete checkpoint "
                    "(expected a step_* folder with model.safetensors, state.pt and done)"
                )
            return ckpts[-1]
        for path in reversed(list_checkpoints(self.out_dir)):  # newest first; skip a corrupt one
            try:
                load_file(path / "model.safetensors")
                torch.load(path / "state.pt", weights_only=True, map_location="cpu")
                return path
            except Exception as e:
                warnings.warn(f"skipping corrupt checkpoint {path}: {e}", stacklevel=1)
        return None

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _batch(self, step: int, micro: int):
        idx = batch_indices(
            step,
            micro,
            n=len(self.dataset),
            batch_size=self.cfg.batch_size,
            grad_accum=self.cfg.grad_accum,
            seed=self.cfg.seed,
            rank=self.accelerator.process_index,
            world=self.accelerator.num_processes,
        )
        get_batch = getattr(self.dataset, "get_batch", None)  # a tensor dataset can gather a batch in one go
        batch = get_batch(idx) if get_batch is not None else self.collate([self.dataset[i] for i in idx])
        return _to_device(batch, self.device)

    def _check_budget(self, elapsed: float, first_step: int) -> None:
        """The time budget, ``elapsed`` seconds into the loop: stop when it is spent; otherwise start timing
        at the 20th step of this invocation (after warm-up), and refit ``cfg.steps`` 10 and 50 steps later,
        then every 500 steps until half-way. Under accelerate every process takes the main
        process's step count."""
        cfg, mark = self.cfg, self._budget_mark
        if elapsed >= cfg.time_budget_s:
            if self.accelerator.is_main_process:
                print(
                    f"time budget {cfg.time_budget_s:.0f} s spent: stopping at step {self.step}", flush=True
                )
            self.cfg = replace(cfg, steps=self.step)
        elif mark is None:
            if self.step - first_step >= 20:
                self._budget_mark = (self.step, elapsed)
        else:
            timed = self.step - mark[0]
            if timed in (10, 50) or (timed % 500 == 0 and self.step < 0.5 * cfg.steps):
                per_step = (elapsed - mark[1]) / timed
                fits = self.step + int((cfg.time_budget_s - elapsed) / per_step)
                new = max(self.step + 1, min(self._max_steps, fits))
                if new != cfg.steps and self.accelerator.is_main_process:
                    print(
                        f"time budget {cfg.time_budget_s:.0f} s: {per_step * 1e3:.1f} ms a step -> {new} "
                        f"steps (was {cfg.steps})",
                        flush=True,
                    )
                self.cfg = replace(cfg, steps=new)
        if self.accelerator.num_processes > 1:  # every process stops at the step the main process chose
            from accelerate.utils import broadcast

            steps = broadcast(torch.tensor([self.cfg.steps], device=self.device), from_process=0)
            self.cfg = replace(self.cfg, steps=int(steps.item()))

    def _generator(self, step: int, micro: int) -> torch.Generator:
        # one generator per (seed, step, micro-batch, rank): the loss's noise is reproducible after a resume
        g = torch.Generator(device=self.device)
        g.manual_seed(((self.cfg.seed * 1_000_003 + step) * 97 + micro) * 31 + self.accelerator.process_index)
        return g

    def _log_rows(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        with open(self.log_path) as f:
            return [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]

    def save(self) -> Path | None:
        """Checkpoint now (main process only; every process waits for it)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                self.out_dir,
                self.step,
                self.unwrapped,
                self.ema,
                self.optimizer,
                {"config": asdict(self.cfg)},
                keep=self.cfg.keep,
            )
        self.accelerator.wait_for_everyone()
        return path

    def fit(self) -> nn.Module:
        """Train to ``cfg.steps``; returns the unwrapped model (raw weights;
        ``ema_model()`` gives the EMA ones)."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        main = acc.is_main_process
        rows = self._log_rows() if main else []
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is not None:
                print(f"resuming from {self.resumed_from} (step {self.step} of {cfg.steps})")
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (main and cfg.progress),
            desc="train",
            mininterval=2.0,
        )
        t0, window = time.perf_counter(), []
        self._max_steps, first_step = cfg.steps, self.step
        self._budget_mark = None  # (step, seconds into the loop) where the timing window starts
        # a resumed budgeted run keeps the step count its first invocation chose
        fit_budget = cfg.time_budget_s is not None and not self._budget_fixed
        self.model.train()
        while self.step < self.cfg.steps:
            cfg = self.cfg  # a time budget may lower cfg.steps as the run goes
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(self.step, cfg)
            terms: dict[str, torch.Tensor | float] = {}
            for micro in range(cfg.grad_accum):
                batch = self._batch(self.step, micro)
                with acc.accumulate(self.model):
                    with acc.autocast():
                        out = self.loss_fn(self.model, batch, self._generator(self.step, micro))
                    loss, logs = out if isinstance(out, tuple) else (out, {})
                    acc.backward(loss)
                    grad_norm = None
                    if acc.sync_gradients and cfg.grad_clip is not None:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": loss, **logs}.items():  # kept as tensors: no GPU sync on most steps
                    terms[k] = terms.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) / cfg.grad_accum
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.unwrapped, copy_only=self.step <= cfg.ema_start)
            # checked every step in one process; only on log steps under accelerate, where
            # all processes must agree
            if fit_budget and (self.step % cfg.log_every == 0 or acc.num_processes == 1):
                self._check_budget(time.perf_counter() - t0, first_step)
            window.append(terms["loss"])
            last = self.step == self.cfg.steps
            if self.step % cfg.log_every == 0 or last:  # the only place the loop waits for the device
                values = {k: float(v) for k, v in terms.items()}
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"loss is {values['loss']} at step {self.step}; lower the LR or check the data"
                    )
                if main:
                    row = {
                        "step": self.step,
                        **{k: round(v, 6) for k, v in values.items()},
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "grad_norm": round(float(grad_norm), 6) if grad_norm is not None else "",
                        "seconds": round(time.perf_counter() - t0, 3),
                    }
                    rows.append(row)
                    _write_csv(self.log_path, rows)
                    bar.set_postfix(loss=f"{sum(float(w) for w in window) / len(window):.4f}")
                window = []
            bar.update(1)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.cfg.steps:
                self.save()
            if self.callbacks and self.callback_every and self.step % self.callback_every == 0:
                for fn in self.callbacks:
                    fn(self, self.step)
        bar.close()
        self.save()
        if main and rows:
            _plot_log(self.log_path, self.out_dir / "loss.png")
        return self.unwrapped

    def ema_model(self) -> nn.Module:
        """A copy of the model holding the EMA weights (the raw model if EMA is off)."""
        model = copy.deepcopy(self.unwrapped)
        if self.ema is not None:
            self.ema.copy_to(model)
        return model.eval()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def _plot_log(log_path: Path, png_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = plot_loss_curves(log_path)
    fig.savefig(png_path, dpi=80, bbox_inches="tight")
    plt.close(fig)
