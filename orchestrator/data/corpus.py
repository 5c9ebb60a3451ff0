"""A corpus of documents tokenized once, on every core, into one flat token file in the cache.

Sources: text files (a file is one document), JSONL (`.jsonl`, `.jsonl.gz`:
one document per record, its `text_key` field) and Parquet (one per row, the
`text_key` column, read one row group at a time). The work is cut into units
whose boundaries depend on the data alone (runs of small files of about
CHUNK_BYTES together, byte ranges of about CHUNK_BYTES cut at line starts,
row groups), a process pool encodes them, and
the parent writes the results in unit order: the token file is the same
whatever the number of workers, and equals encoding each document with the
tokenizer on its own.

The cache folder `<cache_dir>/<key>/` holds `tokens.bin` (uint16 when the
vocabulary fits, else uint32), `docs.bin` (int64: the token offset where each
document starts) and `meta.json`, written last; the folder is built under a
temporary name and renamed, so a reader never sees half of it. The key is a
hash of the corpus content and the tokenizer. One process builds it (an
exclusive lock file); any other process asking for the same key, another
rank or a second run, waits for it and reuses it.
"""

import contextlib
import dataclasses
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer

from orchestrator.data import chat as _chat
from orchestrator.data.tokenizer import ByteTokenizer

KINDS = ("text", "jsonl", "parquet")
CHUNK_BYTES = 1 << 20  # work per unit; fixed, so units (and so the result) never depend on the worker count
_VERSION = "1"


class CorpusError(ValueError):
    """Data that cannot be read as the config says (the message names the file and the setting)."""


def file_kind(path: Path, fmt: str) -> str:
    """text | jsonl | parquet: data.format when it names one, else the file's suffix."""
    if fmt in KINDS:
        return fmt
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# --- reading documents --------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """A piece of work: a byte range of a text or JSONL file, a row group of a Parquet file, or records in hand."""

    path: str
    kind: str  # text | texts (whole small files) | jsonl | parquet | records (jsonl.gz lines read by the parent)
    start: int = 0  # byte offset, or the row group
    end: int = 0
    opens: bool = True  # text: this piece starts its document (BOS)
    closes: bool = True  # text: this piece ends it (EOS)
    weight: int = 0  # bytes on disk it stands for (progress)
    data: bytes = b""
    paths: tuple = ()  # texts: the files, one document each


def _cut_text(data: bytes, size: int) -> list[int]:
    """Cut points of a long text every ~size bytes, each just before a blank line that follows a non-space.

    Encoding the pieces separately then gives the tokens of the whole for byte-level BPEs, whose
    pre-tokenizers split there anyway.
    """
    cuts, pos = [0], size
    while pos < len(data):
        at = data.find(b"\n\n", pos)
        while at > 0 and data[at - 1 : at].isspace():
            at = data.find(b"\n\n", at + 2)
        if at <= 0:
            break
        cuts.append(at)
        pos = at + size
    return cuts + [len(data)]


def _line_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """Byte ranges of ~size bytes, each starting at a line start."""
    total = path.stat().st_size
    starts = [0]
    with open(path, "rb") as f:
        while starts[-1] + size < total:
            f.seek(starts[-1] + size)
            f.readline()
            if f.tell() >= total:
                break
            starts.append(f.tell())
    return list(zip(starts, starts[1:] + [total]))


def units(files: list[tuple[Path, str]], chunk_bytes: int = CHUNK_BYTES) -> Iterator[Unit]:
    small, small_bytes = [], 0  # consecutive small text files go together: one tokenizer call for many documents
    for path, kind in files:
        size = path.stat().st_size
        if small and (kind != "text" or size > chunk_bytes or small_bytes >= chunk_bytes):
            yield Unit(small[0], "texts", weight=small_bytes, paths=tuple(small))
            small, small_bytes = [], 0
        if kind == "text":
            if size <= chunk_bytes:
                small.append(str(path))
                small_bytes += size
                continue
            cuts = _cut_text(path.read_bytes(), chunk_bytes)
            for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
                yield Unit(str(path), "text", a, b, opens=i == 0, closes=b == size, weight=b - a)
        elif kind == "jsonl" and path.name.lower().endswith(".gz"):
            yield from _gz_units(path, chunk_bytes)
        elif kind == "jsonl":
            for a, b in _line_ranges(path, chunk_bytes):
                yield Unit(str(path), "jsonl", a, b, weight=b - a)
        else:
            meta = _parquet_file(path).metadata
            rows = max(1, meta.num_rows)
            for g in range(meta.num_row_groups):
                yield Unit(str(path), "parquet", g, g + 1, weight=size * meta.row_group(g).num_rows // rows)
    if small:
        yield Unit(small[0], "texts", weight=small_bytes, paths=tuple(small))


def _gz_units(path: Path, chunk_bytes: int) -> Iterator[Unit]:
    """A gzip stream cannot be cut by byte offset: the parent reads it and hands out its lines."""
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as gz:
        seen, offset = 0, 0
        while True:
            lines = gz.readlines(chunk_bytes)
            if not lines:
                break
            data = b"".join(lines)
            yield Unit(str(path), "records", offset, offset + len(data), weight=raw.tell() - seen, data=data)
            seen, offset = raw.tell(), offset + len(data)


def _parquet_file(path: Path):
    import pyarrow.parquet as pq  # a heavy import, for Parquet corpora only

    return pq.ParquetFile(path)


def _json_records(unit: Unit) -> Iterator[tuple[object, str]]:
    """A JSONL unit's records, parsed, each with where it is (for its errors)."""
    if unit.kind == "records":
        data, base = unit.data, f"{unit.path} (from byte {unit.start} uncompressed)"
    else:
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            data = f.read(unit.end - unit.start)
        base = f"{unit.path} (from byte {unit.start})"
    for n, line in enumerate(data.splitlines()):
        if line.strip():
            where = f"{base}, record {n + 1} of this range"
            try:
                yield json.loads(line), where
            except ValueError as e:
                raise CorpusError(f"{where}: not JSON ({e})") from None


def _records(unit: Unit, text_key: str) -> list[str]:
    docs = []
    for record, where in _json_records(unit):
        if not isinstance(record, dict) or text_key not in record:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise CorpusError(f"{where}: no data.text_key={text_key!r} (its keys: {keys})")
        text = record[text_key]
        docs.append(text if isinstance(text, str) else "" if text is None else str(text))
    return docs


def _chat_records(unit: Unit, key: str) -> list[tuple[object, str]]:
    """A chat unit's records (parsed JSON, or a Parquet row's `key` column) and where each is, for its errors."""
    if unit.kind == "parquet":
        rows = _parquet_file(Path(unit.path)).read_row_group(unit.start, columns=[key]).column(0).to_pylist()
        return [({key: r}, f"{unit.path}, row group {unit.start}, row {n + 1}") for n, r in enumerate(rows)]
    if unit.kind not in ("records", "jsonl"):
        raise CorpusError(f"{unit.path}: data.format=chat reads records: a .jsonl, .jsonl.gz or .parquet file")
    return list(_json_records(unit))


def read_unit(unit: Unit, text_key: str) -> list[str]:
    """The documents (or, for a text piece, the one piece) of a unit."""
    if unit.kind == "text":
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            return [f.read(unit.end - unit.start).decode("utf-8", errors="replace")]
    if unit.kind == "texts":
        return [Path(p).read_bytes().decode("utf-8", errors="replace") for p in unit.paths]
    if unit.kind in ("records", "jsonl"):
        return _records(unit, text_key)
    table = _parquet_file(Path(unit.path)).read_row_group(unit.start, columns=[text_key])
    return ["" if t is None else str(t) for t in table.column(0).to_pylist()]


# --- encoding (in worker processes) ------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_json: Optional[str], bos: Optional[int], eos: Optional[int], text_key: str,
                 chat: Optional[dict], in_pool: bool) -> None:
    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    tok = Tokenizer.from_str(tokenizer_json) if tokenizer_json is not None else None
    encoder = _chat.ChatEncoder(tok, _chat.ChatRenderer(chat["template"], chat["bos_token"], chat["eos_token"]),
                                chat["train_on"]) if chat else None
    _WORKER.update(tok=tok, bos=bos, eos=eos, text_key=text_key, chat=chat, chat_encoder=encoder)


def encode_chat_unit(unit: Unit) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(tokens, where conversations start, the unit's weight, the learned-token mask as uint8): each record one
    conversation rendered by its chat template (which frames it itself: no BOS/EOS added here)."""
    chat = _WORKER["chat"]
    conversations = [(_chat.check_messages(record, chat["messages_key"], where), where)
                     for record, where in _chat_records(unit, chat["messages_key"])]
    encoded = _WORKER["chat_encoder"].encode_many(conversations)
    if not encoded:
        return np.zeros(0, np.uint32), np.zeros(0, np.int64), unit.weight, np.zeros(0, np.uint8)
    lengths = [len(ids) for ids, _ in encoded]
    tokens = np.concatenate([ids for ids, _ in encoded]).astype(np.uint32)
    mask = np.concatenate([m for _, m in encoded])
    return tokens, np.cumsum([0] + lengths[:-1], dtype=np.int64), unit.weight, mask


def encode_unit(unit: Unit) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens as uint32, offsets where documents start in them, the unit's weight).

    Each document: BOS + its tokens + EOS; a text piece only gets the BOS if it opens its
    document and the EOS if it closes it. Empty documents are dropped.
    """
    tok, bos, eos = _WORKER["tok"], _WORKER["bos"], _WORKER["eos"]
    docs = read_unit(unit, _WORKER["text_key"])
    if unit.kind == "text":
        docs = docs if docs[0] or not (unit.opens and unit.closes) else []
    else:
        docs = [d for d in docs if d]
    if tok is None:
        ids = [np.frombuffer(d.encode("utf-8"), dtype=np.uint8) for d in docs]
    else:
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: no character offsets
        ids = [e.ids for e in encode(docs, add_special_tokens=False)]
    head = [bos] if bos is not None and unit.opens else []
    tail = [eos] if eos is not None and unit.closes else []
    lengths = [len(head) + len(x) + len(tail) for x in ids]
    out = np.empty(sum(lengths), dtype=np.uint32)
    pos = 0
    for x in ids:
        for piece in (head, x, tail):
            out[pos : pos + len(piece)] = piece
            pos += len(piece)
    starts = np.cumsum([0] + lengths[:-1], dtype=np.int64) if unit.opens and lengths else np.zeros(0, np.int64)
    return out, starts, unit.weight


def _ordered_map(fn, items: Iterable, workers: int, initargs: tuple) -> Iterator:
    """fn over items in a process pool, results in item order, at most 2 units per worker in flight."""
    if workers <= 1:
        _init_worker(*initargs, in_pool=False)
        yield from map(fn, items)
        return
    # fork: the workers need nothing of the parent but this module (and start at once).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(*initargs, True))
    try:
        pending = deque()
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# --- progress ----------------------------------------------------------------------------------

def fmt_rate(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar on stderr: share of the corpus done, tokens, tokens/s, ETA.

    On a terminal it redraws in place; in a log file it writes a line every 10 seconds.
    """

    def __init__(self, total_bytes: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label, self.enabled = max(1, total_bytes), label, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = self.tokens = 0
        self.start = self.shown = time.perf_counter()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
        eta = fmt_eta(elapsed * (1 - frac) / frac) if frac > 0 else "?"
        return (f"tokenizing {self.label} [{bar}] {100 * frac:5.1f}%  {fmt_rate(self.tokens)} tokens  "
                f"{fmt_rate(self.tokens / elapsed)} tokens/s  {self.done / elapsed / 1e6:.2f} MB/s  ETA {eta}")

    def update(self, done_bytes: int, tokens: int) -> None:
        self.done += done_bytes
        self.tokens += tokens
        now = time.perf_counter()
        if self.enabled and now - self.shown >= (0.5 if self.tty else 10.0):
            self.shown = now
            print(("\r" + self.line()) if self.tty else self.line(), end="" if self.tty else "\n",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.done = self.total
            print(("\r" if self.tty else "") + self.line(), file=self.stream, flush=True)


# --- the cache ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenFile:
    """A tokenized corpus in the cache."""

    tokens: str  # path of tokens.bin
    docs: str  # path of docs.bin: int64 offset where each document starts
    dtype: str
    num_tokens: int
    num_docs: int
    max_token: int
    source_bytes: int
    seconds: float  # spent tokenizing (0 when read from the cache)
    cached: bool
    mask: Optional[str] = None  # chat: path of mask.bin, uint8 per token, 1 where its prediction is learned

    def doc_starts(self) -> np.ndarray:
        return np.fromfile(self.docs, dtype=np.int64)


def _fingerprints(files: list[Path], cache_dir: Path) -> list[str]:
    """sha256 of each file's content, remembered per (path, size, mtime, inode) in the cache dir."""
    memo_path = cache_dir / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    out, changed = [], False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if key not in memo:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            memo[key], changed = h.hexdigest(), True
        out.append(memo[key])
    if changed:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f"fingerprints.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return out


def cache_key(files: list[tuple[Path, str]], tokenizer, text_key: str, cache_dir: Path,
              chat: Optional[dict] = None) -> str:
    content = _fingerprints([p for p, _ in files], cache_dir)
    kinds = [k for _, k in files]
    text_key = text_key if any(k != "text" for k in kinds) else None
    blob = json.dumps([_VERSION, tokenizer.hash, text_key, list(zip(kinds, content))] + ([chat] if chat else []),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _read_meta(out: Path) -> Optional[TokenFile]:
    meta = out / "meta.json"
    if not meta.is_file():
        return None
    m = json.loads(meta.read_text())
    return TokenFile(str(out / "tokens.bin"), str(out / "docs.bin"), m["dtype"], m["num_tokens"], m["num_docs"],
                     m["max_token"], m["source_bytes"], 0.0, True,
                     str(out / "mask.bin") if m.get("mask") else None)


def _lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _stale(lock: Path) -> bool:
    """A lock left by a process of this machine that no longer exists."""
    try:
        host, pid = lock.read_text().split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def tokenize_cached(files: list[tuple[Path, str]], tokenizer, text_key: str, cache_dir: Path, label: str,
                    workers: Optional[int] = None, progress: bool = True, chunk_bytes: int = CHUNK_BYTES,
                    chat: Optional[dict] = None) -> TokenFile:
    """The corpus's token file: from the cache, or tokenized now (by this process, or another one we wait for).

    chat: conversations (data.format=chat): {template, bos_token, eos_token, messages_key, train_on}."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / cache_key(files, tokenizer, text_key, cache_dir, chat)
    lock = out.with_name(out.name + ".lock")
    told = False
    while True:
        found = _read_meta(out)
        if found is not None:
            return found
        if _lock(lock):
            try:
                return _read_meta(out) or tokenize(files, tokenizer, text_key, out, label, workers, progress, chunk_bytes,
                                                   chat)
            finally:
                lock.unlink(missing_ok=True)
        if _stale(lock):
            lock.unlink(missing_ok=True)
            continue
        if not told and progress:
            print(f"trident: waiting for another process tokenizing {label} into {out}", file=sys.stderr, flush=True)
            told = True
        time.sleep(0.5)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def tokenize(files: list[tuple[Path, str]], tokenizer, text_key: str, out: Path, label: str,
             workers: Optional[int] = None, progress: bool = True, chunk_bytes: int = CHUNK_BYTES,
             chat: Optional[dict] = None) -> TokenFile:
    """Tokenize the files into the folder `out` (built under a temporary name, then renamed)."""
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    total = sum(p.stat().st_size for p, _ in files)
    # No more workers than units of work (a small corpus is encoded here, without a pool).
    workers = max(1, min(workers or default_workers(), -(-total // chunk_bytes)))
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf = not isinstance(tokenizer, ByteTokenizer)
    initargs = (tokenizer.json if hf else None, tokenizer.bos_id, tokenizer.eos_id, text_key, chat)
    bar = Progress(total, label, enabled=progress)
    n_tokens = n_docs = max_token = 0
    start = time.perf_counter()
    try:
        with contextlib.ExitStack() as files_open:
            ftok, fdoc = (files_open.enter_context(open(tmp / name, "wb")) for name in ("tokens.bin", "docs.bin"))
            fmask = files_open.enter_context(open(tmp / "mask.bin", "wb")) if chat else None  # chat only
            encode = encode_chat_unit if chat else encode_unit
            for tokens, starts, weight, *mask in _ordered_map(encode, units(files, chunk_bytes), workers, initargs):
                if fmask is not None:
                    fmask.write(mask[0].tobytes())
                ftok.write(tokens.astype(dtype).tobytes())
                fdoc.write((starts + n_tokens).tobytes())
                n_tokens, n_docs = n_tokens + len(tokens), n_docs + len(starts)
                max_token = max(max_token, int(tokens.max())) if len(tokens) else max_token
                bar.update(weight, len(tokens))
        seconds = time.perf_counter() - start
        meta = {"dtype": dtype.name, "num_tokens": n_tokens, "num_docs": n_docs, "max_token": max_token,
                "source_bytes": total, "tokenizer": tokenizer.name, "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id, "text_key": text_key, "files": [str(p) for p, _ in files],
                "seconds": seconds, "mask": bool(chat), "chat": chat}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        bar.close()
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same key first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dataclasses.replace(_read_meta(out), seconds=seconds, cached=False)


# --- checks before launch ----------------------------------------------------------------------

def first_chat_records(path: Path, key: str, n: int = 8) -> list:
    """The first records of a chat file: JSONL objects, or {key: value} of a Parquet file's first rows."""
    if file_kind(path, "auto") != "parquet":
        return first_records(path, n)
    pf = _parquet_file(path)
    if key not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: no column {key!r} (data.messages_key={key!r}; its columns: "
                          f"{', '.join(pf.schema_arrow.names)})")
    rows = pf.read_row_group(0, columns=[key]).column(0).to_pylist()[:n] if pf.metadata.num_row_groups else []
    return [{key: r} for r in rows]


def first_records(path: Path, n: int = 8) -> list:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    out = []
    with opener(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise CorpusError(f"{path}: record {len(out) + 1} is not JSON ({e})") from None
                if len(out) == n:
                    break
    return out


def check_source(path: Path, kind: str, text_key: str) -> None:
    """That the first records of a JSONL file, or a Parquet file's columns, hold data.text_key."""
    if kind == "jsonl":
        for i, record in enumerate(first_records(path)):
            if not isinstance(record, dict) or text_key not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else f"a {type(record).__name__}"
                raise CorpusError(f"data.text_key={text_key!r} is not in record {i + 1} of {path} "
                                  f"(its keys: {keys})")
    elif kind == "parquet":
        try:
            names = _parquet_file(path).schema_arrow.names
        except Exception as e:  # noqa: BLE001 - pyarrow's own error types
            raise CorpusError(f"{path} is not a Parquet file that pyarrow reads ({type(e).__name__}: {e})") from None
        if text_key not in names:
            raise CorpusError(f"data.text_key={text_key!r} is not a column of {path} (its columns: {', '.join(names)})")
