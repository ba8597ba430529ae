"""The CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", section 2.4): the text tower Stable Diffusion conditions on.

It is a GPT-2-style pre-LN transformer (Radford et al. 2019) over byte-pair tokens:

    h_0    = E_tok[x] + E_pos                            token + learned position embeddings
    h'_l   = h_{l-1} + MHA(LN_1(h_{l-1}), causal mask)    pre-LN self-attention: each token sees its past
    h_l    = h'_l + W_2 quick_gelu(W_1 LN_2(h'_l))        pre-LN MLP, quick_gelu(a) = a * sigmoid(1.702 a)
    out    = LN_final(h_L)                                (B, N, width): what SD's cross-attention reads
    pooled = out[b, position of the end-of-text token]    (B, width): CLIP's sentence embedding

The parameter names and shapes equal transformers' ``CLIPTextModel`` (version 5: no ``text_model.`` prefix),
so ``load_state_dict(strict=True)`` moves weights across; ``normalize_clip_keys`` also accepts the
``text_model.``-prefixed files written by transformers 4 (Stable Diffusion 1.5's ``text_encoder/``).
Attention goes through ``common.attention.attention`` so the course's backends switch it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common.attention import attention
from common.tokenizer import ShapesTokenizer

HIDDEN_ACTS = ("quick_gelu", "gelu")


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408  # BPE vocabulary, including <|startoftext|> and <|endoftext|>
    hidden_size: int = 768  # width of every token's vector; SD's cross-attention context dim
    intermediate_size: int = 3072  # MLP hidden width, 4 x hidden_size as in GPT-2
    num_hidden_layers: int = 12  # transformer blocks
    num_attention_heads: int = 12  # heads; hidden_size must divide by it (head width 64 in CLIP)
    max_position_embeddings: int = 77  # learned positions = the longest token sequence the model reads
    hidden_act: str = "quick_gelu"  # OpenAI's CLIP used x*sigmoid(1.702x); SD 2's OpenCLIP uses exact "gelu"
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon, PyTorch's default
    bos_token_id: int = 0  # metadata only (the tokenizer adds it); kept so the config round-trips
    eos_token_id: int = 2  # 2 means the legacy rule: pool at argmax(input_ids) (see ``pool_positions``)
    pad_token_id: int = 1  # metadata only: the model never reads it, padding is handled by the tokenizer

    def __post_init__(self):
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")

    @classmethod
    def vit_l14(cls) -> CLIPTextConfig:
        """openai/clip-vit-large-patch14's text tower, the one SD 1.x uses: 123,060,480 parameters.

        Its config (and SD 1.5's ``text_encoder/config.json``) carries the pre-2023 ids bos 0, eos 2, pad 1,
        so the pooled output uses the legacy argmax rule; the real end-of-text id is 49407, the largest id.
        """
        return cls()

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """A few-thousand-parameter model for tests; uses the modern "first eos position" pooling rule."""
        return cls(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=97,
            eos_token_id=98,
            pad_token_id=1,
        )

    @classmethod
    def shapes(
        cls,
        vocab_size: int | None = None,
        *,
        bos_token_id: int = 2,
        eos_token_id: int = 3,
        pad_token_id: int = 0,
    ) -> CLIPTextConfig:
        """The course's small text encoder for Shapes captions: 3.2 M parameters at the Shapes vocabulary.

        ``vocab_size=None`` takes ``ShapesTokenizer.for_shapes().vocab_size`` (42); the id defaults are
        ``ShapesTokenizer``'s layout (<pad> 0, [UNK] 1, <bos> 2, <eos> 3). For another tokenizer pass its
        numbers: ``shapes(tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=
        tok.pad_id)``. 32 positions cover the tokenizer's 24-token context with room to spare.
        """
        if vocab_size is None:
            vocab_size = ShapesTokenizer.for_shapes().vocab_size
        return cls(
            vocab_size=vocab_size,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )

    @classmethod
    def from_transformers(cls, config) -> CLIPTextConfig:
        """From a ``transformers.CLIPTextConfig``, its ``to_dict()``, a ``config.json`` mapping, or a full
        ``CLIPConfig`` mapping (its ``text_config`` is used). Keys the text tower does not use are ignored."""
        if not isinstance(config, Mapping):
            if not hasattr(config, "to_dict"):
                raise ValueError(f"expected a mapping or a transformers config, got {type(config).__name__}")
            config = config.to_dict()
        if "text_config" in config and config["text_config"] is not None:
            config = config["text_config"]
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names and v is not None}
        if isinstance(kwargs.get("eos_token_id"), (list, tuple)):
            raise ValueError(f"eos_token_id must be a single int, got {kwargs['eos_token_id']!r}")
        return cls(**kwargs)

    def to_transformers(self) -> dict:
        """Keyword arguments for ``transformers.CLIPTextConfig``."""
        return asdict(self)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, N, width) after the final LayerNorm: SD's cross-attention context
    pooler_output: torch.Tensor  # (B, width) the final state at each sequence's end-of-text token


class CLIPTextEmbeddings(nn.Module):
    """h_0 = E_tok[x] + E_pos[0..N-1]."""

    def __init__(self, *, vocab_size: int, width: int, max_positions: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_positions, width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        N = input_ids.shape[1]
        positions = torch.arange(N, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, N, width)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (transformers' names)."""

    def __init__(self, *, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        h, d = self.heads, C // self.heads

        def split(t):  # (B, N, C) -> (B, h, N, d)
            return t.view(B, N, h, d).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = attention(q, k, v, mask)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.out_proj(out)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPMLP(nn.Module):
    def __init__(self, *, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """One pre-LN block: x + attn(LN_1 x), then x + mlp(LN_2 x)."""

    def __init__(self, *, width: int, heads: int, mlp_hidden: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = CLIPAttention(width=width, heads=heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width=width, hidden=mlp_hidden, act=act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(
                width=config.hidden_size,
                heads=config.num_attention_heads,
                mlp_hidden=config.intermediate_size,
                act=config.hidden_act,
                eps=config.layer_norm_eps,
            )
            for _ in range(config.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


def attention_bias(
    N: int, attention_mask: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The additive mask: 0 where token i may look at token j (j <= i, and j not padding), else a large
    negative number. Returns (1, 1, N, N), or (B, 1, N, N) with a padding ``attention_mask`` (B, N) of 1/0.

    The finite minimum (not -inf) keeps a row that padding masks entirely from turning into NaN.
    """
    keep = torch.ones(N, N, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, N, N) causal
    if attention_mask is not None:
        keep = keep & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, N, N)
    bias = torch.zeros(keep.shape, dtype=dtype, device=device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)


class CLIPTextModel(nn.Module):
    """The CLIP text transformer; ``forward(input_ids)`` returns ``CLIPTextOutput``."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(
            vocab_size=config.vocab_size,
            width=config.hidden_size,
            max_positions=config.max_position_embeddings,
        )
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2 style: small normal weights, zero biases (a training run from scratch starts here)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError("input_ids must be an integer (long) tensor of token ids, shape (B, N)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, N), got {tuple(input_ids.shape)}")
        B, N = input_ids.shape
        if B == 0 or N == 0:
            raise ValueError(
                f"input_ids is empty: shape {tuple(input_ids.shape)}; expected B >= 1 and N >= 1"
            )
        if N > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {N} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}; truncate prompts when tokenizing"
            )
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one read-back from a GPU, not two
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {cfg.vocab_size - 1}] (vocab_size="
                f"{cfg.vocab_size}), got ids in [{lo}, {hi}]; is the tokenizer the model's own?"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, N):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {(B, N)}, got {tuple(attention_mask.shape)}"
            )

    def pool_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where each sequence's end-of-text token sits, (B,), as transformers 5 decides it.

        eos_token_id == 2 (the legacy configs of openai/clip-* and SD 1.x): argmax(input_ids), since the
        end-of-text id 49407 is the largest in CLIP's vocabulary. Otherwise the first position holding
        eos_token_id (the pad token may equal eos, so "last" would be wrong).
        """
        ids = input_ids.to(torch.int)
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CLIPTextOutput:
        """input_ids: (B, N) token ids, N <= max_position_embeddings; attention_mask: optional (B, N) of 1 for
        tokens and 0 for padding (SD passes none: its padding tokens are attended to, causally)."""
        self._check(input_ids, attention_mask)
        B, N = input_ids.shape
        x = self.embeddings(input_ids)  # (B, N, width)
        mask = attention_bias(N, attention_mask, x.dtype, x.device)  # (1 or B, 1, N, N)
        x = self.encoder(x, mask)  # (B, N, width)
        x = self.final_layer_norm(x)
        eos_at = self.pool_positions(input_ids).to(x.device)  # (B,)
        pooled = x[torch.arange(B, device=x.device), eos_at]  # (B, width)
        return CLIPTextOutput(last_hidden_state=x, pooler_output=pooled)

    def load_state_dict_any_prefix(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """``load_state_dict`` that also takes transformers 4 files (``text_model.`` prefix, position_ids)."""
        return self.load_state_dict(normalize_clip_keys(state_dict), strict=strict)


TEXT_MODEL_PREFIX = "text_model."


def normalize_clip_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text state dict with transformers 5's names: strips the ``text_model.`` prefix that
    transformers 4 files carry (SD 1.5's ``text_encoder/model.safetensors``) and drops the
    ``embeddings.position_ids`` buffer that older versions saved. Keys already without it pass unchanged."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(TEXT_MODEL_PREFIX):
            key = key[len(TEXT_MODEL_PREFIX) :]
        if key == "embeddings.position_ids":
            continue
        out[key] = value
    return out


def add_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse for writing transformers 4 layout: ``text_model.`` before every key."""
    return {k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k: v for k, v in state_dict.items()}
