"""Answering prompts on one loaded base: many prompts x many Aligners (`answer_prompts`, what `generate/aligner.py`
runs), prompt files (`read_prompts`), Aligner files as columns of answers (`load_aligner_entries`), and streaming text
to a terminal (`TextStreamer`)."""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, TextIO, Tuple, Union

import torch

from lit_aligner.files import BadRecord, UserError, read_records, read_text
from lit_aligner.generation.engine import GenerationStats, OnToken, cut_at_stop, generate
from lit_aligner.generation.structured import compile_grammar
from lit_aligner.model import Aligner, LLaMA
from lit_aligner.prompts import (CONVERSATION_KEYS, Message, build_prompt, conversation, conversation_template,
                                 encode_prompt, has_tool_turns, is_correction, parse_messages, prompt_for_aligner,
                                 saved_variables)
from lit_aligner.reasoning import opens_thinking, split_reasoning
from lit_aligner.tokenizer import variables_under

if TYPE_CHECKING:  # (lit_aligner.tools reads structured outputs, whose package imports this module)
    from lit_aligner.tools import Call, Tools


class TextStreamer:
    """An `on_token` callback that prints the decoded text of one row as it grows, through the tokenizer's incremental
    decoder (`tokenizer.stream_decoder()`: an incomplete multi-byte character is held back until its last byte
    arrives). With `stop` strings, the text ends before the first of them: the last len(longest) - 1 characters are
    held back until they cannot begin one. Call `finish()` at the end for any text still held back. `text` is
    everything printed."""

    def __init__(self, tokenizer, row: int = 0, file: Optional[TextIO] = None, stop: Sequence[str] = ()):
        self.row, self.file = row, file or sys.stdout
        self.decoder = tokenizer.stream_decoder()
        self.stop = [s for s in stop if s]
        self.hold = max(map(len, self.stop), default=1) - 1
        self.pending = ""  # decoded, not printed yet
        self.stopped = False
        self.text = ""

    def _write(self, piece: str) -> None:
        if piece:
            self.text += piece
            self.file.write(piece)
            self.file.flush()

    def _add(self, piece: str, final: bool) -> None:
        # a stop string ending in this piece starts within the held-back characters or the piece itself
        self.pending += piece
        cut = cut_at_stop(self.pending, self.stop)
        if len(cut) < len(self.pending):
            self.stopped = True
            self._write(cut)
            self.pending = ""
            return
        keep = 0 if final else min(self.hold, len(self.pending))
        self._write(self.pending[:len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep:]

    def __call__(self, row: int, token_id: int) -> None:
        if row == self.row and not self.stopped:
            self._add(self.decoder.step(token_id), final=False)

    def finish(self) -> str:
        if not self.stopped:
            self._add(self.decoder.flush(), final=True)
        return self.text


@dataclass
class PromptItem:
    """One request: an instruction and an optional input (Alpaca style), or the last user turn of a conversation
    (and the tool calls and results after it, when the answer goes on from a tool's result)."""

    instruction: str
    input: str = ""
    system: str = ""  # a system message before the user turn (none: the template's own default, if any)
    history: List[Message] = field(default_factory=list)  # earlier turns, oldest first
    after: List[Message] = field(default_factory=list)  # the assistant's calls and the tools' results after the turn
    tools: Optional["Tools"] = None  # the functions the answer may call (`lit_aligner.tools`)

    def messages(self) -> List[Message]:
        """The request as chat messages: its system message, earlier turns, the user turn and what came after it."""
        return conversation(self.instruction, self.input, self.system, self.history) + list(self.after)

    @property
    def with_tools(self) -> bool:
        """Rendered by `lit_aligner.tools` (tools given, or tool turns in the conversation)."""
        return self.tools is not None or has_tool_turns(self.history + self.after)


PROMPTS_FORMAT = ("a JSON list of strings or of objects with a 'prompt' or 'instruction' field (and optional 'input', "
                  "'system' and 'tools') or a 'messages' conversation (or a 'prompt' that is one) that ends with a "
                  "user turn or a tool's result, "
                  "or JSONL with one such string or object per line, or a .txt file with one prompt per line")


def conversation_item(messages: Sequence[Message], system: str = "", tools: Optional["Tools"] = None) -> PromptItem:
    """The request that answers a conversation: a leading system message (else `system`), its last user turn, the
    turns before as its history and the tool calls and results after it (an answer that goes on from a tool's
    result). ValueError when it ends otherwise."""
    turns = list(messages)
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    last = max((j for j, m in enumerate(turns) if m["role"] == "user"), default=None)
    after = turns[last + 1:] if last is not None else []
    calls_then_results = all(m["role"] == "tool" or m.get("tool_calls") for m in after) and \
        (not after or after[-1]["role"] == "tool")
    if last is None or not turns[last]["content"].strip() or not calls_then_results:
        raise ValueError("the conversation must end with a non-empty user turn (the one to answer) or with the results "
                         "of the tool calls after it (role tool)")
    return PromptItem(turns[last]["content"], system=system, history=turns[:last], after=after, tools=tools)


def read_prompts(path: Union[str, Path]) -> List[PromptItem]:
    """Prompts from a JSON list (of strings, or of objects with `prompt` or `instruction` and an optional `input` and
    `system`, or with `messages` / `conversations` or a `prompt` list of turns: a chat to continue) or a JSONL file
    (one such string or object per line), or a .txt file (one prompt per non-empty line). An object's `tools`
    (OpenAI's list; TRL's column), with its optional `tool_choice` and `parallel_tool_calls`, are the functions its
    answer may call. UserError naming the file and the row on bad input."""
    from lit_aligner.tools import ToolError, parse_tools

    if Path(path).suffix == ".txt":  # plain text: no JSON quoting of each prompt
        lines = read_text(path, f"prompts file ({PROMPTS_FORMAT})").splitlines()
        records = [(f"line {n}", line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        records, _ = read_records(path, f"prompts file ({PROMPTS_FORMAT})")
    items = []
    for where, row in records:
        key = next((k for k in CONVERSATION_KEYS if k in row), None) if isinstance(row, dict) else None
        if isinstance(row, dict) and key is None and isinstance(row.get("prompt"), list):
            key = "prompt"  # TRL's conversational prompt-only rows (what on-policy distillation trains on)
        try:
            tools = parse_tools(row.get("tools"), row.get("tool_choice"), row.get("parallel_tool_calls"),
                                check_schemas=row.get("tool_choice") not in (None, "none", "auto")) \
                if isinstance(row, dict) else None
        except ToolError as e:
            raise UserError(f"{path}: {where}: {e}") from None
        if key is not None:
            try:
                items.append(conversation_item(parse_messages(row[key], key), row.get("system") or "", tools))
            except ValueError as e:
                raise UserError(f"{path}: {where}: {e}; expected {PROMPTS_FORMAT}") from None
            continue
        text = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else row
        inp, system = ((row.get("input") or ""), (row.get("system") or "")) if isinstance(row, dict) else ("", "")
        if (not isinstance(text, str) or not isinstance(inp, str) or not isinstance(system, str)
                or isinstance(row, BadRecord)):
            reason = row if isinstance(row, BadRecord) else "has no 'prompt' or 'instruction' text (or a non-string " \
                                                             "'input' or 'system')"
            raise UserError(f"{path}: {where} {reason}; expected {PROMPTS_FORMAT}")
        items.append(PromptItem(text, inp, system, tools=tools))
    if not items:
        raise UserError(f"{path}: no prompts in the file; expected {PROMPTS_FORMAT}")
    return items


# ---------------------------------------------------------------------------------------------------------------------
# Many prompts x many Aligners on one base


@dataclass
class AlignerEntry:
    """One column of answers: `name` (e.g. the Aligner's path; "base" for the bare base), the Aligner (None: bare
    base) and its metadata (template, mode, ...)."""

    name: str
    aligner: Optional[Aligner] = None
    metadata: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Answer:
    prompt: PromptItem
    entry: AlignerEntry
    prompt_text: str  # the full prompt after templating
    tokens: torch.Tensor  # new token ids (stop token excluded)
    text: str
    calls: List["Call"] = field(default_factory=list)  # the tool calls in `text`, when the prompt gave tools
    content: Optional[str] = None  # with calls: the text around them (None when only blank); else `text`
    reasoning: Optional[str] = None  # with `reasoning`: the think block's text (None: no block); `content` follows it
    template: Optional[str] = None  # the template the prompt was rendered with (`rendered_with`; None: the raw text)

    @property
    def reply(self) -> str:
        """What a conversation goes on with, stripped: the answer after its think block when one was read (its
        reasoning is not said again), else the whole text."""
        return (self.content or "").strip() if self.reasoning is not None else self.text.strip()


def bare_base_template(entries: Sequence[AlignerEntry], template: Optional[str] = None) -> Optional[str]:
    """The template the bare base answers with next to `entries`: `template`, else the one all the Aligners share."""
    shared = {e.metadata.get("template") for e in entries if e.aligner is not None}
    return template or (shared.pop() if len(shared) == 1 else None)


def tool_template(tokenizer, e: AlignerEntry, template: Optional[str] = None,
                  base_template: Optional[str] = None) -> str:
    """The prompt template of entry `e`'s answers to prompts with tools: `template` (the bare base: `base_template`),
    else the Aligner's own, else the tokenizer's chat template, else plain text (the server's rule)."""
    return (template if e.aligner is not None else base_template) or e.metadata.get("template") or \
        conversation_template(tokenizer)


def rendered_with(tokenizer, p: PromptItem, e: AlignerEntry, template: Optional[str] = None,
                  base_template: Optional[str] = None) -> Optional[str]:
    """The name of the template `request_prompt` renders request `p` for entry `e` with (None: the raw text), which
    is what an answer records: a bare base beside Aligners uses theirs, and no name at all means the chat template."""
    if p.with_tools:
        return tool_template(tokenizer, e, template, base_template)
    if e.aligner is None:
        name = base_template
    elif is_correction(e.metadata) and template in (None, "correction"):
        return "correction"
    else:
        name = template or e.metadata.get("template")
    if name:
        return name
    if getattr(tokenizer, "has_chat_template", False):
        return "chat"
    return "plain" if p.history else None


def request_prompt(tokenizer, p: PromptItem, e: AlignerEntry, template: Optional[str] = None,
                   base_template: Optional[str] = None) -> str:
    """The prompt text of request `p` for entry `e`: an Aligner's as its metadata says (`template` overrides; its saved
    chat-template variables under the tokenizer's), the bare base's with `base_template` (see `bare_base_template`);
    with tools or tool turns, as `lit_aligner.tools` renders them (the server's rendering)."""
    with variables_under(tokenizer, saved_variables(e.metadata)):
        return _request_prompt(tokenizer, p, e, template, base_template)


def _request_prompt(tokenizer, p: PromptItem, e: AlignerEntry, template: Optional[str],
                    base_template: Optional[str]) -> str:
    if p.with_tools:
        from lit_aligner.tools import tool_prompt

        if is_correction(e.metadata):
            raise ValueError(f"{e.name} is a correction Aligner: it rewrites an answer and calls no tools")
        return tool_prompt(tool_template(tokenizer, e, template, base_template), tokenizer, p.messages(), p.tools)
    if e.aligner is None:
        return build_prompt(tokenizer, p.instruction, base_template, input=p.input, system=p.system,
                            history=p.history)
    return prompt_for_aligner(tokenizer, p.instruction, p.input, e.metadata, template, system=p.system,
                              history=p.history)


def answer_prompts(
    model: LLaMA,
    tokenizer,
    prompts: Sequence[PromptItem],
    entries: Sequence[AlignerEntry],
    max_new_tokens: int,
    *,
    batch_size: int = 8,
    template: Optional[str] = None,
    on_token: Optional[OnToken] = None,
    reasoning: bool = False,
    **sampling: Any,
) -> Tuple[List[List[Answer]], List[GenerationStats]]:
    """Answer every prompt with every entry, on one loaded base. Returns answers[prompt][entry] and the stats of every
    batch. Requests of Aligners that share n_tokens and start_layer (and bare-base requests) run in the same batches of
    up to `batch_size` rows, sorted by length to limit padding. Each Aligner's prompt follows its metadata
    (`prompt_for_aligner`); `template` overrides it for all. The bare base uses `template`, else the template that all
    the Aligners share, else `build_prompt`'s default. on_token(request, token) numbers requests prompt-major
    (prompt i, entry j -> i * len(entries) + j). `sampling`: the keyword arguments of `generate` (temperature, ...).
    A prompt's tools (`PromptItem.tools`): a forced choice holds its answers to calls with a grammar, and the calls
    of every answer that may call are read into `Answer.calls`. `reasoning`: a think block that starts an answer (or
    that its prompt opened) is read into `Answer.reasoning` (`lit_aligner.reasoning`; not in an answer a grammar
    holds), and `content` and the calls from the rest."""
    from lit_aligner.tools import call_style, split_calls

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    base_template = bare_base_template(entries, template)
    requests = []  # (prompt i, entry j, prompt text, token ids)
    for i, p in enumerate(prompts):
        for j, e in enumerate(entries):
            text = request_prompt(tokenizer, p, e, template, base_template)
            requests.append((i, j, text, encode_prompt(tokenizer, text)))
    # the format each answer's tool calls are written in (its template's), and a forced choice's grammar in it
    styles = [call_style(tool_template(tokenizer, entries[j], template, base_template), tokenizer)
              if prompts[i].tools is not None else None for i, j, _, _ in requests]
    grammar = sampling.pop("grammar", None)  # one for every row, or each forced request's own
    forced = {(id(prompts[i].tools), s): (prompts[i].tools, s) for (i, *_), s in zip(requests, styles)
              if s is not None and prompts[i].tools.forced}
    if forced and grammar is not None:
        raise ValueError("a forced tool_choice holds the answer to tool calls: drop the structured-output flag")
    grammars = {k: compile_grammar(t.output_format(s), tokenizer, model.lm_head_weight.shape[0])
                for k, (t, s) in forced.items()}

    # Group by Aligner shape; bare-base requests join the first group (a None row in a stack is the bare base).
    groups: Dict[Any, List[int]] = {}
    shape_of = {j: (e.aligner.n_tokens, e.aligner.start_layer) if e.aligner is not None else None
                for j, e in enumerate(entries)}
    first_shape = next((s for s in shape_of.values() if s is not None), None)
    for r, (_, j, _, _) in enumerate(requests):
        groups.setdefault(shape_of[j] or first_shape, []).append(r)

    outputs: Dict[int, torch.Tensor] = {}
    all_stats = []
    for members in groups.values():
        members.sort(key=lambda r: len(requests[r][3]))
        for start in range(0, len(members), batch_size):
            batch = members[start:start + batch_size]
            callback = None
            if on_token is not None:
                def callback(row, tok, batch=batch):
                    on_token(batch[row], tok)
            rows_grammar = [grammars.get((id(prompts[requests[r][0]].tools), styles[r])) for r in batch] \
                if grammars else grammar
            out, stats = generate(model, [requests[r][3] for r in batch], max_new_tokens,
                                  aligners=[entries[requests[r][1]].aligner for r in batch], on_token=callback,
                                  return_stats=True, grammar=rows_grammar, **sampling)
            all_stats.append(stats)
            outputs.update(zip(batch, out))

    answers = [[None] * len(entries) for _ in prompts]
    stop = sampling.get("stop_strings") or ()
    for r, (i, j, text, _) in enumerate(requests):
        said = cut_at_stop(tokenizer.decode(outputs[r]), stop)
        tools = prompts[i].tools
        thought, answer = split_reasoning(said, opens_thinking(text)) \
            if reasoning and grammar is None and (id(tools), styles[r]) not in grammars else (None, said)
        content, calls = split_calls(answer or "", styles[r], tools) if tools is not None and tools.choice != "none" \
            else (answer, [])
        answers[i][j] = Answer(prompts[i], entries[j], text, outputs[r], said, calls, content, thought,
                               rendered_with(tokenizer, prompts[i], entries[j], template, base_template))
    return answers, all_stats


def load_aligner_entries(paths: Sequence[Union[str, Path]], model: LLaMA) -> List[AlignerEntry]:
    """Aligner files (ours or the paper's .pth) loaded onto the model's device and dtype and checked against the loaded
    base (`lit_aligner.aligner_files.load_aligner`), as columns of answers named by their paths; each entry's metadata
    is the file's header (template, mode, ...)."""
    from lit_aligner.aligner_files import load_aligner

    return [AlignerEntry(str(path), *load_aligner(path, model)) for path in paths]


def answer(model: LLaMA, tokenizer, prompt: str, aligner: Optional[Aligner] = None,
           metadata: Optional[Dict[str, Any]] = None, max_new_tokens: int = 256, template: Optional[str] = None,
           **sampling: Any) -> str:
    """The text of one answer to `prompt` by the base steered by `aligner` (None: the bare base), its prompt built as
    the Aligner's metadata says (template, correction mode), stopping at the tokenizer's end tokens. `sampling`: the
    keyword arguments of `generate` (temperature, top_k, top_p, generator). Greedy by default."""
    sampling.setdefault("stop_ids", tokenizer.stop_ids)
    entry = AlignerEntry("aligner" if aligner is not None else "base", aligner, dict(metadata or {}))
    answers, _ = answer_prompts(model, tokenizer, [PromptItem(prompt)], [entry], max_new_tokens, template=template,
                                **sampling)
    return answers[0][0].text
