"""Attention: the three backends agree, the modules equal diffusers' with the same weights,
capture and chunking."""

import pytest
import torch
import torch.nn.functional as F

from common.attention import (
    BACKENDS,
    FeedForward,
    MultiHeadAttention,
    SpatialTransformer,
    TransformerBlock,
    attention,
    attention_backend,
    attention_maps_to_image,
    attention_math,
    attention_sliced,
    capture_attention_maps,
    cross_attention_layers,
    get_attention_backend,
    set_attention_backend,
    set_chunk_feed_forward,
)


def assert_close_to_ref(ours: torch.Tensor, ref: torch.Tensor):
    """The course's parity bar: max |ours - ref| <= 1e-4 * max(1, max |ref|)."""
    assert ours.shape == ref.shape
    bound = 1e-4 * max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= bound


def qkv(n_q: int, n_k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, h, d = 2, 3, 8
    return (
        torch.randn(B, h, n_q, d, generator=g),
        torch.randn(B, h, n_k, d, generator=g),
        torch.randn(B, h, n_k, d, generator=g),
    )


def masks(n_q: int, n_k: int):
    """None, a key-padding mask (B, 1, 1, N_k) and a full (B, h, N_q, N_k) mask; no row is fully masked."""
    g = torch.Generator().manual_seed(1)
    padding = torch.zeros(2, 1, 1, n_k)
    padding[1, ..., n_k // 2 :] = float("-inf")  # the second sample ignores its last keys
    full = torch.where(torch.rand(2, 3, n_q, n_k, generator=g) < 0.3, float("-inf"), 0.0)
    full[..., 0] = 0.0  # keep one key per row
    return [None, padding, full]


@pytest.mark.parametrize("n_q,n_k", [(17, 17), (17, 5)], ids=["self", "cross"])
@pytest.mark.parametrize("mask_index", [0, 1, 2], ids=["no-mask", "padding-mask", "full-mask"])
def test_backends_agree(n_q, n_k, mask_index):
    q, k, v = qkv(n_q, n_k)
    mask = masks(n_q, n_k)[mask_index]
    ref = attention_math(q, k, v, mask)
    torch.testing.assert_close(attention(q, k, v, mask, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        attention_sliced(q, k, v, 4, mask), ref, atol=1e-5, rtol=1e-5
    )  # 4 does not divide 17
    for backend in BACKENDS:
        with attention_backend(backend, slice_size=5):
            torch.testing.assert_close(attention(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)


def test_backend_switch_restores_and_rejects():
    before = get_attention_backend()
    with attention_backend("sliced", slice_size=7):
        assert get_attention_backend() == ("sliced", 7)
    assert get_attention_backend() == before
    with pytest.raises(ValueError, match="math"):
        set_attention_backend("flash")
    with pytest.raises(ValueError, match="slice_size"):
        set_attention_backend("sliced", slice_size=0)


@pytest.mark.parametrize("context_dim", [None, 12], ids=["self", "cross"])
def test_multi_head_attention_against_sdpa_by_hand(context_dim):
    torch.manual_seed(0)
    B, N_q, N_k, D, h, d = 2, 9, 5, 16, 4, 6
    attn = MultiHeadAttention(query_dim=D, context_dim=context_dim, heads=h, dim_head=d).eval()
    x = torch.randn(B, N_q, D)
    context = torch.randn(B, N_k, context_dim) if context_dim else x
    # the same computation with the projections written out and PyTorch's own attention
    q = (x @ attn.to_q.weight.T).view(B, N_q, h, d).transpose(1, 2)  # (B, h, N_q, d)
    k = (context @ attn.to_k.weight.T).view(B, -1, h, d).transpose(1, 2)  # (B, h, N_k, d)
    v = (context @ attn.to_v.weight.T).view(B, -1, h, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N_q, h * d)  # (B, N_q, h*d)
    ref = out @ attn.to_out[0].weight.T + attn.to_out[0].bias
    assert attn.to_q.bias is None and attn.to_k.bias is None and attn.to_v.bias is None
    for backend in BACKENDS:
        with attention_backend(backend, slice_size=4):
            got = attn(x, context if context_dim else None)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_multi_head_attention_bad_context():
    attn = MultiHeadAttention(query_dim=16, context_dim=12, heads=2, dim_head=8)
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="12"):
        attn(x, torch.randn(1, 3, 10))  # wrong width
    with pytest.raises(ValueError, match="cross-attention"):
        attn(x)  # cross-attention without a context


def test_transformer_block_matches_diffusers():
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    dim, heads, dim_head, context_dim = 32, 4, 8, 24
    ref = BasicTransformerBlock(
        dim, heads, dim_head, cross_attention_dim=context_dim, activation_fn="geglu"
    ).eval()
    ours = TransformerBlock(dim=dim, heads=heads, dim_head=dim_head, context_dim=context_dim).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, context = torch.randn(2, 10, dim), torch.randn(2, 7, context_dim)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=context)
        for backend in BACKENDS:
            with attention_backend(backend, slice_size=3):
                assert_close_to_ref(ours(x, context), expected)


@pytest.mark.parametrize("linear", [False, True], ids=["conv-proj", "linear-proj"])
def test_spatial_transformer_matches_diffusers(linear):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    channels, heads, context_dim = 32, 4, 24
    ref = Transformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=channels // heads,
        in_channels=channels,
        num_layers=2,
        cross_attention_dim=context_dim,
        norm_num_groups=8,
        use_linear_projection=linear,
    ).eval()
    with torch.no_grad():  # diffusers may zero-initialise some projections: give every weight a value
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ours = SpatialTransformer(
        channels=channels,
        heads=heads,
        dim_head=channels // heads,
        context_dim=context_dim,
        depth=2,
        norm_num_groups=8,
        use_linear_projection=linear,
    ).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, context = torch.randn(2, channels, 6, 4), torch.randn(2, 7, context_dim)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=context).sample
        assert_close_to_ref(ours(x, context), expected)


def small_transformer():
    torch.manual_seed(0)
    return SpatialTransformer(
        channels=16, heads=2, dim_head=8, context_dim=12, depth=2, norm_num_groups=4
    ).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_shapes_rows_and_output(backend):
    model = small_transformer()
    x, context = torch.randn(3, 16, 4, 6), torch.randn(3, 5, 12)
    with torch.no_grad(), attention_backend(backend, slice_size=7):
        plain = model(x, context)
        with capture_attention_maps(model) as maps:
            captured = model(x, context)
            model(x, context)  # a second call appends a second entry
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)  # capture does not change the output
    assert list(maps) == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]  # cross-attention only
    for calls in maps.values():
        assert len(calls) == 2
        weights = calls[0]
        assert weights.shape == (3, 2, 4 * 6, 5)  # (B, heads, N_q = H*W, N_k)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 24))
    assert all(
        layer.captured is None for layer in cross_attention_layers(model).values()
    )  # switched off on exit

    image = attention_maps_to_image(maps, (8, 12))
    assert image.shape == (3, 5, 8, 12)  # (B, N_k, H, W)
    torch.testing.assert_close(
        image.sum(1), torch.ones(3, 8, 12)
    )  # per pixel, still a distribution over tokens


def test_capture_layer_selection_and_errors():
    model = small_transformer()
    x, context = torch.randn(1, 16, 4, 4), torch.randn(1, 5, 12)
    with torch.no_grad(), capture_attention_maps(model, layers=["transformer_blocks.1.attn2"]) as maps:
        model(x, context)
    assert list(maps) == ["transformer_blocks.1.attn2"]
    with pytest.raises(ValueError, match="transformer_blocks.0.attn2"):
        with capture_attention_maps(model, layers=["transformer_blocks.0.attn1"]):
            pass
    with pytest.raises(ValueError, match="no cross-attention"):
        with capture_attention_maps(FeedForward(dim=4)):
            pass
    with pytest.raises(ValueError, match="no attention maps"):
        attention_maps_to_image({"a": []}, (4, 4))


@pytest.mark.parametrize("chunk_size,dim", [(5, 1), (1, 0)], ids=["tokens", "batch"])
def test_chunked_feed_forward_is_unchanged(chunk_size, dim):
    model = small_transformer()
    x, context = torch.randn(2, 16, 4, 6), torch.randn(2, 5, 12)
    with torch.no_grad():
        plain = model(x, context)
        assert (
            set_chunk_feed_forward(model, chunk_size, dim=dim) == 2
        )  # 24 tokens in chunks of 5: a remainder
        chunked = model(x, context)
        set_chunk_feed_forward(model, None)
        assert all(block.chunk_size is None for block in model.transformer_blocks)
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="dim"):
        set_chunk_feed_forward(model, 4, dim=2)
    with pytest.raises(ValueError, match="chunk_size"):
        set_chunk_feed_forward(model, 0)
