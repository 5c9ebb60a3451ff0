"""Conversations as training documents: rendered with the model's chat template, the assistant's tokens marked.

A record holds a list of messages, each `{"role": ..., "content": "..."}` (the Hugging Face / OpenAI chat
format). It is rendered with a Jinja chat template: the `chat_template` of the tokenizer's
tokenizer_config.json, or a template file (data.chat_template). The environment is the one transformers
renders in: sandboxed, trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now` and a `tojson`
filter. The variables are messages, bos_token, eos_token and add_generation_prompt=false.

The rendered text is tokenized whole, with no special tokens added, as
`apply_chat_template(tokenize=True)` does. An assistant message's tokens to learn are those from its content
to the end of its turn (the end-of-turn token included, so the model learns to stop); its role header and every
other message's tokens are not learned: their targets are ignored.

Where each assistant turn lies, the reference way: the conversation up to it is rendered (its end) and once
more with a stand-in content (where its content starts); a template whose prefixes do not render as prefixes
of the whole is refused. That is two more renders per assistant turn, so first the fast way: each sequence of
roles is rendered once with stand-ins for every content (its skeleton, kept), and a conversation, rendered
once, is its skeleton with each content put in as it is or trimmed; where it is not (a template that changes
contents, or prints other keys), the reference way. A test holds the two to the same answers.

Where the template's own code shows that it only prints contents (`contents_put`: every use of a message's
content is printed, as it is or trimmed, or joined to other text that is), the render that checks the filled
skeleton is skipped once the first conversations of each sequence of roles (VERIFIED) all passed it.
"""

import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import pre_tokenizers

ROLES = ("system", "user", "assistant", "tool")
VERIFIED = 16  # conversations per sequence of roles rendered to check the skeleton, where the code says it fits


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
        self._skeletons: dict[tuple[str, ...], Optional[_Skeleton]] = {}
        self.put = contents_put(env.parse(template))  # None: only a render tells

    def render(self, messages: list[dict]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=False, **self.special)

    def spans(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, [start, end) of each assistant turn's learned characters)."""
        try:
            return self._spans_by_skeleton(messages) or self._spans_by_prefixes(messages, where)
        except TemplateError as e:
            raise ChatError(f"{where}: the chat template refused it: {e}") from None

    def _spans_by_prefixes(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """Rendered: the whole, and for each assistant turn the conversation up to it (its end) and once more
        with a stand-in content (where its content starts). Each must be a prefix of the whole."""
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
        return whole, learned

    def _spans_by_skeleton(self, messages: list[dict]) -> Optional[tuple[str, list[tuple[int, int]]]]:
        """The spans in one render, where the conversation's roles have a skeleton and the whole is that
        skeleton with each content put in as it is or trimmed (None otherwise: the prefixes tell)."""
        if any(len(m) != 2 for m in messages):  # more than {role, content}: keys the template may print
            return None
        roles = tuple(m["role"] for m in messages)
        if roles not in self._skeletons:
            self._skeletons[roles] = _Skeleton.of(self, roles)
        skeleton = self._skeletons[roles]
        if skeleton is None:
            return None
        if self.put is not None and skeleton.verified >= VERIFIED:
            contents = [self.put(m["content"]) for m in messages]
            return skeleton.fill(contents), skeleton.learned(contents)
        whole = self.render(messages)
        for put in (str, str.strip):  # as transformers' templates print a content: as it is, or `| trim`
            contents = [put(m["content"]) for m in messages]
            if skeleton.fill(contents) == whole:
                skeleton.verified += put is self.put
                return whole, skeleton.learned(contents)
        self.put = None  # the code looked plain and was not: every conversation is rendered from now on
        return None


# Filters and methods that show a message (or all of them) other than by its printed content.
_EXPOSING_FILTERS = {"tojson", "pprint", "dictsort", "items", "string", "list", "map", "selectattr", "rejectattr",
                     "groupby", "sort", "unique", "attr", "join", "sum", "first", "last", "batch", "slice"}
_EXPOSING_METHODS = {"items", "values", "keys", "get"}


def contents_put(template: nodes.Template):
    """How the template prints each message's content, where its code shows that it does nothing else with it:
    str (as it is) or str.strip (`| trim`); None where a content is tested, changed, measured, or reached
    otherwise (the filled skeleton is then checked against a render for every conversation).

    Every `message['content']` (or `.content`), optionally `| trim`, must be printed, joined by `+` or `~` to
    other text, or assigned to a variable that is used only the same way; the word 'content' appears nowhere
    else, and no filter or method that shows whole messages is used."""
    parent: dict[int, nodes.Node] = {}
    stack = [template]
    while stack:
        node = stack.pop()
        for child in node.iter_child_nodes():
            parent[id(child)] = node
            stack.append(child)
    every = list(template.find_all(nodes.Node))
    if any(isinstance(n, nodes.Filter) and n.name in _EXPOSING_FILTERS for n in every) or \
            any(isinstance(n, nodes.Getattr) and n.attr in _EXPOSING_METHODS for n in every):
        return None

    def is_source(n) -> bool:
        return (isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const) and n.arg.value == "content") or \
            (isinstance(n, nodes.Getattr) and n.attr == "content")

    def sink(n) -> Optional[str]:
        """Where a value holding a content goes: 'out' (printed), a variable's name, or None (elsewhere)."""
        up = parent.get(id(n))
        while isinstance(up, (nodes.Add, nodes.Concat)):
            n, up = up, parent.get(id(up))
        if isinstance(up, nodes.Output):
            return "out"
        if isinstance(up, nodes.Assign) and up.node is n and isinstance(up.target, nodes.Name):
            return up.target.name
        return None

    puts, tainted = set(), set()
    for n in every:
        if isinstance(n, nodes.Const) and n.value == "content" and not is_source(parent.get(id(n))):
            return None  # 'content' reached another way (`.get('content')`, `'content' in message`)
        if not is_source(n):
            continue
        up = parent.get(id(n))
        trimmed = isinstance(up, nodes.Filter) and up.name == "trim" and up.node is n and not up.args
        puts.add(str.strip if trimmed else str)
        where = sink(up if trimmed else n)
        if where is None:
            return None
        if where != "out":
            tainted.add(where)
    grown = True
    while grown:  # variables holding a content, and every use of them
        grown = False
        for n in every:
            if isinstance(n, nodes.Name) and n.ctx == "load" and n.name in tainted:
                where = sink(n)
                if where is None:
                    return None
                if where != "out" and where not in tainted:
                    tainted.add(where)
                    grown = True
    return puts.pop() if len(puts) == 1 else None


class _Skeleton:
    """A conversation's rendering with stand-ins for its contents: the template's own text around them, and
    where each assistant turn ends (from the rendering of the conversation up to it)."""

    def __init__(self, around: list[str], turn_ends: dict[int, int]):
        self.around = around  # the text before content 0, between 0 and 1, ..., after the last
        self.turn_ends = turn_ends  # assistant message -> its turn's end, in characters into the text after it
        self.verified = 0  # conversations whose render was this skeleton filled as ChatRenderer.put says

    @classmethod
    def of(cls, renderer: ChatRenderer, roles: tuple[str, ...]) -> Optional["_Skeleton"]:
        marks = [f"\u0002{i}\u0003" for i in range(len(roles))]
        stand_ins = [{"role": r, "content": m} for r, m in zip(roles, marks)]
        try:
            text = renderer.render(stand_ins)
        except TemplateError:
            return None  # the prefixes say why, naming the record
        around, ends, pos = [], [], 0  # ends: where each stand-in's text ends
        for mark in marks:
            at = text.find(mark, pos)
            if at < 0 or text.count(mark) != 1:  # a content not printed once, as it is: no skeleton
                return None
            around.append(text[pos:at])
            pos = at + len(mark)
            ends.append(pos)
        around.append(text[pos:])
        turn_ends = {}
        for i, role in enumerate(roles):
            if role == "assistant":
                upto = text if i == len(roles) - 1 else renderer.render(stand_ins[: i + 1])
                after = ends[i]
                if not text.startswith(upto) or not after <= len(upto) <= after + len(around[i + 1]):
                    return None  # the prefixes refuse it, naming the record
                turn_ends[i] = len(upto) - after
        return cls(around, turn_ends)

    def fill(self, contents: list[str]) -> str:
        parts = [self.around[0]]
        for content, text in zip(contents, self.around[1:]):
            parts += (content, text)
        return "".join(parts)

    def learned(self, contents: list[str]) -> list[tuple[int, int]]:
        out, pos = [], len(self.around[0])
        for i, (content, text) in enumerate(zip(contents, self.around[1:])):
            if i in self.turn_ends:
                out.append((pos, pos + len(content) + self.turn_ends[i]))
            pos += len(content) + len(text)
        return out


class ChatEncoder:
    """Conversations to (token ids, learned-token mask), with one tokenizer and one template.

    tokenizer: a `tokenizers.Tokenizer`. train_on: "assistant" (the assistant turns' tokens) or "all".
    A token is learned when its characters lie inside an assistant turn's learned span. With a byte-level
    tokenizer and no normalizer (GPT-2, Llama 3, Qwen: each token is bytes of the text, in order), a token's
    characters follow from the byte lengths of the tokens before it, so the batch is encoded without
    character offsets; a conversation whose tokens do not add up to its text, or any other tokenizer, uses
    the offsets.
    """

    def __init__(self, tokenizer, renderer: ChatRenderer, train_on: str):
        self.tokenizer, self.renderer, self.train_on = tokenizer, renderer, train_on
        self.token_bytes = _token_bytes(tokenizer)

    def encode_many(self, conversations: list[tuple[list[dict], str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(token ids as an int64 array, learned mask as a uint8 array)] of many conversations ((messages, where)
        each), tokenized in one batch."""
        rendered = [self.renderer.spans(messages, where) for messages, where in conversations]
        texts = [text for text, _ in rendered]
        if self.train_on == "all":
            return [(np.asarray(enc.ids, dtype=np.int64), np.ones(len(enc.ids), dtype=np.uint8))
                    for enc in self._encode(texts, offsets=False)]
        for (_, learned), (_, where) in zip(rendered, conversations):
            if not learned:
                raise ChatError(f"{where}: no assistant message, and data.train_on=assistant learns only those "
                                "(valid: data.train_on=all, or records with an assistant turn)")
        if self.token_bytes is None:
            return [(np.asarray(enc.ids, dtype=np.int64), _mask_by_offsets(enc, learned))
                    for enc, (_, learned) in zip(self._encode(texts, offsets=True), rendered)]
        encodings = self._encode(texts, offsets=False)
        ids = [np.asarray(enc.ids, dtype=np.int64) for enc in encodings]
        masks = _masks_by_bytes(self.token_bytes, ids, rendered)
        for i, mask in enumerate(masks):
            if mask is None:  # its tokens are not its text's bytes in order: the offsets say where they lie
                [enc] = self._encode([texts[i]], offsets=True)
                masks[i] = _mask_by_offsets(enc, rendered[i][1])
        return list(zip(ids, masks))

    def _encode(self, texts: list[str], offsets: bool):
        fast = None if offsets else getattr(self.tokenizer, "encode_batch_fast", None)  # _fast: no offsets
        return (fast or self.tokenizer.encode_batch)(texts, add_special_tokens=False)


def _token_bytes(tokenizer) -> Optional[np.ndarray]:
    """Each token id's length in bytes of the text, for a byte-level tokenizer with no normalizer (each
    vocabulary entry a string of byte-level characters, one per byte; added tokens their UTF-8 content);
    None for any other tokenizer."""
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if spec.get("normalizer") is not None or not any(s.get("type") == "ByteLevel" for s in steps):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    lengths = np.zeros(max([*vocab.values(), *added, -1]) + 1, dtype=np.int64)
    for token, i in vocab.items():
        if not set(token) <= alphabet:
            return None
        lengths[i] = len(token)
    for i, content in added.items():
        lengths[i] = len(content.encode("utf-8"))
    return lengths


def _masks_by_bytes(token_bytes: np.ndarray, ids: list[np.ndarray],
                    rendered: list[tuple[str, list[tuple[int, int]]]]) -> list[Optional[np.ndarray]]:
    """Each conversation's learned mask from its tokens' byte lengths; None for one whose tokens do not add up
    to its text's bytes. All at once: the conversations' tokens laid end to end, each learned span counted
    from its conversation's first byte."""
    lengths = token_bytes[np.concatenate([np.zeros(0, np.int64), *ids])]
    ends = np.cumsum(lengths)
    bounds = np.cumsum([0] + [len(x) for x in ids])  # conversation k's tokens: bounds[k] to bounds[k + 1]
    byte_at = np.concatenate(([0], ends))[bounds]  # the bytes before conversation k's first token
    fits, lo, hi = [], [], []
    for k, (text, learned) in enumerate(rendered):
        plain = text.isascii()
        fits.append(byte_at[k + 1] - byte_at[k] == (len(text) if plain else len(text.encode("utf-8"))))
        for a, b in learned if fits[k] else ():
            if not plain:
                a, b = len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))
            lo.append(byte_at[k] + a)
            hi.append(byte_at[k] + b)
    # Learned: the tokens inside a span (starting at or after its start, ending at or before its end).
    first = np.searchsorted(ends - lengths, np.asarray(lo, dtype=np.int64), "left")
    stop = np.searchsorted(ends, np.asarray(hi, dtype=np.int64), "right")
    some = first < stop  # (a span inside one token holds none)
    inside = np.zeros(len(ends) + 1, dtype=np.int64)
    np.add.at(inside, first[some], 1)
    np.add.at(inside, stop[some], -1)
    learned_tokens = (np.cumsum(inside[:-1]) > 0).astype(np.uint8)
    return [learned_tokens[bounds[k] : bounds[k + 1]] if fits[k] else None for k in range(len(rendered))]


def _mask_by_offsets(enc, learned: list[tuple[int, int]]) -> np.ndarray:
    """The learned mask from the encoding's character offsets."""
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    start, end = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(enc.ids), dtype=bool)
    for a, b in learned:  # a token is learned when its characters lie inside an assistant span
        mask |= (start >= a) & (end <= b) & (end > start)
    return mask.astype(np.uint8)


def encode(tokenizer, renderer: ChatRenderer, messages: list[dict], train_on: str, where: str):
    """(token ids, a 0/1 mask of the tokens whose prediction is learned) of one conversation."""
    [(ids, mask)] = ChatEncoder(tokenizer, renderer, train_on).encode_many([(messages, where)])
    return ids.tolist(), mask.tolist()
