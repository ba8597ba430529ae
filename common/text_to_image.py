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

The CPU preset weights the loss by Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy"): w_t = min(SNR_t, 5) / SNR_t, which tempers the nearly noise-free timesteps.

``build_pipeline`` wraps the trained parts (usually the EMA weights) in ``common.pipeline.StableDiffusion``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from common.autoencoder import AutoencoderKL
from common.schedules import NoiseSchedule
from common.text_encoder import CLIPTextConfig, CLIPTextModel
from common.training import TrainConfig
from common.unet import UNet, UNetConfig

CONFIG_NAMES = ("cpu", "gpu", "tiny")
LATENT_MODES = ("mean", "sample")
DEFAULT_CACHE = Path(os.environ.get("COURSE_CACHE", Path.home() / ".cache" / "latent_diffusion_course"))


def _text_config(width: int, layers: int, heads: int, context_length: int) -> CLIPTextConfig:
    """A CLIP text transformer over the Shapes tokenizer's ids (pad 0, unk 1, bos 2, eos 3: 42 ids in all)."""
    from common.tokenizer import ShapesTokenizer

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


def _unet_config(
    widths: tuple[int, ...], layers: int, heads: int, context_dim: int, groups: int
) -> UNetConfig:
    """Three levels at 16 x 16 x 4 latents: ResNets only at 16 x 16, cross-attention at 8 x 8 and 4 x 4 and
    in the middle, where a token sees the whole 64 px image through a few latent pixels (positions and
    relations are decided there); full-resolution attention would cost the most and add the least."""
    return UNetConfig(
        sample_size=16,
        block_out_channels=widths,
        layers_per_block=layers,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=context_dim,
        attention_head_dim=heads,
        norm_num_groups=groups,
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
    resolution: int = 64  # image side; the latent side is resolution / f
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule.sd15)  # SD 1.x's scaled-linear, eps target
    snr_gamma: float | None = None  # Min-SNR-gamma loss weights (Hang et al. 2023): None = plain eq. 3
    checkpoint_every: int = 200  # Trainer checkpoints, for resume after a kill
    ema_start: int = 50  # the EMA copies the weights until here (early weights are not worth averaging)

    def __post_init__(self):
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
        """The laptop's course model, sized for a shared 2-core CPU: UNet 4.2 M, text encoder 0.6 M parameters
        (the shipped model is the ``gpu`` preset; 1,800 steps of this one learn colour and size, not yet shape
        or position: chapter 06's README).

        About 2 s a step at batch 32 on a busy 2-core machine (one thread: see the chapter README), so 1,200
        steps take ~40 min; encoding the 4,000 cached items takes ~2.5 min once.
        """
        width = 128
        return cls(
            name="cpu",
            unet=_unet_config((32, 64, 128), 1, 4, width, 16),
            text_encoder=_text_config(width, 3, 4, 24),
            steps=1200,
            batch_size=32,
            lr=1e-3,
            warmup_steps=100,
            ema_decay=0.995,
            train_size=4000,
            checkpoint_every=100,
            snr_gamma=5.0,
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
            unet=_unet_config((64, 96, 128), 1, 4, width, 16),
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
        return cls(
            name="tiny",
            unet=_unet_config((16, 32, 32), 1, 2, width, 8),
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
def module_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    from common.shapes import Shapes

    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    s = float(vae.config.scaling_factor)
    key = (
        f"t2i_{module_sha256(vae)[:16]}_s{s:.6g}_{split}_{length}_{seed}_{resolution}px"
        f"_ctx{tokenizer.context_length}_v{tokenizer.vocab_size}"
    )
    path = cache_dir / f"{key}.pt"
    if path.is_file():
        try:
            data = torch.load(path, weights_only=True)
            return {**data, "path": path, "hit": True}
        except Exception as e:  # a truncated file: rebuild it
            print(f"latent cache {path} unreadable ({e}); rebuilding")
    ds = Shapes(resolution, split, length, seed)
    vae = vae.to(device).eval()
    means, stds, captions = [], [], []
    for start in range(0, length, batch_size):
        items = [ds[i] for i in range(start, min(length, start + batch_size))]
        x = torch.stack([it["image"] for it in items]).to(device)  # (b, 3, H, W) in [-1, 1]
        posterior = vae.encode(x)
        means.append((posterior.mean * s).float().cpu())  # (b, C, h, w)
        stds.append((posterior.std * s).float().cpu())
        captions += [it["caption"] for it in items]
        if verbose and (start // batch_size) % 20 == 0:
            print(f"caching latents {start + len(items)}/{length}", flush=True)
    data = {
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "input_ids": tokenizer(captions),
        "captions": captions,
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return {**data, "path": path, "hit": False}


class LatentDataset(torch.utils.data.Dataset):
    """Cached latents with their token ids: item i is {"z0_mean", "z0_std" (C, h, w), "input_ids" (N_k,)}."""

    def __init__(self, cache: dict):
        self.mean, self.std, self.input_ids = cache["mean"], cache["std"], cache["input_ids"]
        if not len(self.mean) == len(self.std) == len(self.input_ids):
            raise ValueError("the cache's mean, std and input_ids must have one row per item")

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> dict:
        return {"z0_mean": self.mean[i], "z0_std": self.std[i], "input_ids": self.input_ids[i]}

    def get_batch(self, indices: list[int]) -> dict:
        """The collated batch of ``indices`` in one gather per tensor (what ``Trainer`` uses: stacking 256
        items one by one costs more than a GPU step of the course model)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"z0_mean": self.mean[idx], "z0_std": self.std[idx], "input_ids": self.input_ids[idx]}


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
    """``loss_fn(model, batch, generator)`` for ``Trainer``: the eps-prediction MSE of
    eq. 3 with caption dropout.

    ``empty_ids`` (N_k,) are the token ids of "" (bos, eos, padding): what the pipeline feeds as the
    unconditional prompt, so guidance at sampling time uses exactly the context trained here.
    """
    schedule, p, mode, gamma = config.schedule, config.caption_dropout, config.latents, config.snr_gamma

    def loss_fn(model: nn.Module, batch: dict, generator: torch.Generator):
        z0 = batch["z0_mean"]  # (B, C, h, w), already times s
        B = z0.shape[0]
        if mode == "sample":  # z_0 = s (mu + sigma e): a fresh posterior sample every time
            e = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0)
            z0 = z0 + batch["z0_std"] * e
        ids, dropped = drop_captions(batch["input_ids"], empty_ids, p, generator)
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
            weight = snr.clamp(max=gamma) / (snr + 1)
        elif schedule.prediction_type == "sample":
            weight = snr.clamp(max=gamma)
        return (weight * per_item).mean(), {
            "dropped": dropped.float().mean(),
            "mse": per_item.mean().detach(),
        }

    return loss_fn


# ----------------------------------------------------------------------------------------------------------
# From the trained bundle to a pipeline
def build_pipeline(
    model: nn.ModuleDict,
    tokenizer,
    vae: AutoencoderKL,
    config: TextToImageConfig | None = None,
    *,
    sampler: str = "ddim",
    device=None,
):
    """``common.pipeline.StableDiffusion`` around the trained parts (pass
    ``trainer.ema_model()`` for EMA weights).

    The pipeline holds the modules themselves (no copy) and puts them in eval mode on ``device``.
    """
    from common.pipeline import StableDiffusion

    schedule = config.schedule if config is not None else NoiseSchedule.sd15()
    return StableDiffusion(
        tokenizer=tokenizer,
        text_encoder=model["text_encoder"],
        unet=model["unet"],
        vae=vae,
        schedule=schedule,
        sampler=sampler,
        device=device,
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
):
    """Cache the latents, train the bundle with ``common.training.Trainer``; returns (trainer, tokenizer).

    Under ``accelerate launch`` the main process fills the cache first and the others then read it.
    ``init_from``: a shipped course pipeline folder (same config) whose UNet and text encoder are the starting
    weights (fine-tuning; the optimizer starts fresh). A checkpoint in ``out_dir`` still wins: a resumed
    fine-tune continues from its own checkpoint.
    """
    from accelerate import PartialState

    from common.runtime import get_device
    from common.tokenizer import ShapesTokenizer
    from common.training import Trainer

    tokenizer = ShapesTokenizer.for_shapes(config.context_length)
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
    trainer = Trainer(
        model,
        LatentDataset(cache),
        make_loss_fn(config, empty_ids),
        config.train_config(seed=seed, progress=progress, time_budget_s=time_budget_s),
        out_dir,
        device=dev,
        resume=resume,
    )
    trainer.fit()
    return trainer, tokenizer


def init_weights(model: nn.ModuleDict, folder: str | Path) -> None:
    """Copy the UNet and text encoder of a diffusers-format course pipeline folder into ``model`` (in place).

    Read and checked as ``StableDiffusion.from_pretrained`` reads a part: a missing weights file is a
    FileNotFoundError, a missing or unknown key or a wrong shape a ValueError, each naming it.
    """
    from safetensors.torch import load_file

    from common.pipeline_io import load_weights, weights_file

    folder = Path(folder)
    for name, file in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        path = weights_file(folder / name, (file,), name)
        load_weights(model[name], load_file(str(path)), f"--init-from {path}: not this config's {name}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".json") and p.name != "README.md"
    )


def write_model_card(folder: str | Path, training: str | None, metrics: str | None = None) -> Path:
    """``folder/README.md``: what was trained how (``training``, markdown), the metrics from evaluate.py
    (``metrics``, markdown) and the sha256 of every file; a None section is kept from the existing card."""
    folder = Path(folder)
    card = folder / "README.md"
    if metrics is None and card.is_file():
        old = card.read_text()
        if "## Metrics" in old:
            metrics = old.split("## Metrics", 1)[1].split("\n## ", 1)[0].strip()
    if training is None and card.is_file():
        old = card.read_text()
        training = old.split("## Training", 1)[1].split("\n## ", 1)[0].strip() if "## Training" in old else ""
    size = sum(p.stat().st_size for p in weight_files(folder))
    rows = "\n".join(
        f"| `{p.relative_to(folder)}` | {p.stat().st_size:,} | `{file_sha256(p)}` |"
        for p in weight_files(folder)
    )
    text = (
        f"# course_t2i: the course's own text-to-image model\n\n"
        f"A latent diffusion model trained from scratch on Shapes (common/shapes.py) by\n"
        f"`06_stable_diffusion_architecture/train_text_to_image.py`, in diffusers format: it loads with\n"
        f"`common.pipeline.StableDiffusion.from_pretrained` and with `diffusers.StableDiffusionPipeline`.\n\n"
        f"## Training\n\n{training.strip()}\n\n"
        "## Metrics\n\n"
        f"{(metrics or 'not measured yet: run 06_stable_diffusion_architecture/evaluate.py').strip()}\n\n"
        f"## Files\n\n{size / 1e6:.1f} MB in all.\n\n| file | bytes | sha256 |\n|---|---|---|\n{rows}\n"
    )
    tmp = card.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, card)
    return card
