"""Loading and saving a whole pipeline in diffusers' folder layout (``StableDiffusion.from_pretrained`` /
``save_pretrained``), and dispatching single-file SD 1.x checkpoints to ``common/single_file.py``.

A diffusers folder (what ``diffusers.StableDiffusionPipeline.save_pretrained`` writes,
and what SD 1.5 ships as):

    model_index.json                the parts and their classes
    unet/config.json                UNet2DConditionModel config    + diffusion_pytorch_model.safetensors
    vae/config.json                 AutoencoderKL config           + diffusion_pytorch_model.safetensors
    text_encoder/config.json        transformers CLIPTextConfig    + model.safetensors
    tokenizer/                      CLIP BPE (vocab.json, merges.txt) or the Shapes word-level tokenizer.json
    scheduler/scheduler_config.json the noise schedule and the sampler's options (a flow-matching model:
                                    FlowMatchEulerDiscreteScheduler, its num_train_timesteps and shift)

The modules are built on the meta device and the weights assigned into them, so nothing is allocated twice and
SD 1.5 loads without the seconds of random initialisation its 1.07 B parameters would cost.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.cli import ship
from common.convert import to_transformers, unet_config_from_diffusers, unet_config_to_diffusers
from common.flow import FlowSchedule
from common.samplers import DIFFUSERS_SCHEDULERS, SAMPLER_OF_SCHEDULER, SAMPLERS
from common.schedules import NoiseSchedule
from common.single_file import load_single_file
from common.text_encoder import CLIPTextConfig, CLIPTextModel, normalize_clip_keys
from common.tokenizer import BOS, EOS, PAD, UNK, ClipTokenizer, ShapesTokenizer, load_tokenizer
from common.unet import UNet
from common.weights import (
    WEIGHTS_NAME,
    build_on_meta,
    load_weights,
    read_json,
    read_safetensors,
    save_model,
    weights_file,
)

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"  # a flow-matching model: common.flow.FlowSchedule
DIFFUSERS_VERSION = "0.42.1"  # written into the configs; diffusers only reads it to warn about old files


def load_part_weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    names = (
        ("model.safetensors",)
        if part == "text_encoder"
        else (WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors")
    )
    return read_safetensors(weights_file(folder, names, part))


def sampler_of(scheduler_config: dict, where: Path) -> str:
    """The course sampler for a folder's scheduler class; a class the course does not implement is an error
    (never a silent swap for another sampler)."""
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
    if scheduler_config.get("_class_name") == FLOW_SCHEDULER:  # the velocity eps - z_0, not a noise schedule
        schedule, options = FlowSchedule.from_diffusers(scheduler_config), {}
    else:
        schedule = NoiseSchedule.from_diffusers(scheduler_config)
        options = {
            k: v for k, v in scheduler_config.items() if k not in SCHEDULE_KEYS and not k.startswith("_")
        }
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
    unet_cfg = unet_config_from_diffusers(read_json(path / "unet/config.json", "the unet config"))
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
    return ship(
        path, "pipeline", lambda tmp: write_pipeline(pipe, tmp), overwrite=overwrite, what="save_pretrained"
    )


def write_pipeline(pipe, tmp: Path, dtype: torch.dtype = torch.float32) -> None:
    """The diffusers folder's files, written into the empty folder ``tmp`` (``save_pipeline`` ships them).

    ``dtype``: how the weights are stored (float16 halves the folder; both loaders cast them back to the
    dtype they are asked for, and transformers' "auto" reads float32 from the text encoder's config)."""
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    unet_config = {
        "_class_name": "UNet2DConditionModel",
        **version,
        **unet_config_to_diffusers(pipe.unet.config),
    }
    save_model(pipe.unet, tmp / "unet", unet_config, dtype=dtype)
    vae_config = {"_class_name": "AutoencoderKL", **version, **pipe.vae.config.to_diffusers()}
    save_model(pipe.vae, tmp / "vae", vae_config, dtype=dtype)
    text_encoder = to_transformers(pipe.text_encoder.float().cpu()).to(dtype)
    text_encoder.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
    if (
        dtype != torch.float32
    ):  # the dtype transformers' "auto" loads in: compute in fp32, as the other parts do
        config_path = tmp / "text_encoder" / "config.json"
        config_path.write_text(
            json.dumps({**json.loads(config_path.read_text()), "dtype": "float32"}, indent=2) + "\n"
        )
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
