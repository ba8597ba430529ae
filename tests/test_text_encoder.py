"""CLIP text encoder: parity with transformers.CLIPTextModel, conversion, key prefixes, bad inputs."""

import pytest
import torch
import transformers

from common.attention import attention_backend
from common.text_encoder import (
    CLIPTextConfig,
    CLIPTextModel,
    add_text_model_prefix,
    normalize_clip_keys,
)
from common.weights import count_parameters

# SD 1.5's text_encoder/config.json (written by transformers 4.x), as a learner's folder holds it
SD15_TEXT_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}


def reference(cfg: CLIPTextConfig) -> transformers.CLIPTextModel:
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_transformers())).eval()


def padded_batch(cfg: CLIPTextConfig, lengths=(9, 77), N=77, seed=0):
    """Two rows like a tokenizer makes: bos, words, eos, then eos padding (SD) - eos is the largest id when
    the config uses the legacy argmax rule."""
    g = torch.Generator().manual_seed(seed)
    eos = cfg.vocab_size - 1 if cfg.eos_token_id == 2 else cfg.eos_token_id
    bos = cfg.vocab_size - 2 if cfg.eos_token_id == 2 else cfg.bos_token_id
    ids = torch.full((len(lengths), N), eos, dtype=torch.long)
    mask = torch.zeros(len(lengths), N, dtype=torch.long)
    for b, n in enumerate(lengths):
        words = torch.randint(4, cfg.vocab_size - 2, (n - 2,), generator=g)
        words[words == eos] = 5
        ids[b, 0], ids[b, 1 : n - 1], ids[b, n - 1] = bos, words, eos
        mask[b, :n] = 1
    return ids, mask


def assert_parity(out, ref_out):
    for name in ("last_hidden_state", "pooler_output"):
        ours, theirs = getattr(out, name), getattr(ref_out, name)
        assert ours.shape == theirs.shape, name
        tol = 1e-4 * max(1.0, theirs.abs().max().item())
        assert (ours - theirs).abs().max().item() <= tol, name


def test_vit_l14_parameter_count_and_names():
    cfg = CLIPTextConfig.vit_l14()
    with torch.device("meta"):
        ours, ref = CLIPTextModel(cfg), reference(cfg)
    assert count_parameters(ours) == 123_060_480
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert not any(k.startswith("text_model.") for k in ours.state_dict())


@pytest.mark.parametrize("backend", ["math", "sdpa", "sliced"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_tiny_parity_with_transformers(backend, with_mask):
    torch.manual_seed(0)
    cfg = CLIPTextConfig.tiny()
    ref = reference(cfg)
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ids, mask = padded_batch(cfg)
    mask = mask if with_mask else None
    with torch.no_grad(), attention_backend(backend, slice_size=16):
        assert_parity(ours(ids, attention_mask=mask), ref(ids, attention_mask=mask))


def test_legacy_eos_pools_at_argmax():
    torch.manual_seed(1)
    cfg = CLIPTextConfig(**{**CLIPTextConfig.tiny().to_transformers(), "eos_token_id": 2, "bos_token_id": 0})
    ref = reference(cfg)
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    ids, _ = padded_batch(cfg, lengths=(5, 30), N=40)
    with torch.no_grad():
        out = ours(ids)
        assert_parity(out, ref(ids))
    # the first position holding the largest id (the eos right after the words)
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), torch.tensor([4, 29])])


@pytest.mark.slow
def test_vit_l14_parity_with_transformers():
    torch.manual_seed(0)
    cfg = CLIPTextConfig.vit_l14()
    ref = reference(cfg)
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ids, _ = padded_batch(cfg)
    with torch.no_grad():
        assert_parity(ours(ids), ref(ids))


def test_config_round_trips():
    for cfg in (CLIPTextConfig.vit_l14(), CLIPTextConfig.tiny(), CLIPTextConfig.shapes(40)):
        hf = transformers.CLIPTextConfig(**cfg.to_transformers())
        assert CLIPTextConfig.from_transformers(hf) == cfg
        assert CLIPTextConfig.from_transformers(hf.to_dict()) == cfg
    assert CLIPTextConfig.from_transformers(SD15_TEXT_CONFIG) == CLIPTextConfig.vit_l14()
    # a full CLIPConfig (openai/clip-vit-large-patch14's config.json) carries the text tower inside
    assert (
        CLIPTextConfig.from_transformers({"text_config": SD15_TEXT_CONFIG, "vision_config": {}})
        == CLIPTextConfig.vit_l14()
    )


def test_weights_round_trip_both_ways():
    torch.manual_seed(2)
    cfg = CLIPTextConfig.tiny()
    ours = CLIPTextModel(cfg).eval()
    ref = reference(cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)  # ours -> transformers
    back = CLIPTextModel(CLIPTextConfig.from_transformers(ref.config)).eval()
    back.load_state_dict(ref.state_dict(), strict=True)  # transformers -> ours
    ids, _ = padded_batch(cfg)
    with torch.no_grad():
        assert_parity(ours(ids), ref(ids))
        assert torch.equal(ours(ids).last_hidden_state, back(ids).last_hidden_state)


def test_state_dict_with_and_without_text_model_prefix():
    torch.manual_seed(3)
    cfg = CLIPTextConfig.tiny()
    src = CLIPTextModel(cfg)
    plain = src.state_dict()
    # what transformers 4 wrote (SD 1.5's text_encoder): prefixed keys plus the position_ids buffer
    v4 = add_text_model_prefix(plain)
    v4["text_model.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    assert all(k.startswith("text_model.") for k in v4)
    assert normalize_clip_keys(v4).keys() == plain.keys()
    assert normalize_clip_keys(plain).keys() == plain.keys()
    for sd in (plain, v4):
        dst = CLIPTextModel(cfg)
        dst.load_state_dict_any_prefix(sd)
        assert all(torch.equal(dst.state_dict()[k], plain[k]) for k in plain)


def test_bad_inputs_raise_value_errors():
    cfg = CLIPTextConfig.tiny()
    model = CLIPTextModel(cfg)
    with pytest.raises(ValueError, match=r"\[0, 98\]"):
        model(torch.tensor([[0, cfg.vocab_size]]))
    with pytest.raises(ValueError, match="max_position_embeddings=77"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="quick_gelu"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="multiple"):
        CLIPTextConfig(hidden_size=100, num_attention_heads=12)


def test_shapes_preset_reads_shapes_tokens():
    from common.tokenizer import ShapesTokenizer

    torch.manual_seed(4)
    tok = ShapesTokenizer.for_shapes()
    cfg = CLIPTextConfig.shapes()
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.vocab_size,
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings) == (
        256,
        4,
        4,
        32,
    )
    model = CLIPTextModel(cfg).eval()
    ids = tok(["a red circle", ""])
    with torch.no_grad():
        out = model(ids)
    assert out.last_hidden_state.shape == (2, tok.context_length, 256)
    # pooled at the eos: position 4 for "<bos> a red circle <eos>", 1 for the empty prompt
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), torch.tensor([4, 1])])
