"""The course's own text-to-image model: a latent diffusion model trained from scratch on Shapes.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3.3, eq. 3:

    L_LDM = E_{x, c, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, tau_theta(c)) ||^2,
    z_0 = s * E(x),   z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps   (Ho et al. 2020, eq. 4)

| paper            | code                                                                          |
|------------------|-------------------------------------------------------------------------------|
| E, D             | the frozen Shapes VAE (``checkpoints/vae_shapes``), f = 4: 64 px -> 4 x 16 x 16 |
| s                | ``vae.config.scaling_factor`` (1 / std of the latents, measured when it was trained) |
| tau_theta        | ``model["text_encoder"]``: a CLIP-architecture text transformer, trained jointly |
| eps_theta        | ``model["unet"]``: the cross-attention UNet, attending to tau's last hidden state |
| c = "" w.p. p    | caption dropout (Ho & Salimans 2022, sec. 3.2): the same network learns eps(z_t, t, "") |

As in the LDM paper the text encoder is trained from scratch with the UNet (their LAION and COCO models did
the same with a BERT-style transformer), so ``model`` is one ``nn.ModuleDict({"unet", "text_encoder"})`` that
``common.training.Trainer`` optimises jointly.

The VAE is frozen, so every image is encoded once. ``cache_latents`` stores the posterior's mean and standard
deviation, times s, for a fixed list of Shapes items in a tensor file keyed by the VAE's weights (sha256) and
the dataset's parameters; a second run (or a resumed one) reads it back in a second.
``TextToImageConfig.latents`` picks what the loss trains on: ``"mean"`` (default: z_0 = s * mu(x); the course
VAE's posterior std is small and a deterministic target trains faster in a short CPU run) or ``"sample"``
(z_0 = s * (mu + sigma * e), e from the loss's generator, as the LDM code does).

The presets weight the loss by Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy"): w_t = min(SNR_t, 5) / SNR_t on the eps loss, which tempers the nearly noise-free
timesteps. Written as a weight on the x0 error (the eps error is sqrt(SNR) times it, the v error sqrt(SNR + 1)
times it), every objective's weighting is one curve over the noise levels; eps's is min(SNR, 5), and the CPU
preset's v loss uses min(SNR + 0.1, 5) (``snr_offset``): the nearly pure-noise steps, where the layout is
decided, keep a small weight, and the low-noise steps that draw the shapes get as much of the loss as the
noisy half (measured in notebook 06, section 5.2; the plain v loss puts four fifths on the noisy half).

``TextToImageConfig.objective = "flow"`` trains the same networks by flow matching instead, as SD 3 does
(Esser et al. 2024, eqs. 3 and 19; ``common/flow.py``):

    L_flow = E_{x, c, eps, t ~ logit-normal(0, 1)} || v_theta(z_t, 1000 t, tau_theta(c)) - (eps - z_0) ||^2,
    z_t = (1 - t) z_0 + t eps

with the UNet's timestep input 1000 t (diffusers' FlowMatchEulerDiscreteScheduler convention) and SD 3's plain
MSE: the logit-normal density is the weighting, and Min-SNR (``snr_gamma``) does not apply. Everything else
(data, caption dropout, EMA, steps) is the same, so the two objectives cost the same compute per step.

``build_pipeline`` wraps the trained parts (usually the EMA weights) in ``common.pipeline.StableDiffusion``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from common import weights
from common.autoencoder import AutoencoderKL
from common.cli import CHECKPOINTS, atomic_write
from common.convert import unet_config_from_diffusers, unet_config_to_diffusers
from common.data import LatentDataset, cached
from common.flow import FlowSchedule, add_noise, sample_sigmas_logit_normal, velocity_target
from common.pipeline import SD_SAMPLER_OPTIONS, StableDiffusion
from common.runtime import get_device
from common.schedules import NoiseSchedule
from common.shapes import Shapes
from common.text_encoder import CLIPTextConfig, CLIPTextModel
from common.tokenizer import ShapesTokenizer
from common.training import TrainConfig, Trainer
from common.unet import UNet, UNetConfig
from common.weights import load_weights, module_sha256, read_safetensors, weights_file

CONFIG_NAMES = ("cpu", "gpu", "tiny")
LATENT_MODES = ("mean", "sample")
# eps: chapter 06's noise prediction on SD 1.x's schedule; v: SD 2.x's v prediction on the same schedule
# rescaled to zero terminal SNR and sampled from its last timestep (Lin et al. 2023); flow: SD 3's flow
# matching
OBJECTIVES = ("eps", "v", "flow")
DEFAULT_CACHE = Path(os.environ.get("COURSE_CACHE", Path.home() / ".cache" / "latent_diffusion_course"))


def _text_config(width: int, layers: int, heads: int, context_length: int) -> CLIPTextConfig:
    """A CLIP text transformer over the Shapes tokenizer's ids (pad 0, unk 1, bos 2, eos 3: 42 ids in all)."""
    tok = ShapesTokenizer.for_shapes(context_length)
    return CLIPTextConfig(
        vocab_size=tok.vocab_size,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max(32, context_length),
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )


@dataclass
class TextToImageConfig:
    name: str  # the preset's name, written into logs and the model card
    unet: UNetConfig  # eps_theta; cross_attention_dim must equal the text encoder's width
    text_encoder: CLIPTextConfig  # tau_theta, trained from scratch jointly
    steps: int  # optimizer steps
    batch_size: int  # cached latents per step; large batches are cheap at 16 x 16 x 4
    lr: float  # AdamW; small models at this scale like 1e-3 .. 3e-4
    warmup_steps: int  # linear warm-up: Adam's first steps are noisy and attention is easy to wreck early
    ema_decay: float  # EMA of the weights, what the shipped model samples with
    mixed_precision: str = "no"  # "no" = fp32 (CPU); "bf16" on a GPU (Trainer's autocast)
    lr_schedule: str = "cosine"  # decays to 0 at `steps`: the last steps refine instead of bouncing
    caption_dropout: float = 0.1  # P(caption -> ""), so the model also learns eps(z_t, t, "") for guidance
    latents: str = (
        "mean"  # "mean": z_0 = s mu(x); "sample": z_0 = s (mu + sigma e)  (see the module docstring)
    )
    train_size: int = 20_000  # Shapes training items encoded into the latent cache (each with one paraphrase)
    context_length: int = 24  # tokens per prompt (the longest Shapes caption has 12 words)
    echo_prompt: bool = False  # the tokenizer writes the prompt twice (see ShapesTokenizer): relations bind
    resolution: int = 64  # image side; the latent side is resolution / f
    vae: str = "vae_shapes"  # the frozen VAE: a folder under checkpoints/ (or a path); unet fits its latents
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule.sd15)  # SD 1.x's scaled-linear, eps target
    snr_gamma: float | None = None  # eps only: Min-SNR-gamma loss weights (Hang et al. 2023); None = eq. 3
    snr_offset: float = 1.0  # v only: Min-SNR clamps SNR + offset (the x0 weight); see make_loss_fn
    objective: str = "eps"  # "eps": eq. 3 on `schedule`; "flow": SD 3's flow matching (module docstring)
    flow_shift: float = 1.0  # the flow sampler's shift (SD 3: 3.0 at 1024 px; 16 x 16 latents need none)
    checkpoint_every: int = 200  # Trainer checkpoints, for resume after a kill
    ship_dtype: str = "fp32"  # how --ship stores the weights: "fp16" halves the folder (loaded back as fp32)
    snapshot_every: int = (
        0  # EMA snapshots kept for the adherence curve (0 = none; train(snapshot_every=...))
    )
    ema_start: int = 50  # the EMA copies the weights until here (early weights are not worth averaging)

    def __post_init__(self):
        if self.ship_dtype not in ("fp32", "fp16"):
            raise ValueError(f"ship_dtype must be 'fp32' or 'fp16', got {self.ship_dtype!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "v":  # the schedule follows the objective (the loss and the sampler read it)
            self.schedule = NoiseSchedule(prediction_type="v_prediction", rescale_zero_snr=True)
        elif self.schedule.prediction_type != "epsilon":
            self.schedule = NoiseSchedule.sd15()
        if self.latents not in LATENT_MODES:
            raise ValueError(f"latents must be one of {LATENT_MODES}, got {self.latents!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        if self.unet.cross_attention_dim != self.text_encoder.hidden_size:
            raise ValueError(
                f"unet.cross_attention_dim ({self.unet.cross_attention_dim}) must equal the text "
                f"encoder's hidden_size ({self.text_encoder.hidden_size})"
            )

    # --- presets ---------------------------------------------------------------------------------------
    @classmethod
    def cpu(cls) -> TextToImageConfig:
        """The laptop's course model: trained from scratch on 2 CPU cores in under 30 minutes (chapter 06).

        It works on the f = 8 Shapes VAE's latents (``checkpoints/vae_shapes_f8``: 4 x 8 x 8 for a 64 px
        image, Stable Diffusion's own factor), a quarter of the pixels the f = 4 VAE gives (4 x 16 x 16), so
        the UNet (2.8 M parameters, widths 32, 64, 96) sees twice the examples a second on a CPU. It predicts
        v on the zero-terminal-SNR schedule and samples from the last timestep (SD 2.x's fix, Lin et al.
        2023): on SD 1.x's schedule the noisiest training latent still shows where the object is, so an eps
        model learns to read the layout off the noise instead of the caption, and draws it wherever the
        starting noise says (chapter 06's README, ``signal_leak.py``). Its loss weights the x0 error by
        min(SNR + 0.1, 5) (``snr_offset``): the plain v loss puts most of its weight on the nearly pure-noise
        steps, where only the layout is decided, and learns shapes late. Shipped in fp16, the whole pipeline
        folder (VAE included) is under 10 MB.
        """
        width = 128
        return cls(
            name="cpu",
            unet=UNetConfig.shapes_text((32, 64, 96), cross_attention_dim=width, sample_size=8),
            text_encoder=_text_config(width, 3, 4, 24),
            vae="vae_shapes_f8",
            objective="v",
            steps=11_000,
            batch_size=32,
            lr=1e-3,
            warmup_steps=200,
            ema_decay=0.999,
            ema_start=500,
            train_size=20_000,
            checkpoint_every=1000,
            snr_gamma=5.0,
            snr_offset=0.1,
            ship_dtype="fp16",
        )

    @classmethod
    def gpu(cls) -> TextToImageConfig:
        """The full course model for one GPU (bf16): UNet 5.6 M, text encoder 0.6 M parameters, batch 1024.

        Sized to ship: with the Shapes VAE it is under 30 MB in fp32. It is wider than the CPU preset at every
        level (64, 96, 128 channels). ``steps`` is an upper bound: ``train_text_to_image.py --minutes M`` fits
        the run to a wall-clock budget. Measured on one H200: ~95 ms a step whatever the batch (256 or 1024:
        the step is bound by Python and kernel launches at this size, so the large batch is free), and
        ``--minutes 3.5`` gives the shipped model (2,100 steps; see checkpoints/course_t2i/README.md).
        """
        width = 128
        return cls(
            name="gpu",
            unet=UNetConfig.shapes_text_gpu(),
            text_encoder=_text_config(width, 3, 4, 24),
            steps=40_000,
            batch_size=1024,
            lr=2e-3,
            warmup_steps=500,
            ema_decay=0.999,
            mixed_precision="bf16",
            train_size=60_000,
            checkpoint_every=2000,
            ema_start=500,
            snr_gamma=5.0,
        )

    @classmethod
    def tiny(cls) -> TextToImageConfig:
        """For tests and COURSE_FAST: builds and trains a few steps in seconds."""
        width = 32
        unet = UNetConfig.shapes_text((16, 32, 32), heads=2, cross_attention_dim=width, norm_num_groups=8)
        return cls(
            name="tiny",
            unet=unet,
            text_encoder=_text_config(width, 1, 2, 24),
            steps=4,
            batch_size=8,
            lr=1e-3,
            warmup_steps=1,
            ema_decay=0.9,
            train_size=32,
            checkpoint_every=2,
            ema_start=0,
        )

    @classmethod
    def named(cls, name: str) -> TextToImageConfig:
        if name not in CONFIG_NAMES:
            raise ValueError(f"unknown config {name!r}; expected one of {', '.join(CONFIG_NAMES)}")
        return getattr(cls, name)()

    def with_overrides(self, **changes) -> TextToImageConfig:
        """A copy with some training fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def train_config(
        self, seed: int = 0, progress: bool = True, time_budget_s: float | None = None
    ) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            time_budget_s=time_budget_s,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            lr_schedule=self.lr_schedule,
            ema_decay=self.ema_decay,
            ema_start=self.ema_start,
            mixed_precision=self.mixed_precision,
            checkpoint_every=self.checkpoint_every,
            grad_clip=1.0,
            seed=seed,
            progress=progress,
            log_every=10,
        )


def build_model(config: TextToImageConfig) -> nn.ModuleDict:
    """The trainable bundle: ``{"unet": UNet, "text_encoder": CLIPTextModel}``."""
    return nn.ModuleDict({"unet": UNet(config.unet), "text_encoder": CLIPTextModel(config.text_encoder)})


# ----------------------------------------------------------------------------------------------------------
# The latent cache


@torch.no_grad()
def cache_latents(
    vae: AutoencoderKL,
    tokenizer,
    *,
    length: int,
    resolution: int = 64,
    split: str = "train",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    verbose: bool = True,
) -> dict:
    """Encode ``Shapes(resolution, split, length, seed)`` once; returns {"mean", "std" (N, C, h, w) times s,
    "input_ids" (N, context_length), "captions" list[str], "path": the cache file, "hit": bool}.

    The file name holds the VAE's sha256, s, the dataset's parameters and the tokenizer's context length, so a
    changed VAE or dataset never reuses a stale cache. Written atomically (tmp + rename): processes launched
    by ``accelerate`` may race here safely.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    s = float(vae.config.scaling_factor)
    key = (
        f"t2i_{module_sha256(vae)[:16]}_s{s:.6g}_{split}_{length}_{seed}_{resolution}px"
        f"_ctx{tokenizer.context_length}{'_echo' if getattr(tokenizer, 'echo', False) else ''}"
        f"_v{tokenizer.vocab_size}"
    )
    path = cache_dir / f"{key}.pt"

    def encode() -> dict:
        ds = Shapes(resolution, split, length, seed)
        encoder = vae.to(device).eval()
        means, stds, captions = [], [], []
        for start in range(0, length, batch_size):
            items = [ds[i] for i in range(start, min(length, start + batch_size))]
            x = torch.stack([it["image"] for it in items]).to(device)  # (b, 3, H, W) in [-1, 1]
            posterior = encoder.encode(x)
            means.append((posterior.mean * s).float().cpu())  # (b, C, h, w)
            stds.append((posterior.std * s).float().cpu())
            captions += [it["caption"] for it in items]
            if verbose and (start // batch_size) % 20 == 0:
                print(f"caching latents {start + len(items)}/{length}", flush=True)
        return {
            "mean": torch.cat(means),
            "std": torch.cat(stds),
            "input_ids": tokenizer(captions),
            "captions": captions,
        }

    data, hit = cached(path, encode)
    return {**data, "path": path, "hit": hit}


# ----------------------------------------------------------------------------------------------------------
# The loss
def drop_captions(
    input_ids: torch.Tensor, empty_ids: torch.Tensor, p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each row of ``input_ids`` (B, N_k) by the empty prompt's ids with probability p; returns
    (ids, dropped (B,) bool). The coin flips come from ``generator``, so a resumed run
    drops the same captions."""
    B = input_ids.shape[0]
    dropped = torch.rand(B, generator=generator, device=generator.device).to(input_ids.device) < p  # (B,)
    ids = torch.where(dropped[:, None], empty_ids.to(input_ids.device)[None, :], input_ids)  # (B, N_k)
    return ids, dropped


def make_loss_fn(config: TextToImageConfig, empty_ids: torch.Tensor):
    """``loss_fn(model, batch, generator)`` for ``Trainer``: the eps-prediction MSE of eq. 3 with caption
    dropout (``config.objective == "eps"``), or SD 3's flow-matching MSE (``"flow"``) with the same dropout.

    ``empty_ids`` (N_k,) are the token ids of "" (bos, eos, padding): what the pipeline feeds as the
    unconditional prompt, so guidance at sampling time uses exactly the context trained here.
    """
    schedule, p, mode, gamma = config.schedule, config.caption_dropout, config.latents, config.snr_gamma
    offset = config.snr_offset
    T = FlowSchedule().num_train_timesteps  # the flow UNet's timestep is T t, as in diffusers' FlowMatch

    def loss_fn(model: nn.Module, batch: dict, generator: torch.Generator):
        z0 = batch["z0_mean"]  # (B, C, h, w), already times s
        B = z0.shape[0]
        if mode == "sample":  # z_0 = s (mu + sigma e): a fresh posterior sample every time
            e = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0)
            z0 = z0 + batch["z0_std"] * e
        ids, dropped = drop_captions(batch["input_ids"], empty_ids, p, generator)
        if config.objective == "flow":
            return flow_loss(model, z0, ids, generator, T), {"dropped": dropped.float().mean()}
        t = schedule.sample_timesteps(B, generator, device=z0.device)  # (B,) uniform in [0, T-1]
        eps = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0)  # (B, C, h, w)
        z_t = schedule.add_noise(z0, eps, t, validate=False)  # t is valid by construction (no GPU stall)
        context = model["text_encoder"](ids).last_hidden_state  # (B, N_k, D_c)
        pred = model["unet"](z_t, t, context)  # (B, C, h, w)
        target = schedule.training_target(z0, eps, t, validate=False)  # (B, C, h, w)
        per_item = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if gamma is None:
            return per_item.mean(), {"dropped": dropped.float().mean()}
        # Min-SNR-gamma for eps prediction: w_t = min(SNR_t, gamma) / SNR_t. The nearly clean timesteps (huge
        # SNR) stop dominating the gradient, which is spent where layout and colour are decided; Hang et al.
        # report ~3x faster convergence, which a short CPU run needs most.
        snr = schedule.snr(t, validate=False).to(per_item.device)  # (B,)
        weight = snr.clamp(max=gamma) / snr
        if schedule.prediction_type == "v_prediction":
            # the v error is the x0 error times sqrt(SNR + 1), so this gives the x0 error the weight
            # min(SNR + offset, gamma). offset 0 is the paper's min(SNR, gamma): the last, pure-noise
            # timestep of a zero-terminal-SNR schedule would get weight 0, and that is where the model learns
            # to lay out the picture from the caption. offset 1 (the plain v loss, capped) lets those
            # high-noise steps, whose x0 error is large, take most of the gradient, and shapes come late; the
            # CPU preset's 0.1 keeps the layout and spends the rest on shapes (chapter 06's README: the runs).
            weight = (snr + offset).clamp(max=gamma) / (snr + 1)
        elif schedule.prediction_type == "sample":
            weight = snr.clamp(max=gamma)
        return (weight * per_item).mean(), {
            "dropped": dropped.float().mean(),
            "mse": per_item.mean().detach(),
        }

    return loss_fn


def flow_loss(
    model: nn.Module, z0: torch.Tensor, ids: torch.Tensor, generator: torch.Generator, T: int = 1000
) -> torch.Tensor:
    """SD 3's flow-matching loss on a batch (Esser et al. 2024):

        t ~ sigmoid(N(0, 1))                       eq. 19, the logit-normal density (m = 0, s = 1)
        z_t = (1 - t) z_0 + t eps                  eq. 3 with a_t = 1 - t, b_t = t
        L = mean || v_theta(z_t, T t, c) - (eps - z_0) ||^2

    Plain MSE, as SD 3 trains: the logit-normal density already decides how much each t counts.
    z0 (B, C, h, w) and the caption ids (B, N_k) (already dropped) in; the loss, a 0-d tensor, out.
    """
    B = z0.shape[0]
    t = sample_sigmas_logit_normal(B, generator=generator).to(z0.device)  # (B,) in (0, 1)
    eps = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0)  # (B, C, h, w)
    z_t = add_noise(z0, eps, t)  # (B, C, h, w)
    context = model["text_encoder"](ids).last_hidden_state  # (B, N_k, D_c)
    v_pred = model["unet"](z_t, T * t, context)  # (B, C, h, w); the timestep is a float in (0, T)
    v = velocity_target(z0, eps)  # (B, C, h, w)
    return (v_pred.float() - v.float()).pow(2).mean()


# ----------------------------------------------------------------------------------------------------------
# From the trained bundle to a pipeline
def build_pipeline(
    model: nn.ModuleDict,
    tokenizer,
    vae: AutoencoderKL,
    config: TextToImageConfig | None = None,
    *,
    sampler: str | None = None,
    device=None,
):
    """``common.pipeline.StableDiffusion`` around the trained parts (pass
    ``trainer.ema_model()`` for EMA weights).

    The pipeline holds the modules themselves (no copy) and puts them in eval mode on ``device``. A flow model
    (``config.objective == "flow"``) gets a ``FlowSchedule`` with ``config.flow_shift`` and samples with
    ``flow_euler``; a diffusion model with ``sampler`` (default ``ddim``).
    """
    schedule = config.schedule if config is not None else NoiseSchedule.sd15()
    if config is not None and config.objective == "flow":
        schedule = FlowSchedule(shift=config.flow_shift)
    sampler = sampler or ("flow_euler" if isinstance(schedule, FlowSchedule) else "ddim")
    options = None
    if isinstance(schedule, NoiseSchedule) and schedule.rescale_zero_snr:  # start where the noise is pure
        options = {**SD_SAMPLER_OPTIONS, "timestep_spacing": "trailing", "steps_offset": 0}
    return StableDiffusion(
        tokenizer=tokenizer,
        text_encoder=model["text_encoder"],
        unet=model["unet"],
        vae=vae,
        schedule=schedule,
        sampler=sampler,
        sampler_options=options,
        device=device,
    )


def vae_path(config: TextToImageConfig) -> Path:
    """Where ``config.vae`` lives: a folder name under the repository's ``checkpoints/``, or a path."""
    name = Path(config.vae)
    return name if name.is_absolute() or len(name.parts) > 1 else Path(CHECKPOINTS) / name


def check_fits_vae(config: TextToImageConfig, vae: AutoencoderKL) -> None:
    """The UNet denoises the VAE's latents: its channels must be the VAE's latent channels and its
    ``sample_size`` the latent side (resolution / f). A ValueError that names both otherwise."""
    c, f = vae.config.latent_channels, vae.config.downsample_factor
    side = config.resolution // f
    if (config.unet.in_channels, config.unet.out_channels, config.unet.sample_size) != (c, c, side):
        raise ValueError(
            f"config {config.name!r}: its UNet takes {config.unet.in_channels} x {config.unet.sample_size} x "
            f"{config.unet.sample_size} latents, but this VAE makes {c} x {side} x {side} from "
            f"{config.resolution} px images (f = {f}); pass the VAE the config was made for "
            f"({config.vae}) or a config made for this VAE"
        )


def load_vae(path: str | Path, device=None) -> AutoencoderKL:
    """The frozen VAE (a diffusers-format folder); a clear error when it is not there."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no VAE at {path} (expected config.json and diffusion_pytorch_model.safetensors): "
            "train and ship it with chapter 01's train_vae.py, or pass --vae PATH"
        )
    vae = AutoencoderKL.load(path, device=device)
    vae.requires_grad_(False)
    return vae.eval()


# ----------------------------------------------------------------------------------------------------------
# One training run, shared by chapter 04's and chapter 06's scripts
def train(
    config: TextToImageConfig,
    vae: AutoencoderKL,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device=None,
    resume: bool | str = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
    init_from: str | Path | None = None,
    snapshot_every: int = 0,
    clock_start: float | None = None,
):
    """Cache the latents, train the bundle with ``common.training.Trainer``; returns (trainer, tokenizer).

    ``snapshot_every`` > 0 keeps the EMA weights every that many steps in ``out_dir/snapshots/`` (see
    ``SnapshotWriter``): the points of a curve of quality against training time, in seconds since
    ``clock_start`` (a ``time.perf_counter()`` value; default: now, after the latent cache).

    Under ``accelerate launch`` the main process fills the cache first and the others then read it.
    ``init_from``: a shipped course pipeline folder (same config) whose UNet and text encoder are the starting
    weights (fine-tuning; the optimizer starts fresh). A checkpoint in ``out_dir`` still wins: a resumed
    fine-tune continues from its own checkpoint.
    """
    from accelerate import PartialState

    check_fits_vae(config, vae)
    tokenizer = ShapesTokenizer.for_shapes(config.context_length, echo=config.echo_prompt)
    dev = get_device(device)
    state = PartialState(cpu=dev.type == "cpu")
    with state.main_process_first():
        cache = cache_latents(
            vae,
            tokenizer,
            length=config.train_size,
            resolution=config.resolution,
            seed=seed,
            cache_dir=cache_dir,
            device=dev if state.num_processes == 1 else state.device,
        )
    if state.is_main_process:
        print(
            f"latent cache: {cache['path']} ({'reused' if cache['hit'] else 'written'}; "
            f"{len(cache['mean'])} items, z_0 std {cache['mean'].std():.3f})"
        )
    empty_ids = tokenizer([""])[0]  # (N_k,): bos, eos, pad...
    model = build_model(config)
    if init_from is not None:
        init_weights(model, init_from)
    callbacks = [SnapshotWriter(out_dir, config, clock_start)] if snapshot_every else []
    trainer = Trainer(
        model,
        LatentDataset(cache),
        make_loss_fn(config, empty_ids),
        config.train_config(seed=seed, progress=progress, time_budget_s=time_budget_s),
        out_dir,
        device=dev,
        resume=resume,
        callbacks=callbacks,
        callback_every=snapshot_every,
    )
    if callbacks and state.is_main_process and trainer.step == 0:
        callbacks[0](trainer, 0)  # the untrained model: the curve's first point
    trainer.fit()
    return trainer, tokenizer


SNAPSHOT_FIELDS = ("objective", "flow_shift", "echo_prompt", "context_length", "vae")


def snapshot_config(row: dict) -> TextToImageConfig:
    """The config a snapshot row (``load_snapshots``) was trained with, as far as sampling needs it: the
    preset, its sampling fields, and the networks' own configs when the row holds them (a run whose networks
    differ from its preset's, e.g. an experiment, still rebuilds)."""
    config = TextToImageConfig.named(row["config"]).with_overrides(**row.get("overrides", {}))
    if "unet" in row:
        config = config.with_overrides(unet=unet_config_from_diffusers(row["unet"]))
    if "text_encoder" in row:
        config = config.with_overrides(text_encoder=CLIPTextConfig.from_transformers(row["text_encoder"]))
    return config


class SnapshotWriter:
    """Trainer callback: the EMA weights at a step, as ``out_dir/snapshots/step_{step:07d}.safetensors``, and
    a row {step, seconds, config} in ``out_dir/snapshots/index.json``. ``seconds`` counts from ``start`` (a
    ``time.perf_counter()`` value: the training command's start, minus the time of earlier invocations when it
    resumes); each file is written atomically, so a killed run leaves no half snapshot, and a resumed run adds
    to the same index."""

    def __init__(self, out_dir: str | Path, config: TextToImageConfig, start: float | None = None):
        self.dir = Path(out_dir) / "snapshots"
        # what rebuilds the model and its sampler: the preset's name and the fields that change them
        self.config = {
            "config": config.name,
            "overrides": {k: getattr(config, k) for k in SNAPSHOT_FIELDS},
            "unet": unet_config_to_diffusers(config.unet),
            "text_encoder": config.text_encoder.to_transformers(),
        }
        self.start = time.perf_counter() if start is None else start

    def __call__(self, trainer, step: int) -> None:
        if not trainer.accelerator.is_main_process:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in trainer.ema_model().state_dict().items()}
        atomic_write(self.dir / f"step_{step:07d}.safetensors", lambda tmp: save_file(weights, str(tmp)))
        index_path = self.dir / "index.json"
        rows = json.loads(index_path.read_text()) if index_path.is_file() else []
        rows = [r for r in rows if r["step"] != step] + [
            {"step": step, "seconds": round(time.perf_counter() - self.start, 1), **self.config}
        ]
        atomic_write(index_path, json.dumps(sorted(rows, key=lambda r: r["step"]), indent=1) + "\n")


def load_snapshots(run_dir: str | Path) -> list[dict]:
    """The snapshot rows of a run folder, each with its file: [{step, seconds, config, overrides, path}], by
    step."""
    folder = Path(run_dir) / "snapshots"
    if not (folder / "index.json").is_file():
        return []
    rows = json.loads((folder / "index.json").read_text())
    return [
        {**r, "path": folder / f"step_{r['step']:07d}.safetensors"}
        for r in rows
        if (folder / f"step_{r['step']:07d}.safetensors").is_file()
    ]


def init_weights(model: nn.ModuleDict, folder: str | Path) -> None:
    """Copy the UNet and text encoder of a diffusers-format course pipeline folder into ``model`` (in place).

    Read and checked as ``StableDiffusion.from_pretrained`` reads a part: a missing weights file is a
    FileNotFoundError, a missing or unknown key or a wrong shape a ValueError, each naming it.
    """
    folder = Path(folder)
    for name, file in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        path = weights_file(folder / name, (file,), name)
        load_weights(model[name], read_safetensors(path), f"--init-from {path}: not this config's {name}")


NO_METRICS = "not measured yet: run 06_stable_diffusion_architecture/evaluate.py"


def _card_section(text: str, title: str) -> str | None:
    """The body of ``## title`` in a model card's text, or None."""
    if f"## {title}" not in text:
        return None
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0].strip()


def write_model_card(
    folder: str | Path, training: str | None, metrics: str | None = None, curve: str | None = None
) -> Path:
    """``folder/README.md``: what was trained how (``training``, markdown), the metrics from evaluate.py
    (``metrics``), held-out adherence during training from adherence_curve.py (``curve``) and the sha256 of
    every file; a None section is kept from the existing card."""
    folder = Path(folder)
    card = folder / "README.md"
    old = card.read_text() if card.is_file() else ""
    training = training if training is not None else (_card_section(old, "Training") or "")
    metrics = metrics if metrics is not None else _card_section(old, "Metrics")
    curve = curve if curve is not None else _card_section(old, "Adherence during training")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    flow_note = ""
    if scheduler.is_file() and "FlowMatchEulerDiscreteScheduler" in scheduler.read_text():
        flow_note = (
            "\nA flow-matching model (the UNet predicts the velocity eps - z_0 at timestep 1000 t): "
            "sample it with `flow_euler`. diffusers' `StableDiffusionPipeline` loads it, but its "
            "`__call__` expects two members that `FlowMatchEulerDiscreteScheduler` lacks: set "
            "`pipe.scheduler.init_noise_sigma = 1.0` and `pipe.scheduler.scale_model_input = "
            "lambda sample, t: sample` first.\n"
        )
    text = (
        f"# {folder.name}: the course's own text-to-image model\n\n"
        f"A latent diffusion model trained from scratch on Shapes (common/shapes.py) by\n"
        f"`06_stable_diffusion_architecture/train_text_to_image.py`, in diffusers format: it loads with\n"
        f"`common.pipeline.StableDiffusion.from_pretrained` and with `diffusers.StableDiffusionPipeline`.\n"
        f"{flow_note}\n"
        f"## Training\n\n{training.strip()}\n\n"
        + (f"## Adherence during training\n\n{curve.strip()}\n\n" if curve else "")
        + f"## Metrics\n\n{(metrics or NO_METRICS).strip()}\n"
    )
    return weights.write_model_card(folder, text)
