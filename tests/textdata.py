"""Real-text fixtures built in the test, no download: a small BPE trained on stdlib source, a tiny HF Llama.

The tokenizer is a byte-level BPE like Llama 3's (ByteLevel pre-tokenizer, a
`<|begin_of_text|>` BOS added by its post-processor, `<|end_of_text|>` EOS),
trained with the `tokenizers` library on part of this Python's standard library.
"""

import json
from pathlib import Path

from orchestrator.data.dataset import stdlib_dir, text_files

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def stdlib_texts(n: int, start: int = 0, step: int = 1) -> list[str]:
    """n source files of the standard library, as documents (empty ones skipped)."""
    files = text_files(stdlib_dir(), "**/*.py")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files[start::step]]
    return [t for t in texts if t][:n]


def train_bpe(vocab_size: int, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def bare_tokenizer(folder: Path, vocab_size: int = 2048) -> Path:
    """A bare tokenizer.json (no tokenizer_config.json): BOS/EOS found by their names."""
    folder.mkdir(parents=True, exist_ok=True)
    train_bpe(vocab_size, stdlib_texts(200, step=5)).save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def hf_llama(folder: Path, tokenizer_json: Path, dim: int = 32, layers: int = 4, heads: int = 4, kv_heads: int = 2,
             intermediate: int = 96, seed: int = 0, init_std: float = 0.2) -> Path:
    """A tiny random Llama saved by transformers, with the tokenizer saved beside it (tokenizer_config.json too).

    init_std: larger than a real init's 0.02, so that its predictions depend on the context and
    what attention may see (document masking) moves the loss well beyond float error.
    """
    import torch
    import transformers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(str(folder))
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=dim, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
        tie_word_embeddings=False, initializer_range=init_std,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, key: d}) + "\n")
    return path


def short_documents(n_files: int = 60) -> list[str]:
    """Paragraphs of stdlib source, 40-300 characters: a 32-token window often holds several."""
    return [p for t in stdlib_texts(n_files, start=3, step=11) for p in t.split("\n\n") if 40 <= len(p) <= 300]
