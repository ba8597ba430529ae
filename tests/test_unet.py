"""The UNet: diffusers' parameter layout for every preset, the same outputs with the same weights, the config
round trip, timestep handling, bad input and gradient checkpointing."""

import inspect
import math
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from common.attention import attention_backend, attention_maps_to_image, capture_attention_maps
from common.convert import (
    UNET_DIFFUSERS_DEFAULTS,
    UNET_FIXED_OPTIONS,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from common.unet import UNet, UNetConfig
from common.unet_blocks import ResnetBlock2D, timestep_embedding

PRESETS = ["tiny", "digits", "shapes_uncond", "shapes_text", "shapes_text_gpu", "sd15"]


def assert_close_to_ref(ours: torch.Tensor, ref: torch.Tensor):
    """The course's parity bar: max |ours - ref| <= 1e-4 * max(1, max |ref|)."""
    assert ours.shape == ref.shape
    bound = 1e-4 * max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= bound


def inputs(cfg: UNetConfig, batch: int = 2, size: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = size or cfg.sample_size
    z_t = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([10, 700][:batch] + [0] * max(0, batch - 2))
    context = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g) if cfg.has_cross_attention else None
    labels = torch.arange(batch) % cfg.num_class_embeds if cfg.num_class_embeds else None
    return z_t, t, context, labels


def reference_pair(cfg: UNetConfig, seed: int = 0, scale: float | None = 0.05):
    """diffusers' model with random weights (every tensor redrawn, so no zero-initialised layer hides a
    mistake), and ours holding the same weights."""
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**unet_config_to_diffusers(cfg)).eval()
    if scale is not None:
        with torch.no_grad():
            for name, p in ref.named_parameters():
                gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # norms scale around 1
                p.copy_(gain + torch.randn_like(p) * scale)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("preset", PRESETS)
def test_parameter_names_and_shapes_equal_diffusers(preset):
    cfg = getattr(UNetConfig, preset)()
    with torch.device("meta"):  # shapes only: no memory, even for SD 1.5
        ours, ref = UNet(cfg), UNet2DConditionModel(**unet_config_to_diffusers(cfg))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert unet_config_from_diffusers(ref.config) == cfg  # and the config comes back from diffusers' own


def test_sd15_parameter_count():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_sd15_config_json_reads_as_the_preset():
    # runwayml/stable-diffusion-v1-5 unet/config.json, as shipped (keys at diffusers' defaults are left out)
    config_json = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    cfg = unet_config_from_diffusers(config_json)
    assert cfg == UNetConfig.sd15()
    assert cfg.heads_per_level == (8, 8, 8, 8)  # "attention_head_dim": 8 means 8 heads (diffusers' quirk)


def test_config_tables_match_diffusers_signature():
    defaults = {
        name: p.default
        for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
        if name != "self"
    }
    for key, value in {**UNET_DIFFUSERS_DEFAULTS, **UNET_FIXED_OPTIONS}.items():
        assert defaults[key] == value, key


def test_num_attention_heads_and_to_diffusers():
    cfg = replace(UNetConfig.tiny(), attention_head_dim=99, num_attention_heads=2)
    assert cfg.heads_per_level == (2, 2)  # the explicit field wins
    kwargs = unet_config_to_diffusers(cfg)
    assert kwargs["attention_head_dim"] == 2 and "num_attention_heads" not in kwargs
    back = unet_config_from_diffusers({"num_attention_heads": None, **unet_config_to_diffusers(cfg)})
    assert back.heads_per_level == cfg.heads_per_level


def test_config_errors_name_the_choices():
    with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
        UNetConfig(down_block_types=("AttnDownBlock2D",) * 4)
    with pytest.raises(ValueError, match="UNetMidBlock2D"):
        UNetConfig(mid_block_type="UNetMidBlock2DSimpleCrossAttn")
    with pytest.raises(ValueError, match="cross_attention_dim"):
        UNetConfig(cross_attention_dim=None)
    with pytest.raises(ValueError, match="act_fn"):
        unet_config_from_diffusers({"act_fn": "gelu"})
    with pytest.raises(ValueError, match="unknown"):
        unet_config_from_diffusers({"attention_heads": 8})


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 320), (False, 1, 32), (True, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    t = torch.tensor([0, 1, 250, 999])
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    torch.testing.assert_close(timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift), ref)


@pytest.mark.parametrize("preset", ["tiny", "digits", "shapes_uncond", "shapes_text"])
def test_parity_with_diffusers(preset):
    cfg = getattr(UNetConfig, preset)()
    ours, ref = reference_pair(cfg)
    z_t, t, context, labels = inputs(cfg)
    # diffusers requires encoder_hidden_states even where no block reads it: a dummy, checked to be ignored
    ref_context = context if context is not None else torch.randn(2, 7, 1280)
    with torch.no_grad():
        expected = ref(z_t, t, encoder_hidden_states=ref_context, class_labels=labels).sample
        if context is None:
            other = ref(z_t, t, encoder_hidden_states=torch.zeros(2, 3, 1280), class_labels=labels).sample
            torch.testing.assert_close(other, expected)
        for backend in ("math", "sdpa", "sliced"):
            with attention_backend(backend, slice_size=50):
                assert_close_to_ref(ours(z_t, t, context, labels), expected)


def test_linear_projection_and_deeper_transformers_match_diffusers():
    cfg = replace(
        UNetConfig.tiny(),
        use_linear_projection=True,
        transformer_layers_per_block=(2, 1),
        attention_head_dim=(2, 4),
        flip_sin_to_cos=False,
        freq_shift=1,
    )
    ours, ref = reference_pair(cfg)
    z_t, t, context, labels = inputs(cfg, size=8)
    with torch.no_grad():
        assert_close_to_ref(ours(z_t, t, context), ref(z_t, t, encoder_hidden_states=context).sample)


@pytest.mark.slow
def test_parity_sd15():
    cfg = UNetConfig.sd15()
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**unet_config_to_diffusers(cfg)).eval()
    with torch.device("meta"):
        ours = UNet(cfg)
    # assign=True shares diffusers' tensors instead of copying them: one SD-sized model in memory, not two
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    g = torch.Generator().manual_seed(0)
    z_t, context = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        expected = ref(z_t, torch.tensor([500]), encoder_hidden_states=context).sample
        got = ours(z_t, 500, context)
    assert_close_to_ref(got, expected)


def test_timestep_forms_agree():
    cfg = UNetConfig.tiny()
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    z_t, _, context, _ = inputs(cfg, size=8)
    with torch.no_grad():
        ref = unet(z_t, torch.tensor([250, 250]), context)
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250]), torch.tensor([250.0, 250.0])):
            torch.testing.assert_close(unet(z_t, t, context), ref)
        with pytest.raises(ValueError, match=r"\(2,\)"):
            unet(z_t, torch.tensor([1, 2, 3]), context)


def test_bad_input_errors():
    torch.manual_seed(0)
    text = UNet(UNetConfig.tiny()).eval()
    z_t, t, context, _ = inputs(text.config)
    with pytest.raises(ValueError, match="32"):
        text(z_t, t, torch.randn(2, 7, 48))  # context of the wrong width
    with pytest.raises(ValueError, match="context"):
        text(z_t, t)  # a text UNet without its text
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        text(torch.randn(2, 3, 16, 16), t, context)  # wrong latent channels
    digits = UNet(UNetConfig.digits()).eval()
    z_t, t, _, labels = inputs(digits.config)
    with pytest.raises(ValueError, match="num_class_embeds=10"):
        digits(z_t, t)  # class labels missing
    with pytest.raises(ValueError, match="no cross-attention"):
        digits(z_t, t, torch.randn(2, 7, 768), labels)
    with pytest.raises(ValueError, match="not class-conditional"):
        text(z_t, t, context, class_labels=labels)


def test_class_labels_change_the_prediction():
    torch.manual_seed(0)
    cfg = UNetConfig.digits()
    unet, _ = reference_pair(cfg)
    z_t, t, _, _ = inputs(cfg)
    with torch.no_grad():
        a = unet(z_t, t, class_labels=torch.tensor([0, 0]))
        b = unet(z_t, t, class_labels=torch.tensor([0, 1]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = UNetConfig.tiny()
    unet, _ = reference_pair(cfg)
    unet.train()
    z_t, t, context, _ = inputs(cfg, size=8)

    def grads():
        unet.zero_grad()
        unet(z_t, t, context).square().mean().backward()
        return {name: p.grad.clone() for name, p in unet.named_parameters()}

    plain = grads()
    calls = []
    resnet = next(m for m in unet.modules() if isinstance(m, ResnetBlock2D))
    hook = resnet.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: recompute may stop early
    unet.enable_gradient_checkpointing()
    checkpointed = grads()
    hook.remove()
    unet.disable_gradient_checkpointing()
    assert len(calls) == 2  # the block ran again during backward: it was checkpointed
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_capture_on_the_unet():
    cfg = UNetConfig.tiny()
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    z_t, t, context, _ = inputs(cfg)
    with torch.no_grad(), capture_attention_maps(unet) as maps:
        unet(z_t, t, context)
    # tiny: one cross-attention layer at 16x16 (down), one in the middle at 8x8, two at 16x16 (up)
    assert {name: calls[0].shape for name, calls in maps.items()} == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2": (2, 4, 256, 7),
        "mid_block.attentions.0.transformer_blocks.0.attn2": (2, 4, 64, 7),
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2": (2, 4, 256, 7),
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2": (2, 4, 256, 7),
    }
    image = attention_maps_to_image(maps, (16, 16))
    assert image.shape == (2, 7, 16, 16)
    torch.testing.assert_close(image.sum(1), torch.ones(2, 16, 16))
    assert math.isclose(float(image.mean()), 1 / 7, rel_tol=1e-5)


@pytest.mark.parametrize("preset,size", [("tiny", (15, 16)), ("shapes_text", (9, 14))])
def test_sides_that_do_not_halve_evenly_match_diffusers(preset, size):
    # diffusers forwards the skip's size to each upsampler when H or W is not a multiple of 2**(levels-1)
    # (SD 1.5 at 520 px: a 65 x 65 latent); the course UNet always upsamples to the skip's size
    cfg = getattr(UNetConfig, preset)()
    ours, ref = reference_pair(cfg)
    z_t, t, context, labels = inputs(cfg)
    z_t = torch.randn(z_t.shape[0], cfg.in_channels, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(z_t, t, encoder_hidden_states=context, class_labels=labels).sample
        got = ours(z_t, t, context, labels)
    assert got.shape == z_t.shape[:1] + (cfg.out_channels,) + tuple(size)
    assert_close_to_ref(got, expected)
