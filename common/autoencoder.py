"""AutoencoderKL: the first stage of latent diffusion (Rombach et al. 2022, sec. 3 and appendix G).

An encoder E maps an image x (B, 3, H, W) to the parameters of a diagonal Gaussian posterior
q(z | x) = N(mu, sigma^2) over latents z (B, 4, H/f, W/f), f = 2**(levels - 1) the downsampling factor;
a decoder D maps z back to pixels. Training (common/losses.py) minimises a reconstruction term plus a
small KL(q(z | x) || N(0, I)) (Kingma & Welling 2014, appendix B), which keeps the latent space smooth
without squeezing information out of it. The diffusion model later works on ``z * scaling_factor``.

The layout is diffusers' ``AutoencoderKL`` (itself the CompVis ``ldm.modules.diffusionmodules.model``
Encoder/Decoder), and the parameter names and shapes are diffusers' exactly, so one state dict loads
into either: ``encoder.down_blocks.{i}.resnets.{j}``, ``encoder.mid_block.attentions.0.to_q`` and so on.

Shapes use one legend: B batch, C channels, H and W the image (or feature map) sides, N = H*W tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.attention import attention
from common.weights import WEIGHTS_NAME, check_state, read_model, read_safetensors, save_model


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3  # RGB images
    out_channels: int = 3  # the decoder gives RGB back
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level; f = 2**(levels - 1)
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more per level)
    latent_channels: int = 4  # channels of z: SD's 4 x 64 x 64 latents for a 512 px image
    norm_num_groups: int = 32  # GroupNorm groups: batch-size independent, so tiny batches train fine
    sample_size: int = 512  # the image side the model was trained at (informative; any multiple of f works)
    scaling_factor: float = 0.18215  # 1 / std of the latents, so the diffusion model sees unit variance

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level, e.g. (128, 256, 512, 512)")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"every entry of block_out_channels {self.block_out_channels} must be a multiple of "
                    f"norm_num_groups={self.norm_num_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side. One stride-2 Downsample per level but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls) -> AutoencoderConfig:
        """Stable Diffusion 1.x's VAE, f = 8. Parameters: encoder 34,163,592 and decoder 49,490,179 (each
        module alone), plus quant_conv (72) and post_quant_conv (20): 83,653,863 in all."""
        return cls()

    @classmethod
    def tiny(cls) -> AutoencoderConfig:
        """A two-level toy (f = 2) for tests: builds and runs in milliseconds."""
        return cls(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32)

    @classmethod
    def course(cls) -> AutoencoderConfig:
        """The course's Shapes VAE: three levels (f = 4), 64 px images -> 4 x 16 x 16 latents.

        Small enough to train on a laptop CPU in minutes; ``scaling_factor`` is a placeholder that
        ``train_vae.py`` replaces with 1 / std of the latents it measures on the data.
        """
        return cls(
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=16,
            sample_size=64,
            scaling_factor=1.0,
        )

    # --- the conversion contract: diffusers.AutoencoderKL(**config.to_diffusers()) has our parameters ---
    def to_diffusers(self) -> dict:
        """Keyword arguments for ``diffusers.AutoencoderKL`` that build the same architecture."""
        levels = len(self.block_out_channels)
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            act_fn="silu",
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            sample_size=self.sample_size,
            scaling_factor=self.scaling_factor,
        )

    @classmethod
    def from_diffusers(cls, mapping) -> AutoencoderConfig:
        """Read a diffusers AutoencoderKL config (``vae.config`` or a parsed config.json).

        Options that change the architecture away from SD 1.x's (another activation, no quant convs,
        no mid-block attention, latent shift/normalisation) are errors rather than silently ignored.
        """
        mapping = dict(mapping)
        fixed = {
            "act_fn": "silu",
            "use_quant_conv": True,
            "use_post_quant_conv": True,
            "mid_block_add_attention": True,
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
        }
        for key, expected in fixed.items():
            if key in mapping and mapping[key] != expected:
                raise ValueError(
                    f"unsupported AutoencoderKL option {key}={mapping[key]!r}; "
                    f"the course's AutoencoderKL needs {key}={expected!r}"
                )
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if key in mapping and any(t != kind for t in mapping[key]):
                raise ValueError(f"unsupported {key}={mapping[key]!r}; expected only {kind!r} blocks")
        ours = {f.name for f in fields(cls)}
        known = (
            ours | set(fixed) | {"down_block_types", "up_block_types", "force_upcast"}
        )  # force_upcast: fp16 hint
        unknown = sorted(k for k in mapping if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(
                f"unknown AutoencoderKL config keys {unknown}; expected keys among {sorted(known)}"
            )
        return cls(**{k: v for k, v in mapping.items() if k in ours})


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 conv on the skip when the width changes."""

    def __init__(self, *, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Halve H and W: pad one pixel right and bottom (SD's asymmetric pad), then a stride-2 3x3 conv."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H+1, W+1) -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv (no checkerboard artefacts
    of a transposed conv)."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual: x + to_out(attn(GN(x))).

    At the bottleneck every latent position can look at every other one: cheap there (64 x 64 = 4096
    tokens at 512 px) and the one global operation in an otherwise local network.
    """

    def __init__(self, *, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])  # diffusers' names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, N, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, N, C)
        h = attention(q, k, v).squeeze(1)  # (B, N, C); the backend is chosen in common.attention
        h = self.to_out[1](self.to_out[0](h))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    """resnet -> self-attention -> resnet at the lowest resolution."""

    def __init__(self, *, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(channels=channels, groups=groups)])
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels=channels, out_channels=channels, groups=groups) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class Level(nn.Module):
    """One resolution level: ResNet blocks, then an optional Down- or Upsample
    (diffusers' Down/UpDecoderBlock2D)."""

    def __init__(
        self, *, in_channels: int, out_channels: int, num_layers: int, groups: int, resample: str | None
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(
                    in_channels=in_channels if i == 0 else out_channels,
                    out_channels=out_channels,
                    groups=groups,
                )
                for i in range(num_layers)
            ]
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(channels=out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(channels=out_channels)])
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


def _run(block: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Run a block, trading compute for memory when gradient checkpointing is on and gradients are needed."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)  # activations are recomputed in the backward pass
    return block(x)


class Encoder(nn.Module):
    """x (B, 3, H, W) -> moments (B, 2 * latent_channels, H/f, W/f): the mean and log-variance of q(z | x)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                Level(
                    in_channels=widths[max(i - 1, 0)],
                    out_channels=widths[i],
                    num_layers=config.layers_per_block,
                    groups=groups,
                    resample="down" if i < len(widths) - 1 else None,
                )
                for i in range(len(widths))
            ]
        )
        self.mid_block = MidBlock(channels=widths[-1], groups=groups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)  # mean and logvar
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = _run(block, h, self.gradient_checkpointing)  # (B, C_i, H / 2**i, W / 2**i)
        h = _run(self.mid_block, h, self.gradient_checkpointing)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2 * latent_channels, H/f, W/f)


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> x (B, 3, h*f, w*f); the encoder mirrored, one
    extra ResNet per level."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(channels=widths[0], groups=groups)
        self.up_blocks = nn.ModuleList(
            [
                Level(
                    in_channels=widths[max(i - 1, 0)],
                    out_channels=widths[i],
                    num_layers=config.layers_per_block + 1,
                    groups=groups,
                    resample="up" if i < len(widths) - 1 else None,
                )
                for i in range(len(widths))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, C_last, h, w)
        h = _run(self.mid_block, h, self.gradient_checkpointing)
        for block in self.up_blocks:
            h = _run(block, h, self.gradient_checkpointing)  # doubles H and W but at the last level
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, h*f, w*f)


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's 2 * latent_channels moment maps.

    ``kl()`` is KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar) over the latent dims (C, h, w),
    one value per sample (Kingma & Welling 2014, appendix B).
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, latent_channels, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # as SD: keeps exp() finite in both directions
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps (the reparameterisation trick); eps drawn on the generator's device."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z | x) || N(0, I)) per sample, shape (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """The VAE: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``; images in [-1, 1]."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = config or AutoencoderConfig.sd15()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        c = 2 * self.config.latent_channels
        self.quant_conv = nn.Conv2d(c, c, 1)  # 1x1 convs around the latent, kept for weight compatibility
        self.post_quant_conv = nn.Conv2d(self.config.latent_channels, self.config.latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight: where the adaptive GAN weight compares gradient norms (losses.py)."""
        return self.decoder.conv_out.weight

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each level's activations in the backward pass: less memory, ~30% more compute."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    # --- encode / decode; chapter 05 adds tiling and batch slicing around the *_tile seams ---
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, in_channels, H, W) in [-1, 1], H and W multiples of f -> q(z | x) over
        (B, latent_channels, H/f, W/f)."""
        self._check(x, self.config.in_channels, "image", "x")
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"image sides must be multiples of the downsampling factor {f}; got H x W = "
                f"{x.shape[-2]} x {x.shape[-1]} (crop or pad to a multiple of {f})"
            )
        return DiagonalGaussian(self._encode_tile(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w), unscaled (divide by scaling_factor first) -> x
        (B, out_channels, h*f, w*f)."""
        self._check(z, self.config.latent_channels, "latent", "z")
        return self._decode_tile(z)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # (B, 2 * latent_channels, H/f, W/f)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a sampled latent (training) or the posterior mean;
        returns (x_hat, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @staticmethod
    def _check(t: torch.Tensor, channels: int, what: str, name: str) -> None:
        if t.ndim != 4 or t.shape[1] != channels:
            raise ValueError(
                f"{name} must be an {what} batch of shape (B, {channels}, H, W); got {tuple(t.shape)}"
            )

    # --- weights in and out ---
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, but a checkpoint of another config fails with a ValueError
        naming the key and shapes."""
        ours = self.state_dict()
        if not strict:  # only the keys both sides have must agree in shape
            ours = {k: v for k, v in ours.items() if k in state_dict}
            state_dict = {k: v for k, v in state_dict.items() if k in ours}
        check_state(ours, state_dict, f"checkpoint does not fit this config ({self.config})")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_checkpoint(self, path: str | Path) -> AutoencoderKL:
        """Load a safetensors weights file (or a folder holding
        ``diffusion_pytorch_model.safetensors``) into self."""
        path = Path(path)
        self.load_state_dict(read_safetensors(path / WEIGHTS_NAME if path.is_dir() else path))
        return self

    def save(self, path: str | Path) -> Path:
        """Write a diffusers-format folder: config.json and diffusion_pytorch_model.safetensors."""
        return save_model(self, path, {"_class_name": "AutoencoderKL", **self.config.to_diffusers()})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> AutoencoderKL:
        """Build from a diffusers-format folder (ours, or a diffusers ``vae/`` subfolder)
        and load its weights."""
        config, weights = read_model(path)
        model = cls(AutoencoderConfig.from_diffusers(config))
        model.load_state_dict(weights)
        return model.to(device) if device is not None else model
