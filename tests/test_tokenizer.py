"""aim-mlx's CLIP tokenizer against transformers' CLIPTokenizer, on OpenAI's real BPE vocabulary."""

import json

import numpy as np
import pytest
from lit_checkpoints import write_clip_vocab
from transformers import CLIPTokenizer

from aim_mlx.errors import ConfigError
from aim_mlx.inputs.tokenizer import ClipTokenizer

TEXTS = [
    "a photo of a cat.",
    "A Photo Of A CAT",
    "  lots   of\twhite\nspace  ",
    "don't you'll we've she's I'm they'd THEY'RE",
    "punctuation!!! ?? ... (brackets) [x] {y} #hash @user e-mail: a.b@c.com",
    "numbers 12345 3.14159 1,000,000 2nd 3rd",
    "unicode: café naïve Ångström straße ﬁ ½ résumé",
    "emoji 🐱🐶 👩‍👩‍👧 🇯🇵 ❤️",
    "中文 日本語のテキスト 한국어 русский текст العربية",
    "<|endoftext|> inside the text",
    "",
    "ALLCAPS" * 3,
    " ".join(["a very long caption about many things"] * 30),
    "x" * 500,
]


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    return write_clip_vocab(tmp_path_factory.mktemp("clip-vocab"))


@pytest.fixture(scope="module")
def reference(vocab_folder):
    return CLIPTokenizer.from_pretrained(str(vocab_folder))


def expected(reference, texts):
    enc = reference(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    return enc["input_ids"]


def test_matches_transformers(vocab_folder, reference):
    ours = ClipTokenizer.from_folder(vocab_folder)
    ids, truncated = ours.encode(TEXTS)
    assert ids.shape == (len(TEXTS), 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, expected(reference, TEXTS))
    assert [TEXTS[i] for i in truncated] == TEXTS[-2:]
    assert (ids[truncated, -1] == 49407).all()  # EOS kept where the text was cut
    assert ids[0, 0] == 49406 and len(reference.get_vocab()) == 49408


def test_tokenizer_json_matches_too(vocab_folder, reference, tmp_path):
    """Checkpoints may ship only tokenizer.json (transformers writes it); it must tokenize the same."""
    reference.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    ours = ClipTokenizer.from_folder(tmp_path)
    np.testing.assert_array_equal(ours(TEXTS), expected(reference, TEXTS))


def test_pad_token_from_the_config(vocab_folder, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((vocab_folder / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    ids = ClipTokenizer.from_folder(tmp_path)(["a cat"])
    assert list(ids[0, :5]) == [49406, 320, 2368, 49407, 0]  # "!" is id 0; pooling uses the first EOS


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="has no tokenizer"):
        ClipTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ConfigError, match="cannot read the tokenizer"):
        ClipTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(ConfigError, match="tokenizer.json cannot be read"):
        ClipTokenizer.from_folder(tmp_path)
