"""The data path of a mixture against one source: sequences per second of the batches the loop takes.

    .venv/bin/python bench/data_mixture.py [--steps 200] [--global-batch 64] [--seq-len 512]

Three sources (parts of this Python's standard library, byte-tokenized: Lib/*.py, Lib/test, the rest of Lib)
weighted 0.5 / 0.3 / 0.2, against the same standard library as one source (data.path, today's Batches).
Both build `--steps` steps of micro-batches for one rank of dp=1, with document masking on, after one
warm-up step, from token files already in the cache. One JSON line per path, then the ratio
(mixture / one source; target >= 0.95).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402

from orchestrator.config import CONF_DIR, register  # noqa: E402
from orchestrator.data import batches_for, prepare, stdlib_dir  # noqa: E402


def config(*overrides: str):
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def rate(corpus, args) -> float:
    batches = batches_for(corpus, args.seq_len, args.global_batch, args.micro_batch, 0, 0, 1, True)
    batches.step(1)
    t0 = time.perf_counter()
    for step in range(2, args.steps + 2):
        batches.step(step)
    return args.steps * args.global_batch * args.seq_len / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    lib = stdlib_dir()
    cache = tempfile.mkdtemp(prefix="trident-mix-")
    one = prepare(config(f"data.cache_dir={cache}").data, progress=False)
    sources = (f"data.sources={{top:{{path:{lib},pattern:'*.py',weight:0.5}},"
               f"tests:{{path:{lib / 'test'},weight:0.3}},rest:{{path:{lib},pattern:'*/*.py',weight:0.2}}}}")
    mix = prepare(config(sources, f"data.cache_dir={cache}").data, progress=False)
    results = {}
    for name, corpus in (("one_source", one), ("three_sources", mix)):
        results[name] = rate(corpus, args)
        print(json.dumps({"path": name, "tokens_per_s": round(results[name])}))
    print(json.dumps({"mixture_over_one_source": round(results["three_sources"] / results["one_source"], 3),
                      "target": 0.95, "steps": args.steps, "global_batch": args.global_batch,
                      "seq_len": args.seq_len}))


if __name__ == "__main__":
    main()
