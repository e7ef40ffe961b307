"""Reasoning blocks: the `<think> ... </think>` text that thinking models (Qwen3, SmolLM3, DeepSeek-R1's Llama and Qwen
distills) write before their answer, read apart from the answer as vLLM's reasoning parsers read it (the server's
`reasoning_content`).

A block counts where it starts the answer (after blanks), or from the answer's first token when the prompt itself
left one open (DeepSeek-R1's template, a prefill that ends in `<think>`). Without its `</think>` (an answer cut by
max_tokens), everything after the opening is reasoning. The newlines a template writes between `</think>` and the
answer are not the answer's. `ReasoningStream` reads an answer as it comes, holding back what may be a cut tag, and
reads every answer as `split_reasoning` reads it whole, wherever the pieces break.
"""

from typing import List, Literal, Optional, Tuple

OPEN, CLOSE = "<think>", "</think>"
# --reasoning-parser: none, or this reading under our name and vLLM's names for it
ReasoningParser = Literal["none", "think", "qwen3", "deepseek_r1"]

Piece = Tuple[str, str]  # ("reasoning" | "content", text)


def opens_thinking(prompt: str) -> bool:
    """Whether `prompt` leaves a think block open, so that the answer starts inside it."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


def cut_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a beginning of `tag`: a tag that may be cut between two streamed
    pieces, held back until it is known (here and in `tools.CallStream`)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    """An answer's text, piece by piece, as ("reasoning", text) and ("content", text) pieces in order."""

    def __init__(self, inside: bool = False):
        self.state = "reasoning" if inside else "start"  # start -> reasoning -> after -> content, or start -> content
        self.entered = inside  # a block was opened (its reasoning may be "")
        self.buf = ""

    def feed(self, text: str) -> List[Piece]:
        self.buf += text
        out: List[Piece] = []
        while True:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(OPEN):
                    self.buf, self.state, self.entered = s[len(OPEN):], "reasoning", True
                elif not s or OPEN.startswith(s):
                    return out  # blanks or a cut "<thi": not known yet
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                end = self.buf.find(CLOSE)
                if end < 0:
                    keep = cut_tag(self.buf, CLOSE)
                    if len(self.buf) > keep:
                        out.append(("reasoning", self.buf[:len(self.buf) - keep]))
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                if end:
                    out.append(("reasoning", self.buf[:end]))
                self.buf, self.state = self.buf[end + len(CLOSE):], "after"
            elif self.state == "after":
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    return out
                self.state = "content"
            else:
                if self.buf:
                    out.append(("content", self.buf))
                self.buf = ""
                return out

    def close(self) -> List[Piece]:
        """The end of the answer: what was held back is what it is (a cut tag is text)."""
        rest, self.buf = self.buf, ""
        if not rest or self.state == "after":
            return []
        return [("reasoning" if self.state == "reasoning" else "content", rest)]


def split_reasoning(text: str, inside: bool = False) -> Tuple[Optional[str], Optional[str]]:
    """(reasoning, content) of a whole answer: reasoning None without a block; content None when nothing follows
    the block."""
    stream = ReasoningStream(inside)
    pieces = stream.feed(text) + stream.close()
    reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
    content = "".join(t for kind, t in pieces if kind == "content")
    if not stream.entered:
        return None, content
    return reasoning, content or None


__all__ = ["CLOSE", "OPEN", "ReasoningParser", "ReasoningStream", "cut_tag", "opens_thinking", "split_reasoning"]
