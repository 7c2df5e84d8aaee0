"""The CLIP byte-level BPE tokenizer of the LiT checkpoint, built with the `tokenizers` library.

It matches transformers' CLIPTokenizer: NFC, whitespace runs collapsed, lower-cased, CLIP's pre-token split,
`<|startoftext|>` ... `<|endoftext|>`, then padding to the context length. Longer texts are cut so that the
end-of-text token is kept (the text encoder pools at it), with a warning.
"""

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..log import logger

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
# CLIP's pre-tokenizer: its special tokens, English contractions, letter runs, single digits, other symbols.
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bpe_from_files(vocab_path: Path, merges_path: Path):
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the tokenizer in {vocab_path.parent} ({exc}); download it again"
        ) from exc
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
        raise ConfigError(f"{vocab_path.parent}: vocab.json or merges.txt is not a BPE vocabulary")
    tok = Tokenizer(BPE(vocab, merges, end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.add_special_tokens([BOS, EOS])  # as transformers does: written in a text, each is one token
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tok


def _special(folder: Path, name: str, default: str) -> str:
    """A special token from tokenizer_config.json or special_tokens_map.json (string or {"content": ...})."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((folder / file).read_text()).get(name)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return default


class ClipTokenizer:
    """`tokenizer(texts)` -> (B, 77) int32 token ids, padded; `truncated` lists the texts that were cut."""

    def __init__(self, backend, pad: str = EOS, context_length: int = CONTEXT_LENGTH):
        self.backend = backend
        ids = [backend.token_to_id(t) for t in (BOS, EOS, pad)]
        if None in ids:
            raise ConfigError(f"the tokenizer's vocabulary lacks {BOS}, {EOS} or its pad token {pad!r}")
        self.bos_id, self.eos_id, self.pad_id = ids
        self.context_length = context_length

    def __repr__(self) -> str:
        return (
            f"ClipTokenizer(vocab_size={self.backend.get_vocab_size()}, "
            f"context_length={self.context_length}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id})"
        )

    @classmethod
    def from_folder(cls, folder: str | Path, context_length: int = CONTEXT_LENGTH) -> "ClipTokenizer":
        """tokenizer.json when there is one (transformers prefers it too), else vocab.json + merges.txt."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            try:
                backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as exc:
                raise ConfigError(
                    f"{folder / 'tokenizer.json'} cannot be read ({exc}); download it again"
                ) from exc
            backend.no_truncation()  # encode() truncates and pads itself, keeping the EOS
            backend.no_padding()
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            backend = _bpe_from_files(folder / "vocab.json", folder / "merges.txt")
        else:
            raise ConfigError(
                f"{folder} has no tokenizer (vocab.json and merges.txt, or tokenizer.json); "
                "download the LiT checkpoint again"
            )
        return cls(backend, pad=_special(folder, "pad_token", EOS), context_length=context_length)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)[0]

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Token ids (B, context_length) and the indices of the texts that were truncated."""
        body = self.context_length - 2
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int32)
        truncated = []
        for i, enc in enumerate(self.backend.encode_batch(list(texts), add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > body:
                truncated.append(i)
                ids = ids[:body]
            out[i, : len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        for i in truncated:
            logger.warning(
                "text longer than %d tokens was truncated: %.60s...", self.context_length, texts[i]
            )
        return out, truncated
