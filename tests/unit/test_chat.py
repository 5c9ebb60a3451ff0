"""Chat records rendered with the Llama 3 chat template (tests/data), against transformers' apply_chat_template.

The token ids must equal transformers' `apply_chat_template(tokenize=True)`. The learned-token mask must
equal transformers' `return_assistant_tokens_mask`, taken from the same template with `{% generation %}`
around each assistant turn's content and end-of-turn token. That template renders the same text; the Llama 3
template itself has no generation tags.
"""

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer

from orchestrator.data.chat import ChatError, ChatRenderer, check_messages, encode, find_template
from tests.textdata import BOS

TEMPLATE = (Path(__file__).resolve().parent.parent / "data" / "llama3-chat-template.jinja").read_text()
# The same text, each assistant turn's content and end of turn inside {% generation %} (for transformers' mask).
GENERATION = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
)
EOT = "<|eot_id|>"
CONVERSATIONS = [
    [{"role": "user", "content": "What does len() return?"},
     {"role": "assistant", "content": "The number of items in a container."}],
    [{"role": "system", "content": "You answer in Python.\n"},
     {"role": "user", "content": "  Sum a list.  "},
     {"role": "assistant", "content": "def total(xs):\n    return sum(xs)\n"},
     {"role": "user", "content": "And the mean?"},
     {"role": "assistant", "content": " sum(xs) / len(xs)"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "y"},
     {"role": "assistant", "content": "z"}],
]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory, bpe_json) -> Path:
    """The tests' BPE with Llama 3's chat tokens added, saved with a tokenizer_config.json holding the template."""
    folder = tmp_path_factory.mktemp("chat-tok")
    tok = Tokenizer.from_file(str(bpe_json))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|start_header_id|>", "<|end_header_id|>", EOT)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOT, "chat_template": TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def transformers_encode(folder: Path, messages: list, template: str) -> dict:
    import transformers

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token=BOS,
                                               eos_token=EOT)
    out = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask="generation" in template)
    return {k: list(v) for k, v in out.items()}


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_ids_equal_transformers_apply_chat_template_and_the_mask_its_assistant_tokens_mask(chat_tokenizer, index):
    messages = CONVERSATIONS[index]
    template = find_template(chat_tokenizer, None)
    assert template == TEMPLATE
    ids, mask = encode(Tokenizer.from_file(str(chat_tokenizer / "tokenizer.json")), ChatRenderer(template, BOS, EOT),
                       messages, "assistant", f"conversation {index}")
    ref = transformers_encode(chat_tokenizer, messages, TEMPLATE)
    assert ids == ref["input_ids"]
    tagged = transformers_encode(chat_tokenizer, messages, GENERATION)
    assert tagged["input_ids"] == ids  # the tagged template renders the same text
    assert mask == tagged["assistant_masks"]
    assert sum(mask) >= sum(m["role"] == "assistant" for m in messages)  # each turn's end of turn, at least
    all_ids, all_mask = encode(Tokenizer.from_file(str(chat_tokenizer / "tokenizer.json")),
                               ChatRenderer(template, BOS, EOT), messages, "all", "x")
    assert all_ids == ids and all_mask == [1] * len(ids)


@pytest.mark.parametrize("record, message", [
    ({"text": "not a conversation"}, r"line 3: no 'messages' list \(data.messages_key='messages'; its keys: text\)"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"line 3: message 0 has role 'robot' \(valid: system, "),
    ({"messages": [{"role": "user", "content": ["a", "b"]}]}, r"line 3: message 0 \(user\) has content of type list"),
    ({"messages": []}, r"line 3: 'messages' is not a non-empty list"),
])
def test_a_record_that_is_not_a_conversation_is_refused_naming_the_record(record, message):
    with pytest.raises(ChatError, match=message):
        check_messages(record, "messages", "chat.jsonl, line 3")


def test_a_tokenizer_without_a_chat_template_and_no_data_chat_template_is_refused(tmp_path, bpe_json, chat_tokenizer):
    with pytest.raises(ChatError, match=r"needs a chat template: .*tokenizer_config.json has none \(set "
                                        r"data.chat_template"):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS}))
        find_template(tmp_path, None)
    with pytest.raises(ChatError, match=r"data.chat_template='.*missing.jinja' is not a file"):
        find_template(tmp_path, str(tmp_path / "missing.jinja"))
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert find_template(tmp_path, str(tmp_path / "t.jinja")) == TEMPLATE


def test_train_on_assistant_with_no_assistant_turn_is_refused(chat_tokenizer):
    tok = Tokenizer.from_file(str(chat_tokenizer / "tokenizer.json"))
    only_user = [{"role": "user", "content": "hello"}]
    with pytest.raises(ChatError, match=r"chat.jsonl, line 9: no assistant message, and data.train_on=assistant"):
        encode(tok, ChatRenderer(TEMPLATE, BOS, EOT), only_user, "assistant", "chat.jsonl, line 9")


def test_jsonl_and_parquet_conversations_give_the_same_tokens_and_learned_mask(chat_tokenizer, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data.dataset import prepare
    from tests.conftest import make_cfg

    records = [{"messages": c} for c in CONVERSATIONS * 4]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet", row_group_size=5)
    got = {}
    for name in ("c.jsonl", "c.parquet"):
        cfg = make_cfg(f"data.path={tmp_path / name}", "data.format=chat", f"data.tokenizer={chat_tokenizer}",
                       f"data.cache_dir={tmp_path / 'cache'}", "data.mask_across_documents=true", tmp=tmp_path)
        corpus = prepare(cfg.data, progress=False)
        tokens = np.concatenate([corpus.train.tokens(), corpus.eval.tokens()])
        mask = np.concatenate([corpus.train.loss_mask(), corpus.eval.loss_mask()])
        got[name] = (tokens.tolist(), mask.tolist())
    assert got["c.jsonl"] == got["c.parquet"]
    tok = Tokenizer.from_file(str(chat_tokenizer / "tokenizer.json"))
    first_ids, first_mask = encode(tok, ChatRenderer(TEMPLATE, BOS, EOT), CONVERSATIONS[0], "assistant", "x")
    assert got["c.jsonl"][0][: len(first_ids)] == first_ids and got["c.jsonl"][1][: len(first_mask)] == first_mask


def test_a_mixture_of_a_chat_source_and_a_text_source_ignores_only_the_chat_sources_unlearned_targets(
        chat_tokenizer, tmp_path):
    from orchestrator.data.dataset import IGNORE, MixtureBatches, prepare
    from tests.conftest import make_cfg

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 20))
    (tmp_path / "t.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    cfg = make_cfg(f"data.sources={{chat:{{path:{tmp_path / 'c.jsonl'},format:chat,weight:1}},"
                   f"code:{{path:{tmp_path / 't.txt'},weight:1}}}}", f"data.tokenizer={chat_tokenizer}",
                   f"data.cache_dir={tmp_path / 'cache'}", tmp=tmp_path)
    corpus = prepare(cfg.data, progress=False)
    chat, code = (s.corpus.train for s in corpus.sources)
    assert chat.mask is not None and code.mask is None
    batches = MixtureBatches(corpus.sources, 16, 16, 16, seed=0, dp_rank=0, dp_size=1, mask_documents=True)
    (_, targets, _), = batches.step(1)
    ignored = (targets == IGNORE).sum(dim=1)
    kinds = batches.choices(1)
    assert 0 in kinds and 1 in kinds
    # A chat window ignores its non-assistant targets; a code window only a target across a document boundary.
    assert all(ignored[i] > 1 for i in range(16) if kinds[i] == 0)
    assert all(ignored[i] <= 1 for i in range(16) if kinds[i] == 1)


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}")
SHOUTING = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
            "message['content'] | upper + '<|eot_id|>' }}{% endfor %}")
UNICODE = [[{"role": "user", "content": "Écris « naïve » en Python 🐍"},
            {"role": "assistant", "content": "  s = 'naïve café'  # ✓\n"},
            {"role": "user", "content": "中文呢？"}, {"role": "assistant", "content": "s = '中文' 🐍"}]]


@pytest.mark.parametrize("template, one_render", [(TEMPLATE, True), (CHATML, True), (SHOUTING, False)])
@pytest.mark.parametrize("tokenizer", ["byte-level", "normalizer", "prefix-space"])
def test_one_render_and_token_byte_lengths_find_what_prefix_renders_and_character_offsets_find(
        chat_tokenizer, template, one_render, tokenizer):
    """The fast paths (one render per conversation filled into its roles' skeleton; the mask from the tokens'
    byte lengths) against the reference (a render per prefix and stand-in; the mask from character offsets),
    on ASCII and non-ASCII text, with a template that prints contents trimmed (Llama 3), as they are
    (ChatML), and changed (upper-cased: no skeleton fits, the prefixes are used). A tokenizer with a
    normalizer has no byte lengths; one that adds a space before the text has tokens that do not add up to
    it (each conversation falls back to the offsets)."""
    from tokenizers import normalizers, pre_tokenizers

    from orchestrator.data.chat import ChatEncoder, _mask_by_offsets, _masks_by_bytes

    tok = Tokenizer.from_file(str(chat_tokenizer / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    if tokenizer == "normalizer":
        tok.normalizer = normalizers.NFD()
    elif tokenizer == "prefix-space":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    renderer = ChatRenderer(template, BOS, EOT)
    encoder = ChatEncoder(tok, renderer, "assistant")
    assert (encoder.token_bytes is None) == (tokenizer == "normalizer")
    conversations = CONVERSATIONS + UNICODE
    got = encoder.encode_many([(c, f"conversation {i}") for i, c in enumerate(conversations)])
    for messages, (ids, mask) in zip(conversations, got):
        text, learned = renderer._spans_by_prefixes(messages, "x")
        assert renderer._spans_by_skeleton(messages) == ((text, learned) if one_render else None)
        [enc] = tok.encode_batch([text], add_special_tokens=False)
        assert ids.tolist() == enc.ids
        assert mask.tolist() == _mask_by_offsets(enc, learned).tolist()
        if tokenizer != "normalizer":
            [by_bytes] = _masks_by_bytes(encoder.token_bytes, [ids], [(text, learned)])
            assert (by_bytes is None) == (tokenizer == "prefix-space")
        assert 0 < mask.sum() < len(mask)


@pytest.mark.parametrize("template, put", [(TEMPLATE, str.strip), (CHATML, str), (SHOUTING, None)])
def test_a_template_whose_code_only_prints_contents_skips_the_checking_render_and_still_finds_the_same(
        template, put, monkeypatch):
    """Llama 3's template (contents trimmed, through a variable) and ChatML's (as they are) only print contents:
    once checked (here: at once), a conversation is its skeleton filled, with no render, and the spans are the
    reference's. The upper-casing one is never trusted."""
    import orchestrator.data.chat as chat

    monkeypatch.setattr(chat, "VERIFIED", 0)
    renderer = ChatRenderer(template, BOS, EOT)
    assert renderer.put is put
    conversations = CONVERSATIONS + UNICODE
    reference = [renderer._spans_by_prefixes(c, "x") for c in conversations]
    for messages in conversations:  # the skeletons of each sequence of roles, made first
        renderer._spans_by_skeleton(messages)
    renders = []
    monkeypatch.setattr(renderer, "render", lambda messages: renders.append(1) or ChatRenderer.render(renderer, messages))
    got = [renderer._spans_by_skeleton(c) for c in conversations]
    if put is None:
        assert got == [None] * len(conversations)
    else:
        assert got == reference and not renders


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{% if m['content'] %}{{ m['content'] }}{% endif %}{% endfor %}",  # tested
    "{% for m in messages %}{{ m.get('content') }}{% endfor %}",  # reached by name
    "{% for m in messages %}{{ m.content.split('x')[0] }}{% endfor %}",  # changed
    "{{ messages | tojson }}",  # shown whole
    "{% for m in messages %}{{ m['content'] | trim }}{{ m['content'] }}{% endfor %}",  # printed two ways
    "{% for m in messages %}{% set c = m['content'] %}{% if c | length > 3 %}!{% endif %}{{ c }}{% endfor %}",
    "{% for m in messages %}{{ (m['role'] + m['content']) | trim }}{% endfor %}",  # trimmed with other text
])
def test_a_template_that_does_more_with_a_content_than_print_it_is_checked_by_a_render_every_time(template):
    assert ChatRenderer(template, BOS, EOT).put is None
