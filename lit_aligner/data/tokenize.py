"""Examples -> token ids, keeping the prompt exactly as generation will see it.

prompt_ids == tokenizer.encode(prompt) (BOS per the tokenizer's default), and the response ids are the tail of
encode(prompt + response) after those prompt ids (the same as encoding the response alone, except that the tokenizer
sees the boundary: no SentencePiece dummy-prefix space in front of the response). When a tokenizer merges text across
the boundary, the response is encoded on its own. Responses end with the tokenizer's EOS token (with the `chat`
template: the chat template's end-of-turn token).
"""

from typing import Dict, Optional, Sequence, Tuple

import torch

from lit_aligner.data.dataset import NO_CONTEXT
from lit_aligner.data.formats import BadRow, DataError, Example
from lit_aligner.prompts import CorrectionTemplate, PromptTemplate, with_system
from lit_aligner.tools import tool_texts


def _end_tokens(tokenizer) -> Dict[str, int]:
    """Spelling -> id of the tokens that end a response (EOS and the stop tokens)."""
    ids = [tokenizer.eos_id, *sorted(getattr(tokenizer, "stop_ids", ()) or ())]
    spell = getattr(tokenizer, "id_to_token", None)
    out = {}
    for i in ids:
        if i is None:
            continue
        text = spell(i) if spell else tokenizer.decode([i])
        if text:
            out.setdefault(text, i)
    return out


def tokenize_pair(tokenizer, prompt: str, completion: str,
                  prompt_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(prompt_ids, response_ids): prompt_ids == tokenizer.encode(prompt) (BOS per the tokenizer's default);
    response_ids = the completion's tokens ending with one end token: the end-of-turn token the completion already
    ends with (chat templates), else the tokenizer's EOS. prompt_ids: the prompt's ids when already known."""
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token, so responses cannot be terminated; use a checkpoint whose "
                        "tokenizer_config.json names an eos_token")
    body = completion.rstrip()
    end_id = tokenizer.eos_id
    for text, i in _end_tokens(tokenizer).items():
        if body.endswith(text):
            body, end_id = body[: -len(text)].rstrip(), i
            break
    p = tokenizer.encode(prompt).long() if prompt_ids is None else prompt_ids
    full = tokenizer.encode(prompt + body).long()
    if len(full) >= len(p) and torch.equal(full[: len(p)], p):
        r = full[len(p):]
    else:  # the tokenizer merged text across the boundary: the response on its own
        r = tokenizer.encode(body, bos=False).long()
    return p, torch.cat([r, torch.tensor([end_id], dtype=torch.long)])


def end_token(template: PromptTemplate, tokenizer) -> int:
    """The token every response ends with under `template` (with `chat`: its end-of-turn token; else EOS), as
    `tokenize_example` writes it."""
    ex = Example([{"role": "user", "content": "Hi."}], "Hello.")
    return int(tokenize_example(ex, "sft", template, tokenizer)[1][-1])


def _need_turns(ex: Example) -> None:
    if not ex.messages:
        raise BadRow(f"{ex.notes.get('turns_error', 'no prompt turns')} (the dialogue's turns cannot be recovered; "
                     f"only the 'hh' template, which keeps the prompt verbatim, can use this row)")


def render_prompt(template: PromptTemplate, ex: Example, tokenizer) -> str:
    """The prompt text of an example: HH prompts verbatim for `hh`, one-turn prompts via `render` (Alpaca input
    kept apart), multi-turn conversations via `render_messages`."""
    if ex.raw_prompt is not None and template.name == "hh":
        return ex.raw_prompt
    _need_turns(ex)
    if len(ex.messages) == 1:
        return template.render(ex.messages[0]["content"], ex.input, tokenizer=tokenizer)
    return template.render_messages(ex.messages, tokenizer=tokenizer)


def pack_answers(rows: Sequence[Tuple[torch.Tensor, ...]]) -> Optional[Tuple[torch.Tensor, ...]]:
    """One SFT row for every answer of a conversation (TRL's `assistant_only_loss`): rows are the (prompt, response)
    of each answer in order, each prompt the conversation before it. Returns (the first prompt, everything after it,
    the context spans: the turns between answers), in which every answer sees exactly the tokens its own row gives it;
    None when a prompt does not start with the tokens before it (a template that renders earlier turns differently
    once the conversation goes on, e.g. one that hides earlier reasoning)."""
    prompt, seq, spans = rows[0][0], rows[0][1], []
    for p, r, *_ in rows[1:]:
        done = len(prompt) + len(seq)
        if len(p) < done or not torch.equal(p[:len(prompt)], prompt) or \
                not torch.equal(p[len(prompt):done], seq):
            return None
        spans += [len(seq), len(p) - len(prompt)]
        seq = torch.cat([seq, p[done:], r])
    return prompt, seq, torch.tensor(spans, dtype=torch.long)


def tokenize_example(ex: Example, kind: str, template: PromptTemplate, tokenizer,
                     teacher_system: Optional[str] = None) -> Tuple[torch.Tensor, ...]:
    """The token rows of one example, in the order of `dataset.KIND_FIELDS[kind]`: sft (prompt, response, no context);
    preference (prompt, chosen, rejected); correction (prompt, question, answer, correction); unpaired (prompt,
    completion, label); distill (prompt, response, teacher_prompt: the prompt with `teacher_system` as its system
    message, rendered as generation renders a prompt with --system)."""
    if kind == "distill":
        if not teacher_system:
            raise DataError("distillation needs the teacher's context (a system message) to render its prompts")
        _need_turns(ex)
        p, c, _ = tokenize_example(ex, "sft", template, tokenizer)
        messages = with_system(ex.chat_messages(), teacher_system)
        teacher = tool_texts(template, tokenizer, messages, ex.tools)[0] if ex.uses_tools else \
            template.render_messages(messages, tokenizer=tokenizer)
        return p, c, tokenizer.encode(teacher).long()
    if kind == "correction":
        if not isinstance(template, CorrectionTemplate):
            raise DataError(f"correction data needs the 'correction' template, not {template.name!r}")
        _need_turns(ex)
        prompt = template.render_correction(ex.question(), ex.rejected, tokenizer)
        p, a = tokenize_pair(tokenizer, prompt, template.completion(ex.rejected))
        _, c = tokenize_pair(tokenizer, prompt, template.completion(ex.chosen), p)
        return p, tokenizer.encode(ex.question(), bos=False).long(), a, c
    if (ex.reasoning or ex.rejected_reasoning) and template.name != "chat":
        raise BadRow(f"the answer's reasoning_content has no place in the {template.name!r} template (a chat "
                     f"template writes it, e.g. Qwen3's); use --template chat, or drop the field")
    answers = [ex.answer()] + ([ex.rejected_answer()] if kind == "preference" else [])
    if ex.uses_tools:  # rendered as the server renders it; the answer's tool calls are part of its target
        _need_turns(ex)
        prompt, completions = tool_texts(template, tokenizer, ex.chat_messages(), ex.tools, answers)
    else:
        prompt = render_prompt(template, ex, tokenizer)
        msgs = ex.chat_messages()
        completions = [template.completion(a if a.get("reasoning_content") else a["content"], msgs, tokenizer)
                       for a in answers]
    for reasoning, completion in zip((ex.reasoning, ex.rejected_reasoning), completions):
        if reasoning and reasoning.strip() not in completion:  # a template without a think block drops it
            raise BadRow("the chat template leaves the answer's reasoning_content out (it writes no think block), so "
                         "the reasoning would not be learned; put it into the content, or use a template that writes "
                         "it")
    p, c = tokenize_pair(tokenizer, prompt, completions[0])
    if kind == "sft":
        return p, c, NO_CONTEXT
    if kind == "unpaired":
        return p, c, torch.tensor([int(ex.label)])
    _, r = tokenize_pair(tokenizer, prompt, completions[1], p)
    return p, c, r
