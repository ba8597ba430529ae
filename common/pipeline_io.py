"""Loading and saving a whole pipeline in diffusers' folder layout (``StableDiffusion.from_pretrained`` /
``save_pretrained``), and dispatching single-file SD 1.x checkpoints to ``common/single_file.py``.

A diffusers folder (what ``diffusers.StableDiffusionPipeline.save_pretrained`` writes,
and what SD 1.5 ships as):

    model_index.json                the parts and their classes
    unet/config.json                UNet2DConditionModel config    + diffusion_pytorch_model.safetensors
    vae/config.json                 AutoencoderKL config           + diffusion_pytorch_model.safetensors
    text_encoder/config.json        transformers CLIPTextConfig    + model.safetensors
    tokenizer/                      CLIP BPE (vocab.json, merges.txt) or the Shapes word-level tokenizer.json
    scheduler/scheduler_config.json the noise schedule and the sampler's options

The modules are built on the meta device and the weights assigned into them, so nothing is allocated twice and
SD 1.5 loads without the seconds of random initialisation its 1.07 B parameters would cost.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.schedules import NoiseSchedule
from common.text_encoder import CLIPTextConfig, CLIPTextModel, normalize_clip_keys
from common.tokenizer import ClipTokenizer, ShapesTokenizer, load_tokenizer
from common.unet import UNet, UNetConfig

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
SAMPLER_OF_SCHEDULER = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
DIFFUSERS_VERSION = "0.42.1"  # written into the configs; diffusers only reads it to warn about old files


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is missing")
    return json.loads(path.read_text())


def weights_file(folder: Path, names: tuple[str, ...], part: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    other = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    hint = (
        f" (found {other}: only safetensors are read; convert them with safetensors.torch.save_file)"
        if other
        else ""
    )
    raise FileNotFoundError(f"the {part} weights are missing: expected {folder / names[0]}{hint}")


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Assign ``state`` into ``module`` (built on meta), after checking keys and
    shapes; errors name the key."""
    ours = module.state_dict()
    missing = sorted(set(ours) - set(state))
    unknown = sorted(set(state) - set(ours))
    if missing:
        raise ValueError(f"{where}: {len(missing)} weights missing, e.g. {missing[:5]}")
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} unknown keys, e.g. {unknown[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ValueError(
                f"{where}: {key} has shape {tuple(value.shape)} in the file but the config gives "
                f"{tuple(ours[key].shape)}"
            )
    module.load_state_dict(state, strict=True, assign=True)
    return module


def build_on_meta(cls, config, big: bool = True):
    """``cls(config)`` without allocating (meta device) when ``big``; small models are simply built on the
    CPU, where random init costs less than the first meta-device init (which imports
    torch's reference ops)."""
    if not big:
        return cls(config)
    with torch.device("meta"):
        return cls(config)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with a truncated or foreign file reported as a
    ValueError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a bad header or a short file
        raise ValueError(
            f"{path} is not a readable .safetensors file ({e}); it may be truncated: "
            "download or save it again"
        ) from None


def load_part_weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    names = (
        ("model.safetensors",)
        if part == "text_encoder"
        else ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
    )
    return read_safetensors(weights_file(folder, names, part))


def sampler_of(scheduler_config: dict, where: Path) -> str:
    """The course sampler for a folder's scheduler class; a class the course does not implement is an error
    (never a silent swap for another sampler)."""
    from common.samplers import SAMPLERS

    name = scheduler_config.get("_class_name")
    if name not in SAMPLER_OF_SCHEDULER:
        raise ValueError(
            f"{where} names the scheduler {name!r}, which the course does not implement (it has "
            f"{', '.join(SAMPLER_OF_SCHEDULER)}); pick a sampler explicitly: sampler= / --sampler, one "
            f"of {', '.join(SAMPLERS)}"
        )
    return SAMPLER_OF_SCHEDULER[name]


def load_pipeline(cls, path, *, device=None, dtype=None, sampler=None, tokenizer_path=None, config_dir=None):
    path = Path(path)
    dtype = dtype or torch.float32
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{path}: a single-file checkpoint must be .safetensors (CompVis key names); "
                "a .ckpt pickle is not read, convert it first"
            )
        from common.single_file import load_single_file

        parts = load_single_file(path, tokenizer_path=tokenizer_path, config_dir=config_dir)
    elif path.is_dir():
        parts = load_folder(path)
        if tokenizer_path is not None:  # a tokenizer asked for by name replaces the folder's own
            parts = (*parts[:3], load_tokenizer(Path(tokenizer_path)), parts[4])
    else:
        raise FileNotFoundError(
            f"no model at {path}: expected a diffusers folder (with model_index.json) or a .safetensors file"
        )
    unet, vae, text_encoder, tokenizer, scheduler_config = parts
    schedule = NoiseSchedule.from_diffusers(scheduler_config)
    options = {k: v for k, v in scheduler_config.items() if k not in SCHEDULE_KEYS and not k.startswith("_")}
    sampler = sampler or sampler_of(scheduler_config, path if path.is_file() else path / "scheduler")
    return cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        schedule=schedule,
        sampler=sampler,
        device=device,
        dtype=dtype,
        sampler_options=options,
    )


def load_folder(path: Path):
    index = read_json(path / "model_index.json", f"{path} is not a diffusers pipeline folder")
    big = sum(p.stat().st_size for p in path.rglob("*.safetensors")) > 200_000_000  # SD-sized: build on meta
    for part in PARTS:
        if part not in index or index[part] is None or index[part][0] is None:
            raise ValueError(f"{path / 'model_index.json'} names no {part!r}; expected all of {PARTS}")
        if not (path / part).is_dir():
            raise FileNotFoundError(
                f"the {part} folder is missing: {path / part} (model_index.json names it)"
            )
    unet_cfg = UNetConfig.from_diffusers(read_json(path / "unet/config.json", "the unet config"))
    unet = load_weights(
        build_on_meta(UNet, unet_cfg, big), load_part_weights(path / "unet", "unet"), str(path / "unet")
    )
    vae_cfg = AutoencoderConfig.from_diffusers(read_json(path / "vae/config.json", "the vae config"))
    vae = load_weights(
        build_on_meta(AutoencoderKL, vae_cfg, big), load_part_weights(path / "vae", "vae"), str(path / "vae")
    )
    text_cfg = CLIPTextConfig.from_transformers(
        read_json(path / "text_encoder/config.json", "the text encoder config")
    )
    text_state = normalize_clip_keys(load_part_weights(path / "text_encoder", "text_encoder"))
    text_encoder = load_weights(
        build_on_meta(CLIPTextModel, text_cfg, big), text_state, str(path / "text_encoder")
    )
    tokenizer = load_tokenizer(path / "tokenizer")
    scheduler_config = read_json(path / "scheduler/scheduler_config.json", "the scheduler config")
    return unet, vae, text_encoder, tokenizer, scheduler_config


# --- saving ---------------------------------------------------------------------------------------------
def _save_diffusers_part(module: nn.Module, folder: Path, class_name: str, config: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}, indent=2)
        + "\n"
    )
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def save_tokenizer(tokenizer, folder: Path) -> list[str]:
    """Write the tokenizer where transformers finds it; returns model_index.json's [library, class] for it."""
    if isinstance(tokenizer, ClipTokenizer):
        tokenizer.save(folder)
        return ["transformers", "CLIPTokenizer"]
    if not isinstance(tokenizer, ShapesTokenizer):
        raise ValueError(
            f"cannot save a {type(tokenizer).__name__}; expected ClipTokenizer or ShapesTokenizer"
        )
    tokenizer.save(folder)  # tokenizer.json, which also pads and truncates to the context by itself
    from common.tokenizer import BOS, EOS, PAD, UNK

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": tokenizer.context_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        "truncation_side": "right",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}, indent=2) + "\n"
    )
    return ["transformers", "PreTrainedTokenizerFast"]


def save_pipeline(pipe, path, overwrite: bool = False) -> Path:
    """Write the folder through ``common.cli.ship``: a non-empty folder the course did not write is refused
    (``overwrite=True`` writes over same-named files), a user's files in it are kept, and only a previous
    ship's files are replaced."""
    from common.cli import ship

    return ship(
        path, "pipeline", lambda tmp: write_pipeline(pipe, tmp), overwrite=overwrite, what="save_pretrained"
    )


def write_pipeline(pipe, tmp: Path) -> None:
    """The diffusers folder's files, written into the empty folder ``tmp`` (``save_pipeline`` ships them)."""
    from common.convert import to_transformers
    from common.pipeline import DIFFUSERS_SCHEDULERS

    _save_diffusers_part(pipe.unet, tmp / "unet", "UNet2DConditionModel", pipe.unet.config.to_diffusers())
    _save_diffusers_part(pipe.vae, tmp / "vae", "AutoencoderKL", pipe.vae.config.to_diffusers())
    text_encoder = to_transformers(pipe.text_encoder.float().cpu())
    text_encoder.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
    pipe.text_encoder.to(pipe.device, pipe.dtype)
    tokenizer_entry = save_tokenizer(pipe.tokenizer, tmp / "tokenizer")
    scheduler_class = DIFFUSERS_SCHEDULERS[pipe.sampler_name]
    scheduler = {
        "_class_name": scheduler_class,
        "_diffusers_version": DIFFUSERS_VERSION,
        **pipe.schedule.to_diffusers(),
        **pipe.sampler_options,
    }
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": tokenizer_entry,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
