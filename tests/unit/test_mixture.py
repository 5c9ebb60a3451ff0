"""Weighted mixtures of sources (data.sources): draws by weight, layout-independent, epochs, and bad input."""

import math

import numpy as np
import pytest
import torch

from orchestrator.data.corpus import CorpusError
from orchestrator.data.dataset import MixtureBatches, prepare
from tests.conftest import make_cfg

SEQ = 16


def write_source(path, word: str, lines: int) -> str:
    path.write_text("\n".join(f"{word} {i} " * 3 for i in range(lines)))
    return str(path)


def mixture_cfg(tmp_path, a_weight=0.75, b_weight=0.25, b_lines=300, **extra):
    a = write_source(tmp_path / "a.txt", "alpha", 300)
    b = write_source(tmp_path / "b.txt", "beta", b_lines)
    sources = f"data.sources={{a:{{path:{a},weight:{a_weight}}},b:{{path:{b},weight:{b_weight}}}}}"
    return make_cfg(sources, f"train.seq_len={SEQ}", *[f"{k}={v}" for k, v in extra.items()], tmp=tmp_path)


def sequences(batches: MixtureBatches, step: int) -> torch.Tensor:
    return torch.cat([m[0] for m in batches.step(step)])


def test_weights_075_025_give_each_source_its_share_of_200_sequences_within_the_binomial_spread(tmp_path):
    corpus = prepare(mixture_cfg(tmp_path).data)
    assert [(s.name, s.weight) for s in corpus.sources] == [("a", 0.75), ("b", 0.25)]
    batches = MixtureBatches(corpus.sources, SEQ, 8, 2, seed=0, dp_rank=0, dp_size=1)
    seen = batches.tokens_seen(25)  # 25 steps x 8 sequences
    n_a = seen["a"] // SEQ
    assert n_a + seen["b"] // SEQ == 200
    spread = math.sqrt(200 * 0.75 * 0.25)  # the binomial's standard deviation, 6.1 sequences
    assert abs(n_a - 150) <= 3 * spread, n_a
    # The sequences say where they came from: source a's text has only "alpha" in it, b's only "beta".
    text = [bytes(row.tolist()).decode(errors="replace") for row in sequences(batches, 1)]
    sources = batches.choices(1)
    for row, k in zip(text, sources):
        assert ("alpha" in row or "beta" not in row) if k == 0 else ("beta" in row or "alpha" not in row)


def test_the_draws_are_the_same_at_every_dp_size_and_after_a_resume(tmp_path):
    corpus = prepare(mixture_cfg(tmp_path).data)
    one = MixtureBatches(corpus.sources, SEQ, 8, 2, seed=3, dp_rank=0, dp_size=1)
    whole = [sequences(one, s) for s in range(1, 41)]
    for dp in (2, 4):
        ranks = [MixtureBatches(corpus.sources, SEQ, 8, 2, seed=3, dp_rank=r, dp_size=dp) for r in range(dp)]
        for s in (1, 17, 40):
            assert torch.equal(torch.cat([sequences(b, s) for b in ranks]), whole[s - 1])
    resumed = MixtureBatches(corpus.sources, SEQ, 8, 2, seed=3, dp_rank=2, dp_size=4)  # starts at step 31
    assert torch.equal(sequences(resumed, 31), whole[30][4:6])
    assert torch.equal(sequences(resumed, 32), whole[31][4:6])


def test_a_used_up_source_starts_a_new_epoch_in_a_new_order_having_given_every_window_once(tmp_path):
    corpus = prepare(mixture_cfg(tmp_path, b_lines=20).data)  # b: ~400 training tokens, 24 windows
    batches = MixtureBatches(corpus.sources, SEQ, 8, 8, seed=0, dp_rank=0, dp_size=1)
    windows = int(batches.windows[1])
    drawn = [o for s in range(1, 60) for k, o in batches.offsets(s) if k == 1]
    assert len(drawn) >= 2 * windows
    first, second = drawn[:windows], drawn[windows:2 * windows]
    assert sorted(first) == sorted(second) == [w * SEQ for w in range(windows)]
    assert first != second
    assert batches.epochs(59)["b"] == pytest.approx(len(drawn) / windows)


@pytest.mark.parametrize("overrides, message", [
    (dict(a_weight=-1), r"data.sources.a.weight=-1: a weight is a number >= 0"),
    (dict(a_weight=0, b_weight=0), r"data.sources: every weight is 0"),
])
def test_a_negative_weight_or_all_weights_zero_is_refused_naming_the_source(tmp_path, overrides, message):
    with pytest.raises(CorpusError, match=message):
        prepare(mixture_cfg(tmp_path, **overrides).data)


def test_a_source_that_does_not_exist_or_is_empty_is_refused_naming_it(tmp_path):
    missing = make_cfg(f"data.sources={{web:{{path:{tmp_path / 'nope.jsonl'},weight:1}}}}", tmp=tmp_path)
    with pytest.raises(CorpusError, match=r"data.sources.web.path=.*nope.jsonl' does not exist"):
        prepare(missing.data)
    (tmp_path / "empty.jsonl").write_text("")
    empty = make_cfg(f"data.sources={{web:{{path:{tmp_path / 'empty.jsonl'},weight:1}}}}", "data.tokenizer=bytes",
                     tmp=tmp_path)
    with pytest.raises(CorpusError, match=r"empty"):
        prepare(empty.data)
    unknown = make_cfg(f"data.sources={{web:{{path:{tmp_path / 'empty.jsonl'},wieght:1}}}}", tmp=tmp_path)
    with pytest.raises(CorpusError, match=r"data.sources.web: unknown key\(s\) wieght \(valid: path, weight"):
        prepare(unknown.data)


def test_the_sources_are_drawn_in_proportion_over_many_steps(tmp_path):
    corpus = prepare(mixture_cfg(tmp_path, a_weight=1, b_weight=3).data)
    batches = MixtureBatches(corpus.sources, SEQ, 16, 16, seed=1, dp_rank=0, dp_size=1)
    counts = np.bincount(np.concatenate([batches.choices(s) for s in range(1, 101)]), minlength=2)
    assert abs(counts[1] / 1600 - 0.75) <= 3 * math.sqrt(0.75 * 0.25 / 1600)
