"""The data path of a mixture against one source, and chat tokenizing against plain JSONL of the same text.

    .venv/bin/python bench/data_mixture.py [--steps 200] [--global-batch 64] [--seq-len 512] [--chats 2000]

Three sources (parts of this Python's standard library, byte-tokenized: Lib/*.py, Lib/test, the rest of Lib)
weighted 0.5 / 0.3 / 0.2, against the same standard library as one source (data.path, today's Batches).
Both build `--steps` steps of micro-batches for one rank of dp=1, with document masking on, after one
warm-up step, from token files already in the cache. One JSON line per path, then the ratio
(mixture / one source; target >= 0.95).

Chat: `--chats` conversations (2-6 turns of standard-library lines) rendered with the Llama 3 chat template of
tests/data and tokenized with their learned-token mask (orchestrator/data/chat.py, in one process, as each of
the corpus's workers does), against the same messages' text encoded as plain documents: characters per
second of each, and the ratio chat_over_plain (target >= 0.8). Then the whole data path, as trident-tokenize
runs it: four copies of them as a chat JSONL file and as a plain JSONL file ({"text": the contents}) of the
same text, read, encoded by the worker pool and written to the cache (tokenize_chat_over_plain).
"""

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402

from orchestrator.config import CONF_DIR, register  # noqa: E402
from orchestrator.data import chat  # noqa: E402
from orchestrator.data.dataset import batches_for, prepare, stdlib_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


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


def chat_rates(n: int) -> dict:
    """Characters per second: conversations rendered and tokenized with their mask, and the same text plain."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    texts = [f.read_text(errors="replace") for f in sorted(stdlib_dir().glob("*.py"))[:60]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True) for t in
                            ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")])
    rng = random.Random(0)
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    conversations = []
    for _ in range(n):
        turns = []
        for i in range(rng.randint(2, 6)):
            start = rng.randrange(len(lines) - 8)
            turns.append({"role": ("user", "assistant")[i % 2], "content": "\n".join(lines[start:start + 6])})
        conversations.append(turns)
    template = (ROOT / "tests/data/llama3-chat-template.jinja").read_text()
    renderer = chat.ChatRenderer(template, "<|begin_of_text|>", "<|eot_id|>")
    chars = sum(len(m["content"]) for c in conversations for m in c)
    # In one process, as each of the corpus's workers does, a unit of 200 records at a time: chat (checked,
    # rendered, encoded with the learned mask) against plain documents (encode_batch_fast).
    units = [conversations[i : i + 200] for i in range(0, n, 200)]
    encoder = chat.ChatEncoder(tok, renderer, "assistant")  # once per worker, as the corpus does
    plain = [["\n\n".join(m["content"] for m in c) for c in unit] for unit in units]
    chat_s = best(lambda: [encoder.encode_many([(chat.check_messages({"messages": c}, "messages", "bench"), "bench")
                                                for c in unit]) for unit in units])
    plain_s = best(lambda: [[e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
                            for texts in plain])
    # The whole data path (trident-tokenize's): a chat JSONL file and a plain JSONL file of the same text
    # (four copies of the conversations), read, encoded by the worker pool and written to a new cache.
    folder = Path(tempfile.mkdtemp(prefix="trident-chat-"))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template}))
    with open(folder / "chat.jsonl", "w") as fc, open(folder / "plain.jsonl", "w") as fp:
        for _ in range(4):
            for c in conversations:
                fc.write(json.dumps({"messages": c}) + "\n")
                fp.write(json.dumps({"text": "\n\n".join(m["content"] for m in c)}) + "\n")
    seconds, caches = {}, iter(range(100))
    for name, extra in (("plain", ()), ("chat", ("data.format=chat",))):
        seconds[name] = best(lambda: prepare(config(
            f"data.path={folder / (name + '.jsonl')}", f"data.tokenizer={folder}",
            f"data.cache_dir={folder / f'cache{next(caches)}'}", *extra).data, progress=False))
    shutil.rmtree(folder)
    return {"chat_chars_per_s": round(chars / chat_s), "plain_chars_per_s": round(chars / plain_s),
            "chat_over_plain": round(plain_s / chat_s, 3),
            "tokenize_chat_over_plain": round(seconds["plain"] / seconds["chat"], 3),
            "tokenize_chars_per_s": {k: round(4 * chars / v) for k, v in seconds.items()},
            "target": 0.8, "conversations": n}


def best(run, repeats: int = 3) -> float:
    """The fastest of `repeats` runs after one warm-up, in seconds (this machine's timing varies by ~30%)."""
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chats", type=int, default=2000)
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
    print(json.dumps(chat_rates(args.chats)))


if __name__ == "__main__":
    main()
