"""The run's tokenizer, from `data.tokenizer`: text to ids and back.

  bytes                   UTF-8 bytes (vocabulary 256), nothing to load: the default
  <file>.json             a Hugging Face `tokenizer.json`, read with the `tokenizers` library
  <folder>                a folder holding tokenizer.json (a Hugging Face model folder)
  init_from               the folder model.init_from names

No `transformers` at run time. Every tokenizer has `vocab_size`,
`encode(text)` (a prompt: with the BOS its post-processor adds, if any),
`encode_document(text)` (training data: BOS + the text's tokens + EOS),
`decode(ids)` (special tokens dropped) and `eos_ids` (the ids that end a
generated text; none for bytes).

A training document is encoded on its own and framed by the tokenizer's BOS
and EOS, taken from the folder's `tokenizer_config.json` (or
`special_tokens_map.json`); a bare `tokenizer.json` gets them from its
special tokens' usual names (`<|begin_of_text|>`, `<s>`, ...).
`data.eos_token` overrides the EOS. Documents so framed are concatenated into
the token stream, so the boundaries stay visible to the model.

This module imports neither torch nor anything heavy: tokenizing worker
processes import it.
"""

import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer

BYTES = "bytes"
INIT_FROM = "init_from"
BYTE_VOCAB = 256
# Files of a Hugging Face tokenizer, copied next to exported weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")
# The usual names, for a bare tokenizer.json without a tokenizer_config.json: the first one present
# frames documents; all those present end a generated text.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>", "<eos>")


class TokenizerError(ValueError):
    """A data.tokenizer that cannot be used (its message names the setting)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download, lossless, no BOS/EOS."""

    vocab_size = BYTE_VOCAB
    bos_id = eos_id = None
    eos_ids: tuple[int, ...] = ()
    name = BYTES
    hash = BYTES

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    encode_document = encode

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


Bytes = ByteTokenizer  # the name the generation code knows it by


class HFTokenizer:
    """A Hugging Face `tokenizer.json` with the BOS/EOS that frame each document."""

    def __init__(self, path: Path, eos_token: Optional[str] = None, key: str = "data.tokenizer"):
        self.path = Path(path)
        self.name = str(self.path)
        self.json = self.path.read_text(encoding="utf-8", errors="replace")
        try:
            self.tok = Tokenizer.from_str(self.json)
        except Exception as e:  # noqa: BLE001 - the Rust parser's error, whatever its type
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise TokenizerError(f"{key}={str(path)!r} does not parse as a tokenizer.json: {why}") from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        # Ids, not entries: a vocabulary with holes still needs rows up to its largest id.
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        bos, eos, named = special_tokens(self.path.parent, vocab)
        if eos_token is not None:
            if eos_token not in vocab:
                raise TokenizerError(f"data.eos_token={eos_token!r} is not a token of {self.path} "
                                     f"(its special tokens: {', '.join(added_tokens(self.json)) or 'none'})")
            eos, named = eos_token, True
        self.bos_token, self.eos_token = bos, eos
        self.bos_id = vocab[bos] if bos is not None else None
        self.eos_id = vocab[eos] if eos is not None else None
        # Generation stops at the named EOS, or (none named) at any of the usual end tokens present.
        self.eos_ids = (self.eos_id,) if named and eos is not None else tuple(vocab[t] for t in EOS_NAMES if t in vocab)
        self.hash = hashlib.sha256(f"{self.json}\0{self.bos_id}\0{self.eos_id}".encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """A prompt: the tokenizer's own encoding (with the BOS its post-processor adds, if any)."""
        return self.tok.encode(text).ids

    def encode_document(self, text: str) -> list[int]:
        """A training document: BOS + its tokens + EOS (where the tokenizer has them)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids + ([self.eos_id] if self.eos_id is not None else [])

    def decode(self, tokens) -> str:
        return self.tok.decode([int(t) for t in tokens], skip_special_tokens=True)


def added_tokens(tokenizer_json: str) -> list[str]:
    try:
        return [t["content"] for t in json.loads(tokenizer_json).get("added_tokens", []) if t.get("special")]
    except (ValueError, AttributeError, TypeError):
        return []


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def special_tokens(folder: Path, vocab: dict) -> tuple[Optional[str], Optional[str], bool]:
    """(BOS, EOS, whether a config file named them): the folder's config files first, else the usual names."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except ValueError:
                continue
            if "bos_token" in cfg or "eos_token" in cfg:
                bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
                return (bos if bos in vocab else None), (eos if eos in vocab else None), eos in vocab
    bos = next((t for t in BOS_NAMES if t in vocab), None)
    eos = next((t for t in EOS_NAMES if t in vocab), None)
    return bos, eos, False


def tokenizer_path(spec: str, init_from: Optional[str] = None) -> Optional[Path]:
    """The tokenizer.json that data.tokenizer names (None for bytes), or a TokenizerError saying why not."""
    if spec == BYTES:
        return None
    valid = "valid: bytes, init_from, a tokenizer.json file or a folder holding one"
    if spec == INIT_FROM:
        if not init_from:
            raise TokenizerError(f"data.tokenizer=init_from but model.init_from is not set ({valid})")
        folder = Path(init_from).expanduser()
        if not (folder / "tokenizer.json").is_file():
            raise TokenizerError(f"data.tokenizer=init_from: model.init_from={init_from!r} holds no tokenizer.json "
                                 f"({valid})")
        return folder / "tokenizer.json"
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"data.tokenizer={spec!r} is a folder without a tokenizer.json ({valid})")
        return path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"data.tokenizer={spec!r} does not exist ({valid})")
    return path


def load_tokenizer(spec: str, init_from: Optional[str] = None, eos_token: Optional[str] = None):
    """The tokenizer data.tokenizer names: a ByteTokenizer or an HFTokenizer (TokenizerError if it cannot be)."""
    path = tokenizer_path(spec, init_from)
    if path is None:
        if eos_token is not None:
            raise TokenizerError(f"data.eos_token={eos_token!r} with data.tokenizer=bytes: the byte tokenizer has "
                                 "no special tokens (valid: null, or a tokenizer that has the token)")
        return ByteTokenizer()
    st = path.stat()
    return _load_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, eos_token, spec)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, size: int, mtime_ns: int, eos_token: Optional[str], spec: str) -> HFTokenizer:
    # Keyed by the file's identity: the planner validates hundreds of layouts of one config.
    tok = HFTokenizer(Path(path), eos_token)
    tok.name = spec if spec != INIT_FROM else path
    return tok


def tokenizer_folder(spec: str, init_from: Optional[str]) -> Optional[Path]:
    """The folder whose tokenizer files go next to exported weights (None for bytes)."""
    path = tokenizer_path(spec, init_from)
    return path.parent if path is not None else None


def copy_tokenizer(spec: str, init_from: Optional[str], out: Path, eos_token: Optional[str] = None) -> list[str]:
    """Put data.tokenizer's files next to exported weights, so `AutoTokenizer.from_pretrained(out)` loads it.

    A Hugging Face folder's tokenizer files are copied as they are; a bare tokenizer.json gets a
    tokenizer_config.json naming its BOS/EOS. Returns the files written (none for bytes).
    """
    tok = load_tokenizer(spec, init_from, eos_token)
    if isinstance(tok, ByteTokenizer):
        return []
    folder, out = tok.path.parent, Path(out)
    written = []
    for name in TOKENIZER_FILES:
        src = tok.path if name == "tokenizer.json" else folder / name
        if src.is_file():
            shutil.copyfile(src, out / name)
            written.append(name)
    if "tokenizer_config.json" not in written:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                  "model_max_length": 1 << 30}
        (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=1))
        written.append("tokenizer_config.json")
    config_path = out / "config.json"
    if config_path.is_file():  # generation needs to know where a document ends
        config = json.loads(config_path.read_text())
        config.update({k: v for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)) if v is not None})
        config_path.write_text(json.dumps(config, indent=1))
    return written
