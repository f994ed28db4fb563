"""daemon.tokenizer against transformers on the tiny tokenizer, plus config variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from daemon.tokenizer import Tokenizer
from tiny_tokenizer import write_tiny_tokenizer

TEXTS = [
    "Hello, world!",
    "Café naïve — Grüße aus München.",
    "日本語のテキスト 😀🎉 done",
    "<|im_start|>user\nhi<|im_end|>\n",
    "  leading and trailing spaces  \n\ttab",
    "",
]

CHATS = [
    [("user", "Hi there!")],
    [("system", "You are helpful."), ("user", "Wie geht's? é 日本 😀"), ("assistant", "Gut."),
     ("user", "Und dir?")],
    [{"role": "user", "content": "dict form"}, {"role": "assistant", "content": "ok"},
     {"role": "tool", "content": "{\"x\": \"日本 <b>\"}"}],
]

# A Qwen-like template: whitespace control, indented block tags on their own lines (trim_blocks, lstrip_blocks),
# tojson of non-ASCII, loop controls, namespace.
RICH_TEMPLATE = """{% if messages[0].role == 'system' %}
    has system
  {% endif %}
{%- set ns = namespace(n=0) %}
{%- for message in messages %}
    {%- if message.role == 'tool' %}
        {{- '<|im_start|>tool\\n' + (message.content | tojson) + '<|im_end|>\\n' }}
        {%- continue %}
    {%- endif %}
    {%- set ns.n = ns.n + 1 %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(folder)
    return folder


def _variant(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of the tokenizer folder with tokenizer_config.json fields replaced (None deletes a field)."""
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    for k, v in config_changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def _as_dicts(chat):
    return [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in chat]


def test_tiny_tokenizer_is_deterministic(tmp_path):
    assert write_tiny_tokenizer(tmp_path / "a") == write_tiny_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_basics(tiny_dir):
    vocab = json.loads((tiny_dir / "tokenizer.json").read_text())
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.vocab_size == len(vocab["model"]["vocab"]) == 512
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end is not None and tok.id_to_token(im_end) == "<|im_end|>"
    assert tok.eos_token_ids == frozenset({im_end})
    assert Tokenizer.from_dir(tiny_dir, extra_eos_ids=[0]).eos_token_ids == frozenset({im_end, 0})
    assert tok.bos_token is None and not tok.add_bos_token


def test_encode_decode_match_transformers(tiny_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    tok = Tokenizer.from_dir(tiny_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
    # Special tokens in the text are single ids, and skipped in decode unless asked for.
    ids = tok.encode(TEXTS[3])
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.decode(ids) == "user\nhi\n"
    assert tok.decode(ids, skip_special_tokens=False) == TEXTS[3]


@pytest.mark.parametrize("template", ["tiny", "rich"])
def test_render_chat_matches_transformers(tiny_dir, tmp_path, template):
    transformers = pytest.importorskip("transformers")
    folder = tiny_dir if template == "tiny" else _variant(tiny_dir, tmp_path / "rich", chat_template=RICH_TEMPLATE)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = Tokenizer.from_dir(folder)
    for chat in CHATS:
        for gen in (True, False):
            expected = ref.apply_chat_template(_as_dicts(chat), tokenize=False, add_generation_prompt=gen)
            assert tok.render_chat(chat, add_generation_prompt=gen) == expected
    assert tok.render_chat([("user", "x")]).endswith("<|im_start|>assistant\n")
    assert not tok.render_chat([("user", "x")], add_generation_prompt=False).endswith("assistant\n")


def test_render_chat_exact_text(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.render_chat([("system", "S"), ("user", "é")]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\né<|im_end|>\n<|im_start|>assistant\n")


def test_unknown_role(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    with pytest.raises(ValueError, match=r"unknown chat role 'narrator' \(allowed: system, user, assistant, tool\)"):
        tok.render_chat([("narrator", "once upon a time")])


def test_no_template(tiny_dir, tmp_path):
    tok = Tokenizer.from_dir(_variant(tiny_dir, tmp_path / "plain", chat_template=None))
    with pytest.raises(ValueError, match="no chat template"):
        tok.render_chat([("user", "hi")])


def test_template_errors(tiny_dir, tmp_path):
    tpl = "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}ok"
    tok = Tokenizer.from_dir(_variant(tiny_dir, tmp_path / "strict", chat_template=tpl))
    assert tok.render_chat([("system", "s")]) == "ok"
    with pytest.raises(ValueError, match="first message must be system"):
        tok.render_chat([("user", "hi")])
    with pytest.raises(ValueError, match="invalid chat template"):
        Tokenizer.from_dir(_variant(tiny_dir, tmp_path / "broken", chat_template="{% for m in messages %}"))


def test_template_helpers(tiny_dir, tmp_path):
    tpl = ("{{ messages[0].content | tojson }}|{{ {'k': 'ü'} | tojson(indent=1) }}|{{ strftime_now('%Y') | length }}"
           "|{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}")
    tok = Tokenizer.from_dir(_variant(tiny_dir, tmp_path / "helpers", chat_template=tpl))
    assert tok.render_chat([("user", "日本 <b>")]) == '"日本 <b>"|{\n "k": "ü"\n}|4||<|im_end|>|True'
    # The sandbox refuses attribute access into Python internals.
    evil = Tokenizer.from_dir(_variant(tiny_dir, tmp_path / "evil",
                                       chat_template="{{ messages.__class__.__init__.__globals__ }}"))
    with pytest.raises(ValueError, match="chat template error"):
        evil.render_chat([("user", "x")])


def test_named_templates_and_dict_tokens(tiny_dir, tmp_path):
    folder = _variant(
        tiny_dir, tmp_path / "named",
        chat_template=[{"name": "tool_use", "template": "TOOLS"},
                       {"name": "default", "template": "DEFAULT {{ bos_token }}"}],
        bos_token={"content": "<|endoftext|>", "special": True}, eos_token={"content": "<|im_end|>"},
        add_bos_token=True)
    tok = Tokenizer.from_dir(folder)
    bos = tok.token_to_id("<|endoftext|>")
    assert tok.render_chat([("user", "x")]) == "DEFAULT <|endoftext|>"
    assert tok.eos_token_ids == frozenset({tok.token_to_id("<|im_end|>")})
    ids = tok.encode("hello")
    assert ids[0] == bos and tok.decode(ids[1:]) == "hello"
    # A BOS the chat template already wrote is not doubled.
    assert tok.encode("<|endoftext|>hello") == ids


def test_chat_template_jinja_file(tiny_dir, tmp_path):
    folder = _variant(tiny_dir, tmp_path / "jinja_file", chat_template=None)
    (folder / "chat_template.jinja").write_text("FILE {{ messages | length }}")
    assert Tokenizer.from_dir(folder).render_chat([("user", "a"), ("assistant", "b")]) == "FILE 2"
