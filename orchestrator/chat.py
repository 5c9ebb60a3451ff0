"""Conversations as training documents: rendered with the model's chat template, the assistant's tokens marked.

A record holds a list of messages, each `{"role": ..., "content": "..."}` (the Hugging Face / OpenAI chat
format). It is rendered with a Jinja chat template: the `chat_template` of the tokenizer's
tokenizer_config.json, or a template file (data.chat_template). The environment is the one transformers
renders in: sandboxed, trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now` and a `tojson`
filter. The variables are messages, bos_token, eos_token and add_generation_prompt=false.

The rendered text is tokenized whole, with no special tokens added, as
`apply_chat_template(tokenize=True)` does. To find where each assistant turn lies, the conversation up to it
is rendered (its end) and once more with a stand-in content (where its content starts). A template whose
prefixes do not render as prefixes of the whole is refused. An assistant message's tokens to learn are those from its
content to the end of its turn (the end-of-turn token included, so the model learns to stop); the content
starts where the turn, rendered with a stand-in content, first differs. Its role header and every other
message's tokens are not learned: their targets are ignored.
"""

import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")


class ChatError(ValueError):
    """A conversation or a chat template that cannot be used, said in one line naming where."""


def find_template(tokenizer_dir: Optional[Path], template_file: Optional[str]) -> str:
    """The chat template: data.chat_template's file, else the tokenizer_config.json beside the tokenizer."""
    if template_file:
        path = Path(template_file).expanduser()
        if not path.is_file():
            raise ChatError(f"data.chat_template={template_file!r} is not a file")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":  # a tokenizer_config.json given as the template's source
            text = json.loads(text).get("chat_template") or ""
        if not text.strip():
            raise ChatError(f"data.chat_template={template_file!r} holds no template")
        return text
    config = tokenizer_dir / "tokenizer_config.json" if tokenizer_dir is not None else None
    template = json.loads(config.read_text()).get("chat_template") if config is not None and config.is_file() else None
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        where = f"{config}" if config is not None else "data.tokenizer=bytes"
        raise ChatError(f"data.format=chat needs a chat template: {where} has none (set data.chat_template to a "
                        "Jinja template file, or use a tokenizer whose tokenizer_config.json has chat_template)")
    return template


def check_messages(record, key: str, where: str) -> list[dict]:
    """The record's messages, checked: a list of {role, content} with known roles and string contents."""
    if not isinstance(record, dict) or key not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise ChatError(f"{where}: no {key!r} list (data.messages_key={key!r}; its keys: {keys})")
    messages = record[key]
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: {key!r} is not a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatError(f"{where}: message {i} is not a {{role, content}} object")
        if m["role"] not in ROLES:
            raise ChatError(f"{where}: message {i} has role {m['role']!r} (valid: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ChatError(f"{where}: message {i} ({m['role']}) has content of type {type(m['content']).__name__}, "
                            "not a string")
    return messages


_PROBE = "\u0001"  # a content no real message starts with


def _raise(message: str):
    raise TemplateError(message)


class ChatRenderer:
    """One chat template, compiled once; renders conversations and says where each message lies."""

    def __init__(self, template: str, bos_token: Optional[str], eos_token: Optional[str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: \
            json.dumps(x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise ChatError(f"the chat template does not parse: {e}") from None
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def render(self, messages: list[dict]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=False, **self.special)

    def spans(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, [start, end) of each assistant turn's learned characters).

        Rendered: the whole, and for each assistant turn the conversation up to it (its end) and once more
        with a stand-in content (where its content starts). Each must be a prefix of the whole.
        """
        try:
            whole = self.render(messages)
            learned, before = [], 0
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                upto = whole if i == len(messages) - 1 else self.render(messages[: i + 1])
                probe = self.render([*messages[:i], {**m, "content": _PROBE}])
                if not whole.startswith(upto) or len(upto) < before:
                    raise ChatError(f"{where}: the chat template renders message {i} differently once later "
                                    "messages follow, so its tokens cannot be told apart")
                # Where this turn, rendered with a stand-in content, first differs: where the stand-in is
                # (the template printed the content as it is), else found character by character.
                start = probe.find(_PROBE, before)
                if start < 0 or upto[before:start] != probe[before:start]:
                    start = before
                    while start < min(len(upto), len(probe)) and upto[start] == probe[start]:
                        start += 1
                learned.append((start, len(upto)))
                before = len(upto)
        except TemplateError as e:
            raise ChatError(f"{where}: the chat template refused it: {e}") from None
        return whole, learned


def encode(tokenizer, renderer: ChatRenderer, messages: list[dict], train_on: str, where: str):
    """(token ids, a 0/1 mask of the tokens whose prediction is learned) of one conversation.

    tokenizer: a `tokenizers.Tokenizer`. train_on: "assistant" (the assistant turns' tokens) or "all".
    """
    [(ids, mask)] = encode_many(tokenizer, renderer, [(messages, where)], train_on)
    return ids, mask.tolist()


def encode_many(tokenizer, renderer: ChatRenderer, conversations: list[tuple[list[dict], str]], train_on: str):
    """[(token ids, learned mask as a uint8 array)] of many conversations ((messages, where) each), tokenized in
    one batch."""
    rendered = [renderer.spans(messages, where) for messages, where in conversations]
    if train_on != "all":
        for (_, learned), (_, where) in zip(rendered, conversations):
            if not learned:
                raise ChatError(f"{where}: no assistant message, and data.train_on=assistant learns only those "
                                "(valid: data.train_on=all, or records with an assistant turn)")
    out = []
    for enc, (_, learned) in zip(tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False),
                                 rendered):
        if train_on == "all":
            out.append((enc.ids, np.ones(len(enc.ids), dtype=np.uint8)))
            continue
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        start, end = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(enc.ids), dtype=bool)
        for a, b in learned:  # a token is learned when its characters lie inside an assistant span
            mask |= (start >= a) & (end <= b) & (end > start)
        out.append((enc.ids, mask.astype(np.uint8)))
    return out
