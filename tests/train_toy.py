"""A toy run of common.training for the tests: kill-and-resume, and 2 processes under accelerate.

python tests/train_toy.py --out OUT [--steps 40] [--sleep 0.05] [--noise 0.1]
accelerate launch --cpu --num_processes 2 tests/train_toy.py --out OUT --noise 0
"""

import argparse
import json
import time

import torch
from torch import nn

from common.training import TrainConfig, Trainer


class Toy(torch.utils.data.Dataset):
    def __init__(self, n=96):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x @ torch.randn(8, 2, generator=g)).tanh()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step, so a test can kill mid-run")
    p.add_argument("--noise", type=float, default=0.1, help="input noise drawn from the loss's generator")
    p.add_argument("--grad-accum", type=int, default=1)
    args = p.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 2))

    def loss_fn(model, batch, generator):
        if args.sleep:
            time.sleep(args.sleep)
        x = batch["x"] + args.noise * torch.randn(batch["x"].shape, generator=generator)
        return nn.functional.mse_loss(model(x), batch["y"])

    cfg = TrainConfig(
        steps=args.steps,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        ema_decay=0.9,
        checkpoint_every=args.checkpoint_every,
        log_every=5,
        grad_accum=args.grad_accum,
        progress=False,
    )
    trainer = Trainer(model, Toy(), loss_fn, cfg, args.out, device="cpu")
    trainer.fit()
    if trainer.accelerator.is_main_process:
        info = {
            "world": trainer.accelerator.num_processes,
            "resumed_from": str(trainer.resumed_from),
            "step": trainer.step,
        }
        with open(f"{args.out}/run.json", "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    main()
