"""Tool calls (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`; TRL's `tools` column and `tool_calls` turns) in
five formats, each as its chat templates write calls and as vLLM's parser of that name reads them:
- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the answer (Qwen2.5 and 3, Hermes 2
  and 3, SmolLM3);
- `llama3` (vLLM's `llama3_json`): the whole answer is the call, `{"name": ..., "parameters": {...}}` (several joined
  by "; ", after an optional `<|python_tag|>`; Llama 3.1 to 3.3);
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` after the answer's words, if any (Mistral 7B
  v0.3, Mistral-Nemo; their templates want 9-letter call ids, which earlier calls and results get from theirs);
- `qwen3_coder`: `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`
  (Qwen3-Coder, Qwen3.5 and later, Nemotron 3);
- `glm45`: `<tool_call>NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>\\n</tool_call>` (GLM-4.5 to 4.7).
In the last two a value is text: a string as it is, anything else as JSON, read back by the type that the function's
schema gives the argument. The server and the training data render tools and tool turns with the same
`tool_messages`, so an Aligner trained on tool-calling conversations is served the prompts it learnt from.

The prompt: a chat template that renders tools in one of the formats gets them as its `tools` variable (the
transformers convention) and the conversation's earlier calls and results as messages (`tool_calls`, role `tool`), and
its answers are read in its format. Any other template (SmolLM2's, LLaMA-2's, the named ones) gets a system message
that lists the tools and Hermes' format, earlier calls as that text and results as user turns in `<tool_response>`
tags, as Hermes templates render them. A template that renders tools in another format (LFM2's, gpt-oss') gets them
natively, and `auto` is refused: its model's own calls would not be read.

The answer: `tool_choice` "required" or a named function holds it to calls in the template's format with a grammar,
each call's arguments to its function's JSON schema (one call with a name or `parallel_tool_calls: false`): any model
gives a call that parses, not necessarily a good one. "auto" (the default with tools) leaves the model free and reads
the calls it writes; "none" reads none.
"""

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from lit_aligner.files import UserError
from lit_aligner.generation.structured import OutputFormat, StructuredOutputError, check_format
from lit_aligner.reasoning import cut_tag

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3's mark of a tool call (its templates write it for built-in tools)
TOOL_CALLS = "[TOOL_CALLS]"  # Mistral's: the calls follow it as one JSON list
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for a function name
# A forced call's JSON is written as json.dumps writes it, as Hermes templates render calls (`tojson`) and as their
# models write them. (Flexible whitespace would also make the end ambiguous: blank space after the object, or the
# line break before the closing tag.)
CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# The formats with a body of markup between the <tool_call> tags: what goes before and after the function's name, an
# argument's element ({key}, {value}) and what follows the last one, as the templates write them.
MARKUP = {"qwen3_coder": ("\n<function=", ">\n", "<parameter={key}>\n{value}\n</parameter>\n", "</function>\n"),
          "glm45": ("", "\n", "<arg_key>{key}</arg_key>\n<arg_value>{value}</arg_value>\n", "")}
# How each is read (one newline each side of a value is the markup's; vLLM's `qwen3_coder` and `glm45` parsers'):
# the body's (name, elements) and one element's (key, value).
MARKUP_READ = {"qwen3_coder": (re.compile(r"<function=([^>\n]+)>(.*)</function>", re.S),
                               re.compile(r"\s*<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>\s*", re.S)),
               "glm45": (re.compile(r"([^\s<]+)(.*)", re.S),
                         re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.S))}


class ToolError(UserError):
    """A malformed `tools` / `tool_choice` (the server's 400, naming `param`)."""

    def __init__(self, message: str, param: str = "tools"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def openai(self, index: Optional[int] = None) -> Dict[str, Any]:
        """OpenAI's form of the call, with a fresh id (a streamed one with its index among the answer's calls)."""
        out = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class Tools:
    """A request's functions ({"name", "description", "parameters"}) and its choice: "none", "auto", "required" or
    the name of the one function to call."""

    functions: Tuple[Dict[str, Any], ...]
    choice: str = "auto"
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice not in ("none", "auto")

    def template_tools(self) -> List[Dict[str, Any]]:
        """The tools as chat templates take them (OpenAI's form)."""
        return [{"type": "function", "function": f} for f in self.functions]

    def output_format(self, style: str = "hermes") -> Optional[OutputFormat]:
        """The grammar of a forced answer in the format of a template of `style` (`template_style`): one call or
        more, each its function's name and arguments (Hermes' and the markup formats: each in `<tool_call>` tags,
        one per line; Llama 3's: the JSON objects alone, joined by "; "; Mistral's: a JSON list after
        [TOOL_CALLS]). ToolError when a function's parameters cannot be written in a markup format."""
        if not self.forced:
            return None
        key, before, after, between = {"llama3": ("parameters", "", "", "; "),
                                       "mistral": ("arguments", "", "", ", ")}.get(
            style, ("arguments", OPEN + "\n", "\n" + CLOSE, "\n"))
        chosen = [f for f in self.functions if self.choice in ("required", f["name"])]
        rules = []
        for i, f in enumerate(chosen):
            if style in MARKUP:
                rules += _markup_rules(i, f, MARKUP[style])
                continue
            schema = {"type": "object", "properties": {"name": {"const": f["name"]}, key: f["parameters"]},
                      "required": ["name", key], "additionalProperties": False, "x-guidance": CALL_JSON}
            parts = [f"call{i}:", json.dumps(before), "%json", json.dumps(schema), json.dumps(after)]
            rules.append(" ".join(p for p in parts if p != '""'))
        calls = " | ".join(f"call{i}" for i in range(len(chosen)))
        many = self.parallel and self.choice == "required"
        body = f"call ({json.dumps(between)} call)*" if many else "call"
        if style == "mistral":  # one JSON list after the marker
            body = f"{json.dumps(TOOL_CALLS + ' [')} {body} \"]\""
        return OutputFormat("grammar", "\n".join([f"start: {body}", f"call: {calls}", *rules]))


def _value_kind(schema: Any) -> Tuple[str, bool]:
    """("string" or "json", nullable): how an argument's value is written in a markup format, by the type its
    schema gives it (the first besides null of `type`, `anyOf`/`oneOf` or the `enum` values; a string when none)."""
    schema = schema if isinstance(schema, Mapping) else {}
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    for option in schema.get("anyOf", schema.get("oneOf", [])):
        kind = option.get("type") if isinstance(option, Mapping) else None
        types += [kind] if isinstance(kind, str) else list(kind or [])
    values = schema.get("enum", [schema["const"]] if "const" in schema else [])
    types += ["string" if isinstance(v, str) else "null" if v is None else "other" for v in values]
    kinds = [t for t in types if t != "null"]
    return ("string" if not kinds or kinds[0] == "string" else "json"), "null" in types


def _searched(pattern: str) -> str:
    """A JSON schema's `pattern` (found anywhere in the string unless anchored with ^ or $) as a Lark regex of the
    whole string."""
    start, end = pattern.startswith("^"), bool(re.search(r"(?<!\\)\$$", pattern))
    core = pattern[1 if start else 0:len(pattern) - 1 if end else len(pattern)]
    whole = ("" if start else "(?s:.*)") + f"(?:{core})" + ("" if end else "(?s:.*)")
    return re.sub(r"(?<!\\)/", r"\/", whole)  # "/" ends a Lark regex


def _markup_rules(i: int, function: Dict[str, Any], markup: Tuple[str, str, str, str]) -> List[str]:
    """Grammar rules of a call of `function` in a markup format (rule `call{i}`): its properties in the schema's
    order, the required ones always; a string value is any text without the element's closing tag (at the schema's
    minLength/maxLength, pattern, enum or const), any other value its schema's JSON."""
    before, after, element, end = markup
    parameters, name = function["parameters"], function["name"]
    properties = parameters.get("properties")
    if not isinstance(properties, Mapping) or any(k in parameters for k in ("$ref", "anyOf", "oneOf", "allOf")):
        if properties is None and set(parameters) <= {"type", "description", "additionalProperties", "title"}:
            properties = {}  # no arguments
        else:
            raise ToolError(f"function {name!r}: this model's call format writes one element per argument, so its "
                            f"parameters must be an object schema with \"properties\" to be forced")
    closing = element.split("{value}")[1].strip()
    not_closing = f"~/(?s:.*){re.escape(closing)}(?s:.*)/".replace("</", "<\\/")  # "/" ends a Lark regex
    defs = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}
    required, parts, rules = set(parameters.get("required", [])), [], []
    for k, (prop, schema) in enumerate(properties.items()):
        if not re.fullmatch(r"[^<>\n]+", prop):
            raise ToolError(f"function {name!r}: the argument name {prop!r} cannot be written in this model's call "
                            f"format (no <, > or line breaks)")
        head, tail = (json.dumps(s) for s in element.format(key=prop, value="\0").split("\0"))
        kind, _ = _value_kind(schema)
        schema = schema if isinstance(schema, Mapping) else {}
        if kind == "json":
            rules.append(f"arg{i}_{k}: {head} %json {json.dumps({**schema, **defs, 'x-guidance': CALL_JSON})} {tail}")
        else:
            values = schema.get("enum", [schema["const"]] if "const" in schema else None)
            if values is not None:
                text = "(" + " | ".join(json.dumps(v) for v in values if isinstance(v, str)) + ")"
            else:
                length = f"{{{schema.get('minLength', 0)},{schema.get('maxLength', '')}}}"
                pattern = f" & /{_searched(schema['pattern'])}/" if "pattern" in schema else ""
                text = f"(/(?s:.{length})/{pattern} & {not_closing})"
            rules.append(f"ARG{i}_{k}: {head} {text} {tail}")
        parts.append((f"arg{i}_{k}" if kind == "json" else f"ARG{i}_{k}") + ("" if prop in required else "?"))
    call = [json.dumps(OPEN + before + name + after), *parts, json.dumps(end + CLOSE)]
    return [f"call{i}: " + " ".join(call), *rules]


def parse_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: Optional[bool] = None,
                check_schemas: bool = True) -> Optional[Tools]:
    """A request's tool fields as `Tools` (None: no tools, or tool_choice "none" without them); ToolError naming the
    field otherwise. With `check_schemas` each function's parameters must compile as a JSON schema (checked here,
    before any model work; training data, which only shows them, skips it)."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of {\"type\": \"function\", \"function\": {\"name\": ..., "
                        "\"parameters\": {...}}}")
    functions: List[Dict[str, Any]] = []
    for i, tool in enumerate(tools):
        f = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not NAME.fullmatch(f["name"]):
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            f"\"parameters\": {{...}}}}}}, the name 1 to 64 letters, digits, _ or -")
        if any(g["name"] == f["name"] for g in functions):
            raise ToolError(f"tools[{i}]: the function name {f['name']!r} is given twice")
        parameters = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema (an object)")
        try:
            if check_schemas:
                check_format(OutputFormat("json_schema", parameters))
        except StructuredOutputError as e:
            raise ToolError(f"tools[{i}].function.parameters: {e}") from None
        functions.append({k: v for k, v in (("name", f["name"]), ("description", f.get("description")),
                                            ("parameters", parameters)) if v is not None})
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise ToolError("tool_choice is \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", param="tool_choice")
        if all(f["name"] != name for f in functions):
            raise ToolError(f"tool_choice names the function {name!r}, which is not among the tools",
                            param="tool_choice")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise ToolError("tool_choice is \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": "
                        "{\"name\": ...}}", param="tool_choice")
    return Tools(tuple(functions), choice, True if parallel_tool_calls is None else bool(parallel_tool_calls))


# --- the prompt -------------------------------------------------------------------------------------------------------

SYSTEM = (
    "# Tools\n\nYou can call functions to answer the user. Their signatures, one JSON object per line:\n<tools>\n"
    "{tools}\n</tools>\n\nTo call a function, write a JSON object with its name and arguments between <tool_call> and "
    "</tool_call> tags:\n<tool_call>\n{{\"name\": <function name>, \"arguments\": <the arguments as a JSON object>}}\n"
    "</tool_call>\nA result comes back in <tool_response></tool_response> tags."
)


def template_style(chat_template: Optional[str]) -> str:
    """How a chat template (None: a named template) handles tools: "hermes" (renders them, calls in <tool_call>
    tags), "llama3" (renders them, a call is the answer's JSON with "parameters", a result an `ipython` turn: Llama
    3.1 to 3.3), "qwen3_coder" or "glm45" (renders them, a call's name and arguments as markup in <tool_call> tags),
    "mistral" (renders them, the calls a JSON list after [TOOL_CALLS]), "other" (renders them in another format) or
    "text" (not at all: the tools go in as text, calls are Hermes')."""
    if not chat_template or not re.search(r"\btools\b", chat_template):
        return "text"
    if "<function=" in chat_template and "<parameter=" in chat_template:
        return "qwen3_coder"
    if "<arg_key>" in chat_template:
        return "glm45"
    if TOOL_CALLS in chat_template:
        return "mistral"
    if OPEN in chat_template:
        return "hermes"
    return "llama3" if '"parameters": ' in chat_template and "ipython" in chat_template else "other"


def call_style(template_name: str, tokenizer) -> str:
    """`template_style` of the named prompt template with this tokenizer (only "chat" is the tokenizer's own)."""
    return template_style(tokenizer.chat_template if template_name == "chat" else None)


def call_text(name: str, arguments: Union[str, Dict[str, Any]]) -> str:
    """One call in the answer's format."""
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': _as_object(arguments)}, ensure_ascii=False)}\n{CLOSE}"


def tool_messages(messages: Sequence[Dict[str, Any]], tools: Optional[Tools],
                  style: str) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """(messages, template variables) for a conversation with tools or tool turns. "text": the tools as a system
    message (unless the choice is "none"), each earlier call as its text after the assistant's words, each result a
    user turn in <tool_response> tags; otherwise the template's `tools` and the earlier calls' arguments as objects
    (what templates expect; the API sends them as JSON text)."""
    out: List[Dict[str, Any]] = []
    if style != "text":
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"],
                                                      "arguments": _as_object(c["function"].get("arguments", {}))}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return (_mistral_ids(out) if style == "mistral" else out), ({"tools": tools.template_tools()}
                                                                    if tools is not None else {})
    for j, m in enumerate(messages):
        if m.get("role") == "tool":
            response = m.get("content") or ""
            if not response.lstrip().startswith("<tool_response>"):  # ShareGPT rows (Hermes') carry their tags
                response = f"<tool_response>\n{response}\n</tool_response>"
            if j and messages[j - 1].get("role") == "tool":  # results of one turn's calls together, as Hermes does
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + response}
            else:
                out.append({"role": "user", "content": response})
        elif m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"].get("arguments", {})) for c in m["tool_calls"]]
            words = [m["content"]] if m.get("content") else []
            out.append({"role": "assistant", "content": "\n".join(words + calls)})
        else:
            out.append(dict(m))
    if tools is not None and tools.choice != "none":
        listing = SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools.template_tools()))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out, {}


def _mistral_ids(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The call ids as Mistral's templates want them, 9 letters or digits: an id's last 9 (as vLLM cuts them, zeros
    in front of a shorter one), for a call and for the result that names it; a call without one gets `call00001`,
    ..., and a result without one the id of the call it answers (a turn's results answer its calls in order)."""
    def cut(i: Any) -> str:
        return re.sub(r"[^a-zA-Z0-9]", "", str(i))[-9:].rjust(9, "0")

    out, pending, n = [], [], 0
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                n += 1
                calls.append({**c, "id": cut(c["id"]) if c.get("id") else f"call{n:05d}"})
            m, pending = {**m, "tool_calls": calls}, [c["id"] for c in calls]
        elif m.get("role") == "tool":
            given = m.get("tool_call_id")
            m = {**m, "tool_call_id": cut(given) if given else (pending[0] if pending else f"call{n:05d}")}
            pending = [i for i in pending if i != m["tool_call_id"]] if given else pending[1:]
        out.append(m)
    return out


def tool_texts(template, tokenizer, messages: Sequence[Dict[str, Any]], tools: Optional[Tools],
               answers: Sequence[Dict[str, Any]] = (), template_kwargs: Optional[Dict[str, Any]] = None,
               continue_final: bool = False) -> Tuple[str, List[str]]:
    """The prompt text of a conversation with tools or tool turns under a prompt template (`prompts.PromptTemplate`),
    and the training text of each of `answers` (assistant messages, with their `tool_calls`) after it: what the server
    renders and what training learns from. `template_kwargs`: more variables for a chat template (vLLM's
    `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`); a named template has none to take. `continue_final`:
    the prompt continues the last message, an assistant's words (`prompts.continue_final_message`)."""
    from lit_aligner.prompts import continue_final_message

    style = call_style(template.name, tokenizer)
    turns, variables = tool_messages(messages, tools, style)
    if template.name == "chat":
        variables = {**(template_kwargs or {}), **variables}
    if continue_final:
        prompt = continue_final_message(template, turns, tokenizer, **variables)
    else:
        prompt = template.render_messages(turns, tokenizer, **variables)
    completions = []
    for answer in answers:
        (turn,), _ = tool_messages([answer], None, style)
        completions.append(template.completion(turn if style != "text" else turn["content"], turns, tokenizer,
                                               **variables))
    return prompt, completions


def tool_prompt(template_name: str, tokenizer, messages: Sequence[Dict[str, Any]], tools: Optional[Tools],
                template_kwargs: Optional[Dict[str, Any]] = None, continue_final: bool = False) -> str:
    """The prompt text of a conversation with tools or tool turns under the named template (the server's chat
    endpoint, `generate/aligner.py --tools`; `template_kwargs` and `continue_final` as `tool_texts` takes them).
    ToolError when `auto` would leave the model free to write its calls in a format this module does not read (a chat
    template that renders tools in none of the formats above)."""
    from lit_aligner.prompts import get_template

    if tools is not None and tools.choice == "auto" and call_style(template_name, tokenizer) == "other":
        raise ToolError("this model's chat template writes tool calls in a format that is not read here (Hermes', "
                        "Llama 3's, Mistral's, Qwen3-Coder's and GLM-4.5's are): use tool_choice \"required\" or a "
                        "named function, which hold the answer to Hermes' format", param="tool_choice")
    return tool_texts(get_template(template_name), tokenizer, messages, tools, (), template_kwargs, continue_final)[0]


def _as_object(arguments: Any) -> Any:
    """Arguments sent as JSON text (OpenAI's form) as the object they spell; others as they are."""
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return arguments


# --- the answer -------------------------------------------------------------------------------------------------------


def _call(body: str) -> Optional[Call]:
    """The call written between the tags, or None when it is not {"name": ..., "arguments": {...}}."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    return _call_of(value)


def _markup_call(body: str, style: str, tools: Optional[Tools]) -> Optional[Call]:
    """The call written between the tags in a markup format, or None when the body is not a name and elements.
    Each value is read by the type its function's schema gives the argument (`_value_kind`): a string as it is,
    anything else as JSON (or Python's True, False, None, which some templates write); text that does not parse
    stays a string, as vLLM reads it."""
    whole, one = MARKUP_READ[style]
    head = whole.fullmatch(body.strip())
    if head is None or not NAME.fullmatch(head.group(1).strip()):
        return None
    name, rest, at = head.group(1).strip(), head.group(2), 0
    function = next((f for f in (tools.functions if tools else ()) if f["name"] == name), {})
    properties = function.get("parameters", {}).get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    arguments: Dict[str, Any] = {}
    while rest[at:].strip():
        element = one.match(rest, at)
        if element is None:
            return None
        key, text, at = element.group(1).strip(), element.group(2), element.end()
        kind, nullable = _value_kind(properties.get(key))
        if nullable and text.strip().lower() in ("null", "none"):
            arguments[key] = None
        elif kind == "string":
            arguments[key] = text
        else:
            try:
                arguments[key] = json.loads(text)
            except json.JSONDecodeError:
                arguments[key] = {"True": True, "False": False, "None": None}.get(text.strip(), text)
    return Call(name, json.dumps(arguments, ensure_ascii=False))


def _call_of(value: Any) -> Optional[Call]:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))  # Llama-style "parameters" read too
    if not isinstance(arguments, dict):
        return None
    return Call(value["name"], json.dumps(arguments, ensure_ascii=False))


def _llama_calls(text: str) -> Optional[List[Call]]:
    """The calls of a whole answer in Llama 3's format (one JSON call object or several joined by ";", after an
    optional <|python_tag|>), or None when the answer is not that."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip()
    calls, at, decoder = [], 0, json.JSONDecoder()
    while True:
        try:
            value, at = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return None
        call = _call_of(value)
        if call is None:
            return None
        calls.append(call)
        rest = body[at:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return None
        at = len(body) - len(rest[1:].lstrip())


def _mistral_calls(text: str) -> Optional[List[Call]]:
    """The calls of the end of an answer in Mistral's format ([TOOL_CALLS], then a JSON list of calls or one call),
    or None when `text` does not begin with the marker or what follows it is not calls."""
    if not text.startswith(TOOL_CALLS):
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[len(TOOL_CALLS):].lstrip())
    except json.JSONDecodeError:
        return None
    calls = [_call_of(v) for v in (value if isinstance(value, list) else [value])]
    return None if not calls or None in calls else calls


def split_calls(text: str, style: str = "hermes", tools: Optional[Tools] = None) -> Tuple[Optional[str], List[Call]]:
    """(content, calls) of a whole answer in the format of a template of `style` (`template_style`; `tools`: the
    request's, whose schemas type the markup formats' values): the calls it writes, and its text around them (None
    when only blank). Formats with tags: a block that is not a well-formed call stays in the content; a last call may
    be unclosed (the model ended inside its closing tag). Llama 3's: the whole answer is calls, or content."""
    stream = CallStream(style, tools)  # one reader of the format, streamed or not
    pieces = stream.feed(text) + stream.close()
    calls = [p for p in pieces if isinstance(p, Call)]
    if not calls:
        return text, []
    return "".join(p for p in pieces if isinstance(p, str)).strip() or None, calls


class CallStream:
    """A streamed answer split as it comes into content and whole calls. Hermes' format: text that may begin a call's
    tag is held back until it does or does not, and a call is given once its closing tag arrives. Llama 3's: an answer
    that begins as a call may be one (`{` or <|python_tag|>) is held to its end; any other streams as content. The
    markup formats' calls are read as Hermes' are, their bodies each by its own reader. Mistral's: the text before
    [TOOL_CALLS] streams, the marker and what follows it are held to the end."""

    def __init__(self, style: str = "hermes", tools: Optional[Tools] = None):
        self.buffer, self.llama, self.content = "", style == "llama3", False
        self.mistral = style == "mistral"
        self.open, self.end = (TOOL_CALLS, None) if self.mistral else (OPEN, CLOSE)
        self.read = (lambda body: _markup_call(body, style, tools)) if style in MARKUP else _call

    def feed(self, text: str) -> List[Union[str, Call]]:
        self.buffer += text
        out: List[Union[str, Call]] = []
        if self.llama:
            head = self.buffer.lstrip()
            if not self.content and (not head or head.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(head)):
                return out
            self.content, out, self.buffer = True, [self.buffer] if self.buffer else [], ""
            return out
        while True:
            start = self.buffer.find(self.open)
            if start < 0:
                cut = len(self.buffer) - cut_tag(self.buffer, self.open)
                if cut:
                    out.append(self.buffer[:cut])
                self.buffer = self.buffer[cut:]
                return out
            if start:
                out.append(self.buffer[:start])
                self.buffer = self.buffer[start:]
            end = self.buffer.find(self.end) if self.end else -1
            if end < 0:
                return out
            block, self.buffer = self.buffer[:end + len(self.end)], self.buffer[end + len(self.end):]
            out.append(self.read(block[len(self.open):end].strip()) or block)

    def close(self) -> List[Union[str, Call]]:
        """What is left at the end: an unclosed last call (the answer may have ended inside its closing tag), or
        text."""
        rest, self.buffer = self.buffer, ""
        if not rest:
            return []
        if self.llama:
            return list(_llama_calls(rest) or [rest])
        if self.mistral:  # (the text before the marker has gone out already)
            return list(_mistral_calls(rest) or [rest])
        call = None
        if rest.startswith(OPEN):
            body = rest[len(OPEN):].rstrip()
            call = self.read(body[:len(body) - cut_tag(body, CLOSE)].strip())
        return [call or rest]


__all__ = ["CLOSE", "MARKUP", "OPEN", "PYTHON_TAG", "TOOL_CALLS", "Call", "CallStream", "ToolError", "Tools",
           "call_style", "call_text", "parse_tools", "split_calls", "template_style", "tool_messages", "tool_prompt",
           "tool_texts"]
