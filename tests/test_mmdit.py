"""The course's MMDiT against diffusers' SD3Transformer2DModel: same parameter names and shapes for the same
config (SD 3 medium's too, counted on the meta device), same outputs with the same weights (square and
non-square latents, with and without QK RMS norm), and the building blocks' own properties."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from common.convert import from_diffusers, to_diffusers
from common.mmdit import MMDiT, MMDiTConfig, PatchEmbed, unpatchify

TINY = MMDiTConfig.tiny().to_diffusers()
CONFIGS = {
    "tiny": TINY,
    "qk_rms_norm": {**TINY, "qk_norm": "rms_norm"},
    "wider_3_layers": {
        **TINY,
        "num_layers": 3,
        "attention_head_dim": 12,
        "num_attention_heads": 3,
        "caption_projection_dim": 36,
        "patch_size": 1,
        "out_channels": 6,
        "sample_size": 6,
    },
}


def random_reference(config: dict, seed: int = 0) -> SD3Transformer2DModel:
    """diffusers' model with every weight random (its adaLN-Zero init would make the blocks identities)."""
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2 if p.ndim > 1 else 0.1)
    return ref


def inputs(config: dict, H: int, W: int, B: int = 2, L: int = 7):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, config["in_channels"], H, W, generator=g)
    context = torch.randn(B, L, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(B, config["pooled_projection_dim"], generator=g)
    t = torch.tensor([999.0, 312.5])[:B]  # flow-matching timesteps are floats (1000 sigma)
    return z, t, context, pooled


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("H, W", [(8, 8), (8, 12), (12, 6)])
def test_output_equals_diffusers(name, H, W):
    ref = random_reference(CONFIGS[name])
    ours = from_diffusers(ref)
    assert isinstance(ours, MMDiT)
    z, t, context, pooled = inputs(CONFIGS[name], H, W)
    with torch.no_grad():
        expected = ref(
            hidden_states=z, encoder_hidden_states=context, pooled_projections=pooled, timestep=t
        ).sample
        got = ours(z, t, context, pooled)
    assert got.shape == expected.shape == (2, CONFIGS[name]["out_channels"], H, W)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, scale)


def test_to_diffusers_round_trips_a_course_model():
    ours = MMDiT(MMDiTConfig.tiny())
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    ref = to_diffusers(ours)
    z, t, context, pooled = inputs(TINY, 8, 10)
    with torch.no_grad():
        expected = ref(
            hidden_states=z, encoder_hidden_states=context, pooled_projections=pooled, timestep=t
        ).sample
        torch.testing.assert_close(ours(z, t, context, pooled), expected, atol=1e-4, rtol=0)
    assert ours(z, 500.0, context, pooled).shape == z.shape  # a scalar t is shared by the batch


def test_positions_are_built_not_copied():
    """Our sine-cosine table, computed from scratch, equals the one diffusers registers for the config."""
    for config in CONFIGS.values():
        ours, ref = MMDiT(MMDiTConfig.from_diffusers(config)), SD3Transformer2DModel(**config)
        torch.testing.assert_close(ours.pos_embed.pos_embed, ref.pos_embed.pos_embed, atol=1e-6, rtol=0)


def test_sd3_medium_names_shapes_and_count_on_the_meta_device():
    with torch.device("meta"):
        ours = MMDiT(MMDiTConfig.sd3_medium())
        ref = SD3Transformer2DModel(**MMDiTConfig.sd3_medium().to_diffusers())
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert 2.0e9 < n < 2.1e9  # "SD3 Medium, a 2 billion parameter model"


def test_patchify_then_unpatchify_is_the_identity():
    p, C = 2, 3
    z = torch.randn(2, C, 6, 10)
    # patch (i, j) flattened in (row, col, channel) order: what proj_out's p*p*C outputs mean
    tokens = z.unfold(2, p, p).unfold(3, p, p)  # (B, C, h, w, p, p)
    tokens = tokens.permute(0, 2, 3, 4, 5, 1).reshape(2, 3 * 5, p * p * C)  # (B, N, p*p*C)
    torch.testing.assert_close(unpatchify(tokens, 3, 5, p, C), z, atol=0, rtol=0)


def test_adaln_zero_makes_a_fresh_block_the_identity():
    """With the adaLN linear layers zeroed (DiT's init) every gate is 0: the image stream passes unchanged."""
    ours = MMDiT(MMDiTConfig.tiny())
    block = ours.transformer_blocks[0]
    for norm in (block.norm1, block.norm1_context):
        torch.nn.init.zeros_(norm.linear.weight)
        torch.nn.init.zeros_(norm.linear.bias)
    x, c, c_vec = torch.randn(2, 16, 16), torch.randn(2, 5, 16), torch.randn(2, 16)
    x_out, c_out = block(x, c, c_vec)
    torch.testing.assert_close(x_out, x)
    torch.testing.assert_close(c_out, c)


def test_joint_attention_is_one_softmax_over_both_streams():
    """Each image query's attention weights over image and text keys together sum to one."""
    block = MMDiT(MMDiTConfig.tiny()).transformer_blocks[0].attn
    x, c = torch.randn(1, 6, 16), torch.randn(1, 4, 16)
    q = torch.cat([block.split_heads(block.to_q(x)), block.split_heads(block.add_q_proj(c))], dim=2)
    k = torch.cat([block.split_heads(block.to_k(x)), block.split_heads(block.add_k_proj(c))], dim=2)
    v = torch.cat([block.split_heads(block.to_v(x)), block.split_heads(block.add_v_proj(c))], dim=2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)  # (1, heads, 10, 10)
    torch.testing.assert_close(block.attention_weights(x, c), weights)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 10))
    expected = (weights @ v).transpose(1, 2).reshape(1, 10, 16)
    x_out, c_out = block(x, c)
    torch.testing.assert_close(x_out, block.to_out[0](expected[:, :6]))
    torch.testing.assert_close(c_out, block.to_add_out(expected[:, 6:]))
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), weights @ v)


def test_bad_config_and_input_say_what_is_expected():
    with pytest.raises(ValueError, match="caption_projection_dim=20 must equal"):
        MMDiTConfig(**{**TINY, "caption_projection_dim": 20})
    with pytest.raises(ValueError, match="dual_attention_layers"):
        MMDiTConfig.from_diffusers({**TINY, "dual_attention_layers": (0,)})
    with pytest.raises(ValueError, match="at most 16 per side"):
        embed = PatchEmbed(patch_size=2, in_channels=4, width=16, pos_embed_max_size=16, base_size=4)
        embed(torch.zeros(1, 4, 34, 8))
