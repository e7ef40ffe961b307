"""Prompt templates: how an instruction (+ optional input, or a whole conversation) becomes the prompt text that the
response follows directly.

`TEMPLATES` maps a name to a `PromptTemplate`:

| name | prompt (one turn) | response follows as |
| --- | --- | --- |
| `alpaca` | Stanford Alpaca: "Below is an instruction that describes a task[...]. ... ### Response:" | the response |
| `beaver` | PKU-Beaver: "BEGINNING OF CONVERSATION: USER: {instruction} ASSISTANT:" | " " + response |
| `hh` | Anthropic HH-RLHF: "\\n\\nHuman: {instruction}\\n\\nAssistant:" | " " + response |
| `chat` | the tokenizer's own chat template, one user turn, assistant turn opened | the template's assistant text |
| `plain` | the instruction itself (+ "\\n\\n" + input) | "\\n" + response |
| `correction` | question + upstream answer + the request for a corrected answer (Q-A-C) | the corrected answer |

Generation builds its prompts here too (`build_prompt`, `prompt_for_aligner`, `encode_prompt`), so that a model sees at
inference exactly the text and token ids its Aligner was trained on.

Every template but `chat` ends its response with the tokenizer's EOS token (added by the tokenizing code in
`lit_aligner.data`); `chat` ends it with the chat template's own end-of-turn token. The template name is saved in an
Aligner's metadata so that generation renders the same prompt.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

from lit_aligner.files import UserError

# {"role": "system" | "user" | "assistant" | "tool", "content": str}; an assistant turn may carry OpenAI's
# "tool_calls", a tool result its "tool_call_id" (`lit_aligner.tools` renders them)
Message = Dict[str, Any]

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
CORRECTION = (
    "Below is a question and an answer to it written by another assistant. Write a corrected answer: fix whatever is "
    "wrong, unhelpful or harmful in it and keep what is right. If the answer needs no change, repeat it unchanged.\n\n"
    "### Question:\n{question}\n\n### Answer:\n{answer}\n\n### Corrected answer:\n"
)


def join_input(instruction: str, input: str = "") -> str:
    """One user message from an instruction and an optional input (the same join `generate.build_prompt` uses)."""
    return f"{instruction}\n\n{input}" if input else instruction


def transcript(messages: Sequence[Message]) -> str:
    """A conversation as plain text ("User: ...\\n\\nAssistant: ..."), for templates that have no turns of their own."""
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


CONVERSATION_KEYS = ("messages", "conversations")  # the fields that hold a chat (OpenAI / TRL; ShareGPT)


def conversation(text: str, input: str = "", system: Optional[str] = None,
                 history: Sequence[Message] = ()) -> List[Message]:
    """A request as chat messages: a system message (if any), the earlier turns, the user turn (text + input)."""
    return ([{"role": "system", "content": system}] if system else []) + list(history) + \
        [{"role": "user", "content": join_input(text, input)}]


# ShareGPT's speaker names, OpenAI's "developer" (its newer name for system) and the roles chat templates know
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
          "developer": "system", "tool": "tool"}


def with_system(messages: Sequence[Message], system: str) -> List[Message]:
    """The conversation with `system` as its system message: put first, or ahead of the conversation's own (a blank
    line between)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{system}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def parse_messages(value: Any, key: str = "messages") -> List[Message]:
    """Chat turns from JSON: a list of {"role", "content"} (OpenAI, TRL; a content may be a list of text parts, joined
    as the server joins them) or ShareGPT's {"from", "value"} (human, gpt), as Messages with the roles system, user,
    assistant, tool. An assistant turn's OpenAI `tool_calls` are kept (its content may then be null), and its
    `reasoning_content` (or vLLM's `reasoning`: a thinking model's reasoning, which templates such as Qwen3's write in
    its think block); a tool result's `tool_call_id` too. ValueError naming `key` and the turn otherwise."""
    if isinstance(value, dict):  # one message where a list was expected (a TRL completion of one turn)
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {key!r} must be a non-empty list of chat messages, got {type(value).__name__}")
    turns: List[Message] = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{key}[{j}] must be a message object, got {type(m).__name__}")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in _ROLES:
            raise ValueError(f"{key}[{j}]: role {role!r} is not supported (user, assistant, system, tool; ShareGPT's "
                             f"human, gpt)")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        calls = m.get("tool_calls") or None
        if calls is not None and (_ROLES[role] != "assistant" or not _well_formed_calls(calls)):
            raise ValueError(f"{key}[{j}]: tool_calls must be on an assistant turn, a list of {{\"type\": "
                             f"\"function\", \"function\": {{\"name\": <text>, \"arguments\": ...}}}}")
        if content is None and calls is not None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"{key}[{j}]: content must be a string or a list of text parts, got "
                             f"{type(content).__name__}")
        turn: Message = {"role": _ROLES[role], "content": content}
        if calls is not None:
            turn["tool_calls"] = calls
        reasoning = m.get("reasoning_content", m.get("reasoning"))  # (vLLM's newer name)
        if reasoning is not None and (_ROLES[role] != "assistant" or not isinstance(reasoning, str)):
            raise ValueError(f"{key}[{j}]: reasoning_content must be text on an assistant turn")
        if reasoning:
            turn["reasoning_content"] = reasoning
        if _ROLES[role] == "tool" and m.get("tool_call_id") is not None:
            turn["tool_call_id"] = m["tool_call_id"]
        turns.append(turn)
    return turns


def has_tool_turns(messages: Sequence[Message]) -> bool:
    """Whether a conversation calls tools or holds their results (`lit_aligner.tools` renders those)."""
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def _well_formed_calls(calls: Any) -> bool:
    return isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", {}), (str, dict)) for c in calls)


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages or messages[-1].get("role") not in ("user", "tool"):
        raise ValueError("a prompt conversation must end with a user message or a tool result (the turn the response "
                         "answers)")


@dataclass(frozen=True)
class PromptTemplate:
    """A named prompt format. `response_lead` is the text between the prompt and the response in training targets
    (e.g. the space after "ASSISTANT:"); it belongs to the response, so a generation prompt never ends in it."""

    name: str
    description: str
    response_lead: str = ""

    def render(self, instruction: str, input: str = "", tokenizer: Any = None) -> str:
        """The prompt text for one instruction (+ optional input); the response follows it directly."""
        return self.render_messages([{"role": "user", "content": join_input(instruction, input)}], tokenizer)

    def render_messages(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        """The prompt text for a conversation that ends with a user message. Templates without turns of their own
        answer the last user message and pass the earlier turns as its input (`flatten`)."""
        _check_messages(messages)
        instruction, input = flatten(messages)
        return self.render(instruction, input, tokenizer)

    def completion(self, response: str, messages: Optional[Sequence[Message]] = None, tokenizer: Any = None) -> str:
        """The training text that follows the prompt: `response_lead` + the stripped response. The end token is not
        part of it unless the template writes one itself (`chat`); the tokenizing code adds EOS otherwise."""
        return self.response_lead + response.strip()


def flatten(messages: Sequence[Message]) -> "tuple[str, str]":
    """(instruction, input) for templates without turns: the last user message, and the earlier turns (if any) as a
    transcript labelled as context."""
    _check_messages(messages)
    instruction = messages[-1]["content"]
    earlier = list(messages[:-1])
    return instruction, ("Conversation so far:\n" + transcript(earlier) if earlier else "")


@dataclass(frozen=True)
class AlpacaTemplate(PromptTemplate):
    def render(self, instruction: str, input: str = "", tokenizer: Any = None) -> str:
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)


@dataclass(frozen=True)
class PlainTemplate(PromptTemplate):
    def render(self, instruction: str, input: str = "", tokenizer: Any = None) -> str:
        return join_input(instruction, input)


@dataclass(frozen=True)
class TurnsTemplate(PromptTemplate):
    """Templates with their own turn markers (beaver, hh): multi-turn conversations keep their turns."""

    begin: str = ""
    user: str = ""
    assistant: str = ""

    def render(self, instruction: str, input: str = "", tokenizer: Any = None) -> str:
        return self.render_messages([{"role": "user", "content": join_input(instruction, input)}], tokenizer)

    def render_messages(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        _check_messages(messages)
        parts = [self.begin]
        for m in messages:
            if m["role"] == "assistant":
                parts.append(self.assistant + self.response_lead + m["content"].strip())
            else:  # a system message has no marker of its own in these formats; it reads as a user turn
                parts.append(self.user + m["content"])
        return "".join(parts) + self.assistant


@dataclass(frozen=True)
class ChatTemplate(PromptTemplate):
    """The tokenizer's own chat template (needs a tokenizer with one)."""

    @staticmethod
    def _need(tokenizer: Any) -> None:
        if tokenizer is None or not getattr(tokenizer, "has_chat_template", False):
            where = getattr(tokenizer, "checkpoint_dir", None)
            raise UserError(f"the 'chat' template needs a tokenizer with a chat template"
                             f"{f' ({where} has none)' if where else ''}; pick another template "
                             f"(alpaca, beaver, hh, plain)")

    def render_messages(self, messages: Sequence[Message], tokenizer: Any = None, **variables: Any) -> str:
        """variables: more for the template (`tools`, as transformers passes them)."""
        _check_messages(messages)
        self._need(tokenizer)
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, **variables)

    def completion(self, response: Union[str, Message], messages: Optional[Sequence[Message]] = None,
                   tokenizer: Any = None, **variables: Any) -> str:
        """The assistant turn as the template writes it, end-of-turn token included: the suffix of the full
        conversation rendered with the answer after the prompt rendered without it (so the end marker is the
        template's, e.g. "<|im_end|>\\n" for ChatML, " </s>" for LLaMA-2-chat). `response`: the answer's text, or
        the assistant message itself (one with `tool_calls`)."""
        self._need(tokenizer)
        if messages is None:
            raise ValueError("the 'chat' template needs the prompt messages to render the answer turn")
        prompt = self.render_messages(messages, tokenizer, **variables)
        answer = response if isinstance(response, dict) else {"role": "assistant", "content": response.strip()}
        full = tokenizer.apply_chat_template(list(messages) + [answer], add_generation_prompt=False, **variables)
        if not full.startswith(prompt):
            raise ValueError("this chat template renders the conversation differently once the answer is added (it "
                             "rewrites earlier turns), so the answer cannot be split off; pick another template")
        return full[len(prompt):]


@dataclass(frozen=True)
class CorrectionTemplate(PromptTemplate):
    """Q-A-C: the question, the upstream model's answer, and the request for a corrected answer."""

    def render_correction(self, question: str, answer: str, tokenizer: Any = None) -> str:
        return CORRECTION.format(question=question.strip(), answer=answer.strip())

    def render(self, instruction: str, input: str = "", tokenizer: Any = None) -> str:
        """instruction = the question, input = the upstream answer (required)."""
        if not input.strip():
            raise ValueError("the 'correction' template needs the upstream answer (as the input) next to the question")
        return self.render_correction(instruction, input, tokenizer)

    def render_messages(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        raise ValueError("the 'correction' template renders a question and an answer: use render_correction")


TEMPLATES: Dict[str, PromptTemplate] = {
    t.name: t
    for t in [
        AlpacaTemplate("alpaca", "Stanford Alpaca instruction format (with and without input)"),
        TurnsTemplate("beaver", "PKU-Beaver: BEGINNING OF CONVERSATION: USER: ... ASSISTANT:", response_lead=" ",
                      begin="BEGINNING OF CONVERSATION:", user=" USER: ", assistant=" ASSISTANT:"),
        TurnsTemplate("hh", "Anthropic HH-RLHF: \\n\\nHuman: ...\\n\\nAssistant:", response_lead=" ",
                      user="\n\nHuman: ", assistant="\n\nAssistant:"),
        ChatTemplate("chat", "the base model's own chat template (one user turn, assistant turn opened)"),
        PlainTemplate("plain", "the instruction text as is", response_lead="\n"),
        CorrectionTemplate("correction", "Q-A-C: question + upstream answer -> corrected answer"),
    ]
}


def continue_final_message(template: PromptTemplate, messages: Sequence[Message], tokenizer: Any = None,
                           **variables: Any) -> str:
    """The prompt that continues the conversation's last message, an assistant's words (vLLM's and transformers'
    `continue_final_message`, a prefill): under a chat template, the whole conversation rendered without a generation
    prompt and cut after those words (stripped, as transformers cuts them); under a named template, the prompt of the
    turns before + the template's response lead + the words, as its training text begins. ValueError otherwise."""
    final = messages[-1] if messages else {}
    if final.get("role") != "assistant" or final.get("tool_calls") or not final.get("content", "").strip():
        raise ValueError("continue_final_message continues the last message, which must be an assistant's words (no "
                         "tool calls)")
    start = final["content"].strip()
    if not isinstance(template, ChatTemplate):
        return template.render_messages(messages[:-1], tokenizer) + template.response_lead + start
    template._need(tokenizer)
    full = tokenizer.apply_chat_template(list(messages), add_generation_prompt=False, **variables)
    if start not in full:
        raise ValueError("the chat template does not write the last assistant message as given, so it cannot be "
                         "continued")
    return full[:full.rindex(start) + len(start)]


def default_template(tokenizer) -> str:
    """The template raw data is rendered with when none is given (training, preparing): the tokenizer's chat template
    when it has one, else Alpaca's."""
    return "chat" if getattr(tokenizer, "has_chat_template", False) else "alpaca"


def conversation_template(tokenizer) -> str:
    """The template a conversation is rendered with when none is saved or given (the server's chat endpoint, tools in
    `generate/aligner.py`): the tokenizer's chat template when it has one, else plain text."""
    return "chat" if getattr(tokenizer, "has_chat_template", False) else "plain"


def get_template(name: str) -> PromptTemplate:
    """The registered template `name` (see TEMPLATES); ValueError listing the names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; choose one of {', '.join(TEMPLATES)}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Prompts for generation: the text (and token ids) a model sees, the same as training rendered and encoded them

# The mode an Aligner trained to rewrite answers records in its metadata ("correct" in files written before 0.2).
CORRECTION_MODES = ("correction", "correct")


def is_correction(metadata: Optional[Dict[str, Any]]) -> bool:
    return (metadata or {}).get("mode") in CORRECTION_MODES


def saved_variables(metadata: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The chat-template variables an Aligner was trained with (its metadata's `template_variables`, JSON text in a
    file's header; {} for none): its prompts are rendered with them, under a user's own. ValueError when malformed."""
    import json

    from lit_aligner.tokenizer import check_template_variables

    value = (metadata or {}).get("template_variables")
    if not value:
        return {}
    return check_template_variables(json.loads(value) if isinstance(value, str) else value, "template_variables")


def conversation_question(messages: Sequence[Message]) -> str:
    """The question a corrector rewrites an answer to, for a conversation: its last user message, with the system
    message and the earlier turns as context (`flatten`); a lone user message is itself."""
    return join_input(*flatten(messages))


def correction_prompt(question: str, answer: str) -> str:
    """The Q-A-C prompt for one (question, upstream answer); the corrected answer follows it directly."""
    return TEMPLATES["correction"].render_correction(question, answer)


def build_prompt(tokenizer, text: str, template: Optional[str] = None, input: str = "",
                 system: Optional[str] = None, history: Sequence[Message] = ()) -> str:
    """The prompt string for one instruction (+ optional input). template None: the tokenizer's chat template (one user
    turn, assistant turn opened) when it has one, else the raw text; a template name: that template's rendering.
    system: a system message before the user turn (the chat template's own; in the other templates it reads as an
    earlier turn, and as a first paragraph in raw text). history: the conversation's earlier user and assistant turns,
    oldest first, rendered as the template renders a conversation (without a chat template or a template: `plain`,
    as the server renders chat messages)."""
    if system or history:
        messages = conversation(text, input, system, history)
        if template is None and not getattr(tokenizer, "has_chat_template", False):
            if not history:
                return f"{system}\n\n{join_input(text, input)}"
            template = "plain"
        return get_template(template or "chat").render_messages(messages, tokenizer=tokenizer)
    if template is not None:
        return get_template(template).render(text, input, tokenizer=tokenizer)
    if getattr(tokenizer, "has_chat_template", False):
        return get_template("chat").render(text, input, tokenizer=tokenizer)
    return join_input(text, input)


def prompt_for_aligner(tokenizer, text: str, input: str = "", metadata: Optional[Dict[str, Any]] = None,
                       template: Optional[str] = None, system: Optional[str] = None,
                       history: Sequence[Message] = ()) -> str:
    """The prompt an Aligner expects, from its metadata (as saved with it): `template` (an override, e.g. --template)
    wins over metadata["template"], which wins over `build_prompt`'s default. Correction Aligners get the Q-A-C prompt:
    `text` is the question and `input` the answer to correct (the prompt their training data used)."""
    if is_correction(metadata) and template in (None, "correction"):
        if not input.strip():
            raise ValueError("this is a correction Aligner (mode 'correction'): it rewrites an answer, so give the "
                             "question AND the answer to correct (generate/aligner.py --question/--answer or "
                             "--qa-file), or use --pipeline to let the bare base answer first")
        if system or history:
            raise ValueError("a correction Aligner's prompt (question, answer to correct) has no system message and "
                             "no earlier turns: drop them for it")
        return correction_prompt(text, input)
    return build_prompt(tokenizer, text, template or (metadata or {}).get("template"), input=input, system=system,
                        history=history)


def encode_prompt(tokenizer, text: str):
    """Token ids (1-D) of a prompt: BOS per the tokenizer's default (as training encodes prompts), minus a doubled BOS
    when the prompt text already starts with it (chat templates such as LLaMA-2-chat's write "<s>" themselves)."""
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None and len(ids) >= 2 and int(ids[0]) == int(ids[1]) == bos:
        ids = ids[1:]
    return ids
