"""Reasoning blocks read apart from the answer (`lit_aligner.reasoning`): where a block counts, a cut answer, the
newlines after it, and the same reading whole and streamed in pieces of any size."""

import pytest

from lit_aligner.reasoning import ReasoningStream, opens_thinking, split_reasoning

CASES = [  # (answer, the prompt left a block open, reasoning, content)
    ("<think>\nAdd them.\n</think>\n\n4", False, "\nAdd them.\n", "4"),
    ("  \n<think>x</think>y", False, "x", "y"),
    ("<think></think>\n\nHi", False, "", "Hi"),
    ("Plain answer.", False, None, "Plain answer."),
    ("  plain, with blanks first", False, None, "  plain, with blanks first"),
    ("A <think> later is text </think>", False, None, "A <think> later is text </think>"),
    ("<thin", False, None, "<thin"),
    ("<think>cut by max_tokens</thi", False, "cut by max_tokens</thi", None),
    ("Reason first.\n</think>\n\nThe answer.", True, "Reason first.\n", "The answer."),
    ("no end at all", True, "no end at all", None),
    ("</think>\nx", True, "", "x"),
    ("<think>a</think>b</think>c", False, "a", "b</think>c"),  # the first end closes it; the rest is the answer's
    ("", False, None, ""),
]


@pytest.mark.parametrize("text,inside,reasoning,content", CASES)
def test_whole_answers_split_as_written(text, inside, reasoning, content):
    assert split_reasoning(text, inside) == (reasoning, content)


@pytest.mark.parametrize("text,inside,reasoning,content", CASES)
def test_streamed_in_pieces_of_any_size_reads_the_same(text, inside, reasoning, content):
    for size in range(1, len(text) + 1):
        stream = ReasoningStream(inside)
        pieces = [p for i in range(0, len(text), size) for p in stream.feed(text[i:i + size])] + stream.close()
        assert "".join(t for k, t in pieces if k == "reasoning") == (reasoning or ""), size
        assert "".join(t for k, t in pieces if k == "content") == (content or ""), size
        kinds = [k for k, _ in pieces]
        assert kinds == sorted(kinds, key=lambda k: k == "content"), size  # reasoning never after content


def test_a_prompt_opens_a_block_when_its_last_tag_opens_one():
    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, enable_thinking false
    assert not opens_thinking("<|im_start|>assistant\n")
