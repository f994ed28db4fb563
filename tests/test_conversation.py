"""The server's history of a conversation (daemon/conversation.py): what each way a turn ends leaves in it."""

from __future__ import annotations

from daemon.conversation import Conversation


def chat_turn(conv: Conversation, rid: str, question: str, reply: list[str]) -> None:
    conv.begin_turn(rid, [("user", question)])
    conv.turn_queued("chat")
    for text in reply:
        conv.record_reply(text, [len(text)])


def test_an_answered_chat_turn_adds_its_messages_and_the_streamed_reply():
    conv = Conversation("c")
    chat_turn(conv, "t1", "hi", ["hel", "lo"])
    conv.end_turn(answered=True, prompt_ids=[1, 2], output_ids=[3, 4])
    chat_turn(conv, "t2", "and?", ["more"])
    conv.end_turn(answered=True, prompt_ids=[1, 2, 3], output_ids=[5])
    assert conv.messages == [("user", "hi"), ("assistant", "hello"), ("user", "and?"), ("assistant", "more")]
    assert conv.turn is None and conv.kind == "chat" and conv.history_ids == []


def test_a_turn_that_ended_before_any_token_leaves_the_history_as_it_was():
    conv = Conversation("c")
    chat_turn(conv, "t1", "hi", ["hello"])
    conv.end_turn(answered=True, prompt_ids=[1], output_ids=[2])
    chat_turn(conv, "t2", "lost", [])
    conv.end_turn(answered=False, prompt_ids=[1, 2, 3], output_ids=None)
    assert conv.messages == [("user", "hi"), ("assistant", "hello")] and conv.turn is None


def test_a_raw_turn_keeps_every_generated_token_not_only_the_streamed_ones():
    conv = Conversation("c")
    conv.begin_turn("t1", [])
    conv.turn_queued("raw")
    conv.record_reply("a", [7])  # the tokens of a stop string were generated but never streamed
    conv.end_turn(answered=True, prompt_ids=[1, 2], output_ids=[7, 8, 9])
    assert conv.history_ids == [1, 2, 7, 8, 9]  # what the engine's cache holds
    conv.begin_turn("t2", [])
    conv.turn_queued("raw")
    conv.record_reply("b", [5])
    conv.end_turn(answered=True, prompt_ids=[1, 2, 7, 8, 9, 4], output_ids=None)  # failed after tokens
    assert conv.history_ids == [1, 2, 7, 8, 9, 4, 5] and conv.messages == []


def test_the_first_turn_the_engine_takes_fixes_the_kind_and_an_abandoned_one_does_not():
    conv = Conversation("c")
    conv.begin_turn("t1", [("user", "x")])
    conv.abandon_turn("t1")  # refused before the engine had it
    assert conv.turn is None and conv.kind is None
    conv.begin_turn("t2", [])
    conv.abandon_turn("other")  # another request's refusal does not free this turn
    assert conv.turn.request_id == "t2"
    conv.turn_queued("raw")
    conv.end_turn(answered=True, prompt_ids=[1], output_ids=[2])
    conv.begin_turn("t3", [("user", "y")])
    conv.turn_queued("chat")
    assert conv.kind == "raw"
