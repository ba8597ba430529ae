"""The autoencoder's training objective (Rombach et al. 2022, sec. 3 and appendix G;
Esser et al. 2021, eq. 5-7).

Stage one of latent diffusion trains the VAE with a reconstruction term, a perceptual term, a small KL
penalty and, later in training, a patch-based adversarial term:

    L_G = w_rec * |x - x_hat|_1  +  w_lpips * LPIPS(x, x_hat)  +  w_kl * KL(q(z|x) || N(0, I))
          + [step >= disc_start] * lambda * w_gan * L_adv(x_hat)
    L_D = [step >= disc_start] * hinge(D(x), D(x_hat))

=================  =============================================================================
paper              code
=================  =============================================================================
L_rec              ``reconstruction_loss``: mean |x - x_hat| over pixels and batch
LPIPS (Zhang 18)   ``LPIPS``: distance between normalised AlexNet/VGG features, one value per image
KL                 ``kl_loss``: sum over the latent dims (C, h, w), mean over the batch
D, L_adv           ``PatchDiscriminator`` (pix2pix / taming NLayerDiscriminator), ``hinge_*_loss``
lambda             ``adaptive_weight``: ||grad_last L_rec|| / (||grad_last L_adv|| + 1e-4), eq. 7 of Esser et
al. =================  =============================================================================

Scale of the terms: taming-transformers sums |x - x_hat| (plus LPIPS at every pixel) over the pixels,
which is this file's per-pixel mean times H*W*3. The ratio rec : lpips is the same (1 : 1); the KL
weight is not: SD's kl_weight = 1e-6 on summed pixels corresponds to 1e-6 / (H*W*3) here. The default
below (1e-6) is therefore a stronger KL than SD's: on the course's small latents it keeps the
latent statistics tame; sweep it (chapter 01) to see what it does.

Images are in [-1, 1] throughout, as the VAE sees them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------- the individual terms


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """L1: mean |x - x_hat| over every pixel and the batch (L1 gives sharper images than L2)."""
    return (x - x_hat).abs().mean()


def kl_loss(posterior) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)): summed over the latent dims of each sample, averaged over the batch."""
    return posterior.kl().mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]); 0 once D is confident."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial term: -E[D(x_hat)] (raise the critic's score of reconstructions)."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """lambda = ||grad_last L_rec|| / (||grad_last L_adv|| + eps), clamped to [0, max_weight] and detached.

    Balances the two terms where they meet, at the decoder's last layer, so the adversarial gradient is
    as large as the reconstruction one whatever their raw scales (taming's calculate_adaptive_weight).
    Outside autograd (evaluation under ``torch.no_grad()``) there are no gradients: lambda is 0.
    """
    if not (torch.is_grad_enabled() and rec_loss.requires_grad and gan_loss.requires_grad):
        return torch.zeros((), device=rec_loss.device)
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------- LPIPS

LPIPS_NETS = ("alex", "vgg", "squeeze")
_TORCHVISION_NAMES = {
    "alex": "alexnet",
    "vgg": "vgg16",
    "squeeze": "squeezenet1_1",
}  # lpips net -> torchvision


def backbone_weights(net: str):
    import torchvision.models as tvm

    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS backbone {net!r}; expected one of {LPIPS_NETS}")
    return tvm.get_model_weights(_TORCHVISION_NAMES[net]).IMAGENET1K_V1


def lpips_backbone_path(net: str = "alex") -> Path:
    """Where torchvision caches the ImageNet backbone LPIPS needs: $TORCH_HOME/hub/checkpoints/<file>."""
    url = backbone_weights(net).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def lpips_backbone_available(net: str = "alex") -> bool:
    """True when LPIPS can be built offline (its backbone weights are in the torch hub cache)."""
    return lpips_backbone_path(net).is_file()


class LPIPS(nn.Module):
    """Perceptual distance of Zhang et al. 2018 through the ``lpips`` package; one value per image pair.

    The package ships its calibrated linear heads but takes the backbone from torchvision's cache and
    would download it on first use: here a missing backbone is an error that says how to get it.
    ``pretrained_backbone=False`` builds a randomly initialised backbone (for tests only: the numbers
    then mean nothing perceptually). The network is frozen and stays in eval mode.
    """

    def __init__(self, *, net: str = "alex", pretrained_backbone: bool = True):
        super().__init__()
        import lpips

        path = lpips_backbone_path(net)
        if pretrained_backbone and not path.is_file():
            weights = backbone_weights(net)
            raise FileNotFoundError(
                f"LPIPS needs the torchvision {net} ImageNet weights at {path}, and they are not there. "
                f"Get them once with network access:\n"
                '    python -c "import torchvision; '
                f"torchvision.models.get_model('{_TORCHVISION_NAMES[net]}', weights='IMAGENET1K_V1')\"\n"
                f"or download {weights.url} into {path.parent} (set TORCH_HOME to use another cache). "
                f"Alternatively train without the perceptual term (lpips weight 0)."
            )
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` flag
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> LPIPS:
        super().train(mode)
        self.model.eval()  # the package's linear heads hold dropout: never train-mode them
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] -> (B,) distances."""
        return self.model(x, y).flatten()


# ---------------------------------------------------------------------------- the discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017; taming's NLayerDiscriminator): a real/fake logit per overlapping patch.

    conv4x4/2 + LeakyReLU, then (n_layers - 1) x [conv4x4/2, BatchNorm, LeakyReLU], one stride-1 block,
    and a 1-channel conv4x4 head. With n_layers = 3 each logit sees a 70 x 70 pixel patch.
    """

    def __init__(self, *, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution
            layers += [
                nn.Conv2d(
                    base_channels * prev, base_channels * mult, 4, stride=stride, padding=1, bias=False
                ),
                nn.BatchNorm2d(base_channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the DCGAN initialisation pix2pix and taming use
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, H', W'): one logit per patch


# ---------------------------------------------------------------------------- the combined objective


@dataclass
class VAELossWeights:
    rec: float = 1.0  # L1 per pixel
    lpips: float = 1.0  # as SD / taming (perceptual_weight = 1 beside the per-pixel L1)
    kl: float = 1e-6  # on the per-sample KL sum; see the module docstring for how it relates to SD's
    gan: float = 0.5  # SD's disc_weight, multiplied by the adaptive lambda
    disc_start: int = 5_000  # steps of reconstruction-only training first (SD: 50,001 of a far longer run)


class VAELoss(nn.Module):
    """The generator (VAE) and discriminator objectives; each step returns (loss, dict of detached terms).

    Holds the LPIPS network (frozen) and the discriminator: optimise ``vae.parameters()`` with the
    generator loss and ``loss.discriminator.parameters()`` with the discriminator loss, zeroing each
    optimiser's grads before its backward (the generator loss also sends gradients into D).
    """

    def __init__(
        self,
        weights: VAELossWeights | None = None,
        *,
        lpips: nn.Module | None = None,
        discriminator: nn.Module | None = None,
    ):
        super().__init__()
        self.weights = weights or VAELossWeights()
        if self.weights.lpips > 0 and lpips is None:
            lpips = LPIPS()  # raises, saying how to get the backbone, when it is not cached
        self.lpips = lpips
        if self.weights.gan > 0 and discriminator is None:
            discriminator = PatchDiscriminator()
        self.discriminator = discriminator

    def gan_active(self, step: int) -> bool:
        return self.weights.gan > 0 and step >= self.weights.disc_start

    def generator_loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        posterior,
        *,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_G for a batch; ``last_layer`` (``vae.last_layer``) is needed once the
        discriminator has started."""
        w = self.weights
        rec = reconstruction_loss(x, x_hat)
        perceptual = self.lpips(x, x_hat).mean() if w.lpips > 0 else torch.zeros((), device=x.device)
        nll = w.rec * rec + w.lpips * perceptual  # the "reconstruction" side of the adaptive weight
        kl = kl_loss(posterior)
        total = nll + w.kl * kl
        gan = lam = torch.zeros((), device=x.device)
        if self.gan_active(step):
            if last_layer is None:
                raise ValueError(
                    "last_layer (the decoder's last weight, vae.last_layer) is needed once "
                    f"step >= disc_start={w.disc_start}"
                )
            gan = hinge_g_loss(self.discriminator(x_hat))
            lam = adaptive_weight(nll, gan, last_layer)
            total = total + lam * w.gan * gan
        terms = {"rec": rec, "lpips": perceptual, "kl": kl, "gan": gan, "gan_weight": lam, "total": total}
        return total, {k: v.detach() for k, v in terms.items()}

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, *, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_D for a batch (x_hat is detached here); 0, with no discriminator forward, before disc_start."""
        if not self.gan_active(step):
            zero = torch.zeros((), device=x.device)
            return zero, {"disc": zero, "logits_real": zero, "logits_fake": zero}
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_hat.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {
            "disc": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
