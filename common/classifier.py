"""A small digits classifier, the course's judge of class-conditional samples (chapter 03).

A class-conditional diffusion model is asked for a "7"; did it draw a 7? A separate network trained on real
digits answers that, the way Inception scores grade ImageNet samples (Salimans et al. 2016) and classifier
accuracy grades conditional MNIST models. ``conditional_accuracy(classifier, images, labels)`` is the
fraction of generated images classified as the digit they were asked for.

The network is a LeNet-style CNN (LeCun et al. 1998) with batch-free GroupNorm, for (B, 1, 32, 32) images
in [-1, 1] (white digit on black, ``common.data.Digits``):

    x (B, 1, 32, 32) -> [conv3x3, GroupNorm, SiLU] x 2 + 2x2 max-pool, per level (32 -> 16 -> 8 -> 4)
      -> global average pool (B, C_last) -> dropout -> Linear -> logits (B, 10)

Weights are saved as ``model.safetensors`` beside a ``config.json`` holding ``ClassifierConfig``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1  # grey digits
    num_classes: int = 10  # 0 .. 9
    widths: tuple[int, ...] = (16, 32, 64)  # channels per level; each level halves H and W
    groups: int = 8  # GroupNorm groups: no batch statistics, so eval on 10 samples equals eval on 10,000
    dropout: float = 0.2  # before the linear head: the rendered digits come from only 12 fonts
    resolution: int = 32  # the image side it was trained at; other sides are resized to it

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or any(w % self.groups for w in self.widths):
            raise ValueError(f"widths {self.widths} must be non-empty multiples of groups={self.groups}")

    @classmethod
    def digits(cls) -> ClassifierConfig:
        """The shipped checkpoints/digits_classifier: about 73k parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> ClassifierConfig:
        """For tests: one narrow level."""
        return cls(widths=(8, 16), groups=4)


class DigitClassifier(nn.Module):
    """logits = f(x): (B, 1, H, W) in [-1, 1] -> (B, num_classes)."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = cfg = config or ClassifierConfig.digits()
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for c in cfg.widths:
            for k in range(2):
                layers += [
                    nn.Conv2d(c_in if k == 0 else c, c, 3, padding=1),
                    nn.GroupNorm(cfg.groups, c),
                    nn.SiLU(),
                ]
            layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))  # (B, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features before the head, (B, C_last): the features of a Frechet distance."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, H, W); got {tuple(x.shape)}")
        if x.shape[-1] != cfg.resolution or x.shape[-2] != cfg.resolution:
            x = F.interpolate(
                x, size=(cfg.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False
            )
        h = self.features(x)  # (B, C_last, H / 2**levels, W / 2**levels)
        return h.mean(dim=(2, 3))  # (B, C_last)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class per image, (B,) LongTensor; runs in eval mode in batches."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = torch.cat(
            [self(x[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch_size)]
        )
        self.train(was_training)
        return out

    # --- weights in and out -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path/config.json`` and ``path/model.safetensors``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME)
        )
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> DigitClassifier:
        """Build from a folder written by ``save`` (config.json + model.safetensors);
        returned in eval mode."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{path} must hold {CONFIG_NAME} and {WEIGHTS_NAME} (a folder written by "
                "DigitClassifier.save; train one with 03_latent_ddpm/train_classifier.py)"
            )
        config = ClassifierConfig(**json.loads((path / CONFIG_NAME).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return model.to(device or "cpu").eval()


def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` (B, 1, H, W) in [-1, 1] whose predicted class equals ``labels`` (B,)."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    return float((classifier.predict(images) == labels.cpu()).float().mean())


def conditional_accuracy(classifier: DigitClassifier, samples: torch.Tensor, asked: torch.Tensor) -> float:
    """Of the samples generated for class ``asked[i]``, the fraction the classifier reads as that class."""
    return accuracy(classifier, samples.clamp(-1, 1), asked)
