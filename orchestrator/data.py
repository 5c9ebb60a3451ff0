"""Token data with no download: a corpus on disk, a byte tokenizer, deterministic batches.

A corpus is text (the Python standard library's own source by default, or a
user's file or folder) tokenized once into a cached uint8 `.bin`, or a user's
pre-tokenized uint16/uint32 `.bin`. A held-out tail (by file for folders)
is the eval split.

Batches are layout-independent: the sequences of step s are drawn from a
generator seeded with (seed, s), the same on every rank; dp rank r takes its
contiguous share. So the data a step sees, and the position to resume from
(the step itself), do not depend on the TP x PP x DP layout.
"""

import hashlib
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BYTE_VOCAB = 256
BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
FORMATS = ("auto", "text", "bin")
_CACHE_VERSION = "1"


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download, lossless."""

    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Split:
    """A range [start, end) of tokens in a flat binary file."""

    path: str
    dtype: str
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r")[self.start : self.end]


@dataclass(frozen=True)
class Corpus:
    train: Split
    eval: Split
    source: str
    max_token: int  # the largest token id present; the model's vocabulary must exceed it


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "bin" if path.suffix == ".bin" else "text"


def text_files(root: Path, pattern: str) -> list[Path]:
    if root.is_file():
        return [root]
    return [
        f
        for f in sorted(root.glob(pattern))
        if f.is_file() and not {"site-packages", "dist-packages", "__pycache__"} & set(f.parts)
    ]


def prepare(data_cfg) -> Corpus:
    """Find or build the token files of the configured corpus (in the launcher, once)."""
    root = Path(data_cfg.path).expanduser() if data_cfg.path else stdlib_dir()
    if resolve_format(root, data_cfg.format) == "bin":
        return _bin_corpus(root, data_cfg.bin_dtype, data_cfg.eval_fraction)
    return _text_corpus(root, data_cfg.pattern, data_cfg.eval_fraction, Path(data_cfg.cache_dir).expanduser())


def _bin_corpus(path: Path, dtype: str, eval_fraction: float) -> Corpus:
    tokens = np.memmap(path, dtype=BIN_DTYPES[dtype], mode="r")
    n_eval = max(1, int(len(tokens) * eval_fraction))
    max_token = max((int(tokens[i : i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24)), default=0)
    n = len(tokens)
    return Corpus(
        train=Split(str(path), dtype, 0, n - n_eval),
        eval=Split(str(path), dtype, n - n_eval, n),
        source=str(path),
        max_token=max_token,
    )


def _text_corpus(root: Path, pattern: str, eval_fraction: float, cache_dir: Path) -> Corpus:
    files = text_files(root, pattern)
    if not files:
        raise FileNotFoundError(f"no files match {pattern!r} under {root}")
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(repr((_CACHE_VERSION, eval_fraction, stats)).encode()).hexdigest()[:16]
    out = cache_dir / key
    if not (out / "eval.bin").exists():
        _tokenize(root, files, eval_fraction, out)
    paths = {name: str(out / f"{name}.bin") for name in ("train", "eval")}
    sizes = {name: os.path.getsize(p) for name, p in paths.items()}
    return Corpus(
        train=Split(paths["train"], "uint8", 0, sizes["train"]),
        eval=Split(paths["eval"], "uint8", 0, sizes["eval"]),
        source=str(root),
        max_token=BYTE_VOCAB - 1,
    )


def _tokenize(root: Path, files: list[Path], eval_fraction: float, out: Path) -> None:
    """Write train.bin and eval.bin (bytes), atomically: eval.bin is renamed into place last."""
    out.mkdir(parents=True, exist_ok=True)
    if len(files) == 1:
        data = files[0].read_bytes()
        cut = len(data) - max(1, int(len(data) * eval_fraction))
        parts = {"train": [data[:cut]], "eval": [data[cut:]]}
    else:
        # Hold out whole files, chosen by a hash of their path: stable as the folder grows.
        parts = {"train": [], "eval": []}
        for f in files:
            rel = str(f.relative_to(root)) if f != root else f.name
            held_out = zlib.crc32(rel.encode()) % 10_000 < eval_fraction * 10_000
            parts["eval" if held_out else "train"].append(f.read_bytes())
    pid = os.getpid()
    for name in ("train", "eval"):
        tmp = out / f"{name}.bin.tmp{pid}"
        tmp.write_bytes(b"\n\n".join(parts[name]))
        os.replace(tmp, out / f"{name}.bin")


class Batches:
    """The micro-batches of each step for one dp rank, drawn deterministically from a split."""

    def __init__(self, split: Split, seq_len: int, global_batch: int, micro_batch: int, seed: int, dp_rank: int, dp_size: int):
        self.tokens = split.tokens()
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.seed = seed
        self.per_rank = global_batch // dp_size
        self.first = dp_rank * self.per_rank

    def step(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(inputs, targets)] of shape (micro_batch, seq_len) each, for optimizer step `step`."""
        rng = np.random.default_rng([self.seed, step])
        offsets = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.global_batch)
        mine = offsets[self.first : self.first + self.per_rank]
        return [
            windows(self.tokens, mine[i : i + self.micro_batch], self.seq_len)
            for i in range(0, self.per_rank, self.micro_batch)
        ]


def eval_batches(split: Split, seq_len: int, n_sequences: int, micro_batch: int, dp_rank: int, dp_size: int):
    """This rank's share of a fixed set of evenly spaced held-out windows."""
    tokens = split.tokens()
    span = len(tokens) - seq_len - 1
    offsets = np.array([i * span // n_sequences for i in range(n_sequences)])
    mine = np.array_split(offsets, dp_size)[dp_rank]
    return [windows(tokens, mine[i : i + micro_batch], seq_len) for i in range(0, len(mine), micro_batch)]


def windows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[o : o + seq_len + 1], dtype=np.int64) for o in offsets])
    seqs = torch.from_numpy(rows)
    return seqs[:, :-1], seqs[:, 1:]

