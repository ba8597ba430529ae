"""Tokenizers: CLIP BPE (against transformers on a tiny local vocab) and the Shapes word-level tokenizer."""

import json
import warnings

import numpy as np
import pytest
import tokenizers
import torch
from transformers import CLIPTokenizer

from common import shapes
from common.tokenizer import ClipTokenizer, ShapesTokenizer, load_tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's printable stand-in for each of the 256 bytes (the BPE base alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP-style tokenizer/ folder: the byte alphabet (plain, word-final), a few merges, specials."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    chars = _bytes_to_unicode()
    merges = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("a", "n"), ("an", "d</w>")]
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


PROMPTS = ["a red cat", "", "A RED Cat, and a dog!", "it's 3 cats", " ".join(["red cat and"] * 30)]


def test_clip_matches_transformers(clip_folder):
    tok = ClipTokenizer.load(clip_folder)
    ref = CLIPTokenizer.from_pretrained(str(clip_folder))
    expected = ref(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
    assert torch.equal(ids, expected)
    assert tok.decode(ids[0]) == "a red cat"
    assert tok.decode(ids) == [ref.decode(row, skip_special_tokens=True) for row in expected.tolist()]


def test_clip_pads_with_eos_and_empty_prompt(clip_folder):
    tok = ClipTokenizer.load(clip_folder)
    assert (tok.context_length, tok.vocab_size) == (77, 520)
    assert tok.pad_id == tok.eos_id == 519 and tok.bos_id == 518  # SD: pad_token "<|endoftext|>"
    row = tok("")[0]
    assert row[0] == tok.bos_id and (row[1:] == tok.eos_id).all()
    row = tok("a red cat")[0]  # a, red, cat: 3 tokens, then eos padding
    assert row[0] == tok.bos_id and (row[4:] == tok.eos_id).all() and (row[1:4] != tok.eos_id).all()


def test_clip_truncation_warns_with_dropped_words(clip_folder):
    tok = ClipTokenizer.load(clip_folder)
    prompt = " ".join(["red"] * 75 + ["cat", "and"])  # 77 words: "cat" and "and" do not fit
    with pytest.warns(UserWarning, match=r"77-token context.*dropped: 'cat and'"):
        ids = tok(prompt)
    assert ids[0, -1] == tok.eos_id and ids.shape == (1, 77)


def test_clip_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ClipTokenizer.load(tmp_path / "tokenizer")
    assert str(tmp_path / "tokenizer") in str(err.value)
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5" in str(err.value)


def test_clip_save_load_round_trip(clip_folder, tmp_path):
    tok = ClipTokenizer.load(clip_folder, context_length=16)
    tok.save(tmp_path / "saved")
    back = load_tokenizer(tmp_path / "saved")
    assert isinstance(back, ClipTokenizer) and back.context_length == 16
    assert torch.equal(back(PROMPTS[:4]), tok(PROMPTS[:4]))


def test_empty_and_bad_batches_raise(clip_folder):
    for tok in (ClipTokenizer.load(clip_folder), ShapesTokenizer.for_shapes()):
        with pytest.raises(ValueError, match="at least one prompt"):
            tok([])
        with pytest.raises(ValueError, match=r"prompts\[1\] must be a str"):
            tok(["a red circle", 3])


def test_shapes_ids_padding_and_empty_prompt():
    tok = ShapesTokenizer.train(["A small red circle on the left", "two objects: a blue square"])
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocabulary[4:] == sorted(
        ["a", "small", "red", "circle", "on", "the", "left", "two", "objects", ":", "blue", "square"]
    )
    words = tok.vocabulary
    ids = tok(["a small RED circle", "", "two objects: a blue square"])
    assert ids.shape == (3, 24) and ids.dtype == torch.long
    assert [words[i] for i in ids[0, :6]] == ["<bos>", "a", "small", "red", "circle", "<eos>"]
    assert (ids[0, 6:] == tok.pad_id).all()
    assert ids[1, :2].tolist() == [tok.bos_id, tok.eos_id] and (ids[1, 2:] == tok.pad_id).all()
    assert tok.decode(ids) == ["a small red circle", "", "two objects: a blue square"]
    # the same words in any order give the same ids
    assert ShapesTokenizer.from_vocabulary(list(reversed(tok.vocabulary[4:]))).vocabulary == tok.vocabulary


def test_shapes_unknown_words_and_truncation_warn():
    tok = ShapesTokenizer.from_vocabulary(["a red circle"], context_length=6)
    with pytest.warns(UserWarning, match=r"\[UNK\]: \['pink'\]"):
        ids = tok("a pink circle")
    assert ids[0, 2] == tok.unk_id
    with pytest.warns(UserWarning, match=r"6-token context.*dropped: 'red circle'"):
        ids = tok("a red circle a red circle")  # bos + 4 words + eos fit; "red circle" does not
    assert tok.decode(ids[0]) == "a red circle a" and ids[0, -1] == tok.eos_id


def test_shapes_save_load_round_trip(tmp_path):
    tok = ShapesTokenizer.for_shapes(context_length=20)
    tok.save(tmp_path / "tok")
    assert [p.name for p in (tmp_path / "tok").iterdir()] == ["tokenizer.json"]
    back = load_tokenizer(tmp_path / "tok")
    assert isinstance(back, ShapesTokenizer) and back.context_length == 20
    assert back.vocabulary == tok.vocabulary
    prompt = "a large blue square to the left of a small green triangle"
    assert torch.equal(back(prompt), tok(prompt))
    # the file alone (tokenizers, no course code) pads and truncates the same way
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert raw.encode(prompt).ids == tok(prompt)[0].tolist()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ShapesTokenizer.load(tmp_path / "missing")


def test_shapes_covers_every_caption_of_the_grammar():
    tok = ShapesTokenizer.for_shapes()
    assert tok.vocab_size == 4 + len(shapes.vocabulary())
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no [UNK], no truncation
        for _ in range(30):
            scene = shapes.sample_scene(rng)
            for paraphrase in range(shapes.N_PARAPHRASES):
                caption = shapes.caption(scene, paraphrase)
                ids = tok(caption)
                assert tok.unk_id not in ids
                assert tok.decode(ids[0]) == caption
