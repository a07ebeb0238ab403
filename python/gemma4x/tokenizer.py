"""Text ↔ token ids through a checkpoint's ``tokenizer.json`` (the ``tokenizers`` package).

The dependency is optional: token-id prompts never need it, and a text prompt without it
raises :class:`TokenizerUnavailableError` saying how to install it. Gemma prompts start
with ``<bos>`` (id 2); Gemma's own tokenizer.json adds it through its post-processor, and
:meth:`GemmaTokenizer.encode` adds it only when the post-processor did not.
Chat templates are rendered by :mod:`gemma4x.chat`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = [
    "GemmaTokenizer",
    "TokenizerUnavailableError",
    "load_tokenizer",
    "optional_tokenizer",
    "require_tokenizers",
]

TOKENIZER_FILE = "tokenizer.json"
GEMMA_BOS_ID = 2


class TokenizerUnavailableError(RuntimeError):
    """The ``tokenizers`` package is missing, or the checkpoint has no tokenizer.json."""


def require_tokenizers() -> ModuleType:
    """The ``tokenizers`` module, or a clear error saying how to get it."""
    try:
        import tokenizers
    except ImportError:
        raise TokenizerUnavailableError(
            "text prompts need the `tokenizers` package: pip install 'gemma4x[tokenizer]' "
            "(or pass token ids instead of text)"
        ) from None
    return tokenizers


class GemmaTokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with Gemma's BOS convention."""

    def __init__(self, tokenizer, *, bos_id: int | None = GEMMA_BOS_ID):
        self._tok = tokenizer
        self.bos_id = bos_id

    @classmethod
    def from_file(cls, path: str | Path, *, bos_id: int | None = GEMMA_BOS_ID) -> GemmaTokenizer:
        tk = require_tokenizers()
        path = Path(path)
        if not path.is_file():
            raise TokenizerUnavailableError(f"no tokenizer file at {path}")
        try:
            return cls(tk.Tokenizer.from_file(str(path)), bos_id=bos_id)
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise TokenizerUnavailableError(f"cannot read tokenizer {path}: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_bos``, exactly one leading BOS."""
        ids = list(self._tok.encode(text, add_special_tokens=add_bos).ids)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the tokenizer's vocabulary are dropped."""
        n = self.vocab_size
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(model_dir: str | Path, *, bos_id: int | None = GEMMA_BOS_ID) -> GemmaTokenizer:
    """The tokenizer of a checkpoint directory (``DIR/tokenizer.json``)."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerUnavailableError(f"no {TOKENIZER_FILE} in {model_dir}; pass token ids instead of text")
    return GemmaTokenizer.from_file(path, bos_id=bos_id)


def optional_tokenizer(model_dir: str | Path, *, bos_id: int | None = GEMMA_BOS_ID) -> GemmaTokenizer | None:
    """The checkpoint's tokenizer when it has one and ``tokenizers`` is installed, else None.

    For loaders that only need a tokenizer for text prompts: token-id prompts must keep
    working without the optional package. A tokenizer.json that exists but is malformed
    still raises.
    """
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        require_tokenizers()
    except TokenizerUnavailableError:
        return None
    return GemmaTokenizer.from_file(path, bos_id=bos_id)
