"""A tiny GPT-2 style byte-level BPE tokenizer, trained on the fly for tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512

# ChatML, as SmolLM2 / Qwen ship it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# English plus some multi-byte text, so merges exist both inside and across UTF-8 characters.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Edge inference runs a large language model close to the user.",
    "The daemon streams tokens over gRPC while the engine thread samples the next one.",
    "A tokenizer turns text into ids, and the model turns ids into logits.",
    "Once upon a time there was a small model that wanted to speak every language.",
    "Stop sequences end the answer; the user never sees them.",
    "Café, naïve, résumé, déjà vu, crème brûlée, élève, été.",
    "Über, München, Grüße, fünf, schön, Mädchen, Straße.",
    "日本語のテキスト。日本は東京です。こんにちは世界。",
    "Emoji: 😀 🎉 👍 🚀 ❤️ 🤖 — fun with four-byte characters 😀😀.",
    "Numbers 0123456789 and symbols: #$%&*()[]{}<>/\\|~^_+=-.",
]


def write_tiny_tokenizer(folder: Path) -> int:
    """Train the tokenizer into folder (tokenizer.json, tokenizer_config.json); return its vocab size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so frequent pairs dominate; the trainer is deterministic for a fixed input.
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


def write_tiny_sentencepiece_tokenizer(folder: Path, special_tokens: list[str], config: dict, *,
                                       legacy: bool = False) -> int:
    """A tiny SentencePiece style BPE ("▁" for spaces, byte fallback) into folder; return its vocab size.

    legacy=False: "▁" goes before the text only at its very start (Metaspace, prepend_scheme "first", as in
    Mistral v0.3's tokenizer.json). legacy=True: before every stretch of text, also after each special token (a
    Prepend normalizer, as older Llama/Mistral tokenizer.json files and build_engine's GGUF loader have).
    config: the tokenizer_config.json fields (special token names, chat_template).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE + 256, min_frequency=1,
                                  special_tokens=["<unk>", *special_tokens, *byte_tokens], show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    # Byte tokens are plain vocabulary entries (reached through byte fallback), not special tokens.
    tok = Tokenizer.from_str(_unmark_special(tok.to_str(), set(byte_tokens)))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


def _unmark_special(tokenizer_json: str, names: set[str]) -> str:
    data = json.loads(tokenizer_json)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in names]
    return json.dumps(data, ensure_ascii=False)
