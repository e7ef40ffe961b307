"""Answer prompts with one or more Aligners (and optionally the bare base) on one loaded base model.

    python generate/aligner.py --prompt "What is 2+2?"        # the Aligner python finetune/aligner.py wrote
    python generate/aligner.py --aligner out/alpaca/aligner.safetensors --no-aligner --prompt "What is 2+2?"
    python generate/aligner.py --tools tools.json --prompt "Weather in Paris?"   # may call the functions listed

Every prompt is answered once per Aligner, labelled; --out writes one JSONL row per prompt x Aligner. See
howto/generate.md.

Correction Aligners (trained with --mode correction) rewrite an answer instead (howto/correction.md):

    python generate/aligner.py --aligner out/corr/aligner.safetensors --question "Q" --answer "A to correct"
    python generate/aligner.py --aligner out/corr/aligner.safetensors --qa-file answers.jsonl --out fixed.jsonl
    python generate/aligner.py --aligner out/corr/aligner.safetensors --pipeline --prompt "Q"   # base answers first
"""

import json
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List, Literal, Optional

import tyro

from lit_aligner.base import load_base
from lit_aligner.cli import run_cli
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR
from lit_aligner.files import UserError, atomic_output, check_output, input_files, read_json
from lit_aligner.generation import (AlignerEntry, Answer, DecodingArgs, PromptItem, TextStreamer, answer_prompts,
                                    load_aligner_entries, read_prompts)
from lit_aligner.generation.answers import bare_base_template, request_prompt
from lit_aligner.generation.correction import base_answers, read_qa_pairs
from lit_aligner.generation.engine import first_step_note
from lit_aligner.perf import compile_flag, decode_steps_bound
from lit_aligner.prompts import conversation_question, encode_prompt, get_template, is_correction, join_input
from lit_aligner.quantize import QuantizeFlag
from lit_aligner.reasoning import ReasoningParser
from lit_aligner.tokenizer import ChatTemplateKwargsFlag, read_template_variables
from lit_aligner.tools import ToolError, Tools, parse_tools


def default_aligner(checkpoint_dir: Path) -> Path:
    """The Aligner the training command's defaults write for this base: what `--prompt` alone answers with (as
    litgpt's generate/adapter.py defaults to its finetune script's output)."""
    from lit_aligner.base import load_config
    from lit_aligner.training import SFTRunConfig
    from lit_aligner.training.state import ALIGNER_NAME

    path = SFTRunConfig(checkpoint_dir=checkpoint_dir).default_out_dir(load_config(checkpoint_dir).name) / ALIGNER_NAME
    if not path.is_file():
        raise ValueError(f"no --aligner given, and {path} (what python finetune/aligner.py writes for this base) does "
                         f"not exist: train one with python finetune/aligner.py, or give --aligner PATH and/or "
                         f"--no-aligner (the bare base)")
    print(f"note: no --aligner given: answering with {path}, the default training run's Aligner", file=sys.stderr)
    return path


def read_tools(path: Optional[Path], choice: str, parallel: bool) -> Optional[Tools]:
    """--tools FILE with --tool-choice and --parallel-tool-calls as `Tools` (None without --tools)."""
    if path is None:
        if choice != "auto" or not parallel:
            raise ValueError("--tool-choice and --no-parallel-tool-calls go with --tools FILE (the functions to call)")
        return None
    value = read_json(path, "tools file (OpenAI's tools list)")
    if isinstance(value, dict) and "tools" in value:
        value = value["tools"]
    if value == []:
        raise UserError(f"{path}: the tools list is empty; give at least one function")
    named = choice if choice in ("auto", "none", "required") else {"type": "function", "function": {"name": choice}}
    try:
        return parse_tools(value, named, parallel, check_schemas=choice not in ("auto", "none"))
    except ToolError as e:
        raise UserError(f"--tool-choice {choice}: {e}" if e.param == "tool_choice" else f"{path}: {e}") from None


def main(
    aligner: tyro.conf.UseAppendAction[List[Path]] = [],
    no_aligner: tyro.conf.FlagCreatePairsOff[bool] = False,
    prompt: tyro.conf.UseAppendAction[List[str]] = [],
    prompts_file: Optional[Path] = None,
    system: Optional[str] = None,
    tools: Optional[Path] = None,
    tool_choice: str = "auto",
    no_parallel_tool_calls: tyro.conf.FlagCreatePairsOff[bool] = False,
    reasoning_parser: ReasoningParser = "none",
    question: tyro.conf.UseAppendAction[List[str]] = [],
    answer: tyro.conf.UseAppendAction[List[str]] = [],
    qa_file: Optional[Path] = None,
    pipeline: tyro.conf.FlagCreatePairsOff[bool] = False,
    out: Optional[Path] = None,
    force: tyro.conf.FlagCreatePairsOff[bool] = False,
    interactive: tyro.conf.FlagCreatePairsOff[bool] = False,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    template: Optional[str] = None,
    chat_template_kwargs: ChatTemplateKwargsFlag = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    decoding: tyro.conf.OmitArgPrefixes[DecodingArgs] = DecodingArgs(),
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    quantize: QuantizeFlag = "none",
    compile: Literal["auto", "on", "off"] = "auto",
) -> None:
    """Answer every prompt with every Aligner on one loaded base; answers are labelled with the Aligner's path.

    Args:
        aligner: an Aligner file; repeat the flag to compare several (all run on the same loaded base). Without it
            (and without --no-aligner): the one `python finetune/aligner.py` writes for this base,
            out/aligner/<base>/aligner.safetensors.
        no_aligner: also answer with the bare base (a column labelled "base").
        prompt: a prompt; repeat the flag for several.
        prompts_file: JSON list of strings or of objects with "prompt" or "instruction" (+ optional "input" and
            "system") or with "messages": a chat conversation that ends with the user turn to answer; or JSONL.
        system: a system message for every prompt that has none of its own (a prompts file's "system"): the chat
            template's system turn; other templates read it as an earlier turn. With --pipeline the base answers
            with it, and the corrector sees it as context of the question.
        tools: a JSON file of functions every prompt's answer may call: OpenAI's `tools` list ({"type": "function",
            "function": {"name", "description", "parameters"}}), or an object holding it as "tools". A prompts-file
            row's own "tools" win for that row. They are rendered as the server renders them (each template's own
            call format); the calls in each answer are printed and written with --out (howto/generate.md).
        tool_choice: with --tools: auto (the model decides), none (no calls), required (one call or more, held to the
            format and each function's parameters by a grammar) or a function's name (exactly one call of it).
        no_parallel_tool_calls: with --tool-choice required, one call per answer (else one or more).
        reasoning_parser: think (or vLLM's names qwen3, deepseek_r1): an answer's <think> ... </think> block (at its
            start, or opened by the prompt) is printed as its reasoning apart from the answer, and written with --out
            as "reasoning" and "content" (as the server's --reasoning-parser; howto/generate.md).
        question: correction mode: a question whose --answer the correction Aligner(s) rewrite; repeat --question and
            --answer for several pairs (the n-th --answer belongs to the n-th --question).
        answer: correction mode: the answer to correct (written by any upstream model), paired with --question.
        qa_file: correction mode: JSON list or JSONL of {"question", "answer"} rows (e.g. another model's answers) to
            correct; with --out, one row per pair x Aligner (question, answer, aligner, output).
        pipeline: correction mode, two stages on one loaded base: the bare base answers every --prompt /
            --prompts-file prompt (with --template, default its chat template), then each correction Aligner
            rewrites that answer; both are shown (and written with --out: question, base_answer, aligner, output).
        out: write one JSONL row per prompt x Aligner (prompt, input, aligner, template, output) to this file (through
            a temporary file: an existing file is replaced only when every answer is written, and only with --force).
        force: replace an existing --out file.
        interactive: after any given prompts, chat on stdin, one message per line, until EOF or "exit": each Aligner
            (and the base) keeps its own conversation; "/reset" starts a new one.
        checkpoint_dir: converted base model the Aligners were trained on.
        template: prompt template for every Aligner and the base (alpaca, beaver, hh, chat, plain, correction);
            default: each Aligner's own (from its metadata), for the base the one the Aligners share, else the
            tokenizer's chat template.
        batch_size: most requests (prompt x Aligner) decoded together.
        max_new_tokens: most tokens per answer; answers stop earlier at the tokenizer's end-of-turn/EOS tokens.
        decoding: how each token is picked (greedy by default), the repetition penalties and the stop strings.
        device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...
        dtype: weights dtype; auto = bfloat16 on CUDA, the checkpoint's own dtype on the CPU.
        compile: torch.compile the decoding step; auto = on for CUDA when the prompts can take 2,048 decoding steps
            or more (batches x --max-new-tokens: where compiling, ~40 s per batch size, pays), off on the CPU, with
            --quantize and for --interactive's turns alone.
    """
    if not aligner and not no_aligner:
        aligner = [default_aligner(checkpoint_dir)]
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if len(question) != len(answer):
        raise ValueError(f"{len(question)} --question but {len(answer)} --answer: give one --answer per --question "
                         f"(the answer to correct)")
    pairs = list(zip(question, answer)) + (read_qa_pairs(qa_file) if qa_file else [])
    items = [PromptItem(p) for p in prompt] + (read_prompts(prompts_file) if prompts_file else [])
    if system:
        items = [replace(p, system=p.system or system) for p in items]
    functions = read_tools(tools, tool_choice, not no_parallel_tool_calls)
    if functions is not None:
        items = [p if p.tools is not None else replace(p, tools=functions) for p in items]
    correcting = bool(pairs) or pipeline
    if correcting and reasoning_parser != "none":
        raise ValueError("--reasoning-parser reads the answers to prompts; a correction rewrites its answer as "
                         "written: drop the flag")
    if pipeline and not items:
        raise ValueError("--pipeline needs questions for the base to answer: give --prompt TEXT or --prompts-file")
    if pipeline and not aligner:
        raise ValueError("--pipeline needs a correction Aligner to rewrite the base's answers: give --aligner PATH")
    if pipeline and pairs:
        raise ValueError("--pipeline lets the base write the answers: use it with --prompt / --prompts-file, not with "
                         "--question/--answer or --qa-file (those already have answers)")
    if pairs and items:
        raise ValueError("give either answers to correct (--question/--answer, --qa-file) or --prompt / "
                         "--prompts-file (add --pipeline to correct the base's answers), not both")
    if pairs and system:
        raise ValueError("--system is for prompts that a model answers (add --pipeline to let the base answer them "
                         "first); --question/--answer and --qa-file pairs already have their answers")
    if correcting and interactive:
        raise ValueError("--interactive reads plain prompts; it does not combine with correction mode")
    if correcting and (functions is not None or any(p.with_tools for p in items)):
        raise ValueError("tools (--tools, a prompts file's tools or tool turns) are for prompts that a model answers; "
                         "a correction Aligner calls no tools")
    if functions is not None and interactive:
        raise ValueError("--tools does not combine with --interactive, which has no way to give a call its result "
                         "(serve/aligner.py does: howto/serve.md)")
    if not items and not pairs and not interactive:
        raise ValueError("no prompts: give --prompt TEXT (repeatable), --prompts-file FILE or --interactive "
                         "(correction Aligners: --question/--answer, --qa-file or --pipeline --prompt)")
    if template is not None:
        get_template(template)  # an unknown name fails here, before the model is loaded
    variables = read_template_variables(chat_template_kwargs)
    fmt = decoding.check()
    if functions is not None and functions.forced and fmt is not None:
        raise ValueError(f"--tool-choice {tool_choice} holds every answer to tool calls: drop the structured-output "
                         f"flag (--json-schema, --json-object, --regex, --choice or --grammar)")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if out is not None:
        check_output(out, input_files(*aligner, prompts_file, qa_file, tools, checkpoint_dir), force)

    model, tokenizer = load_base(checkpoint_dir, device, dtype, quantize)
    tokenizer.template_variables = variables
    entries = load_aligner_entries(aligner, model)
    check_modes(entries, correcting)
    if no_aligner and not pipeline:  # in the pipeline the bare base's column is stage one itself
        entries.append(AlignerEntry("base"))
    dev = model.tok_embeddings.weight.device
    # auto: eager on CUDA too unless this run decodes enough steps for compiling to pay (--interactive's are unknown)
    requests = (len(pairs) or len(items)) * len(entries)
    steps = decode_steps_bound(requests, batch_size, max_new_tokens) + (
        decode_steps_bound(len(items), batch_size, max_new_tokens) if pipeline else 0)
    kwargs = dict(stop_ids=tokenizer.stop_ids, compile=compile_flag(compile, dev, steps),
                  **decoding.generate_kwargs(dev, tokenizer, model.lm_head_weight.shape[0], fmt))
    answering = {**kwargs, "reasoning": reasoning_parser != "none"}  # (corrections rewrite answers as written)
    with atomic_output(out) if out else nullcontext() as sink:
        if pipeline:
            # the base answers the whole conversation (system message, earlier turns); the corrector gets the question
            # with that context, as the server gives it
            answers = base_answers(model, tokenizer, [join_input(p.instruction, p.input) for p in items],
                                   max_new_tokens, template, batch_size, systems=[p.system for p in items],
                                   histories=[p.history for p in items], **kwargs)
            questions = [conversation_question(p.messages()) for p in items]
            correct_pairs(model, tokenizer, list(zip(questions, answers)), entries, max_new_tokens, batch_size,
                          kwargs, sink, pipeline=True)
        elif pairs:
            correct_pairs(model, tokenizer, pairs, entries, max_new_tokens, batch_size, kwargs, sink)
        elif items:
            answer_items(model, tokenizer, items, entries, max_new_tokens, batch_size, template, answering, sink)
        if interactive:
            chat(model, tokenizer, entries, system or "", template, max_new_tokens, answering, sink)
    if out:
        print(f"wrote {out}", file=sys.stderr)


def answer_items(model, tokenizer, items, entries, max_new_tokens, batch_size, template, sampling, sink) -> None:
    # One answer at a time can be streamed as it is generated; otherwise print when the batches are done (and an
    # answer that may call tools is printed with its calls read out).
    stream = len(items) == 1 and len(entries) == 1 and items[0].tools is None
    if stream:
        show_prompt(items[0], 0, 1)
        print(f"--- {entries[0].name} ---", flush=True)
    streamer = TextStreamer(tokenizer, stop=sampling["stop_strings"]) if stream else None
    answers, stats = answer_prompts(model, tokenizer, items, entries, max_new_tokens, batch_size=batch_size,
                                    template=template, on_token=streamer, **sampling)
    for i, row in enumerate(answers):
        if stream:
            streamer.finish()
            print()
        else:
            show_prompt(items[i], i, len(items))
            for a in row:
                print(f"--- {a.entry.name} ---\n{shown(a)}")
        if sink:
            for a in row:
                write_answer(sink, a)
    sys.stdout.flush()
    new = sum(s.new_tokens for s in stats)
    decode_s = sum(s.decode_s for s in stats)
    steps = sum(s.decode_steps * s.batch_size for s in stats)
    print(f"{len(stats)} batch(es), {new} new tokens, decode {steps / max(decode_s, 1e-9):.1f} tokens/s"
          f"{first_step_note(stats)}", file=sys.stderr)


def shown(a: Answer) -> str:
    """An answer as printed: its text, or its reasoning, the text around its tool calls and one line per call."""
    if not a.calls and a.reasoning is None:
        return a.text.strip()
    return "\n".join(([f"reasoning: {a.reasoning.strip()}"] if a.reasoning is not None else []) +
                     ([a.content.strip()] if a.content else []) +
                     [f"tool call: {c.name} {c.arguments}" for c in a.calls])


def write_answer(sink, a: Answer) -> None:
    """One --out row: the request (its system message, earlier turns and tool turns when it has them), who answered,
    the template its prompt was rendered with, the answer (with tools: also its calls in OpenAI's form and the text
    around them)."""
    p = a.prompt
    calls = {"content": a.content, "tool_calls": [c.openai() for c in a.calls]} if p.tools is not None else {}
    if a.reasoning is not None:
        calls = {"reasoning": a.reasoning, "content": a.content, **calls}
    sink.write(json.dumps({"prompt": p.instruction, "input": p.input, **({"system": p.system} if p.system else {}),
                           **({"history": p.history} if p.history else {}), **({"after": p.after} if p.after else {}),
                           "aligner": a.entry.name if a.entry.aligner is not None else None,
                           "template": a.template, "output": a.text,
                           **calls}) + "\n")
    sink.flush()


def chat(model, tokenizer, entries: List[AlignerEntry], system: str, template: Optional[str], max_new_tokens: int,
         sampling, sink) -> None:
    """--interactive: a conversation on stdin. Every entry keeps its own history (its own earlier answers), and its
    answers stream one entry after another; "/reset" starts a new conversation. When a conversation no longer fits
    the context with --max-new-tokens, its oldest exchanges are left out (with a note)."""
    histories: List[List[dict]] = [[] for _ in entries]
    base_template = bare_base_template(entries, template)
    room = model.config.block_size - max_new_tokens
    for text in read_stdin():
        if text == "/reset":
            histories = [[] for _ in entries]
            print("(new conversation)", file=sys.stderr)
            continue
        print(f"\n=== {text} ===")
        for j, e in enumerate(entries):
            # the bare base's template: the one it would use beside these Aligners (answer_prompts sees it alone)
            tmpl = template if e.aligner is not None else base_template
            item = PromptItem(text, system=system, history=histories[j])
            dropped = 0
            while item.history and len(encode_prompt(tokenizer, request_prompt(tokenizer, item, e, tmpl, tmpl))) > room:
                item.history, dropped = item.history[2:], dropped + 1
            if dropped:
                print(f"note: {e.name}: the conversation no longer fits the context of {model.config.block_size} "
                      f"tokens with --max-new-tokens {max_new_tokens}: its oldest {dropped} exchange(s) left out",
                      file=sys.stderr)
            print(f"--- {e.name} ---", flush=True)
            streamer = TextStreamer(tokenizer, stop=sampling["stop_strings"])
            try:
                answers, _ = answer_prompts(model, tokenizer, [item], [e], max_new_tokens, template=tmpl,
                                            on_token=streamer, **sampling)
            except ValueError as err:  # this message alone does not fit (or its template refuses it): say so, go on
                print(f"error: {err}", file=sys.stderr)
                continue
            streamer.finish()
            print(flush=True)
            a = answers[0][0]
            histories[j] = item.history + [{"role": "user", "content": text},
                                           {"role": "assistant", "content": a.reply}]
            if sink:
                write_answer(sink, a)


def check_modes(entries: List[AlignerEntry], correcting: bool) -> None:
    """Correction-mode Aligners rewrite answers; the others answer prompts. One run does one of the two."""
    for e in entries:
        is_corrector = is_correction(e.metadata)
        if is_corrector and not correcting:
            raise ValueError(f"{e.name} is a correction Aligner (mode 'correction'): it rewrites an answer rather "
                             f"than answering a prompt. Give --question TEXT --answer TEXT (repeatable) or --qa-file "
                             f"FILE with the answers to correct, or add --pipeline to let the bare base answer the "
                             f"--prompt first (see howto/correction.md)")
        if correcting and not is_corrector:
            raise ValueError(f"{e.name} is not a correction Aligner (its metadata mode is "
                             f"{e.metadata.get('mode', 'unset')!r}); --question/--answer, --qa-file and --pipeline "
                             f"need Aligners trained with `finetune/aligner.py --mode correction`")


def correct_pairs(model, tokenizer, pairs, entries, max_new_tokens, batch_size, sampling, sink,
                  pipeline: bool = False) -> None:
    """Every (question, answer) corrected by every entry (the bare base, if listed, gets the same correction
    prompt); printed per pair, and one JSONL row per pair x entry."""
    # An empty base answer still needs something for the corrector to rewrite.
    items = [PromptItem(q, a if a.strip() else "(no answer)") for q, a in pairs]
    answers, stats = answer_prompts(model, tokenizer, items, entries, max_new_tokens, batch_size=batch_size,
                                    template="correction", **sampling)
    for i, row in enumerate(answers):
        q, a = pairs[i]
        print(f"\n=== [{i + 1}/{len(pairs)}] {q} ===")
        print(f"--- {'base answer' if pipeline else 'answer to correct'} ---\n{a.strip()}")
        for r in row:
            print(f"--- {r.entry.name} ---\n{r.text.strip()}")
        if sink:
            for r in row:
                sink.write(json.dumps({"question": q, "base_answer" if pipeline else "answer": a,
                                       "aligner": r.entry.name if r.entry.aligner is not None else None,
                                       "output": r.text}) + "\n")
            sink.flush()
    sys.stdout.flush()
    new = sum(s.new_tokens for s in stats)
    print(f"{len(stats)} batch(es), {new} new tokens", file=sys.stderr)


def show_prompt(item: PromptItem, i: int, n: int) -> None:
    head = item.instruction + (f"\n{item.input}" if item.input else "")
    if item.history:
        head += f" (after {len(item.history)} earlier turn{'s' if len(item.history) > 1 else ''})"
    results = sum(m["role"] == "tool" for m in item.after)
    if results:
        head += f" (going on from {results} tool result{'s' if results > 1 else ''})"
    print(f"\n=== [{i + 1}/{n}] {head} ===")


def read_stdin() -> Iterator[str]:
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line.strip()


if __name__ == "__main__":
    run_cli(main)
