"""Structured outputs (`lit_aligner.generation.structured`) on both tokenizer backends: whatever the logits, a row
masked by its constraint decodes to text the grammar accepts, and ends where the grammar ends."""

import json
import re

import pytest
import torch

from helpers import bpe_tokenizer_dir, sp_tokenizer_dir
from lit_aligner.generation.structured import (OutputFormat, StructuredOutputError, compile_grammar, mask_logits,
                                               parse_response_format, parse_structured_outputs)
from lit_aligner.tokenizer import Tokenizer

pytest.importorskip("llguidance")
CORPUS = [f"The code ab{i} is {i * 7} and cd{i} says yes or no: {{\"name\": \"x{i}\", \"n\": {i}}}" for i in range(200)]


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tok(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return Tokenizer(bpe_tokenizer_dir(d, CORPUS, 400) if request.param == "bpe" else sp_tokenizer_dir(d, CORPUS, 300))


def decode_under(fmt: OutputFormat, tok, seed: int, vocab: int, steps: int = 80):
    """Random logits every step, masked by the constraint, greedy: (text, ended at the grammar's end)."""
    c = compile_grammar(fmt, tok, vocab).constraint()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        t = int(mask_logits(torch.randn(1, vocab, generator=g), [c]).argmax())
        assert c.advance(t), c.error
        if t in tok.stop_ids or t == tok.eos_id:
            return tok.decode(out), True
        out.append(t)
        if c.done:
            return tok.decode(out), True
    return tok.decode(out), False


def test_random_logits_under_a_constraint_give_text_the_grammar_accepts(tok):
    vocab = tok.vocab_size + 7  # a padded embedding: the ids past the tokenizer are never allowed
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["name", "n"], "additionalProperties": False}
    for seed in range(4):
        text, ended = decode_under(OutputFormat("regex", r"(ab|cd)[0-9]{2}"), tok, seed, vocab)
        assert ended and re.fullmatch(r"(ab|cd)[0-9]{2}", text), text
        text, ended = decode_under(OutputFormat("choice", ["yes", "no", "yes or no"]), tok, seed, vocab)
        assert ended and text in ("yes", "no", "yes or no"), text
        text, ended = decode_under(OutputFormat("json_schema", schema), tok, seed, vocab, steps=200)
        value = json.loads(text)
        assert ended and set(value) == {"name", "n"} and len(value["name"]) <= 8 and 0 <= value["n"] <= 999, text
    # unconstrained, the same random logits are no such text
    g = torch.Generator().manual_seed(0)
    free = tok.decode([int(torch.randn(vocab, generator=g)[:tok.vocab_size].argmax()) for _ in range(6)])
    assert not re.fullmatch(r"(ab|cd)[0-9]{2}", free)


def test_bad_formats_are_one_clear_error(tok):
    for fmt, match in [(OutputFormat("regex", "[a-"), "regex cannot be compiled"),
                       (OutputFormat("json_schema", {"type": "nonsense"}), "json schema cannot be compiled"),
                       (OutputFormat("choice", []), "non-empty list"), (OutputFormat("grammar", ""), "Lark"),
                       (OutputFormat("xml"), "unknown structured output kind")]:
        with pytest.raises(StructuredOutputError, match=match) as e:
            compile_grammar(fmt, tok, tok.vocab_size)
        assert "\n" not in str(e.value)
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}
                                 ) == OutputFormat("json_schema", {"type": "integer"})
    assert parse_structured_outputs({"json": '{"type": "string"}'}) == OutputFormat("json_schema", {"type": "string"})
    for bad in [{"type": "xml"}, {"type": "json_schema"}, "json"]:
        with pytest.raises(StructuredOutputError, match="response_format"):
            parse_response_format(bad)
    for bad in [{}, {"regex": "a", "choice": ["a"]}, {"json": "{not json"}]:
        with pytest.raises(StructuredOutputError, match="structured_outputs"):
            parse_structured_outputs(bad)


def test_generate_holds_each_row_to_its_grammar_and_leaves_free_rows_as_they_were(tiny_checkpoint_dir):
    """A batch mixing a JSON-schema row, a regex row and a free row (greedy and sampled) on the tiny random model,
    whose unconstrained text is no JSON: the constrained rows parse and end at their grammar's end, the free row is
    token for token what it is decoded without the others."""
    from lit_aligner.base import load_base
    from lit_aligner.generation import generate

    model, tok = load_base(tiny_checkpoint_dir, device="cpu")
    V = model.lm_head_weight.shape[0]
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["a"], "additionalProperties": False}
    js, rx = (compile_grammar(OutputFormat("json_schema", schema), tok, V),
              compile_grammar(OutputFormat("regex", "[0-9]{2}-[a-z]{1,3}"), tok, V))
    prompts = [tok.encode(p) for p in ("Give me JSON.", "A code:", "Tell me a story.")]
    for kw in ({}, {"temperature": 1.0, "generator": torch.Generator().manual_seed(1)}):
        out = generate(model, prompts, 100, stop_ids=tok.stop_ids, grammar=[js, rx, None], **kw)
        assert list(json.loads(tok.decode(out[0]))) == ["a"] and re.fullmatch("[0-9]{2}-[a-z]{1,3}", tok.decode(out[1]))
        if not kw:
            free = generate(model, prompts[2:], 100, stop_ids=tok.stop_ids)[0]
            assert torch.equal(out[2], free)
            with pytest.raises(json.JSONDecodeError):
                json.loads(tok.decode(generate(model, prompts[:1], 40, stop_ids=tok.stop_ids)[0]))


def test_generate_cli_structured_flags_and_their_errors(tiny_checkpoint_dir, tmp_path):
    import helpers

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 999}},
                                  "required": ["n"], "additionalProperties": False}))
    out = tmp_path / "answers.jsonl"
    base = ["generate/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--no-aligner", "--max-new-tokens", "100"]
    p = helpers.run_script(*base, "--prompt", "one", "--prompt", "two", "--json-schema", schema, "--out", out)
    assert p.returncode == 0, p.stderr
    assert all(isinstance(json.loads(json.loads(line)["output"])["n"], int) for line in out.read_text().splitlines())
    p = helpers.run_script(*base, "--prompt", "pick", "--choice", "red", "--choice", "green blue")
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] in ("red", "green blue"), p.stdout
    for flags, message in [(["--regex", "[a-"], "error: the regex cannot be compiled"),
                           (["--regex", "a", "--json-object"],
                            "error: give one structured-output flag, not --json-object and --regex"),
                           (["--json-schema", tmp_path / "none.json"], "none.json: no such file"),
                           (["--json-schema", "[1, 2]"], "error: --json-schema must be a JSON object"),
                           (["--json-schema", "{nope"], "error: --json-schema is neither a file nor valid JSON")]:
        p = helpers.run_script(*base, "--prompt", "x", *flags)
        assert p.returncode != 0 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# --- tool calls (`lit_aligner.tools`): forced calls are a grammar, the answer's calls are read back ------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CODE = {"type": "function", "function": {
    "name": "lookup", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 99}},
                                     "required": ["n"], "additionalProperties": False}}}


def fits(call) -> bool:
    """Whether a read-back call is one of the two functions with arguments its schema allows."""
    args = json.loads(call.arguments)
    if call.name == "get_weather":
        return set(args) == {"city", "unit"} and len(args["city"]) <= 6 and args["unit"] in ("c", "f")
    return call.name == "lookup" and set(args) == {"n"} and isinstance(args["n"], int) and 0 <= args["n"] <= 99


def test_forced_tool_calls_decode_to_calls_that_fit_their_functions(tok):
    """tool_choice "required" (parallel or not) and a named function as grammars: whatever the logits, the answer reads
    back as calls of the allowed functions with arguments their schemas allow, and nothing else."""
    from lit_aligner.tools import parse_tools, split_calls

    vocab = tok.vocab_size
    names = set()
    for choice, parallel, allowed in [("required", False, {"get_weather", "lookup"}),
                                      ("required", True, {"get_weather", "lookup"}),
                                      ({"type": "function", "function": {"name": "lookup"}}, True, {"lookup"})]:
        fmt = parse_tools([WEATHER, CODE], choice, parallel).output_format()
        for seed in range(8):
            text, ended = decode_under(fmt, tok, seed, vocab, steps=400)
            content, calls = split_calls(text)
            assert ended and content is None and calls, text
            assert all(fits(c) and c.name in allowed for c in calls), text
            assert len(calls) == 1 or (choice == "required" and parallel), text
            names |= {c.name for c in calls}
    assert names == {"get_weather", "lookup"}
    # without the grammar the same logits write no call
    g = torch.Generator().manual_seed(0)
    assert split_calls(tok.decode([int(torch.randn(vocab, generator=g).argmax()) for _ in range(60)]))[1] == []


def test_tool_fields_are_checked_with_the_field_named():
    from lit_aligner.tools import ToolError, parse_tools

    assert parse_tools(None) is None and parse_tools([], "none") is None
    spec = parse_tools([WEATHER, {"type": "function", "function": {"name": "ping"}}])
    assert spec.choice == "auto" and spec.parallel and not spec.forced and spec.output_format() is None
    assert spec.functions[1]["parameters"] == {"type": "object", "properties": {}}
    for tools, choice, param, match in [
            ("f", None, "tools", "must be a list"),
            ([{"type": "function", "function": {"name": "bad name"}}], None, "tools", r"tools\[0\]"),
            ([{"type": "code_interpreter"}], None, "tools", r"tools\[0\]"),
            ([WEATHER, WEATHER], None, "tools", "given twice"),
            ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], None, "tools",
             r"tools\[0\].function.parameters: the json schema cannot be compiled"),
            ([WEATHER], "sometimes", "tool_choice", "tool_choice is"),
            ([WEATHER], {"type": "function", "function": {"name": "lookup"}}, "tool_choice", "not among the tools"),
            (None, "required", "tool_choice", "tool_choice needs tools")]:
        with pytest.raises(ToolError, match=match) as e:
            parse_tools(tools, choice)
        assert e.value.param == param and "\n" not in str(e.value)


TEXT = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
        '<tool_call>\n{"oops": 1}\n</tool_call> and <tool_call>\n{"name": "lookup", "parameters": {"n": 7}}\n'
        '</tool_call>\n<tool_call>\n{"name": "lookup", "arguments": {"n": 8}}')


def streamed(text: str, stream) -> list:
    """What `stream` (a fresh `CallStream` per call) gives for `text` fed one character at a time, whole, and in
    random pieces of 1 to 9 characters: three lists of pieces."""
    import random

    rng, out = random.Random(0), []
    for sizes in ([1] * len(text), [len(text)], [rng.randint(1, 9) for _ in range(len(text))]):
        s, pieces, at = stream(), [], 0
        for n in sizes:
            pieces += s.feed(text[at:at + n])
            at += n
        out.append(pieces + s.close())
    return out


def test_a_streamed_answer_splits_into_the_content_and_calls_of_the_whole_answer():
    """`CallStream` fed the answer in pieces of any size (tags cut anywhere) gives the content and calls that
    `split_calls` reads from the whole answer: well-formed calls, a malformed block kept as text, Llama's
    "parameters", an unclosed last call (also one cut inside its closing tag)."""
    from lit_aligner.tools import Call, CallStream, split_calls

    content, calls = split_calls(TEXT)
    assert [c.name for c in calls] == ["get_weather", "lookup", "lookup"]
    assert json.loads(calls[1].arguments) == {"n": 7} and '{"oops": 1}' in content and content.startswith("Checking.")
    assert split_calls("no calls here") == ("no calls here", [])
    cut = split_calls('<tool_call>\n{"name": "f", "arguments": {"n": 1}}\n</tool_')  # max_tokens inside the tag
    assert cut == (None, [Call("f", '{"n": 1}')])
    for pieces in streamed(TEXT, CallStream):
        assert [p for p in pieces if isinstance(p, Call)] == calls
        assert "".join(p for p in pieces if isinstance(p, str)).strip() == content


def test_tool_turns_render_so_the_calls_read_back_in_hermes_and_in_plain_chat_templates(smollm2_dir):
    """A conversation with tools, an earlier call and its result: Qwen2.5's own template (a Hermes one, as TRL ships
    it) gets the tools and the call's arguments as objects, so it writes the call exactly as a forced answer writes
    it; a template without tools (ChatML) gets the tools listed in a system message, the call as that text and the
    result as a user turn. Either way the assistant turn reads back as the call, and Llama 3.1's template (tools in
    another format) is told apart."""
    trl = pytest.importorskip("trl")
    from importlib import resources

    from helpers import CHATML
    from lit_aligner.base import load_tokenizer
    from lit_aligner.prompts import get_template
    from lit_aligner.tools import parse_tools, split_calls, template_style, tool_messages

    templates = resources.files(trl) / "chat_templates"
    qwen, llama = (templates / "qwen2_5.jinja").read_text(), (templates / "llama3_1.jinja").read_text()
    lfm2 = (templates / "lfm2.jinja").read_text()  # tools in a third format (LFM2's Python-like calls)
    assert [template_style(t) for t in (qwen, llama, lfm2, CHATML, None)] == \
        ["hermes", "llama3", "other", "text", "text"]
    args = {"city": "Paris", "unit": "c"}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]
    spec = parse_tools([WEATHER, CODE])
    tok = load_tokenizer(smollm2_dir)
    for template in (qwen, CHATML):
        tok.chat_template = template
        turns, variables = tool_messages(messages, spec, template_style(template))
        prompt = get_template("chat").render_messages(turns, tok, **variables)
        assert prompt.count('"get_weather"') == 2 and '"lookup"' in prompt  # listed once, called once
        answer = prompt.split("<|im_start|>assistant")[1].split("<|im_end|>")[0]
        content, calls = split_calls(answer)
        assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", args)]
        result = prompt.split("<|im_start|>")[-2]
        assert result.startswith("user\n") and '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in result
        assert prompt.endswith("<|im_start|>assistant\n")
    # Llama 3.1's template writes the call as the whole assistant turn, which reads back in its own format
    tok.chat_template = llama
    turns, variables = tool_messages(messages, spec, "llama3")
    prompt = get_template("chat").render_messages(turns, tok, **variables)
    answer = prompt.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    content, calls = split_calls(answer, "llama3")
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", args)]
    assert split_calls(answer) == (answer, [])  # (not Hermes')
    assert "<|start_header_id|>ipython<|end_header_id|>" in prompt and '"lookup"' in prompt


LLAMA_ANSWERS = [  # (answer, its content, its calls' names) in Llama 3's format
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', None, ["get_weather"]),
    ('<|python_tag|>{"name": "lookup", "parameters": {"n": 7}}; {"name": "lookup", "arguments": {"n": 8}}', None,
     ["lookup", "lookup"]),
    ("Paris is sunny today.", "Paris is sunny today.", []),
    ('{"name": "lookup", "parameters": {"n": 7}} and more words', '{"name": "lookup", "parameters": {"n": 7}} and more '
                                                                 'words', []),
    ('{"oops": 1}', '{"oops": 1}', []),
    ('  {"name": "lookup", "parameters": {"n": 7', '  {"name": "lookup", "parameters": {"n": 7', []),
]


def test_llama3_calls_are_the_whole_answer_streamed_or_not():
    """Llama 3's format (vLLM's llama3_json): an answer that is one call object or several joined by ";" (after an
    optional <|python_tag|>) is calls, any other answer is content; `CallStream` fed it in pieces of any size gives
    the same, and streams an answer that does not begin as a call at once."""
    from lit_aligner.tools import Call, CallStream, split_calls

    for text, content, names in LLAMA_ANSWERS:
        got, calls = split_calls(text, "llama3")
        assert got == content and [c.name for c in calls] == names, text
        for pieces in streamed(text, lambda: CallStream("llama3")):
            assert [p for p in pieces if isinstance(p, Call)] == calls
            assert "".join(p for p in pieces if isinstance(p, str)) == (content or "")
    stream = CallStream("llama3")
    assert stream.feed("Paris") == ["Paris"] and stream.feed(" is sunny") == [" is sunny"]  # not held back
    assert json.loads(split_calls(LLAMA_ANSWERS[1][0], "llama3")[1][1].arguments) == {"n": 8}


@pytest.mark.parametrize("style,start", [("llama3", '{"name": "'), ("mistral", '[TOOL_CALLS] [{"name": "')])
def test_a_forced_call_is_written_as_the_template_writes_calls(tok, style, start):
    """tool_choice "required" under a Llama 3 template (the JSON with "parameters", no tags) or a Mistral one
    ([TOOL_CALLS] and a list): whatever the logits, the answer is calls in that format that fit their functions (one
    with parallel_tool_calls false)."""
    from lit_aligner.tools import parse_tools, split_calls

    for parallel in (False, True):
        fmt = parse_tools([WEATHER, CODE], "required", parallel).output_format(style)
        for seed in range(6):
            text, ended = decode_under(fmt, tok, seed, tok.vocab_size, steps=400)
            content, calls = split_calls(text, style)
            assert ended and content is None and calls and all(fits(c) for c in calls), text
            assert text.startswith(start) and "<tool_call>" not in text
            assert len(calls) == 1 or parallel, text


# --- the markup formats: Qwen3-Coder's (Qwen3.5+, Nemotron 3) and GLM-4.5's ------------------------------------------

TYPED = {"type": "function", "function": {"name": "run", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["code", "n"],
    "properties": {"code": {"type": "string", "maxLength": 30}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "zip": {"type": "string", "pattern": "^[0-9]{3}$"}, "flag": {"type": "boolean"},
                   "o": {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}},
                         "required": ["a"], "additionalProperties": False},
                   "maybe": {"type": ["integer", "null"]}, "unit": {"enum": ["c", "f"]}}}}}
TYPED_ARGS = {"code": "  def f():\n    return 1\n", "n": 3, "zip": "042", "flag": True, "o": {"a": [1, 2]},
              "maybe": None, "unit": "f"}


def fits_typed(call) -> bool:
    args = json.loads(call.arguments)
    return (call.name == "run" and {"code", "n"} <= set(args) <= set(TYPED_ARGS) and isinstance(args["code"], str)
            and len(args["code"]) <= 30
            and isinstance(args["n"], int) and 0 <= args["n"] <= 99
            and re.fullmatch("[0-9]{3}", args.get("zip", "000")) is not None
            and isinstance(args.get("flag", False), bool) and args.get("unit", "c") in ("c", "f")
            and (("o" not in args) or (set(args["o"]) == {"a"} and all(isinstance(x, int) for x in args["o"]["a"])))
            and (args.get("maybe") is None or isinstance(args["maybe"], int)))


def test_markup_templates_write_calls_that_read_back_with_their_types(smollm2_dir):
    """Qwen3.5's, Qwen3.6's, Nemotron 3's and GLM-4.5's chat templates (as TRL ships them) are told apart by their
    call format; each writes an assistant turn with a call whose arguments have every JSON type (a string of digits
    and one with indentation and line breaks, an integer, a boolean, an object, null), and that turn reads back as
    exactly that call: each value by its schema's type (the digits stay a string)."""
    trl = pytest.importorskip("trl")
    from importlib import resources

    from lit_aligner.base import load_tokenizer
    from lit_aligner.tools import parse_tools, split_calls, template_style, tool_messages

    spec, tok = parse_tools([TYPED, CODE]), load_tokenizer(smollm2_dir)
    call = {"id": "call_1", "type": "function", "function": {"name": "run", "arguments": json.dumps(TYPED_ARGS)}}
    messages = [{"role": "user", "content": "Run it."}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    for name, style in [("qwen3_5_nothink", "qwen3_coder"), ("qwen3_6", "qwen3_coder"),
                        ("nemotron_3_nano", "qwen3_coder"), ("glm4moe", "glm45")]:
        tok.chat_template = (resources.files(trl) / "chat_templates" / f"{name}.jinja").read_text()
        assert template_style(tok.chat_template) == style
        turns, variables = tool_messages(messages, spec, style)
        turn = tok.apply_chat_template(turns, **variables).split("Run it.")[1]  # (after the tools' listing)
        assert "<tool_call>" in turn and '{"name"' not in turn, turn  # not Hermes' JSON
        _, calls = split_calls(turn, style, spec)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("run", TYPED_ARGS)], (name, turn)
        _, untyped = split_calls(turn, style)  # without the schemas every value is text
        assert json.loads(untyped[0].arguments)["n"] == "3", name
        assert split_calls(turn)[1] == []  # (Hermes' reader sees no call)


MARKUP_ANSWERS = {  # style: (answer, its content, its calls' names and arguments)
    "qwen3_coder": ("Let me run it.\n<tool_call>\n<function=run>\n<parameter=code>\nprint(1)\n</parameter>\n"
                    "<parameter=n>\n7\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=run>\n"
                    "<oops>\n</function>\n</tool_call>\n<tool_call>\n<function=lookup>\n<parameter=n>\n8\n"
                    "</parameter>\n</function>\n</tool_", "Let me run it.\n\n<tool_call>\n<function=run>\n<oops>\n"
                    "</function>\n</tool_call>", [("run", {"code": "print(1)", "n": 7}), ("lookup", {"n": 8})]),
    "glm45": ("<tool_call>run\n<arg_key>code</arg_key>\n<arg_value>x = 1</arg_value>\n<arg_key>n</arg_key>\n"
              "<arg_value>7</arg_value>\n</tool_call>and then<tool_call>lookup\n</tool_call>", "and then",
              [("run", {"code": "x = 1", "n": 7}), ("lookup", {})]),
}


@pytest.mark.parametrize("style", MARKUP_ANSWERS)
def test_a_streamed_markup_answer_splits_as_the_whole_answer(style):
    """A markup answer (well-formed calls, a malformed block kept as text, a last call cut inside its closing tag)
    fed to `CallStream` in pieces of any size gives the content and calls `split_calls` reads from the whole."""
    from lit_aligner.tools import Call, CallStream, parse_tools, split_calls

    text, content, expected = MARKUP_ANSWERS[style]
    spec = parse_tools([TYPED, CODE])
    got, calls = split_calls(text, style, spec)
    assert got == content and [(c.name, json.loads(c.arguments)) for c in calls] == expected
    for pieces in streamed(text, lambda: CallStream(style, spec)):
        assert [p for p in pieces if isinstance(p, Call)] == calls
        assert "".join(p for p in pieces if isinstance(p, str)).strip() == content


@pytest.mark.parametrize("style", ["qwen3_coder", "glm45"])
def test_a_forced_markup_call_fits_its_function_whatever_the_logits(tok, style):
    """tool_choice "required" (parallel or not) and a named function under a markup template: whatever the logits, the
    answer is calls in that format whose arguments fit their schemas (a string's pattern and length, an integer's
    range, an enum, an object, a nullable integer; required arguments present), read back by type."""
    from lit_aligner.tools import parse_tools, split_calls

    names = set()
    for choice, parallel in [("required", False), ("required", True), ({"type": "function", "function":
                                                                          {"name": "run"}}, True)]:
        spec = parse_tools([TYPED, WEATHER], choice, parallel)
        for seed in range(4):
            text, ended = decode_under(spec.output_format(style), tok, seed, tok.vocab_size, steps=2000)
            content, calls = split_calls(text, style, spec)
            assert ended and content is None and calls, text
            assert all(fits_typed(c) if c.name == "run" else fits(c) for c in calls), text
            assert len(calls) == 1 or (choice == "required" and parallel), text
            names |= {c.name for c in calls}
    assert names == {"run", "get_weather"}


def test_a_markup_string_is_held_to_its_pattern_as_json_schema_reads_it(smollm2_dir):
    """A string argument's `pattern` is searched for, as JSON Schema's (and llguidance's JSON) are, unless anchored."""
    from lit_aligner.base import load_tokenizer
    from lit_aligner.tools import parse_tools

    tok = load_tokenizer(smollm2_dir)  # (a byte-level BPE: any text encodes as it is)

    def accepts(parameters, value):
        spec = parse_tools([{"type": "function", "function": {"name": "f", "parameters": parameters}}], "required",
                           False)
        c = compile_grammar(spec.output_format("qwen3_coder"), tok, tok.vocab_size).constraint()
        text = f"<tool_call>\n<function=f>\n<parameter=s>\n{value}\n</parameter>\n</function>\n</tool_call>"
        return all(c.advance(t) for t in tok.encode(text, bos=False, eos=False).tolist()) and c.done

    def schema(pattern):
        return {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}, "required": ["s"]}

    assert accepts(schema("b/c"), "ab/cd") and not accepts(schema("b/c"), "abcd")
    assert accepts(schema("^ab"), "abc") and not accepts(schema("^ab"), "cab")
    assert accepts(schema("ab$"), "cab") and not accepts(schema("ab$"), "abc")


def test_a_function_the_markup_formats_cannot_write_is_refused_when_forced():
    from lit_aligner.tools import ToolError, parse_tools

    for parameters, match in [({"anyOf": [{"type": "object"}, {"type": "string"}]}, "object schema"),
                              ({"type": "object", "properties": {"a>b": {"type": "string"}}}, "argument name 'a>b'")]:
        spec = parse_tools([{"type": "function", "function": {"name": "f", "parameters": parameters}}], "required",
                           False)
        with pytest.raises(ToolError, match=match):
            spec.output_format("qwen3_coder")
        assert spec.output_format("hermes") is not None  # the JSON formats take any schema
    free = parse_tools([{"type": "function", "function": {"name": "ping"}}], "required")
    assert "<function=ping>\\n" in free.output_format("qwen3_coder").spec  # no arguments at all


# --- Mistral's format: [TOOL_CALLS] and a JSON list ------------------------------------------------------------------

MISTRAL_ANSWERS = [  # (answer, its content, its calls' names)
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, {"name": "lookup", '
     '"arguments": {"n": 7}}]', None, ["get_weather", "lookup"]),
    ('Let me look. [TOOL_CALLS] [{"name": "lookup", "arguments": {"n": 7}}]', "Let me look.", ["lookup"]),
    ('[TOOL_CALLS] {"name": "lookup", "arguments": {"n": 7}}', None, ["lookup"]),  # one call, no list
    ("Paris is sunny [TOOL_CALLS", "Paris is sunny [TOOL_CALLS", []),
    ('[TOOL_CALLS] [{"oops": 1}]', '[TOOL_CALLS] [{"oops": 1}]', []),
    ('[TOOL_CALLS] [{"name": "lookup", "arguments": {"n": 7', '[TOOL_CALLS] [{"name": "lookup", "arguments": {"n": 7',
     []),
]


def test_mistral_calls_follow_their_marker_streamed_or_not():
    """Mistral's format (vLLM's `mistral`): [TOOL_CALLS] then a JSON list of calls (or one call), after the answer's
    words; anything else is content. `CallStream` fed it in pieces of any size gives the same, and streams the words
    before the marker as they come."""
    from lit_aligner.tools import Call, CallStream, split_calls

    for text, content, names in MISTRAL_ANSWERS:
        got, calls = split_calls(text, "mistral")
        assert got == content and [c.name for c in calls] == names, text
        for pieces in streamed(text, lambda: CallStream("mistral")):
            assert [p for p in pieces if isinstance(p, Call)] == calls
            assert "".join(p for p in pieces if isinstance(p, str)).strip() == (content or "")
    stream = CallStream("mistral")
    assert stream.feed("Let me") == ["Let me"] and stream.feed(" look. [TOOL") == [" look. "]


def test_mistral_templates_get_nine_letter_ids_and_their_calls_read_back(smollm2_dir):
    """Under a template in Mistral's format (which refuses ids that are not 9 letters or digits), a conversation with
    OpenAI-style ids renders with each id's last 9 on the call and on its result, one without ids with call00001, ...
    (a turn's results in the order of its calls), and the assistant turn reads back as the calls."""
    from helpers import MISTRAL_TOOLS
    from lit_aligner.base import load_tokenizer
    from lit_aligner.tokenizer import ChatTemplateRefusal
    from lit_aligner.tools import parse_tools, split_calls, template_style, tool_messages

    tok = load_tokenizer(smollm2_dir)
    tok.chat_template = MISTRAL_TOOLS
    assert template_style(MISTRAL_TOOLS) == "mistral"
    spec = parse_tools([WEATHER, CODE])
    args = [{"city": "Paris", "unit": "c"}, {"n": 7}]

    def conversation(ids):
        calls = [{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}, **i}
                 for n, a, i in zip(("get_weather", "lookup"), args, ids)]
        return [{"role": "user", "content": "Weather in Paris, and number 7?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "content": "sunny", **{k.replace("id", "tool_call_id"): v for k, v in ids[0].items()}},
                {"role": "tool", "content": "seven", **{k.replace("id", "tool_call_id"): v for k, v in ids[1].items()}}]

    with pytest.raises(ChatTemplateRefusal):  # the template's own check, without the mapping
        tok.apply_chat_template(conversation([{"id": "call_0123456789abcdef"}] * 2), tools=spec.template_tools())
    for ids, expected in [([{"id": "call_0123456789abcdef"}, {"id": "call_fedcba9876543210"}],
                           ["789abcdef", "876543210"]), ([{}, {}], ["call00001", "call00002"])]:
        turns, variables = tool_messages(conversation(ids), spec, "mistral")
        prompt = tok.apply_chat_template(turns, **variables)
        for i, result in zip(expected, ("sunny", "seven")):
            assert f'"id": "{i}"' in prompt and f'{{"content": "{result}", "call_id": "{i}"}}' in prompt
        content, calls = split_calls(prompt.split("[/INST]")[1], "mistral")
        assert content is None and [json.loads(c.arguments) for c in calls] == args
