"""Structured outputs: answers held to a JSON schema, to any JSON object, a regular expression, a list of choices or a
Lark grammar (OpenAI's `response_format`, vLLM's `structured_outputs`), through llguidance (the grammar engine behind
Guidance, one of vLLM's and SGLang's backends).

A grammar is compiled once per request (`compile_grammar`, which also validates it against the vocabulary); each row
that decodes under it holds a `Constraint`: before a token is sampled, `allowed_tokens` gives the tokens that keep
the text inside the grammar (the others' logits become -inf, so greedy and sampled rows alike stay in it), and
`advance` feeds it the token taken. The end tokens are allowed only where the grammar may end, and a row whose
grammar cannot go on (`done`: a JSON value closed) stops there. llguidance works on the CPU, on the tokens' bytes:
`vocabulary` builds its tokenizer from ours once (a tokenizer.json as is; a SentencePiece model from its pieces).
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from lit_aligner.files import UserError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# Whitespace between JSON tokens: none, one space, or a line break and an indent: compact and pretty-printed JSON both
# fit, but not the endless run of blank space a weak model falls into under llguidance's default (any whitespace,
# vLLM's too) and then ends at max_tokens with no JSON. A schema's own "x-guidance" options override it.
JSON_OPTIONS = {"whitespace_pattern": r"[ ]?|\n[ ]{0,32}|\n\t{0,8}"}


class StructuredOutputError(UserError):
    """A grammar, schema or regex that cannot be compiled (the server's 400, the CLI's error line)."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise StructuredOutputError("structured outputs need llguidance: pip install llguidance (or the [serve] "
                                    "extra)") from None
    return llguidance


@dataclass(frozen=True)
class OutputFormat:
    """What an answer must be: `kind` (one of KINDS) and its `spec` (a schema dict, a regex, a list of choices, a Lark
    grammar; None for json_object)."""

    kind: str
    spec: Any = None

    def grammar(self) -> str:
        """The llguidance grammar (a string) of this format."""
        m = _llguidance().LLMatcher
        if self.kind == "json_object":
            return m.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
        if self.kind == "json_schema":
            if not isinstance(self.spec, dict):
                raise StructuredOutputError(f"a JSON schema is a JSON object, got {type(self.spec).__name__}")
            try:
                return m.grammar_from_json_schema(self.spec, JSON_OPTIONS)
            except (ValueError, TypeError) as e:
                raise StructuredOutputError(f"not a usable JSON schema: {e}") from None
        if self.kind == "regex":
            if not isinstance(self.spec, str) or not self.spec:
                raise StructuredOutputError("a regex is a non-empty string")
            return m.grammar_from_regex(self.spec)
        if self.kind == "choice":
            if not isinstance(self.spec, list) or not self.spec or not all(isinstance(c, str) and c for c in self.spec):
                raise StructuredOutputError("choice is a non-empty list of non-empty strings")
            return m.grammar_from_regex("|".join(f"({re.escape(c)})" for c in self.spec))
        if self.kind == "grammar":
            if not isinstance(self.spec, str) or not self.spec.strip():
                raise StructuredOutputError("a grammar is a non-empty Lark grammar string")
            return m.grammar_from_lark(self.spec)
        raise StructuredOutputError(f"unknown structured output kind {self.kind!r}; one of {', '.join(KINDS)}")


def vocabulary(tokenizer, vocab_size: int):
    """llguidance's tokenizer for ours (built once per tokenizer and model vocabulary size, ~0.3 s): the token bytes,
    and the tokenizer's end tokens as the ones that end a finished grammar. Ids past the tokenizer's vocabulary (a
    padded embedding) are never allowed."""
    cached = getattr(tokenizer, "_llguidance", None)
    if cached is not None and cached[0] == vocab_size:
        return cached[1]
    llg = _llguidance()
    eos = sorted(set(getattr(tokenizer, "stop_ids", ()) or ()) | ({tokenizer.eos_id} - {None}))
    if tokenizer.backend == "hf":
        ll = llg.LLTokenizer(tokenizer._hf.to_str(), n_vocab=vocab_size, eos_token=eos)
    else:
        ll = llg.LLTokenizer(llg.TokenizerWrapper(_PieceTokens(tokenizer, eos)), n_vocab=vocab_size, eos_token=eos)
    tokenizer._llguidance = (vocab_size, ll)
    return ll


class _PieceTokens:
    """A SentencePiece tokenizer as llguidance's generic wrapper wants it: each id's bytes (`▁` a space, `<0xNN>`
    byte-fallback pieces their byte; special pieces marked by a leading 0xff, as llguidance's llama.cpp bridge does)
    and an encoder of text as it continues an answer: without SentencePiece's dummy-prefix space."""

    def __init__(self, tokenizer, eos: Sequence[int]):
        sp = tokenizer._sp
        self.eos_token_id, self.bos_token_id = eos[0], tokenizer.bos_id
        self.tokens: List[bytes] = []
        self.special_token_ids: List[int] = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if i in tokenizer._specials:  # control, unknown and user-defined pieces (e.g. a chat end-of-turn)
                self.tokens.append(b"\xff" + piece.encode())
                self.special_token_ids.append(i)
            elif sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:-1], 16)]))
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self._plain = tokenizer._sp_plain

    def __call__(self, text: str) -> List[int]:
        return self._plain.encode(text)


def _cannot_compile(fmt: OutputFormat, error: str) -> StructuredOutputError:
    return StructuredOutputError(f"the {fmt.kind.replace('_', ' ')} cannot be compiled: {' '.join(error.split())}")


def check_format(fmt: OutputFormat) -> None:
    """StructuredOutputError naming the problem when `fmt` does not compile, found without a vocabulary: before a
    model is loaded."""
    error = _llguidance().LLMatcher.validate_grammar(fmt.grammar())
    if error:
        raise _cannot_compile(fmt, error)


@dataclass(frozen=True)
class Grammar:
    """A validated grammar for one vocabulary, built once (`compile_grammar`, where the request is read: a large
    schema takes up to a second); `constraint()` starts a row in it from a copy of its matcher, which costs little
    in the decoding loop."""

    source: str
    vocab_size: int
    matcher: Any = field(repr=False, compare=False)

    def constraint(self) -> "Constraint":
        return Constraint(self.matcher.deep_copy(), self.vocab_size)


def compile_grammar(fmt: OutputFormat, tokenizer, vocab_size: int) -> Grammar:
    """`fmt` for this tokenizer and vocabulary size (the model's output rows)."""
    source = fmt.grammar()
    # log_level 0: a grammar that does not compile is reported here, not also as a warning on stderr
    matcher = _llguidance().LLMatcher(vocabulary(tokenizer, vocab_size), source, log_level=0)
    if matcher.is_error():
        raise _cannot_compile(fmt, matcher.get_error())
    return Grammar(source, vocab_size, matcher)


class Constraint:
    """One row's position in its grammar (`Grammar.constraint()`)."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def advance(self, token: int) -> bool:
        """Take a sampled token; False when the grammar refuses it (then `error` says why)."""
        return bool(self.matcher.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar cannot go on (e.g. the JSON value is closed): the answer is complete."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


_executor = None  # llguidance's thread pool: the masks of a batch's rows computed in parallel


def allowed_tokens(constraints: Sequence[Optional[Constraint]], vocab_size: int) -> torch.Tensor:
    """(n, vocab_size) bool on the CPU: the tokens each row's constraint allows next (every token for a None row),
    the rows' masks computed in parallel (16 rows of a JSON schema on 2 cores: 1.8 ms instead of 2.8 one by one)."""
    global _executor
    # llguidance.numpy, not llguidance.torch: importing that one compiles a kernel with torch.compile (~2 s)
    import numpy as np
    from llguidance.numpy import fill_next_token_bitmask_par

    words = np.full((len(constraints), (vocab_size + 31) // 32), -1, dtype=np.int32)  # -1: every bit allowed
    rows = [(c.matcher, i) for i, c in enumerate(constraints) if c is not None]
    if rows:
        _executor = _executor or _llguidance().LLExecutor()
        fill_next_token_bitmask_par(_executor, rows, words)
    bits = (torch.from_numpy(words)[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # low bit first
    return bits.flatten(1)[:, :vocab_size].bool()


class GrammarRows:
    """The grammars of a batch of rows for `generate` (one for all, or one or None per row): the (B, vocab) mask
    before each step, and each row's grammar fed its token after it."""

    def __init__(self, grammar: Union[Grammar, Sequence[Optional[Grammar]]], batch: int, vocab_size: int):
        grammars = [grammar] * batch if isinstance(grammar, Grammar) else list(grammar)
        if len(grammars) != batch:
            raise ValueError(f"got {len(grammars)} grammars for {batch} prompts: one for all, or one (or None) each")
        if any(g is not None and g.vocab_size != vocab_size for g in grammars):
            raise ValueError("the grammar was compiled for another vocabulary size than this model's")
        # None: a free row, or one whose grammar has ended (nothing to mask)
        self.rows = [g.constraint() if g is not None else None for g in grammars]
        self.vocab_size = vocab_size

    def allowed(self, device: torch.device) -> torch.Tensor:
        """(B, vocab) bool: the tokens each row may take next (every token for a free or ended row)."""
        return allowed_tokens(self.rows, self.vocab_size).to(device)

    def advance(self, tokens: Sequence[int]) -> List[int]:
        """Feed each row its new token; the rows whose grammar ended with it (or whose end token it was)."""
        now = []
        for b, (c, t) in enumerate(zip(self.rows, tokens)):
            if c is not None and (not c.advance(t) or c.done):
                self.rows[b] = None
                now.append(b)
        return now


def mask_logits(logits: torch.Tensor, constraints: Sequence[Optional[Constraint]]) -> torch.Tensor:
    """logits (n, V) with every token a row's constraint refuses at -inf (a copy; rows without one unchanged)."""
    if not any(c is not None for c in constraints):
        return logits
    return logits.masked_fill(~allowed_tokens(constraints, logits.shape[-1]).to(logits.device), float("-inf"))


def parse_response_format(value: Optional[Dict[str, Any]]) -> Optional[OutputFormat]:
    """OpenAI's `response_format`: {"type": "text"} (none), {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}. StructuredOutputError on anything else."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise StructuredOutputError("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                    "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return OutputFormat("json_object")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise StructuredOutputError("response_format json_schema needs \"json_schema\": {\"name\": ..., \"schema\": "
                                    "{...}} (the schema a JSON object)")
    return OutputFormat("json_schema", spec.get("schema", {}))


def parse_structured_outputs(value: Optional[Dict[str, Any]]) -> Optional[OutputFormat]:
    """vLLM's `structured_outputs` extra: exactly one of json (a schema, or a string of one), regex, choice, grammar
    (Lark), or json_object: true."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise StructuredOutputError("structured_outputs is an object with one of json, regex, choice, grammar")
    given = {k: v for k, v in value.items() if k in ("json", "regex", "choice", "grammar", "json_object")
             and v not in (None, False)}
    if len(given) != 1:
        raise StructuredOutputError(f"structured_outputs takes exactly one of json, regex, choice, grammar, "
                                    f"json_object; got {', '.join(sorted(given)) or 'none'}")
    (kind, spec), = given.items()
    if kind == "json":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise StructuredOutputError(f"structured_outputs json is not valid JSON: {e}") from None
        return OutputFormat("json_schema", spec)
    return OutputFormat(kind, None if kind == "json_object" else spec)


__all__ = ["Constraint", "Grammar", "GrammarRows", "KINDS", "OutputFormat", "StructuredOutputError", "allowed_tokens",
           "check_format", "compile_grammar", "mask_logits", "parse_response_format", "parse_structured_outputs",
           "vocabulary"]
