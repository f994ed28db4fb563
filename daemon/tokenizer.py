"""The model's tokenizer and chat template, read from a Hugging Face style tokenizer folder."""

from __future__ import annotations

import itertools
import json
import re
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta as jinja2meta
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from daemon.tool_calls import Tool, fallback_messages, template_call

CHAT_ROLES = ("system", "user", "assistant", "tool")

# Private-use code points: a chat content's special-token text is swapped for one of these (around a number) while the
# template renders, so the rendered text shows where content put a special token and where the template did.
_PRIVATE_USE = (range(0xE000, 0xF900), range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))


def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, {"content": ...} or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML and non-ASCII; chat templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    # Same environment settings as transformers, so the rendered prompt matches the model's training.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"invalid chat template: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _pick_template(value: Any) -> str | None:
    """chat_template is a string, or a list of {"name", "template"} of which "default" is the chat one."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


class Tokenizer:
    """Text <-> ids, special tokens and chat rendering for one model."""

    def __init__(self, tok: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 add_bos_token: bool | None = None, extra_eos_ids: Iterable[int] = (),
                 special_tokens: Mapping[str, str] | None = None) -> None:
        self._tok = tok
        # Ids of special added tokens: control tokens such as role markers, which only the template may write.
        self._special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self._plain: tokenizers.Tokenizer | None = None  # made on first need by _plain_tokenizer
        self._plain_lock = threading.Lock()
        self._after_special = f"<edgellm-{secrets.token_hex(8)}>"
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        if add_bos_token is None:
            # No explicit setting: follow tokenizer.json's post-processor, as transformers' encode does.
            add_bos_token = self.bos_token_id is not None and tok.encode("").ids[:1] == [self.bos_token_id]
        self.add_bos_token = bool(add_bos_token) and self.bos_token_id is not None
        eos_ids = set(int(i) for i in extra_eos_ids)
        if eos_token and (eos_id := tok.token_to_id(eos_token)) is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        # The variables the template reads (does it take `tools`?).
        self._template_names = jinja2meta.find_undeclared_variables(
            self._template.environment.parse(chat_template)) if chat_template else set()
        # Template globals: every named special token (bos_token, eos_token, pad_token, ...), as transformers passes.
        self._template_vars = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._template_vars.update(bos_token=bos_token or "", eos_token=eos_token or "")

    @classmethod
    def from_dir(cls, folder: Path, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json (plus chat_template.jinja, special_tokens_map.json if any)."""
        folder = Path(folder)
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "special_tokens_map.json") | _read_json(folder / "tokenizer_config.json")
        template = _pick_template(config.get("chat_template"))
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None:
            template = _pick_template(_read_json(folder / "chat_template.json").get("chat_template"))
        specials = {k: _token_str(v) for k, v in config.items() if k.endswith("_token") and not k.startswith("add_")}
        add_bos = config.get("add_bos_token")
        return cls(tok, chat_template=template, bos_token=specials.get("bos_token"),
                   eos_token=specials.get("eos_token"),
                   add_bos_token=add_bos if isinstance(add_bos, bool) else None,
                   extra_eos_ids=extra_eos_ids, special_tokens=specials)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of text; special-token text in it (e.g. "<|im_end|>") becomes the special token's id."""
        # encode_batch_fast lets go of the GIL while it works (encode holds it, stalling the event loop and the
        # engine thread for the whole text) and skips the offsets nobody reads here.
        return self._with_bos(self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids)

    def _with_bos(self, ids: list[int]) -> list[int]:
        # A chat template often writes the BOS itself; never add a second one.
        if self.add_bos_token and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def template_has_tools(self) -> bool:
        """Whether the chat template reads the `tools` variable (else tools go in by the system-prompt fallback)."""
        return self._template is not None and "tools" in self._template_names

    def render_chat(self, messages: Sequence[tuple[str, str]] | Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, tools: Sequence[Tool] = ()) -> str:
        """The prompt text for messages ((role, content) pairs or dicts), rendered by the model's template."""
        chat, template_tools = self._chat(messages, tools)
        return self._render(chat, add_generation_prompt, template_tools)

    def encode_chat(self, messages: Sequence[tuple[str, str]] | Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, tools: Sequence[Tool] = ()) -> list[int]:
        """Ids of the rendered chat, in which only the template's own markup yields special tokens.

        Special-token text inside a message's content (a forged "<|im_end|>", "<|start_header_id|>", "[INST]") is
        tokenized as plain text, so a message cannot close its turn or open another. A chat without such text gets
        exactly encode(render_chat(messages)), i.e. what transformers' apply_chat_template gives.
        """
        chat, template_tools = self._chat(messages, tools)
        found = [self._special_spans(m.get("content")) for m in chat]
        if not any(found):
            return self.encode(self._render(chat, add_generation_prompt, template_tools))
        # Render with each special-token text of the contents swapped for a placeholder: mark, its number, mark.
        mark = self._content_marker(chat)
        forged: list[str] = []  # the special-token texts, by number
        for m, spans in zip(chat, found):
            if spans:
                m["content"] = self._swap_out(m["content"], spans, mark, forged)
        text, spans = self._swap_in(self._render(chat, add_generation_prompt, template_tools), mark, forged)
        return self._with_bos(self._encode_with_plain_spans(text, spans))

    def _chat(self, messages: Sequence[tuple[str, str]] | Sequence[Mapping[str, Any]],
              tools: Sequence[Tool] = ()) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages as the template takes them, and its `tools` variable (None: in the messages, or none)."""
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        chat = []
        for m in messages:
            m = {"role": m[0], "content": m[1]} if isinstance(m, tuple) else dict(m)
            if m.get("role") not in CHAT_ROLES:
                role = str(m.get("role"))  # the client's text: cut short, as it reaches the request log
                raise ValueError(f"unknown chat role {role[:32]!r}{'...' if len(role) > 32 else ''} "
                                 f"(allowed: {', '.join(CHAT_ROLES)})")
            if m.get("tool_calls"):
                m["tool_calls"] = [template_call(c) for c in m["tool_calls"]]
            chat.append(m)
        if self.template_has_tools:
            template_tools = [t.as_template_tool() for t in tools] or None
            # The template writes these outside any content, where special-token text would not be read as text.
            for value in (template_tools, *((m.get("tool_calls"), m.get("tool_call_id")) for m in chat)):
                if value and self._special_spans(json.dumps(value, ensure_ascii=False)):
                    raise ValueError("tool definitions, tool calls and tool call ids may not hold special-token text")
            return chat, template_tools
        if tools or any(m.get("tool_calls") or m.get("tool_call_id") for m in chat):
            chat = fallback_messages(chat, tools)
        return chat, None

    def _render(self, chat: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
        try:
            return self._template.render(messages=chat, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._template_vars)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e

    def _content_marker(self, chat: list[dict[str, Any]]) -> str:
        """A private-use character in no message and not in the template, to mark content's special-token text."""
        used = set(self.chat_template or "")
        for value in (*self._template_vars.values(), *(v for m in chat for v in m.values())):
            if isinstance(value, str):
                used.update(value)
        mark = next((chr(c) for c in itertools.chain(*_PRIVATE_USE) if chr(c) not in used), None)
        if mark is None:
            raise ValueError("the chat uses every private-use character; it cannot be told apart from the template")
        return mark

    def _special_spans(self, content: Any) -> list[tuple[int, int]]:
        """Where content (if text) holds special-token text, as the tokenizer would read it."""
        if not self._special_ids or not isinstance(content, str):
            return []
        enc = self._tok.encode(content, add_special_tokens=False)
        return [span for i, span in zip(enc.ids, enc.offsets) if i in self._special_ids]  # each read: a new list

    @staticmethod
    def _swap_out(content: str, spans: list[tuple[int, int]], mark: str, forged: list[str]) -> str:
        """content with the text at each span replaced by mark + its number in forged + mark."""
        pieces, last = [], 0
        for start, end in spans:
            pieces.append(content[last:start])
            pieces.append(f"{mark}{len(forged)}{mark}")
            forged.append(content[start:end])
            last = end
        pieces.append(content[last:])
        return "".join(pieces)

    @staticmethod
    def _swap_in(text: str, mark: str, forged: list[str]) -> tuple[str, list[tuple[int, int]]]:
        """text with each placeholder replaced by its special-token text, and where those texts now lie."""
        pieces: list[str] = []
        spans: list[tuple[int, int]] = []
        length = last = 0  # length of "".join(pieces); end of the last placeholder in text
        for hit in re.finditer(f"{mark}(\\d+){mark}", text):
            number = int(hit.group(1))
            if number >= len(forged):
                continue  # not one of ours (a template that writes private-use characters itself)
            original = forged[number]
            pieces += (text[last:hit.start()], original)
            length += hit.start() - last
            spans.append((length, length + len(original)))
            length += len(original)
            last = hit.end()
        pieces.append(text[last:])
        return "".join(pieces), spans

    def _encode_with_plain_spans(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """Ids of text where special tokens that overlap spans (sorted, disjoint) are read as plain text.

        The text is encoded as usual; each stretch between two kept special tokens that holds a span is encoded
        again as plain text, in the same place (just after a special token, or at the start) it had before.
        """
        enc = self._tok.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets  # read once: each read builds a new list
        out: list[int] = []
        first = 0  # first token of the current stretch
        start = 0  # where the current stretch starts in text
        redo = False  # whether the current stretch holds a special token to read as text
        s = 0
        for k, token_id in enumerate(ids):
            if token_id not in self._special_ids:
                continue
            lo, hi = offsets[k]
            while s < len(spans) and spans[s][1] <= lo:
                s += 1
            if s < len(spans) and spans[s][0] < hi:
                redo = True
                continue
            out.extend(self._plain_ids(text[start:lo], start) if redo else ids[first:k])
            out.append(token_id)
            first, start, redo = k + 1, hi, False
        out.extend(self._plain_ids(text[start:], start) if redo else ids[first:])
        return out

    def _plain_ids(self, stretch: str, start: int) -> list[int]:
        """Ids of stretch with special-token text read as text; start > 0: it follows a special token."""
        plain = self._plain_tokenizer()
        if start == 0:
            return plain.encode(stretch, add_special_tokens=False).ids
        ids = plain.encode(self._after_special + stretch, add_special_tokens=False).ids
        marker = plain.token_to_id(self._after_special)
        if ids[:1] != [marker] or marker in ids[1:]:
            raise ValueError("chat content holds the tokenizer's internal marker")  # only by guessing 64 random bits
        return ids[1:]

    def _plain_tokenizer(self) -> tokenizers.Tokenizer:
        """A second instance that reads special-token text as plain text.

        Its setting is fixed when it is made, so pool threads share it without flipping anything per call. It has one
        non-special token of its own (unguessable; never in the output): put before a stretch of text, it gives the
        stretch the place of text after a special token, which is what a SentencePiece "prepend first" looks at.
        Made on first need: a copy of a large vocabulary costs tens of MB, and most chats never need it.
        """
        with self._plain_lock:
            if self._plain is None:
                plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
                plain.encode_special_tokens = True
                plain.add_tokens([tokenizers.AddedToken(self._after_special, normalized=False, special=False)])
                self._plain = plain
            return self._plain
