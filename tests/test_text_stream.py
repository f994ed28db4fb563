"""daemon.text_stream: UTF-8-safe incremental detokenization and stop sequences, on the tiny byte-level tokenizer."""

from __future__ import annotations

import random

import pytest

from daemon.text_stream import TextStream
from daemon.tokenizer import Tokenizer
from tiny_tokenizer import write_tiny_tokenizer

MULTIBYTE = "Café déjà vu — 日本語のテキスト 😀🎉👍 Grüße aus München 🤖❤️ fin."


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(folder)
    return Tokenizer.from_dir(folder)


def run(stream: TextStream, ids: list[int]) -> tuple[list[str], bool]:
    """Push every id (until stopped); return the deltas, finish() included, and whether it stopped."""
    deltas, stopped = [], False
    for i in ids:
        delta, stopped = stream.push(i)
        deltas.append(delta)
        if stopped:
            break
    if not stopped:
        deltas.append(stream.finish())
    return deltas, stopped


def pieces(tok: Tokenizer, *parts: str) -> list[int]:
    """Ids of the parts encoded separately, so token boundaries fall between them."""
    return [i for p in parts for i in tok.encode(p)]


def test_multibyte_streamed_whole(tok):
    ids = tok.encode(MULTIBYTE)
    # The test is only meaningful if some characters really are split across tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, stopped = run(TextStream(tok, stop=[]), ids)
    assert not stopped
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == MULTIBYTE
    assert deltas[-1] == ""  # nothing was left for finish(): text goes out as soon as it is whole
    # Every delta is whole UTF-8 (str can hold lone surrogates; those would fail to encode).
    for d in deltas:
        d.encode("utf-8")


def test_decodes_a_bounded_window(tok):
    """Per-token cost does not grow with the sequence: decode only ever sees a few recent ids."""
    seen = []

    class Counting:
        def decode(self, ids):
            seen.append(len(ids))
            return tok.decode(ids)

    ids = tok.encode(MULTIBYTE * 20)
    assert len(ids) > 500
    deltas, _ = run(TextStream(Counting(), stop=["never there"]), ids)
    assert "".join(deltas) == MULTIBYTE * 20
    assert max(seen) <= 8


def test_special_tokens_skipped(tok):
    ids = pieces(tok, "<|im_start|>", "assistant\nok", "<|im_end|>")
    deltas, _ = run(TextStream(tok), ids)
    assert "".join(deltas) == "assistant\nok"


def test_stop_split_across_tokens(tok):
    for parts in (("The answer is 42", "\n\nUs", "er:", " more"),         # 2 tokens
                  ("The answer is 42", "\n", "\nU", "ser", ": more")):     # 3+ tokens
        ids = pieces(tok, *parts)
        stream = TextStream(tok, stop=["\n\nUser:"])
        deltas, stopped = run(stream, ids)
        assert stopped and stream.stopped and stream.stopped_by == "\n\nUser:"
        assert "".join(deltas) == "The answer is 42"
        # Once stopped, the stream stays stopped and says nothing more.
        assert stream.push(ids[-1]) == ("", True)
        assert stream.finish() == ""


def test_text_after_stop_never_sent(tok):
    ids = pieces(tok, "yes STOP and then some")  # the stop sequence and what follows arrive in one delta
    stream = TextStream(tok, stop=["STOP"])
    deltas, stopped = run(stream, ids)
    assert stopped and "".join(deltas) == "yes "


def test_partial_match_that_diverges_is_sent(tok):
    ids = pieces(tok, "Hi", "\n\nUs", "ually fine")
    stream = TextStream(tok, stop=["\n\nUser:"])
    deltas, stopped = [], False
    for i in ids:
        d, stopped = stream.push(i)
        deltas.append(d)
    # "\n\nUs" was held back while it could still become the stop sequence...
    assert "\n\nUs" not in "".join(deltas[:len(tok.encode("Hi")) + len(tok.encode("\n\nUs"))])
    deltas.append(stream.finish())
    assert not stopped and stream.stopped_by is None
    assert "".join(deltas) == "Hi\n\nUsually fine"


def test_held_text_flushed_by_finish(tok):
    stream = TextStream(tok, stop=["\n\nUser:"])
    deltas, _ = run(stream, pieces(tok, "Bye", "\n\nUs"))
    assert deltas[-1] == "\n\nUs" and "".join(deltas) == "Bye\n\nUs"


def test_earliest_stop_wins(tok):
    stream = TextStream(tok, stop=["world", "lo w"])
    deltas, stopped = run(stream, tok.encode("Hello world"))
    assert stopped and stream.stopped_by == "lo w" and "".join(deltas) == "Hel"
    stream = TextStream(tok, stop=["xyz", "abc"])
    deltas, stopped = run(stream, tok.encode("123abcxyz"))
    assert stopped and stream.stopped_by == "abc" and "".join(deltas) == "123"


def test_multibyte_stop(tok):
    stream = TextStream(tok, stop=["本語"])
    deltas, stopped = run(stream, tok.encode("Café 日本語 end"))
    assert stopped and "".join(deltas) == "Café 日" and all("\ufffd" not in d for d in deltas)


def test_empty_stop_strings_ignored(tok):
    deltas, stopped = run(TextStream(tok, stop=[""]), tok.encode("plain text"))
    assert not stopped and "".join(deltas) == "plain text"


def test_random_texts_and_stops(tok):
    """Streaming equals cutting the full text at the stop sequence, whatever the token boundaries."""
    rng = random.Random(0)
    alphabet = list("ab c\n.:") + ["é", "ü", "日", "本", "😀", "🎉", "Us", "er"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if text and rng.random() < 0.7:
            start = rng.randrange(len(text))
            stop = text[start:start + rng.randint(1, 6)]
        else:
            stop = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
        ids = tok.encode(text)
        stream = TextStream(tok, stop=[stop])
        deltas, stopped = run(stream, ids)
        cut = text.find(stop)
        assert stopped == (cut >= 0), (text, stop)
        assert "".join(deltas) == (text[:cut] if cut >= 0 else text), (text, stop)
        assert all("\ufffd" not in d for d in deltas), (text, stop)
