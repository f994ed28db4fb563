"""The model's tokenizer and chat template, read from a Hugging Face style tokenizer folder."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_ROLES = ("system", "user", "assistant", "tool")


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
        """Ids of text; special tokens written in the text (e.g. from the chat template) become their ids."""
        # encode_batch_fast lets go of the GIL while it works (encode holds it, stalling the event loop and the
        # engine thread for the whole text) and skips the offsets nobody reads here.
        ids = self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
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

    def render_chat(self, messages: Sequence[tuple[str, str]] | Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True) -> str:
        """The prompt text for messages ((role, content) pairs or dicts), rendered by the model's template."""
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        chat = []
        for m in messages:
            m = {"role": m[0], "content": m[1]} if isinstance(m, tuple) else dict(m)
            if m.get("role") not in CHAT_ROLES:
                raise ValueError(f"unknown chat role {m.get('role')!r} (allowed: {', '.join(CHAT_ROLES)})")
            chat.append(m)
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._template_vars)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e
