"""The run's tokenizer, from `data.tokenizer`: text to ids and back.

  bytes                   UTF-8 bytes (vocabulary 256), nothing to load: the default
  <file>.json             a Hugging Face `tokenizer.json`, read with the `tokenizers` library
  <folder>                a folder holding tokenizer.json (a Hugging Face model folder)
  init_from               the folder model.init_from names

Every tokenizer has `vocab_size`, `encode(text)` (with the BOS its
post-processor adds, if any), `decode(ids)` (special tokens dropped) and
`eos_ids` (the ids that end a generated text; none for bytes).
"""

import json
from pathlib import Path
from typing import Optional

from orchestrator.data import ByteTokenizer

# Where tokenizer_config.json names no EOS: the end tokens of the common Llama-family tokenizers.
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>", "<eos>")


class TokenizerError(ValueError):
    """A data.tokenizer that cannot be used, explained in one line."""


class Bytes(ByteTokenizer):
    name = "bytes"
    eos_ids: tuple[int, ...] = ()


class HFTokenizer:
    """A `tokenizer.json`, with the EOS its folder's tokenizer_config.json names (else a known end token)."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer  # optional: only data.tokenizer=<a tokenizer.json> needs it
        except ImportError:
            raise TokenizerError(f"data.tokenizer={str(path)!r} needs the `tokenizers` package (pip install tokenizers)")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises its own exception types
            raise TokenizerError(f"data.tokenizer={str(path)!r} does not parse as a tokenizer.json: "
                                 f"{(str(e).splitlines() or [''])[0][:200]}") from None
        self.name = str(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_ids = tuple(i for i in (self.tok.token_to_id(t) for t in self._eos_names(path)) if i is not None)

    @staticmethod
    def _eos_names(path: Path) -> list[str]:
        config = path.parent / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos:
                return [eos]
        return list(EOS_NAMES)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, tokens) -> str:
        return self.tok.decode([int(t) for t in tokens], skip_special_tokens=True)


def tokenizer_path(spec: str, init_from: Optional[str] = None) -> Optional[Path]:
    """The tokenizer.json a data.tokenizer value names (None for bytes)."""
    if spec == "bytes":
        return None
    if spec == "init_from":
        if not init_from:
            raise TokenizerError("data.tokenizer=init_from but model.init_from is not set")
        spec = init_from
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"data.tokenizer={spec!r}: no such tokenizer file "
                             "(valid: bytes, a tokenizer.json, a folder holding one, or init_from)")
    return path


def load_tokenizer(spec: str, init_from: Optional[str] = None):
    path = tokenizer_path(spec, init_from)
    return Bytes() if path is None else HFTokenizer(path)
