"""`trident-tokenize`: tokenize a corpus into the cache ahead of training, and say what it holds.

    trident-tokenize data.path=corpus.jsonl data.tokenizer=~/Llama-3.2-1B [--workers N] [--json]

Takes the same overrides as trident-train (the data.* keys, and model.init_from for
data.tokenizer=init_from), builds the same cached token file that trident-train would
(a later run finds it and starts at once), and prints the documents, tokens and
tokens per second; with data.sources (a mixture), each source's.
"""

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from orchestrator.config import CONF_DIR, register
from orchestrator.data.chat import ChatError
from orchestrator.data.corpus import CorpusError, fmt_rate
from orchestrator.data.dataset import prepare
from orchestrator.data.tokenizer import TokenizerError
from orchestrator.validate import ConfigError, check_data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="trident-tokenize", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides, as for trident-train (data.path=..., data.tokenizer=...)")
    ap.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: data.tokenize_workers, or every core)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ns = ap.parse_args(argv)
    register()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=ns.overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's override and composition errors
        print(f"trident-tokenize: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        check_data(cfg, against_model=cfg.model.init_from is not None)
        corpus = prepare(cfg.data, cfg.model.init_from, workers=ns.workers)
    except (ConfigError, CorpusError, TokenizerError, ChatError, FileNotFoundError) as e:
        print(f"trident-tokenize: config error: {e}", file=sys.stderr)
        return 2
    if corpus.sources:  # a mixture: every source, each its own token file
        results = [describe(s.corpus, cfg.data.tokenizer) | {"name": s.name, "weight": s.weight}
                   for s in corpus.sources]
        if ns.json:
            print(json.dumps({"sources": results}, indent=1))
            return 0
        for out in results:
            show(out, f"source {out['name']} (weight {out['weight']:g}): ")
        return 0
    out = describe(corpus, cfg.data.tokenizer)
    if ns.json:
        print(json.dumps(out, indent=1))
        return 0
    show(out)
    return 0


def describe(corpus, tokenizer: str) -> dict:
    stats = corpus.stats or {}
    return {
        "source": corpus.source,
        "tokenizer": tokenizer,
        "documents": corpus.num_docs,
        "tokens": corpus.train.num_tokens + corpus.eval.num_tokens,
        "train_tokens": corpus.train.num_tokens,
        "eval_tokens": corpus.eval.num_tokens,
        "dtype": corpus.train.dtype,
        "token_file": corpus.train.path,
        "cached": stats.get("cached", True),
        "seconds": stats.get("seconds", 0.0),
        "tokens_per_s": stats.get("tokens_per_s"),
        "mb_per_s": stats.get("mb_per_s"),
    }


def show(out: dict, what: str = "") -> None:
    print(f"trident-tokenize: {what}{out['source']} with data.tokenizer={out['tokenizer']}")
    print(f"  documents   {out['documents']:,}" if out["documents"] is not None else "  documents   (unknown)")
    print(f"  tokens      {out['tokens']:,} ({out['dtype']}): train {out['train_tokens']:,} | eval {out['eval_tokens']:,}")
    if out["cached"]:
        print("  speed       already in the cache (tokenized by an earlier run)")
    else:
        print(f"  speed       {fmt_rate(out['tokens_per_s'])} tokens/s, {out['mb_per_s']:.2f} MB/s of text, "
              f"{out['seconds']:.1f} s")
    print(f"  token file  {Path(out['token_file'])}")


if __name__ == "__main__":
    sys.exit(main())
