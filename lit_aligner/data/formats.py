"""Row formats: how one raw JSON row of a public dataset becomes an `Example` (prompt turns, the target / preferred
answer, the other answer). One small parser per format in one registry (`FORMATS`), detected from a row's fields.

| format | fields | SFT target | pair (preferred, other) |
| --- | --- | --- | --- |
| `alpaca` | instruction, input, output | output | (SFT only) |
| `pku` | prompt, response_0/1, better/safer_response_id, is_response_*_safe | the preferred one | (preferred, other) |
| `hh` | chosen, rejected: "\\n\\nHuman: ... \\n\\nAssistant: ..." chats | chosen's last answer | (chosen, rejected) |
| `pairs` | prompt, chosen, rejected | chosen | (chosen, rejected) |
| `prompt` | prompt, response (or completion) | response | (SFT only) |
| `qac` | question, answer, correction | correction | (correction, answer) |
| `messages` | messages / conversations, or chosen / rejected as chat turns; tools | the last turn | (both last turns) |
| `prompt_only` | prompt alone (text or chat turns: TRL's prompt-only rows); tools | none (on-policy runs) | - |

Conversations may call tools (OpenAI's / TRL's form: assistant turns with `tool_calls`, `tool` turns with the results,
the functions in the row's `tools`); they are rendered as the server renders them (`lit_aligner.tools`), and an
answer that calls tools is trained on its calls as written there.
"""

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from lit_aligner.data.dataset import ONE_ANSWER_KINDS
from lit_aligner.files import UserError
from lit_aligner.prompts import CONVERSATION_KEYS, Message, has_tool_turns, join_input, parse_messages, transcript
from lit_aligner.tools import ToolError, Tools, parse_tools

PREFERENCES = ("safer", "better")


class DataError(UserError):
    """Unusable data: the message names the file (and row) and the fix."""


class BadRow(Exception):
    """One malformed row: counted and skipped, or (strict) a DataError naming the file and the row."""


@dataclass
class Example:
    """One normalized row: the prompt conversation (ends with a user message), an optional Alpaca input for one-turn
    prompts, the response (`chosen`: SFT target / preferred / correction C), the other answer (`rejected`:
    dispreferred / upstream answer A), and for HH-RLHF the verbatim dialogue prefix used by the `hh` template. Chat
    rows may bring `tools` (the functions the conversation may call) and the tool calls of the SFT answer (`calls`,
    OpenAI's `tool_calls`; `chosen` is then the text before them, often empty)."""

    messages: List[Message]
    chosen: str
    rejected: Optional[str] = None
    input: str = ""
    raw_prompt: Optional[str] = None
    notes: Dict[str, Any] = field(default_factory=dict)
    tools: Optional[Tools] = None
    calls: Optional[List[Dict[str, Any]]] = None
    reasoning: Optional[str] = None  # the (chosen) answer's reasoning_content: the think block its template writes
    rejected_reasoning: Optional[str] = None  # the rejected answer's
    label: Optional[bool] = None  # an unpaired (KTO) row's: is `chosen`, its one completion, desirable?

    @property
    def uses_tools(self) -> bool:
        return self.tools is not None or bool(self.calls) or has_tool_turns(self.messages)

    def answer(self) -> Message:
        """The SFT (or chosen) answer as an assistant message (with its tool calls and its reasoning)."""
        return {"role": "assistant", "content": self.chosen, **({"tool_calls": self.calls} if self.calls else {}),
                **({"reasoning_content": self.reasoning} if self.reasoning else {})}

    def rejected_answer(self) -> Message:
        """The rejected answer as an assistant message (with its reasoning)."""
        return {"role": "assistant", "content": self.rejected,
                **({"reasoning_content": self.rejected_reasoning} if self.rejected_reasoning else {})}

    def chat_messages(self) -> List[Message]:
        """The conversation with the input joined into the (single) user message."""
        if self.input:
            return [{"role": "user", "content": join_input(self.messages[-1]["content"], self.input)}]
        return self.messages

    def question(self) -> str:
        """The question as one text, for the correction template (earlier turns as a transcript)."""
        if len(self.messages) == 1:
            return join_input(self.messages[0]["content"], self.input)
        return transcript(self.messages)


# ---------------------------------------------------------------------------------------------------------------------
# Field access


def text_field(row: Dict[str, Any], key: str, allow_empty: bool = False) -> str:
    if key not in row:
        raise BadRow(f"missing field {key!r} (fields: {sorted(row)})")
    value = row[key]
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        hint = " (a list of chat messages: --format messages)" if isinstance(value, list) else ""
        raise BadRow(f"field {key!r} must be a string, got {type(value).__name__}{hint}")
    if not allow_empty and not value.strip():
        raise BadRow(f"field {key!r} is empty")
    return value


def _optional_input(row: Dict[str, Any]) -> str:
    return text_field(row, "input", allow_empty=True) if "input" in row else ""


def _user(text: str) -> List[Message]:
    return [{"role": "user", "content": text}]


def _choice_id(row: Dict[str, Any], key: str) -> int:
    if key not in row:
        raise BadRow(f"missing field {key!r}")
    v = row[key]
    if isinstance(v, bool) or v not in (0, 1):
        raise BadRow(f"field {key!r} must be 0 or 1, got {v!r}")
    return int(v)


def _single_answer(fmt: str, fields: str) -> DataError:
    return DataError(f"{fmt} rows ({fields}) have one answer per prompt: they make SFT data only. Preference / "
                     f"correction data needs pairs (PKU-SafeRLHF, HH-RLHF, prompt/chosen/rejected or "
                     f"question/answer/correction); KTO reads pairs or labelled completions (prompt/completion/label).")


# ---------------------------------------------------------------------------------------------------------------------
# HH-RLHF dialogues

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(dialogue: str) -> Tuple[str, str]:
    """Split an HH-RLHF dialogue at its LAST "\\n\\nAssistant:" into (prompt, answer): the prompt is everything up to
    and including that "Assistant:", the answer the rest (stripped). ValueError when there is no Assistant turn or
    the answer is empty."""
    i = dialogue.rfind(HH_ASSISTANT)
    if i < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in the dialogue")
    prompt, answer = dialogue[: i + len(HH_ASSISTANT)], dialogue[i + len(HH_ASSISTANT):].strip()
    if not answer:
        raise ValueError("the last Assistant turn is empty")
    return prompt, answer


def hh_messages(prompt: str) -> List[Message]:
    """Chat messages (Human → user, Assistant → assistant) of an HH prompt ending with the open "\\n\\nAssistant:"
    turn; consecutive turns of one speaker are merged. ValueError when it does not end with a Human turn."""
    parts = _HH_TURN.split(prompt)
    lead, turns = parts[0].strip(), list(zip(parts[1::2], parts[2::2]))
    if not turns or turns[-1][0] != "Assistant" or turns[-1][1].strip():
        raise ValueError("the prompt must end with an open '\\n\\nAssistant:' turn")
    messages: List[Message] = []
    if lead:  # text before the first marker: context from the user
        messages.append({"role": "user", "content": lead})
    for speaker, content in turns[:-1]:
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
        else:
            messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"]:
        raise ValueError("the dialogue's last turn before the answer is not a (non-empty) Human turn")
    return messages


# ---------------------------------------------------------------------------------------------------------------------
# One parser per format: parse(row, pair, preference) -> Example (raises BadRow)


def _alpaca(row, pair, preference):
    if pair:
        raise _single_answer("Alpaca-style", "instruction, input, output")
    return Example(_user(text_field(row, "instruction")), text_field(row, "output"), input=_optional_input(row))


def _prompt_response(row, pair, preference):
    if pair:
        raise _single_answer("prompt/response", "prompt, response")
    key = "response" if "response" in row else "completion"
    return Example(_user(text_field(row, "prompt")), text_field(row, key), input=_optional_input(row))


def _pairs(row, pair, preference):
    return Example(_user(text_field(row, "prompt")), text_field(row, "chosen"),
                   text_field(row, "rejected") if pair else None, input=_optional_input(row))


def _qac(row, pair, preference):
    return Example(_user(text_field(row, "question")), text_field(row, "correction"), text_field(row, "answer"))


def _pku(row, pair, preference):
    prompt = text_field(row, "prompt")
    responses = [text_field(row, "response_0"), text_field(row, "response_1")]
    best = _choice_id(row, "safer_response_id" if preference == "safer" else "better_response_id")
    safe = row.get(f"is_response_{best}_safe")
    if safe is not None and not isinstance(safe, bool):
        raise BadRow(f"field 'is_response_{best}_safe' must be true or false, got {safe!r}")
    return Example(_user(prompt), responses[best], responses[1 - best] if pair else None,
                   notes={"chosen_unsafe": True} if safe is False else {})


def _hh(row, pair, preference):
    try:
        prompt, chosen = split_hh(text_field(row, "chosen"))
        rejected = None
        if pair:
            prompt_r, rejected = split_hh(text_field(row, "rejected"))
            if prompt_r != prompt:
                raise BadRow("'chosen' and 'rejected' have different prompts (they differ before the last Assistant "
                             "turn)")
        try:
            messages = hh_messages(prompt)
        except ValueError as e:  # the hh template still uses the prompt verbatim; others need the turns
            return Example([], chosen, rejected, raw_prompt=prompt, notes={"turns_error": str(e)})
        return Example(messages, chosen, rejected, raw_prompt=prompt)
    except ValueError as e:
        raise BadRow(str(e)) from None


# ---------------------------------------------------------------------------------------------------------------------
# Chat conversations: OpenAI / TRL "messages" (role, content), ShareGPT "conversations" (from, value)

def chat_turns(value: Any, key: str) -> List[Message]:
    """`parse_messages` for a row's field. Raises BadRow."""
    try:
        return parse_messages(value, key)
    except ValueError as e:
        raise BadRow(str(e)) from None


def _split_answer(turns: List[Message], key: str) -> Tuple[List[Message], Message]:
    """(prompt turns, the answer): the answer is the last turn, an assistant one (text, tool calls or both, and its
    reasoning); the prompt ends with a user turn or a tool result."""
    last = turns[-1]
    if last["role"] != "assistant" or not (last["content"].strip() or last.get("tool_calls")):
        raise BadRow(f"{key!r} must end with a non-empty assistant turn (the answer)")
    prompt = turns[:-1]
    if prompt and (prompt[-1]["role"] not in ("user", "tool") or not prompt[-1]["content"].strip()):
        raise BadRow(f"in {key!r} the turn before the answer must be a non-empty user turn or tool result")
    return prompt, last


def row_tools(row: Dict[str, Any]) -> Optional[Tools]:
    """A row's `tools` (TRL's column): a list of functions in OpenAI's form or bare ({"name", "description",
    "parameters"}), or that list as JSON text (as some datasets store it). Raises BadRow."""
    value = row.get("tools")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow(f"'tools' is text that is not JSON ({e})") from None
    if isinstance(value, list):
        value = [t if isinstance(t, dict) and "function" in t else {"type": "function", "function": t} for t in value]
    try:
        return parse_tools(value, check_schemas=False)
    except ToolError as e:
        raise BadRow(str(e)) from None


def _prompt_turns(row: Dict[str, Any], key: str) -> List[Message]:
    if "prompt" not in row:
        raise BadRow(f"{key!r} holds only the answer, and there is no 'prompt' field with the conversation before it")
    value = row["prompt"]
    turns = _user(text_field(row, "prompt")) if isinstance(value, str) else chat_turns(value, "prompt")
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise BadRow("'prompt' must end with a non-empty user turn")
    return turns


def _answer_of(row: Dict[str, Any], key: str) -> Tuple[Optional[List[Message]], Message]:
    """A chosen / rejected message list (or text): (its own prompt turns, or None when it holds the answer alone; the
    answer as an assistant message)."""
    if isinstance(row.get(key), str):
        return None, {"role": "assistant", "content": text_field(row, key)}
    prompt, answer = _split_answer(chat_turns(row.get(key), key), key)
    return (prompt or None), answer


def _messages(row, pair, preference):
    """SFT: "messages" / "conversations" (or "chosen", or TRL's "prompt" + "completion", as message lists) ending with
    the answer, the earlier turns (system, user, assistant) its prompt. Pairs: "chosen" and "rejected" as message
    lists, either whole conversations that share everything before their last turn (TRL's implicit prompt) or the
    answers alone with the conversation in "prompt" (TRL's explicit prompt; a string is one user turn)."""
    tools = row_tools(row)
    if not pair:
        key = next((k for k in CONVERSATION_KEYS if k in row), None)
        if key is not None:
            prompt, answer = _split_answer(chat_turns(row[key], key), key)
            if not prompt:
                raise BadRow(f"{key!r} holds only an answer: no user turn before it")
            return Example(prompt, answer["content"], tools=tools, calls=answer.get("tool_calls"),
                           reasoning=answer.get("reasoning_content"))
    key = "chosen" if "chosen" in row or pair else "completion"  # TRL's prompt-completion rows: SFT only
    if key not in row:
        if pair:
            raise _single_answer("chat conversation", "messages / conversations / prompt + completion")
        raise BadRow(f"no conversation: none of the fields {', '.join(CONVERSATION_KEYS)}, chosen, completion")
    prompt, chosen = _answer_of(row, key)
    rejected = None
    if pair:
        if "rejected" not in row:
            raise BadRow("missing field 'rejected'")
        prompt_r, answer_r = _answer_of(row, "rejected")
        rejected = answer_r["content"]
        if (prompt is None) != (prompt_r is None) or (prompt is not None and prompt != prompt_r):
            raise BadRow("'chosen' and 'rejected' have different prompts (they differ before the last turn)")
        if chosen.get("tool_calls") or answer_r.get("tool_calls"):
            raise BadRow("preference answers that call tools are not supported (SFT data may call them)")
    return Example(prompt if prompt is not None else _prompt_turns(row, key), chosen["content"], rejected, tools=tools,
                   calls=chosen.get("tool_calls"), reasoning=chosen.get("reasoning_content"),
                   rejected_reasoning=None if rejected is None else answer_r.get("reasoning_content"))


def _prompt_only(row, pair, preference):
    """TRL's prompt-only rows: a prompt (text, or chat turns ending with a user turn) and no answer. Only on-policy
    distillation and GRPO read them (the student writes every response); `chosen` stays empty."""
    value = row.get("prompt")
    turns = chat_turns(value, "prompt") if isinstance(value, list) else _user(text_field(row, "prompt"))
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise BadRow("'prompt' must end with a non-empty user turn")
    return Example(turns, "", tools=row_tools(row), input=_optional_input(row))


def _unpaired(row, pair, preference):
    """TRL's unpaired preference rows (KTO's data): a prompt, one completion and its label (true: desirable), as text
    or as message lists."""
    label = row.get("label")
    if not isinstance(label, bool):
        raise BadRow(f"'label' must be true or false (is the completion desirable?), got {label!r}")
    prompt, answer = _answer_of(row, "completion")
    if answer.get("tool_calls"):
        raise BadRow("unpaired completions that call tools are not supported (SFT data may call them)")
    return Example(prompt if prompt is not None else _prompt_turns(row, "completion"), answer["content"],
                   tools=row_tools(row), reasoning=answer.get("reasoning_content"), label=label)


def unpair(ex: Example) -> List[Example]:
    """A preference pair as two unpaired rows (TRL's `unpair_preference_dataset`): the chosen answer desirable, the
    rejected one not."""
    chosen = dataclasses.replace(ex, rejected=None, rejected_reasoning=None, label=True)
    return [chosen, dataclasses.replace(chosen, chosen=ex.rejected, reasoning=ex.rejected_reasoning, calls=None,
                                        label=False)]


def every_answer(ex: Example) -> List[Example]:
    """SFT examples for every assistant turn of an example's conversation that follows a user turn or a tool result,
    each with the conversation before it as its prompt; `ex` (the last answer) last."""
    turns = ex.messages
    return [Example(turns[:k], m["content"], tools=ex.tools, calls=m.get("tool_calls"),
                    reasoning=m.get("reasoning_content"))
            for k, m in enumerate(turns) if k and m["role"] == "assistant" and turns[k - 1]["role"] in ("user", "tool")
            and (m["content"].strip() or m.get("tool_calls"))] + [ex]


@dataclass(frozen=True)
class Format:
    name: str
    fields: Tuple[str, ...]  # the fields (after a field map) that identify a row of this format
    parse: Callable[[Dict[str, Any], bool, str], Example]
    description: str


# Detection order matters: the first format whose fields a row has wins.
FORMATS: Dict[str, Format] = {f.name: f for f in [
    Format("unpaired", ("prompt", "completion", "label"), _unpaired, "unpaired preference rows (KTO: prompt, one "
           "completion, a true/false label; text or message lists)"),
    Format("pku", ("prompt", "response_0", "response_1"), _pku, "PKU-SafeRLHF"),
    Format("qac", ("question", "answer", "correction"), _qac, "Q-A-C correction rows"),
    Format("pairs", ("prompt", "chosen", "rejected"), _pairs, "prompt/chosen/rejected preference pairs"),
    Format("prompt", ("prompt", "response"), _prompt_response, "prompt/response (or prompt/completion) rows"),
    Format("hh", ("chosen",), _hh, "HH-RLHF {chosen, rejected} dialogues"),
    Format("alpaca", ("instruction", "output"), _alpaca, "Stanford Alpaca (instruction, input, output)"),
    Format("messages", ("messages",), _messages, "chat conversations (messages or conversations: lists of "
           "role/content or ShareGPT from/value turns; or chosen/rejected as message lists)"),
    Format("prompt_only", ("prompt",), _prompt_only, "prompt-only rows (a prompt and no answer: on-policy "
           "distillation, GRPO)"),
]}
# a row with any of these holds an answer (or a whole conversation), so it is not prompt-only
ANSWER_FIELDS = ("response", "completion", "chosen", "rejected", "label", "response_0", "response_1", "output",
                 "answer", "correction", *CONVERSATION_KEYS)
# fields a field map may map onto
MAPPABLE = ("instruction", "input", "output", "prompt", "response", "completion", "chosen", "rejected", "question",
            "answer", "correction", "response_0", "response_1", "better_response_id", "safer_response_id",
            "is_response_0_safe", "is_response_1_safe", "messages", "conversations", "tools", "label")


def is_conversational(row: Dict[str, Any]) -> bool:
    """Chat turns as message lists (TRL's "conversational" rows), whatever other fields the row carries."""
    return any(k in row for k in CONVERSATION_KEYS) or any(isinstance(row.get(k), list)
                                                           for k in ("prompt", "chosen", "rejected", "completion"))


def detect_format(row: Dict[str, Any], path: Path) -> str:
    if {"prompt", "completion", "label"} <= set(row):  # text or message lists alike
        return "unpaired"
    if "prompt" in row and not any(k in row for k in ANSWER_FIELDS):  # text or message lists alike
        return "prompt_only"
    if is_conversational(row):
        return "messages"
    keys = set(row)
    if {"prompt", "completion"} <= keys:
        keys.add("response")
    for name, fmt in FORMATS.items():
        if (name == "hh" and "prompt" in keys) or name == "prompt_only":
            continue  # {prompt, chosen, ...} is a pair row that lacks a field, not an HH dialogue nor prompt-only
        if set(fmt.fields) <= keys:
            return name
    raise DataError(
        f"{path}: cannot tell the data format from the row keys {sorted(row)}. Known formats: "
        + "; ".join(f"{f.description} ({', '.join(f.fields)})" for f in FORMATS.values())
        + ". Map other names with --field-map, e.g. instruction=question,output=answer.")


def parse_field_map(spec: Union[str, Dict[str, str], None]) -> Optional[Dict[str, str]]:
    """"instruction=question,output=answer" (ours=theirs) or a dict -> {ours: theirs}; DataError on a bad spec."""
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, str):
        pairs = [p.strip() for p in spec.split(",") if p.strip()]
        if any(p.count("=") != 1 for p in pairs):
            raise DataError(f"--field-map {spec!r}: expected comma-separated ours=theirs pairs, e.g. "
                            f"instruction=question,output=answer")
        spec = dict(tuple(s.strip() for s in p.split("=")) for p in pairs)
    unknown = sorted(set(spec) - set(MAPPABLE))
    if unknown:
        raise DataError(f"field map: unknown target field(s) {unknown}; map onto {', '.join(MAPPABLE)}")
    return dict(spec)


def apply_field_map(row: Dict[str, Any], field_map: Optional[Dict[str, str]]) -> Dict[str, Any]:
    if not field_map:
        return row
    out = {k: v for k, v in row.items() if k not in field_map.values()}
    for ours, theirs in field_map.items():
        if theirs in row:
            out[ours] = row[theirs]
    return out


def row_to_example(row: Any, fmt: str, kind: str, preference: str) -> Example:
    """One raw row of format `fmt` -> Example for data `kind` (sft and distill use `chosen` only). Raises BadRow."""
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt].parse(row, kind not in ONE_ANSWER_KINDS, preference)
