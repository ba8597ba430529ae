"""Moving weights between the course's modules and diffusers / transformers.

Because the course's AutoencoderKL, UNet, MMDiT and CLIP text model have exactly the parameter names and
shapes of diffusers' ``AutoencoderKL``, ``UNet2DConditionModel``, ``SD3Transformer2DModel`` and transformers'
``CLIPTextModel`` for the same
configuration, conversion is two steps: translate the config, then ``load_state_dict(strict=True)``.
Nothing is renamed, so nothing can be renamed wrongly; a strict load fails loudly on any mismatch.

    ours = from_diffusers(diffusers_vae)       # -> common.autoencoder.AutoencoderKL
    ref  = to_diffusers(ours)                  # -> diffusers.AutoencoderKL with the same weights
    clip = from_transformers(hf_text_model)    # -> common.text_encoder.CLIPTextModel

The single-file SD checkpoints with the original CompVis key names are handled in ``common.pipeline``.
"""

from __future__ import annotations

from torch import nn


def _copy_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    state = src.state_dict()
    dst_state = dst.state_dict()
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(dst_state[k].shape)}"
        for k in dst_state
        if k in state and state[k].shape != dst_state[k].shape
    ]
    if wrong:
        raise ValueError(
            f"parameter shapes differ between {type(src).__name__} and {type(dst).__name__}: {wrong[:5]}"
        )
    dst.load_state_dict(state, strict=True)
    return dst.to(next(iter(state.values())).dtype if state else None).eval()


def from_diffusers(module: nn.Module) -> nn.Module:
    """The course's equivalent of a diffusers ``AutoencoderKL`` or
    ``UNet2DConditionModel``, holding its weights."""
    import diffusers

    if isinstance(module, diffusers.AutoencoderKL):
        from common.autoencoder import AutoencoderConfig, AutoencoderKL

        return _copy_weights(module, AutoencoderKL(AutoencoderConfig.from_diffusers(dict(module.config))))
    if isinstance(module, diffusers.UNet2DConditionModel):
        from common.unet import UNet, UNetConfig

        return _copy_weights(module, UNet(UNetConfig.from_diffusers(dict(module.config))))
    if isinstance(module, diffusers.SD3Transformer2DModel):
        from common.mmdit import MMDiT, MMDiTConfig

        return _copy_weights(module, MMDiT(MMDiTConfig.from_diffusers(dict(module.config))))
    raise ValueError(
        f"from_diffusers converts diffusers.AutoencoderKL, UNet2DConditionModel or "
        f"SD3Transformer2DModel, got {type(module).__name__}"
    )


def to_diffusers(module: nn.Module) -> nn.Module:
    """The diffusers equivalent of the course's ``AutoencoderKL`` or ``UNet``, holding its weights."""
    import diffusers

    from common.autoencoder import AutoencoderKL
    from common.mmdit import MMDiT
    from common.unet import UNet

    if isinstance(module, AutoencoderKL):
        return _copy_weights(module, diffusers.AutoencoderKL(**module.config.to_diffusers()))
    if isinstance(module, UNet):
        return _copy_weights(module, diffusers.UNet2DConditionModel(**module.config.to_diffusers()))
    if isinstance(module, MMDiT):
        return _copy_weights(module, diffusers.SD3Transformer2DModel(**module.config.to_diffusers()))
    raise ValueError(
        f"to_diffusers converts common.autoencoder.AutoencoderKL, common.unet.UNet or "
        f"common.mmdit.MMDiT, got {type(module).__name__}"
    )


def from_transformers(module: nn.Module) -> nn.Module:
    """The course's CLIP text model from a transformers ``CLIPTextModel``, holding its weights."""
    import transformers

    from common.text_encoder import CLIPTextConfig, CLIPTextModel, normalize_clip_keys

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

    from common.text_encoder import CLIPTextModel, normalize_clip_keys

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
