"""Corpora on disk, the held-out split, and layout-independent batches."""

import numpy as np
import pytest
import torch

from orchestrator.data.dataset import Batches, ByteTokenizer, eval_batches, prepare, text_files
from orchestrator.validate import ConfigError, check_corpus
from tests.conftest import make_cfg


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    return prepare(make_cfg(f"data.cache_dir={tmp_path_factory.mktemp('cache')}").data)


def test_default_corpus_is_the_stdlib_source_with_a_disjoint_held_out_split(stdlib_corpus):
    train, held = stdlib_corpus.train, stdlib_corpus.eval
    assert train.num_tokens > 5_000_000  # megabytes of real Python
    assert 0.005 < held.num_tokens / (train.num_tokens + held.num_tokens) < 0.05
    text = bytes(train.tokens()[:20000]).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text
    # Held out by whole file: a long held-out snippet does not occur in the training bytes.
    snippet = bytes(held.tokens()[1000:1200])
    assert snippet not in bytes(train.tokens())


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "def π(): return 'naïve' # ✓"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < tok.vocab_size == 256


def test_batches_are_deterministic_and_dp_ranks_partition_the_global_batch(stdlib_corpus):
    split = stdlib_corpus.train
    whole = Batches(split, seq_len=16, global_batch=8, micro_batch=2, seed=5, dp_rank=0, dp_size=1).step(3)
    again = Batches(split, seq_len=16, global_batch=8, micro_batch=2, seed=5, dp_rank=0, dp_size=1).step(3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, again))
    inputs = torch.cat([x for x, _ in whole])
    shares = [
        torch.cat([x for x, _ in Batches(split, 16, 8, 2, 5, r, 4).step(3)]) for r in range(4)
    ]
    assert torch.equal(torch.cat(shares), inputs)
    x, y = whole[0]
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    other = torch.cat([x for x, _ in Batches(split, 16, 8, 2, 5, 0, 1).step(4)])
    assert not torch.equal(other, inputs)


def test_eval_windows_are_fixed_and_split_across_dp_ranks(stdlib_corpus):
    full = torch.cat([x for x, _ in eval_batches(stdlib_corpus.eval, 16, 10, 4, 0, 1)])
    parts = [torch.cat([x for x, _ in eval_batches(stdlib_corpus.eval, 16, 10, 4, r, 3)]) for r in range(3)]
    assert full.shape[0] == 10
    assert torch.equal(torch.cat(parts), full)


def test_user_text_file_and_folder(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i} " * 50)
    folder = prepare(make_cfg(f"data.path={tmp_path / 'docs'}", "data.pattern=*.txt", f"data.cache_dir={tmp_path / 'c'}").data)
    assert folder.train.num_tokens + folder.eval.num_tokens > 30 * 500
    one = tmp_path / "one.txt"
    one.write_text("hello world " * 1000)
    single = prepare(make_cfg(f"data.path={one}", f"data.cache_dir={tmp_path / 'c'}").data)
    assert single.train.num_tokens + single.eval.num_tokens == 12000
    assert single.eval.num_tokens == 240  # the last 2%


def test_a_folders_files_are_globbed_in_path_order_without_installed_packages_or_caches(tmp_path):
    for name in ("b.py", "a-c.py", "a/b.py", ".hidden.py", ".dot/x.py", "a/deep/er/z.py", "a/notes.txt",
                 "site-packages/pkg/m.py", "a/__pycache__/b.cpython-311.py", "dist-packages/n.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    (tmp_path / "dir.py").mkdir()  # matches the pattern, but is no file
    found = text_files(tmp_path, "**/*.py")
    assert [f.relative_to(tmp_path).as_posix() for f in found] == [
        ".dot/x.py", ".hidden.py", "a/b.py", "a/deep/er/z.py", "a-c.py", "b.py"]  # Path order: "a" < "a-c.py"
    assert [f.name for f in text_files(tmp_path, "*.py")] == [".hidden.py", "a-c.py", "b.py"]
    assert text_files(tmp_path / "site-packages", "**/*.py") == []
    assert text_files(tmp_path / "b.py", "*.md") == [tmp_path / "b.py"]


def test_pretokenized_bin_file_and_vocab_check(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(10_000, dtype=np.uint16).tofile(path)
    cfg = make_cfg(f"data.path={path}", "data.bin_dtype=uint16")
    corpus = prepare(cfg.data)
    assert corpus.max_token == 9999
    assert corpus.eval.tokens()[0] == 9800 and corpus.train.num_tokens == 9800
    with pytest.raises(ConfigError, match="model.vocab_size=256 is too small.*valid: vocab_size >= 10000"):
        check_corpus(cfg, corpus)
    check_corpus(make_cfg(f"data.path={path}", "model.vocab_size=10000"), corpus)
