"""Single-file Stable Diffusion 1.x checkpoints: the original CompVis key names <-> the
diffusers names the course uses.

The released ``v1-5-pruned-emaonly.safetensors`` holds one flat state dict of the CompVis ``LatentDiffusion``
(Rombach et al. 2022, github.com/CompVis/stable-diffusion):

    model.diffusion_model.*          the UNet (``ldm.modules.diffusionmodules.openaimodel.UNetModel``)
    first_stage_model.*              the VAE  (``ldm.modules.diffusionmodules.model.Encoder/Decoder``)
    cond_stage_model.transformer.*   the CLIP text model (transformers 4 names, ``text_model.`` prefix)
    betas, alphas_cumprod, ...       the noise schedule as buffers (recomputed here, so ignored)

The UNet's blocks are numbered flat in CompVis: ``input_blocks.{k}`` runs through conv_in (k = 0), then per
level ``layers_per_block`` pairs (ResNet ``.0``, attention ``.1``) and a downsampler; ``output_blocks.{k}``
runs per level ``layers_per_block + 1`` pairs and an upsampler appended to the last pair. The VAE's decoder
levels are numbered from the bottom (``decoder.up.{n-1-i}`` is diffusers' ``up_blocks.{i}``) and its mid
attention is 1x1 convs where diffusers has linear layers. The mapping is computed from each module's own
parameter list, so one function serves both directions (``compvis_names``), and an unknown or missing key is
an error that names it. A file with both raw and EMA weights (``v1-5-pruned.safetensors``) loads the raw ones;
``-emaonly`` files hold only EMA.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.convert import unet_config_from_diffusers
from common.text_encoder import CLIPTextConfig, CLIPTextModel
from common.tokenizer import SD_TOKENIZER_HINT, ClipTokenizer, load_tokenizer
from common.unet import UNet, UNetConfig
from common.weights import build_on_meta, load_weights, read_json

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.transformer.",
)
# what else a CompVis checkpoint holds: the schedule's buffers, EMA copies, the VAE's training loss
IGNORED_KEYS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "lvlb_weights",
}
IGNORED_PREFIXES = (
    "model_ema.",
    "first_stage_model.loss.",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
)
RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_name(key: str, cfg: UNetConfig) -> str:
    """diffusers UNet2DConditionModel name -> CompVis UNetModel name (without the prefix)."""
    L = cfg.layers_per_block

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"{RESNET_UNET[head]}.{tail}"

    simple = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "class_embedding": "label_emb",
    }
    for ours, theirs in simple.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        k = 1 + b * (L + 1) + l
        return f"input_blocks.{k}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{k}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (L + 1) + L}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        step = (
            2 if cfg.mid_block_type == "UNetMidBlock2DCrossAttn" else 1
        )  # the attention sits between the ResNets
        return f"middle_block.{step * j}.{resnet(rest)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        k = b * (L + 1) + l
        return f"output_blocks.{k}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{k}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        position = 2 if cfg.up_block_types[b] == "CrossAttnUpBlock2D" else 1
        return f"output_blocks.{b * (L + 1) + L}.{position}.conv.{m[2]}"
    raise ValueError(f"no CompVis name known for the UNet parameter {key!r}")


def _vae_name(key: str, cfg: AutoencoderConfig) -> str:
    """diffusers AutoencoderKL name -> CompVis AutoencoderKL name (without the prefix)."""
    n = len(cfg.block_out_channels)

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
    return key.replace(
        "conv_norm_out", "norm_out"
    )  # conv_in, conv_out, quant_conv, post_quant_conv: same names


def compvis_names(unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> dict[str, tuple[str, str]]:
    """CompVis key -> (part, course/diffusers key) for every parameter of the three modules."""
    names = {}
    for key in unet.state_dict():
        names[UNET_PREFIX + _unet_name(key, unet.config)] = ("unet", key)
    for key in vae.state_dict():
        names[VAE_PREFIX + _vae_name(key, vae.config)] = ("vae", key)
    for key in text_encoder.state_dict():
        names[CLIP_PREFIX + "text_model." + key] = ("text_encoder", key)
    return names


def _is_vae_attention_weight(part: str, key: str) -> bool:
    return part == "vae" and ".mid_block.attentions.0.to_" in key and key.endswith("weight")


def to_compvis(unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The three modules' weights as one CompVis state dict (what ``save_file`` writes as a
    single-file checkpoint)."""
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    states = {part: m.state_dict() for part, m in modules.items()}
    out = {}
    for compvis, (part, key) in compvis_names(unet, vae, text_encoder).items():
        value = states[part][key].detach().cpu().contiguous()
        if _is_vae_attention_weight(part, key):
            value = value[:, :, None, None].contiguous()  # linear (C, C) -> conv 1x1 (C, C, 1, 1)
        out[compvis] = value
    return out


def sd15_configs() -> tuple[UNetConfig, AutoencoderConfig, CLIPTextConfig, dict]:
    """The configs of SD 1.5's parts, and its scheduler config (stable-diffusion-v1-5, PNDMScheduler's)."""
    scheduler = {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "clip_sample": False,
    }
    # no timestep_spacing, as in SD 1.5's file: each sampler then spaces as diffusers' class does by default
    return UNetConfig.sd15(), AutoencoderConfig.sd15(), CLIPTextConfig.vit_l14(), scheduler


def load_single_file(path: Path, *, tokenizer_path=None, config_dir=None):
    """(unet, vae, text_encoder, tokenizer, scheduler_config) from a CompVis .safetensors file."""
    try:  # the header first: a file that is not a CompVis checkpoint is refused before any model is built
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors' own error type: a bad header or a short file
        raise ValueError(f"{path} is not a readable .safetensors file ({e}); it may be truncated") from None
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ValueError(
            f"{path} holds no SD 1.x UNet weights (no 'model.diffusion_model.*' keys among its "
            f"{len(keys)}); expected a single-file Stable Diffusion 1.x checkpoint"
        )
    if config_dir is None:
        unet_cfg, vae_cfg, text_cfg, scheduler_config = sd15_configs()
    else:  # a diffusers folder's configs (a small model's, say, or an SD 1.x fine-tune with its own config)
        config_dir = Path(config_dir)
        unet_cfg = unet_config_from_diffusers(read_json(config_dir / "unet/config.json", "the unet config"))
        vae_cfg = AutoencoderConfig.from_diffusers(
            read_json(config_dir / "vae/config.json", "the vae config")
        )
        text_cfg = CLIPTextConfig.from_transformers(
            read_json(config_dir / "text_encoder/config.json", "the text encoder config")
        )
        scheduler_config = read_json(config_dir / "scheduler/scheduler_config.json", "the scheduler config")
    if tokenizer_path is None and config_dir is not None and (Path(config_dir) / "tokenizer").is_dir():
        tokenizer_path = Path(config_dir) / "tokenizer"
    if tokenizer_path is None:
        raise ValueError(
            f"{path} holds no tokenizer: pass tokenizer_path (--tokenizer), a local folder with SD 1.5's "
            f"CLIP tokenizer (vocab.json, merges.txt). Get it with: {SD_TOKENIZER_HINT}"
        )
    tokenizer = (
        load_tokenizer(tokenizer_path) if config_dir is not None else ClipTokenizer.load(tokenizer_path)
    )

    # SD-sized (or SD 1.5's configs): build on meta, so nothing is allocated before the weights are read
    big = config_dir is None or Path(path).stat().st_size > 200_000_000
    unet, vae = build_on_meta(UNet, unet_cfg, big), build_on_meta(AutoencoderKL, vae_cfg, big)
    text_encoder = build_on_meta(CLIPTextModel, text_cfg, big)
    names = compvis_names(unet, vae, text_encoder)
    states = {"unet": {}, "vae": {}, "text_encoder": {}}
    unknown = []
    with safe_open(str(path), framework="pt") as f:
        for compvis in f.keys():
            target = names.get(compvis) or names.get(
                compvis.replace(CLIP_PREFIX, CLIP_PREFIX + "text_model.", 1)
                if compvis.startswith(CLIP_PREFIX)
                else compvis
            )
            if target is None:
                if compvis not in IGNORED_KEYS and not compvis.startswith(IGNORED_PREFIXES):
                    unknown.append(compvis)
                continue
            part, key = target
            value = f.get_tensor(compvis)
            if _is_vae_attention_weight(part, key) and value.ndim == 4:
                value = value[:, :, 0, 0]  # conv 1x1 (C, C, 1, 1) -> linear (C, C)
            states[part][key] = value
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} keys that are not SD 1.x's (CompVis names), e.g. {unknown[:5]}"
        )
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        missing = [c for c, (p, k) in names.items() if p == part and k not in states[part]]
        if missing:
            raise ValueError(
                f"{path}: the {part} weights are incomplete: {len(missing)} keys missing, e.g. {missing[:5]}"
            )
        load_weights(module, states[part], f"{path} ({part})")
    return unet, vae, text_encoder, tokenizer, scheduler_config
