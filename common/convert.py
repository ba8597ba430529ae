"""Moving weights between the course's modules and diffusers / transformers.

Because the course's AutoencoderKL, UNet, MMDiT and CLIP text model have exactly the parameter names and
shapes of diffusers' ``AutoencoderKL``, ``UNet2DConditionModel``, ``SD3Transformer2DModel`` and transformers'
``CLIPTextModel`` for the same
configuration, conversion is two steps: translate the config, then ``load_state_dict(strict=True)``.
Nothing is renamed, so nothing can be renamed wrongly; a strict load fails loudly on any mismatch.

    ours = from_diffusers(diffusers_vae)       # -> common.autoencoder.AutoencoderKL
    ref  = to_diffusers(ours)                  # -> diffusers.AutoencoderKL with the same weights
    clip = from_transformers(hf_text_model)    # -> common.text_encoder.CLIPTextModel

The UNet's config translation lives here too (``unet_config_to_diffusers`` / ``unet_config_from_diffusers``,
with diffusers' option tables), so ``common/unet.py`` holds only the model. The single-file SD checkpoints
with the original CompVis key names are handled in ``common/single_file.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from torch import nn

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.mmdit import MMDiT, MMDiTConfig
from common.text_encoder import CLIPTextConfig, CLIPTextModel, normalize_clip_keys
from common.unet import UNet, UNetConfig
from common.weights import check_state

# UNet2DConditionModel options the course's UNet does not implement, with the one value it accepts (diffusers'
# defaults)
UNET_FIXED_OPTIONS = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# diffusers' defaults for the options we do read: a config.json only lists what differs from these
UNET_DIFFUSERS_DEFAULTS = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "num_class_embeds": None,
}
UNET_IGNORED_OPTIONS = {"addition_embed_type_num_heads"}  # only read when addition_embed_type is set


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """Keyword arguments for ``diffusers.UNet2DConditionModel`` that build the architecture of ``config``.

    diffusers refuses ``num_attention_heads``, so head counts travel as ``attention_head_dim`` (its quirk).
    Without cross-attention diffusers still wants an int ``cross_attention_dim``: its default, unused, goes.
    """
    heads = config.attention_head_dim if config.num_attention_heads is None else config.num_attention_heads
    return dict(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        mid_block_type=config.mid_block_type,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim
        if config.has_cross_attention
        else UNET_DIFFUSERS_DEFAULTS["cross_attention_dim"],
        attention_head_dim=heads,
        use_linear_projection=config.use_linear_projection,
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        num_class_embeds=config.num_class_embeds,
        flip_sin_to_cos=config.flip_sin_to_cos,
        freq_shift=config.freq_shift,
        transformer_layers_per_block=config.transformer_layers_per_block,
    )


def unet_config_from_diffusers(mapping: Mapping) -> UNetConfig:
    """Read a diffusers UNet2DConditionModel config (``unet.config`` or a parsed config.json).

    Keys a config.json leaves out take diffusers' defaults (not ours). Options that change the architecture
    away from what the course's UNet implements (another activation, SDXL's added embeddings, ...) are errors.
    """
    mapping = {k: v for k, v in dict(mapping).items() if not k.startswith("_")}
    for key, expected in UNET_FIXED_OPTIONS.items():
        if key in mapping and mapping[key] != expected:
            raise ValueError(
                f"unsupported UNet2DConditionModel option {key}={mapping[key]!r}; "
                f"the course's UNet needs {key}={expected!r}"
            )
    known = set(UNET_DIFFUSERS_DEFAULTS) | set(UNET_FIXED_OPTIONS) | UNET_IGNORED_OPTIONS
    unknown = sorted(k for k in mapping if k not in known)
    if unknown:
        raise ValueError(
            f"unknown UNet2DConditionModel config keys {unknown}; expected keys among {sorted(known)}"
        )
    values = {**UNET_DIFFUSERS_DEFAULTS, **{k: v for k, v in mapping.items() if k in UNET_DIFFUSERS_DEFAULTS}}
    if not isinstance(values["layers_per_block"], int):
        raise ValueError(f"layers_per_block must be a single int, got {values['layers_per_block']!r}")
    if isinstance(values["sample_size"], (list, tuple)):
        raise ValueError(f"sample_size must be a single int (square latents), got {values['sample_size']!r}")
    config = UNetConfig(**values)
    if not config.has_cross_attention:  # then cross_attention_dim is diffusers' unused default, not a width
        config = replace(config, cross_attention_dim=None)
    return config


def diffusers_config(module: nn.Module) -> dict:
    """The keyword arguments of the diffusers class that has exactly ``module``'s parameters."""
    if isinstance(module, UNet):
        return unet_config_to_diffusers(module.config)
    if isinstance(module, (AutoencoderKL, MMDiT)):
        return module.config.to_diffusers()
    raise ValueError(
        f"diffusers_config takes common.autoencoder.AutoencoderKL, common.unet.UNet or "
        f"common.mmdit.MMDiT, got {type(module).__name__}"
    )


def _copy_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    state = src.state_dict()
    check_state(dst.state_dict(), state, f"{type(src).__name__} -> {type(dst).__name__}")
    dst.load_state_dict(state, strict=True)
    return dst.to(next(iter(state.values())).dtype if state else None).eval()


def from_diffusers(module: nn.Module) -> nn.Module:
    """The course's equivalent of a diffusers ``AutoencoderKL`` or
    ``UNet2DConditionModel``, holding its weights."""
    import diffusers

    if isinstance(module, diffusers.AutoencoderKL):
        return _copy_weights(module, AutoencoderKL(AutoencoderConfig.from_diffusers(dict(module.config))))
    if isinstance(module, diffusers.UNet2DConditionModel):
        return _copy_weights(module, UNet(unet_config_from_diffusers(module.config)))
    if isinstance(module, diffusers.SD3Transformer2DModel):
        return _copy_weights(module, MMDiT(MMDiTConfig.from_diffusers(dict(module.config))))
    raise ValueError(
        f"from_diffusers converts diffusers.AutoencoderKL, UNet2DConditionModel or "
        f"SD3Transformer2DModel, got {type(module).__name__}"
    )


def to_diffusers(module: nn.Module) -> nn.Module:
    """The diffusers equivalent of the course's ``AutoencoderKL`` or ``UNet``, holding its weights."""
    import diffusers

    if isinstance(module, AutoencoderKL):
        return _copy_weights(module, diffusers.AutoencoderKL(**module.config.to_diffusers()))
    if isinstance(module, UNet):
        reference = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(module.config))
        return _copy_weights(module, reference)
    if isinstance(module, MMDiT):
        return _copy_weights(module, diffusers.SD3Transformer2DModel(**module.config.to_diffusers()))
    raise ValueError(
        f"to_diffusers converts common.autoencoder.AutoencoderKL, common.unet.UNet or "
        f"common.mmdit.MMDiT, got {type(module).__name__}"
    )


def from_transformers(module: nn.Module) -> nn.Module:
    """The course's CLIP text model from a transformers ``CLIPTextModel``, holding its weights."""
    import transformers

    if not isinstance(module, transformers.CLIPTextModel):
        raise ValueError(
            f"from_transformers converts transformers.CLIPTextModel, got {type(module).__name__}"
        )
    ours = CLIPTextModel(CLIPTextConfig.from_transformers(module.config))
    ours.load_state_dict(normalize_clip_keys(module.state_dict()), strict=True)
    return ours.to(next(module.parameters()).dtype).eval()


def to_transformers(module: nn.Module) -> nn.Module:
    """A transformers ``CLIPTextModel`` holding the weights of the course's CLIP text model."""
    import transformers

    if not isinstance(module, CLIPTextModel):
        raise ValueError(
            f"to_transformers converts common.text_encoder.CLIPTextModel, got {type(module).__name__}"
        )
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**module.config.to_transformers()))
    state = normalize_clip_keys(module.state_dict())
    ref_keys = set(ref.state_dict())
    if not (set(state) <= ref_keys):  # an older transformers keeps the `text_model.` prefix
        state = {f"text_model.{k}": v for k, v in state.items()}
    ref.load_state_dict(state, strict=False)
    missing = sorted(
        ref_keys - set(state) - {"text_model.embeddings.position_ids", "embeddings.position_ids"}
    )
    if missing:
        raise ValueError(f"transformers' CLIPTextModel has parameters the course model lacks: {missing[:5]}")
    return ref.to(next(module.parameters()).dtype).eval()
