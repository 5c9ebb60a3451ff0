"""Real text in one process: tokenizer loading, the tokenizing pool, JSONL/Parquet, the cache, the
document split, document masking in the model, trident-tokenize, and the errors before launch."""

import gzip
import json
import shutil

import numpy as np
import pytest
import torch

from models.llama import ModelArgs, Transformer, document_mask
from orchestrator.build.model import init_weights
from orchestrator.data import corpus as C
from orchestrator.data.dataset import IGNORE, Batches, prepare
from orchestrator.data.tokenizer import HFTokenizer
from orchestrator.data.tokenizer import load_tokenizer as load
from orchestrator.validate import ConfigError, validate
from tests.conftest import make_cfg
from tests.textdata import BOS, EOS, stdlib_texts, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def docs():
    # Documents of every size, some far over a unit's bytes, one empty (dropped: it has no text).
    texts = stdlib_texts(120, start=2, step=7)
    return texts[:60] + [""] + texts[60:]


def direct(tok: HFTokenizer, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: each document encoded by the tokenizers library on its own, framed by BOS/EOS."""
    ids = [[tok.bos_id] + tok.tok.encode(d, add_special_tokens=False).ids + [tok.eos_id] for d in documents if d]
    return np.concatenate([np.array(x, np.int64) for x in ids]), np.cumsum([0] + [len(x) for x in ids[:-1]])


def test_tokenizing_with_1_and_4_workers_gives_one_file_equal_to_encoding_each_document_alone(tmp_path, bpe_json, docs):
    tok = load(str(bpe_json))
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS) and tok.vocab_size == 2048
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    files = [(path, "jsonl")]
    small = 1 << 16  # many units of ~64 KB, so the pool has work to share
    assert len(list(C.units(files, small))) >= 8
    one = C.tokenize(files, tok, "text", tmp_path / "w1", "docs", workers=1, progress=False, chunk_bytes=small)
    four = C.tokenize(files, tok, "text", tmp_path / "w4", "docs", workers=4, progress=False, chunk_bytes=small)
    for name in ("tokens", "docs"):
        a, b = open(getattr(one, name), "rb").read(), open(getattr(four, name), "rb").read()
        assert a == b and len(a) > 0, name
    tokens, starts = direct(tok, docs)
    assert one.dtype == "uint16" and one.num_docs == len(docs) - 1 == len(starts)
    assert np.array_equal(np.fromfile(one.tokens, np.uint16).astype(np.int64), tokens)
    assert np.array_equal(one.doc_starts(), starts)
    assert one.max_token == tokens.max() and one.num_tokens == len(tokens)


def test_a_folder_of_text_files_and_one_long_text_file_in_pieces_encode_as_whole_documents(tmp_path, bpe_json, docs):
    tok = load(str(bpe_json))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(d)
    files = [(f, "text") for f in sorted(folder.glob("*.txt"))]
    got = C.tokenize(files, tok, "text", tmp_path / "f", "folder", workers=2, progress=False)
    tokens, starts = direct(tok, docs)
    assert np.array_equal(np.fromfile(got.tokens, np.uint16).astype(np.int64), tokens)
    assert np.array_equal(got.doc_starts(), starts)
    # One file of ~1 MB is one document, encoded in pieces cut before blank lines on every core.
    long = "\n\n".join(d.strip() for d in docs if d)
    (tmp_path / "long.txt").write_text(long)
    pieces = list(C.units([(tmp_path / "long.txt", "text")], 1 << 16))
    assert len(pieces) > 4 and pieces[0].opens and not pieces[0].closes and pieces[-1].closes
    whole = C.tokenize([(tmp_path / "long.txt", "text")], tok, "text", tmp_path / "l", "long", workers=2,
                       progress=False, chunk_bytes=1 << 16)
    tokens, _ = direct(tok, [long])
    assert whole.num_docs == 1 and np.array_equal(np.fromfile(whole.tokens, np.uint16).astype(np.int64), tokens)


def test_jsonl_jsonl_gz_and_parquet_of_the_same_documents_give_the_same_token_file(tmp_path, bpe_json, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "d.jsonl", docs, key="content")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write((tmp_path / "d.jsonl").read_text())
    pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), tmp_path / "d.parquet", row_group_size=16)
    assert pq.ParquetFile(tmp_path / "d.parquet").metadata.num_row_groups == -(-len(docs) // 16)
    made = {}
    for name in ("d.jsonl", "d.jsonl.gz", "d.parquet"):
        cfg = make_cfg(f"data.path={tmp_path / name}", f"data.tokenizer={bpe_json}", "data.text_key=content",
                       "model.vocab_size=2048", tmp=tmp_path)  # one cache dir: each file's content is its own key
        validate(cfg)
        corpus = prepare(cfg.data, workers=2, progress=False)
        made[name] = (open(corpus.train.path, "rb").read(), open(corpus.train.docs, "rb").read(), corpus)
        assert corpus.stats["cached"] is False and corpus.num_docs == len(docs) - 1
    first = made["d.jsonl"]
    for name, got in made.items():
        assert got[0] == first[0] and got[1] == first[1], name
    # The second run, and every rank, reuse the cache.
    again = prepare(make_cfg(f"data.path={tmp_path / 'd.parquet'}", f"data.tokenizer={bpe_json}", "data.text_key=content",
                             tmp=tmp_path).data, progress=False)
    assert again.stats["cached"] is True and again.train == made["d.parquet"][2].train


def test_eval_split_is_the_last_whole_documents_and_masked_batches_ignore_exactly_the_crossing_targets(tmp_path, bpe_json, docs):
    docs = [d[: 100 + 7 * i] for i, d in enumerate(docs)]  # short: 64-token windows cross boundaries
    write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = make_cfg(f"data.path={tmp_path / 'd.jsonl'}", f"data.tokenizer={bpe_json}", "data.eval_fraction=0.1",
                   f"data.cache_dir={tmp_path / 'c'}")
    corpus = prepare(cfg.data, progress=False)
    tok = load(str(bpe_json))
    tokens, starts = direct(tok, docs)
    train, held = corpus.train, corpus.eval
    assert train.start == 0 and train.end == held.start and held.end == len(tokens)
    assert held.start in set(starts.tolist()) and held.tokens()[0] == tok.bos_id and train.tokens()[-1] == tok.eos_id
    # The fewest last documents that make up 10%: one document fewer would be less.
    assert held.num_tokens >= 0.1 * len(tokens)
    nxt = starts[np.searchsorted(starts, held.start) + 1]
    assert len(tokens) - nxt < 0.1 * len(tokens)
    # Masked batches: a target is ignored exactly where it is the next document's first token (its BOS).
    plain = Batches(train, 64, 32, 4, 3, 0, 1).step(1)
    masked = Batches(train, 64, 32, 4, 3, 0, 1, mask_documents=True).step(1)
    crossings = 0
    for (x, y), (mx, my, doc_ids) in zip(plain, masked):
        assert torch.equal(x, mx)
        crossing = y == tok.bos_id
        crossings += crossing.sum().item()
        assert torch.equal(my == IGNORE, crossing) and torch.equal(my[~crossing], y[~crossing])
        assert torch.equal(doc_ids[:, 1:] != doc_ids[:, :-1], crossing[:, :-1])
    assert crossings >= 4


def test_document_mask_gives_each_document_the_logits_it_has_alone():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)
    model = Transformer(args)
    init_weights(model, seed=1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 24), generator=gen)
    doc_ids = torch.tensor([[0] * 5 + [1] * 12 + [2] * 7, [4] * 24])
    mask = document_mask(doc_ids)
    assert mask.shape == (2, 1, 24, 24) and not mask[0, 0, 5, 4] and mask[0, 0, 6, 5] and not mask[0, 0, 5, 6]
    with torch.no_grad():
        got = model(tokens, doc_ids=doc_ids)
        for row in range(2):
            for d in doc_ids[row].unique():
                cols = (doc_ids[row] == d).nonzero().flatten()
                alone = model(tokens[row : row + 1, cols])  # positions from 0: rotary depends on distances only
                assert (got[row, cols] - alone[0]).abs().max() < 1e-5
        # One document covering the sequence is plain causal attention.
        assert (got[1] - model(tokens[1:])[0]).abs().max() < 1e-5
        assert (got[0, 5:] - model(tokens[:1])[0, 5:]).abs().max() > 1e-2  # the mask changed something


def test_trident_tokenize_prints_documents_tokens_and_speed(tmp_path, bpe_json, docs, capsys):
    from orchestrator.cli.tokenize import main

    write_jsonl(tmp_path / "d.jsonl", docs[:20])
    argv = [f"data.path={tmp_path / 'd.jsonl'}", f"data.tokenizer={bpe_json}", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(argv + ["--workers", "2"]) == 0
    out = capsys.readouterr().out
    tokens, _ = direct(load(str(bpe_json)), docs[:20])
    assert "documents   20" in out and f"{len(tokens):,}" in out and "tokens/s" in out and "MB/s" in out
    assert main(argv + ["--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["cached"] is True and figures["tokens"] == len(tokens) and figures["documents"] == 20


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, bpe_json, docs):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "broken.json").write_text('{"model": {"type": "BPE", "vocab": ')
    write_jsonl(tmp / "other_key.jsonl", docs[:5], key="body")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs[:5]}), tmp / "other_col.parquet")
    np.arange(1000, dtype=np.uint16).tofile(tmp / "tokens.bin")
    return tmp


@pytest.mark.parametrize("overrides, says", [
    (["data.tokenizer={tmp}/broken.json"], ["data.tokenizer=", "broken.json", "does not parse as a tokenizer.json"]),
    (["data.tokenizer=/no/such/tokenizer.json"], ["data.tokenizer='/no/such/tokenizer.json' does not exist", "init_from"]),
    (["data.tokenizer=init_from"], ["data.tokenizer=init_from but model.init_from is not set"]),
    (["data.tokenizer={bpe}", "data.eos_token='<nope>'"], ["data.eos_token='<nope>'", BOS]),
    (["data.tokenizer={bpe}"], ["has 2048 tokens, more than model.vocab_size=256", "may be smaller than the model, not larger"]),
    (["data.path={tmp}/other_key.jsonl"], ["data.text_key='text' is not in record 1", "its keys: id, body"]),
    (["data.path={tmp}/other_col.parquet"], ["data.text_key='text' is not a column", "its columns: body"]),
    (["data.path={tmp}/tokens.bin", "data.mask_across_documents=true"], ["data.mask_across_documents=true", ".bin"]),
])
def test_bad_text_input_is_one_config_error_before_anything_starts(bad_inputs, bpe_json, tmp_path, monkeypatch,
                                                                    overrides, says):
    import orchestrator.cli.train as train_app

    spawned = []
    monkeypatch.setattr(train_app, "spawn", lambda *a, **k: spawned.append(a))
    overrides = [o.format(tmp=bad_inputs, bpe=bpe_json) for o in overrides]
    with pytest.raises(ConfigError) as e:
        train_app.run(make_cfg(*overrides, tmp=tmp_path), str(tmp_path / "run"))
    for text in says:
        assert text in str(e.value)
    assert "\n" not in str(e.value) and spawned == [] and not (tmp_path / "cache").exists()


def test_a_stale_lock_is_taken_over_and_a_live_one_waited_for(tmp_path, bpe_json, docs):
    import os
    import threading

    tok = load(str(bpe_json))
    write_jsonl(tmp_path / "d.jsonl", docs[:10])
    files = [(tmp_path / "d.jsonl", "jsonl")]
    key = C.cache_key(files, tok, "text", tmp_path / "c")
    lock = tmp_path / "c" / f"{key}.lock"
    import socket

    lock.write_text(f"{socket.gethostname()} {2 ** 22 + 12345}\n")  # a pid that does not exist
    got = C.tokenize_cached(files, tok, "text", tmp_path / "c", "d", workers=1, progress=False)
    assert not got.cached and not lock.exists()
    # Another live process holds the lock: wait for its result rather than tokenizing again.
    shutil.rmtree(tmp_path / "c" / key)
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")
    done = threading.Timer(1.0, lambda: (C.tokenize(files, tok, "text", tmp_path / "c" / key, "d", 1, False),
                                         lock.unlink()))
    done.start()
    waited = C.tokenize_cached(files, tok, "text", tmp_path / "c", "d", workers=1, progress=False)
    done.join()
    assert waited.cached and waited.num_tokens == got.num_tokens


def test_byte_corpus_keeps_its_bytes_and_masks_at_its_file_boundaries(tmp_path):
    (tmp_path / "docs").mkdir()
    texts = [f"file {i}: " + "x" * (5 + 3 * i) for i in range(12)]
    for i, t in enumerate(texts):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(t)
    cfg = make_cfg(f"data.path={tmp_path / 'docs'}", "data.pattern=*.txt", "data.mask_across_documents=true",
                   "data.eval_fraction=0.1", tmp=tmp_path)
    validate(cfg)
    corpus = prepare(cfg.data)
    stream = bytes(corpus.train.tokens()) + b"\n\n" + bytes(corpus.eval.tokens())
    assert corpus.train.dtype == "uint8" and sorted(stream.split(b"\n\n")) == sorted(t.encode() for t in texts)
    starts = corpus.train.doc_starts()
    assert [bytes(corpus.train.tokens()[s : s + 5]) for s in starts] == [b"file "] * len(starts)
    (x, y, doc_ids), = Batches(corpus.train, 16, 4, 4, 0, 0, 1, mask_documents=True).step(1)
    (px, py), = Batches(corpus.train, 16, 4, 4, 0, 0, 1).step(1)
    crossing = doc_ids[:, 1:] != doc_ids[:, :-1]
    assert crossing.any() and torch.equal(x, px) and torch.equal((y == IGNORE)[:, :-1], crossing)
    assert torch.equal(py[y == IGNORE], torch.full_like(py[y == IGNORE], ord("f")))  # the next file's first byte
