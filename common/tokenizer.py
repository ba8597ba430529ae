"""Tokenizers: text -> a fixed-length row of token ids the text encoder reads.

Two tokenizers with one call interface, ``tok(prompts) -> LongTensor (B, context_length)``:

``ClipTokenizer``    CLIP's byte-pair encoding (Sennrich et al. 2016; Radford et al. 2021), SD 1.x's,
                     wrapped from transformers and loaded from a local ``tokenizer/`` folder (vocab.json +
                     merges.txt, or tokenizer.json). SD pads with the end-of-text token to 77.
``ShapesTokenizer``  a word-level tokenizer over the Shapes caption vocabulary (a few dozen words), built with
                     the ``tokenizers`` library and saved as one ``tokenizer.json`` beside the model it feeds.

Every row is ``<bos> w_1 ... w_n <eos> <pad> ...``: a prompt longer than the context keeps its first
``context_length - 2`` tokens and its ``<eos>`` (as transformers' truncation does), with a warning that names
the dropped words. ``""`` (classifier-free guidance's unconditional prompt) gives ``<bos> <eos> <pad> ...``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from common.shapes import vocabulary

SD_TOKENIZER_HINT = (
    'huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --include "tokenizer/*" '
    "--local-dir <dir>, then pass <dir>/tokenizer (`python -m common.weights fetch sd15` fetches it with "
    "the rest of SD 1.5)"
)


class Tokenizer:
    """The shared interface; subclasses supply ``_encode`` (ids with bos/eos, untruncated) and ``_decode``."""

    context_length: int
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """Token ids (B, context_length), long: bos, the prompt's tokens, eos, then pad up to the context."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError(
                'prompts is an empty list; expected at least one prompt (use "" for the unconditional prompt)'
            )
        L = self.context_length
        rows = []
        for i, text in enumerate(prompts):
            if not isinstance(text, str):
                raise ValueError(f"prompts[{i}] must be a str, got {type(text).__name__}")
            ids = self._encode(text)
            if len(ids) > L:
                dropped = self._decode(ids[L - 1 : -1])
                warnings.warn(
                    f"prompt {i} is longer than the {L}-token context and was truncated; "
                    f"dropped: {dropped!r}",
                    stacklevel=2,
                )
                ids = ids[: L - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (L - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # (B, L)

    def decode(self, ids) -> str | list[str]:
        """Text of a row (N,) or of each row of (B, N); bos, eos and pad are skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if len(ids) > 0 and isinstance(ids[0], (list, tuple)):
            return [self._decode(list(row)) for row in ids]
        return self._decode(list(ids))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"
        )


class ClipTokenizer(Tokenizer):
    """CLIP's BPE tokenizer (transformers' ``CLIPTokenizer``) with SD's settings: 77 tokens, eos padding."""

    def __init__(self, hf_tokenizer, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for bos and eos), got {context_length}")
        self._hf = hf_tokenizer
        self.context_length = context_length
        self.vocab_size = len(hf_tokenizer)
        self.bos_id = hf_tokenizer.bos_token_id
        self.eos_id = hf_tokenizer.eos_token_id
        # SD 1.x pads with <|endoftext|>; a folder without a pad token gets the same
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_id

    @classmethod
    def load(cls, directory: str | Path, context_length: int | None = None) -> ClipTokenizer:
        """From a local folder holding vocab.json + merges.txt (SD's ``tokenizer/``) or a tokenizer.json."""
        from transformers import CLIPTokenizer

        directory = Path(directory)
        has_bpe_files = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
        if not (has_bpe_files or (directory / "tokenizer.json").is_file()):
            raise FileNotFoundError(
                f"no CLIP tokenizer in {str(directory)!r}: expected vocab.json and merges.txt (or "
                f"tokenizer.json) there. Get SD 1.5's with: {SD_TOKENIZER_HINT}"
            )
        hf = CLIPTokenizer.from_pretrained(str(directory))
        if context_length is None:
            # a folder without tokenizer_config.json reports a huge sentinel length; CLIP's is 77
            context_length = hf.model_max_length if hf.model_max_length <= 4096 else 77
        return cls(hf, context_length)

    def save(self, directory: str | Path) -> None:
        """Writes transformers' files (tokenizer.json, tokenizer_config.json); ``load`` reads them back."""
        self._hf.model_max_length = self.context_length
        self._hf.save_pretrained(str(directory))

    def _encode(self, text: str) -> list[int]:
        # verbose=False: transformers' own "longer than model_max_length" notice; ours names the words
        return self._hf(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]

    def _decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=True)


PAD, UNK, BOS, EOS = "<pad>", "[UNK]", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3 in this order; eos is not 2, which CLIP pools by argmax
_SPACE_BEFORE_PUNCT = re.compile(r" ([^\w\s])")


def _normalizer():
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])


def _pre_tokenizer():
    # "two objects: a red circle" -> two | objects | : | a | red | circle
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def _split_words(text: str) -> list[str]:
    text = _normalizer().normalize_str(text)
    return [word for word, _ in _pre_tokenizer().pre_tokenize_str(text)]


class ShapesTokenizer(Tokenizer):
    """Word-level tokenizer for Shapes captions: lowercase, split on spaces and punctuation, one id per word.

    Ids: <pad> 0, [UNK] 1, <bos> 2, <eos> 3, then the vocabulary's words in sorted order (so the same
    words always get the same ids). A word outside the vocabulary becomes [UNK], with a warning.

    ``echo=True`` writes the prompt twice, ``<bos> w_1 ... w_n <eos> w_1 ... w_n <eos>`` (echo embeddings,
    Springer et al. 2024, "Repetition Improves Language Model Embeddings"): under the causal mask of a CLIP
    text encoder the first copy's token i sees only w_1..w_i, but the second copy's tokens see the whole
    prompt, so "square" in "a square left of a circle" can carry "left". The template lives in
    ``tokenizer.json``'s post-processor, so transformers' tokenizer of a saved folder
    (and diffusers' pipeline) echoes too.
    """

    def __init__(self, tokenizer: _HFTokenizer, context_length: int = 24):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for bos and eos), got {context_length}")
        for token in SPECIAL_TOKENS:
            if tokenizer.token_to_id(token) is None:
                raise ValueError(
                    f"the tokenizer lacks the special token {token!r}; expected all of {SPECIAL_TOKENS}"
                )
        tokenizer.no_truncation()  # truncation and padding are ours (warnings name the dropped words)
        tokenizer.no_padding()
        self._tk = tokenizer
        self.context_length = context_length
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        template = json.loads(tokenizer.to_str()).get("post_processor") or {}
        self.echo = sum("Sequence" in piece for piece in template.get("single", [])) == 2
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids

    @classmethod
    def from_vocabulary(cls, words, context_length: int = 24, echo: bool = False) -> ShapesTokenizer:
        """From the caption grammar's words (strings are lowercased and split like captions are)."""
        vocabulary = sorted({w for item in words for w in _split_words(item)} - set(SPECIAL_TOKENS))
        if not vocabulary:
            raise ValueError("the vocabulary is empty; expected at least one word")
        vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + vocabulary)}
        tk = _HFTokenizer(WordLevel(vocab, unk_token=UNK))
        tk.add_special_tokens(list(SPECIAL_TOKENS))  # known as special: decode skips them
        tk.normalizer = _normalizer()
        tk.pre_tokenizer = _pre_tokenizer()
        tk.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS} $A {EOS}" if echo else f"{BOS} $A {EOS}",
            special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
        )
        return cls(tk, context_length)

    @classmethod
    def train(cls, captions: list[str], context_length: int = 24) -> ShapesTokenizer:
        """Every word that occurs in ``captions`` (order and frequency do not change the ids)."""
        if isinstance(captions, str) or len(captions) == 0:
            raise ValueError("captions must be a non-empty list of str")
        return cls.from_vocabulary(captions, context_length)

    @classmethod
    def for_shapes(cls, context_length: int = 24, echo: bool = False) -> ShapesTokenizer:
        """The tokenizer for ``common.shapes``: every word its caption grammar can produce (42 ids in all;
        the longest caption is 12 words, so 24 tokens leave room for a learner's longer prompts; 27 with
        ``echo``)."""
        return cls.from_vocabulary(vocabulary(), context_length, echo)

    @property
    def vocabulary(self) -> list[str]:
        """The words, in id order (special tokens included)."""
        vocab = self._tk.get_vocab(with_added_tokens=True)
        return sorted(vocab, key=vocab.get)

    def _encode(self, text: str) -> list[int]:
        encoding = self._tk.encode(text)
        unknown = [w for w, i in zip(_split_words(text), encoding.ids[1:-1]) if i == self.unk_id]
        if unknown:
            warnings.warn(f"words outside the Shapes vocabulary became {UNK}: {unknown}", stacklevel=3)
        return encoding.ids

    def _decode(self, ids: list[int]) -> str:
        text = self._tk.decode(ids, skip_special_tokens=True)
        return _SPACE_BEFORE_PUNCT.sub(r"\1", text)

    def save(self, directory: str | Path) -> None:
        """``directory/tokenizer.json``, usable on its own: ``tokenizers.Tokenizer.from_file`` pads and
        truncates to the context length exactly as this class does (silently)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tk = _HFTokenizer.from_str(self._tk.to_str())
        tk.enable_truncation(max_length=self.context_length)
        tk.enable_padding(pad_id=self.pad_id, pad_token=PAD, length=self.context_length)
        tk.save(str(directory / "tokenizer.json"))

    @classmethod
    def load(cls, directory: str | Path) -> ShapesTokenizer:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no {path}; write one with ShapesTokenizer.save({str(directory)!r})")
        tk = _HFTokenizer.from_file(str(path))
        if tk.truncation is None:
            raise ValueError(f"{path} has no truncation length; expected one written by ShapesTokenizer.save")
        return cls(tk, tk.truncation["max_length"])


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Whichever tokenizer a folder holds: a Shapes word-level tokenizer.json or a CLIP BPE one."""
    path = Path(directory) / "tokenizer.json"
    if path.is_file() and json.loads(path.read_text())["model"]["type"] == "WordLevel":
        return ShapesTokenizer.load(directory)
    return ClipTokenizer.load(directory)
