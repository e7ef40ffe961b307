"""The OpenAI-compatible HTTP API over the engine (FastAPI): `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
`/health`, `/metrics` (Prometheus), vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info`, and the comparison page
at `/`.

`/v1/completions` takes what the legacy API takes: a string, a list of strings, token ids or a list of token-id lists
(choice `p * n + j` is prompt p's choice j), and `echo` with `logprobs` (the prompt's tokens' log-probabilities,
`max_tokens` 0 to score the prompt only). With the tokenizer endpoints, that is what lm-evaluation-harness's
`local-completions` model needs to evaluate a served Aligner on any task, as it evaluates a vLLM server.

The event loop never touches the model: requests go to the engine thread (`Engine.submit`), its events come back
through `loop.call_soon_threadsafe`, and Aligner files are loaded in a worker thread. Every error is the OpenAI error
JSON ({"error": {"message", "type", "param", "code"}}): 400 malformed body or too long a prompt, 401 missing or wrong
API key, 404 unknown model, 429 queue full.

Correction Aligners (metadata mode "correction") rewrite an answer: the request gives the question (the last user
message, or `prompt`) and the answer to correct in the extra body field `answer`. Without `answer`, one call runs both
stages: the bare base answers the question first (same sampling parameters), then the Aligner rewrites that answer; the
response carries the base's answer as `upstream_answer` and `usage` counts both stages.

Tool calls (`tools`, `tool_choice`): `lit_aligner.tools` renders the tools into the prompt and reads the calls back out
of the answer; forced calls are a grammar like structured outputs.
"""

import asyncio
import json
import secrets
import time
import uuid
from importlib import resources
from typing import Any, AsyncIterator, Dict, List, Literal, Optional, Tuple, Union

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from lit_aligner.generation.engine import Penalties, Sampling
from lit_aligner.generation.structured import (Grammar, OutputFormat, StructuredOutputError, compile_grammar,
                                               parse_response_format, parse_structured_outputs)
from lit_aligner.prompts import (conversation_question, conversation_template, correction_prompt, encode_prompt,
                                 has_tool_turns, is_correction, saved_variables)
from lit_aligner.reasoning import ReasoningStream, opens_thinking, split_reasoning
from lit_aligner.serving.engine import Engine, Event, QueueFull, Request, ServedAligner, TokenLogprob
from lit_aligner.serving.metrics import Metrics
from lit_aligner.serving.registry import AlignerRegistry, BadAligner, UnknownAligner
from lit_aligner.tokenizer import check_template_variables
from lit_aligner.tools import CallStream, ToolError, Tools, call_style, parse_tools, split_calls, tool_prompt

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's (and vLLM's) legacy completions endpoint; chat has no default cap
# Fields of the OpenAI API this server does not implement: a request that sets them gets a 400, not a silent ignore.
UNSUPPORTED = ("tools", "functions", "best_of", "echo", "suffix",  # (chat declares `tools`, completions `echo`:
               "audio", "web_search_options",                       # the other endpoint gets the 400)
               "use_beam_search", "include_stop_str_in_output", "truncate_prompt_tokens", "prompt_logprobs")  # vLLM's
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")  # vLLM's older names of structured_outputs
MAX_LOGIT_BIAS = 300  # entries, as OpenAI's
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat endpoint
MAX_N = 16  # choices per request: each is a row of the batch


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# --- request bodies ---------------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    name: str
    arguments: str  # a JSON object as text


class ToolCall(BaseModel):  # an earlier call, in an assistant message
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = None  # None: an assistant message that only calls tools
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None  # a tool result: the call it answers
    reasoning_content: Optional[str] = None  # an earlier answer's reasoning, sent back (Qwen3's template writes it)
    reasoning: Optional[str] = None  # vLLM's newer name of the same

    @model_validator(mode="after")
    def _check(self) -> "Message":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if (self.tool_calls or self.reasoning_content or self.reasoning) and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls or reasoning_content")
        return self

    def as_dict(self) -> Dict[str, Any]:
        text = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)
        out: Dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text or ""}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.reasoning_content or self.reasoning:  # the templates' name
            out["reasoning_content"] = self.reasoning_content or self.reasoning
        return out


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRendering(BaseModel):
    """How a conversation is rendered, as vLLM's chat endpoint and /tokenize take it."""

    chat_template_kwargs: Optional[Dict[str, Any]] = None  # more variables for the chat template
    continue_final_message: bool = False  # a prefill: the last (assistant) message is continued
    add_generation_prompt: Optional[bool] = None  # (set: only false with continue_final_message here)

    def check_rendering(self) -> None:
        """The template variables (`tokenizer.check_template_variables`) and vLLM's rules for the two flags (not
        both true); `add_generation_prompt: false` only for a continued message (a prompt that ends inside the user's
        turn is not rendered). 400s naming the field."""
        try:
            check_template_variables(self.chat_template_kwargs or {})
        except ValueError as e:
            raise APIError(400, str(e), param="chat_template_kwargs") from None
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "cannot set both continue_final_message and add_generation_prompt to true",
                           param="continue_final_message")
        if self.add_generation_prompt is False and not self.continue_final_message:
            raise APIError(400, "add_generation_prompt false is supported only with continue_final_message true "
                           "(which continues the last assistant message)", param="add_generation_prompt")


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, metadata, ...) are accepted and ignored

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)  # vLLM's extra: -1, 0 or none for every token
    min_p: float = Field(0.0, ge=0, le=1)  # vLLM's extra: tokens less likely than min_p x the top one are dropped
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)  # vLLM's extra (transformers' meaning); 1 is off
    logit_bias: Optional[Dict[str, float]] = None  # token id (as a string) -> bias in [-100, 100]
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    answer: Optional[str] = None  # correction Aligners: the answer to rewrite (else the base answers first)
    ignore_eos: bool = False  # as vLLM's: keep generating past end tokens (benchmarks: exactly max_tokens tokens)
    min_tokens: int = Field(0, ge=0)  # vLLM's: no end token or stop string before this many tokens
    stop_token_ids: Optional[List[int]] = None  # vLLM's: more tokens that end the answer (also with ignore_eos)
    response_format: Optional[Dict[str, Any]] = None  # OpenAI's: text, json_object, json_schema
    structured_outputs: Optional[Dict[str, Any]] = None  # vLLM's extra: json, regex, choice, grammar

    def structured(self) -> Tuple[Optional[Dict[str, Any]], str]:
        """vLLM's structured_outputs, or its older guided_json / guided_regex / guided_choice / guided_grammar as its
        fields, and the field that gave them (None, "structured_outputs" when none did)."""
        guided = {k[len("guided_"):]: v for k, v in (self.model_extra or {}).items() if k in GUIDED and v is not None}
        if guided and self.structured_outputs is not None:
            raise APIError(400, "give structured_outputs or the older guided_* fields, not both",
                           param="structured_outputs")
        return (guided, f"guided_{next(iter(guided))}") if guided else (self.structured_outputs, "structured_outputs")

    @property
    def format_field(self) -> str:
        """The field that says what the answers must be (what a 400 about it names)."""
        return "response_format" if self.response_format is not None else self.structured()[1]

    def output_format(self) -> Optional[OutputFormat]:
        """What the answers must be (None: free text); 400 on a malformed response_format / structured_outputs (or
        its older guided_* fields)."""
        structured, _ = self.structured()
        if self.response_format is not None and structured is not None:
            raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
        try:
            return parse_response_format(self.response_format) if self.response_format is not None else \
                parse_structured_outputs(structured)
        except StructuredOutputError as e:
            raise APIError(400, str(e), param=self.format_field) from None

    def stop_strings(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise APIError(400, f"at most 16 stop strings, got {len(stops)}", param="stop")
        return [s for s in stops if s]

    def check(self) -> None:
        for name in UNSUPPORTED:
            if (self.model_extra or {}).get(name) not in (None, False, 0, [], {}):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)

    def penalties(self) -> Penalties:
        bias = []
        if len(self.logit_bias or {}) > MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}",
                           param="logit_bias")
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit() or not -100 <= value <= 100:
                raise APIError(400, f"logit_bias maps token ids (as strings) to biases in [-100, 100], got "
                                    f"{key!r}: {value}", param="logit_bias")
            bias.append((int(key), float(value)))
        return Penalties(self.presence_penalty, self.frequency_penalty, self.repetition_penalty, tuple(sorted(bias)))

    def top_logprobs_k(self) -> Optional[int]:
        """None: no log-probabilities; k: each token's and its k most likely alternatives'."""
        return None

    def tool_spec(self) -> Optional[Tools]:
        """The functions the model may call and how (None: no tools)."""
        return None

    def echo_prompt(self) -> bool:
        """Whether each choice starts with its prompt (and its logprobs with the prompt's)."""
        return False


class ChatBody(_Body, ChatRendering):
    messages: List[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Union[str, Dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    include_reasoning: bool = True  # vLLM's: with --reasoning-parser, false leaves the reasoning out

    def check(self) -> None:
        super().check()
        self.check_rendering()

    def top_logprobs_k(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_spec(self) -> Optional[Tools]:
        try:
            return parse_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param) from None


class CompletionBody(_Body):
    prompt: Union[str, List[str], List[int], List[List[int]]]  # text, texts, token ids, lists of token ids
    max_tokens: Optional[int] = Field(None, ge=0)  # 0 with echo: score the prompt only
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # the legacy form: k alternatives
    echo: bool = False

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 only scores the prompt: it needs echo: true", param="max_tokens")

    def top_logprobs_k(self) -> Optional[int]:
        return self.logprobs

    def echo_prompt(self) -> bool:
        return self.echo

    def prompts(self) -> List[Union[str, List[int]]]:
        """The prompts, each a text or a list of token ids."""
        p = self.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(q) == 0 for q in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        return prompts


class TokenizeBody(ChatRendering):
    """vLLM's /tokenize: a prompt (BOS as the completions endpoint adds it, unless add_special_tokens is false) or
    chat messages (the chat endpoint's rendering, `tools` too)."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[Message]] = None
    tools: Optional[List[Dict[str, Any]]] = None
    add_special_tokens: bool = True


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    tokens: List[int]


# --- the server -------------------------------------------------------------------------------------------------------


class AlignerServer:
    """The base model's tokenizer, the engine and the Aligner registry behind one FastAPI `app`."""

    def __init__(self, engine: Engine, registry: AlignerRegistry, tokenizer, base_name: str,
                 api_key: Optional[str] = None, reasoning: bool = False):
        self.engine, self.registry, self.tokenizer = engine, registry, tokenizer
        self.base_name, self.api_key = base_name, api_key
        self.reasoning = reasoning  # chat answers' think blocks read apart as reasoning_content (--reasoning-parser)
        self.metrics = Metrics(lambda: engine.load, lambda: len(registry.loaded))
        self.created = int(time.time())
        self.app = self._build_app()

    # --- prompts ------------------------------------------------------------------------------------------------------

    def template_name(self, aligner: Optional[ServedAligner]) -> str:
        """The prompt template of a chat with this Aligner (None: the bare base): the one saved with it, else the
        tokenizer's chat template, else plain text."""
        return (aligner.metadata.get("template") if aligner is not None else None) or \
            conversation_template(self.tokenizer)

    def chat_prompt(self, aligner: Optional[ServedAligner], messages: List[Dict[str, Any]],
                    tools: Optional[Tools] = None, template_kwargs: Optional[Dict[str, Any]] = None,
                    continue_final: bool = False) -> str:
        """The conversation rendered as the Aligner was trained (its saved template and chat-template variables), else
        with the tokenizer's chat template; the request's `chat_template_kwargs` over the saved variables; else as plain
        text; tools and tool turns as `lit_aligner.tools` says; with `continue_final`, up to the last (assistant)
        message's words."""
        variables = {**saved_variables(aligner.metadata if aligner is not None else None), **(template_kwargs or {})}
        try:
            return tool_prompt(self.template_name(aligner), self.tokenizer, messages, tools, variables,
                               continue_final)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param) from None

    def encode(self, prompt: Union[str, List[int]]) -> List[int]:
        """A prompt's token ids (a text encoded as training encodes prompts; ids checked against the vocabulary),
        400 when it leaves no room in the context."""
        ids = encode_prompt(self.tokenizer, prompt).tolist() if isinstance(prompt, str) else self.check_ids(prompt)
        if len(ids) >= self.engine.max_seq_length:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's context is "
                                f"{self.engine.max_seq_length} tokens (prompt + completion): shorten the prompt",
                           param="messages", code="context_length_exceeded")
        return ids

    def check_ids(self, ids: List[int], param: str = "prompt") -> List[int]:
        bad = [i for i in ids if not 0 <= i < self.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside this model's vocabulary (0 to "
                                f"{self.tokenizer.vocab_size - 1})", param=param)
        return list(ids)

    def make_request(self, body: _Body, ids: List[int], aligner: Optional[ServedAligner],
                     default_max: Optional[int]) -> Request:
        room = self.engine.max_seq_length - len(ids)
        max_tokens = getattr(body, "max_completion_tokens", None)
        max_tokens = max_tokens if max_tokens is not None else body.max_tokens
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds this server's "
                                f"context of {self.engine.max_seq_length} tokens: lower max_tokens or shorten the "
                                f"prompt", param="max_tokens", code="context_length_exceeded")
        sampling = Sampling(body.temperature, body.top_k if body.top_k and body.top_k > 0 else None,
                            body.top_p if body.top_p < 1 else None, body.min_p or None)
        k = body.top_logprobs_k()
        max_tokens = min(max_tokens if max_tokens is not None else default_max or room, room)
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens})",
                           param="min_tokens")
        stop_ids = (set() if body.ignore_eos else set(self.tokenizer.stop_ids)) | \
            set(self.check_ids(body.stop_token_ids or [], param="stop_token_ids"))
        # echo scores the prompt when logprobs are asked for, or when there is nothing else to do (max_tokens 0)
        scored = body.echo_prompt() and (k is not None or max_tokens == 0)
        return Request(ids, max_tokens, emit=lambda ev: None, aligner=aligner, sampling=sampling,
                       penalties=body.penalties(), seed=body.seed,
                       stop=body.stop_strings(), stop_ids=stop_ids, min_tokens=body.min_tokens,
                       logprobs=k, prompt_logprobs=(k or 0) if scored else None)

    def grammar(self, body: _Body, tools: Optional[Tools], style: str) -> Optional[Grammar]:
        """The compiled grammar of the body's structured output or forced tool calls in the format of a template of
        `style` (None: free text); 400 when it cannot compile (or a function cannot be called in that format)."""
        fmt, field = body.output_format(), body.format_field
        if tools is not None and tools.forced:
            if fmt is not None:
                raise APIError(400, f"tool_choice {tools.choice!r} holds the answer to tool calls: drop {field}",
                               param="tool_choice")
            try:
                fmt, field = tools.output_format(style), "tools"
            except ToolError as e:
                raise APIError(400, str(e), param=e.param) from None
        if fmt is None:
            return None
        try:
            return compile_grammar(fmt, self.tokenizer, self.engine.model.lm_head_weight.shape[0])
        except StructuredOutputError as e:
            raise APIError(400, str(e), param=field) from None

    async def resolve(self, name: str) -> Optional[ServedAligner]:
        if name == self.base_name:
            return None
        try:
            return await asyncio.to_thread(self.registry.get, name)
        except UnknownAligner:
            raise APIError(404, f"the model '{name}' does not exist: GET /v1/models lists the base "
                                f"('{self.base_name}') and the Aligners in the aligners directory",
                           param="model", code="model_not_found") from None
        except BadAligner as e:
            raise APIError(400, f"the Aligner '{name}' cannot be served: {e}", param="model",
                           code="invalid_aligner") from None

    # --- running requests ---------------------------------------------------------------------------------------------

    def submit(self, *reqs: Request) -> List["asyncio.Queue[Event]"]:
        """Queue the requests (a request's `n` choices: all or none, so a full queue leaves no orphan rows)."""
        loop = asyncio.get_running_loop()
        queues: List["asyncio.Queue[Event]"] = []
        try:
            for req in reqs:
                queue: "asyncio.Queue[Event]" = asyncio.Queue()
                see = self.metrics.observe(req, req.aligner.name if req.aligner is not None else self.base_name)

                def emit(ev: Event, q=queue, see=see) -> None:  # in the engine thread
                    see(ev)
                    loop.call_soon_threadsafe(q.put_nowait, ev)

                req.emit = emit
                self.engine.submit(req)
                queues.append(queue)
        except (QueueFull, ValueError) as e:
            for req in reqs:
                req.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy: {e}", type="rate_limit_error",
                               code="rate_limit_exceeded") from None
            raise APIError(400, str(e)) from None
        return queues

    async def events(self, req: Request, queue: "asyncio.Queue[Event]",
                     http: Optional[HTTPRequest] = None) -> AsyncIterator[Event]:
        """The request's events until it finishes; a disconnected client (or a cancelled task) frees its row."""
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if http is not None and await http.is_disconnected():
                        return
                    continue
                yield ev
                if ev.finish is not None:
                    return
        finally:
            req.cancel()

    async def complete(self, req: Request, http: HTTPRequest, queue: Optional["asyncio.Queue[Event]"] = None) -> Event:
        """Run a request (submitted already when `queue` is given) to the end: its whole text, finish reason, token
        counts and log-probabilities as one Event."""
        text, logprobs, prompt_logprobs = [], [], None
        async for ev in self.events(req, queue or self.submit(req)[0], http):
            text.append(ev.text)
            logprobs.extend(ev.logprobs)
            prompt_logprobs = ev.prompt_logprobs if ev.prompt_logprobs is not None else prompt_logprobs
            if ev.finish is not None:
                if ev.finish == "error":
                    raise APIError(500, f"generation failed: {ev.error}", type="server_error")
                return Event("".join(text), ev.finish, ev.prompt_tokens, ev.completion_tokens, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs, cached_tokens=ev.cached_tokens)
        raise APIError(499, "the client closed the request")  # nobody reads this; the row is already freed

    async def prompt_texts(self, body: _Body, http: HTTPRequest, aligner: Optional[ServedAligner],
                           messages: Optional[List[Dict[str, Any]]], prompts: Optional[List[Union[str, List[int]]]],
                           default_max: Optional[int],
                           tools: Optional[Tools]) -> Tuple[List[Union[str, List[int]]], Optional[str], Tuple]:
        """What each prompt asks the model: the chat rendered with the Aligner's template, the completions' texts or
        ids as given, or for a correction Aligner the Q-A-C prompt (after the bare base has answered the question
        when the request gives no `answer`). Returns (prompts, the base's answer or None, the base's usage)."""
        kwargs, continued = getattr(body, "chat_template_kwargs", None), getattr(body, "continue_final_message", False)
        if aligner is None or not is_correction(aligner.metadata):
            return ([self.chat_prompt(aligner, messages, tools, kwargs, continued)] if messages is not None
                    else prompts), None, (0, 0)
        if continued:
            raise APIError(400, f"'{aligner.name}' is a correction Aligner: it writes its own corrected answer, which "
                           f"continues no message", param="continue_final_message")
        if tools is not None or has_tool_turns(messages or []):
            raise APIError(400, f"'{aligner.name}' is a correction Aligner: it rewrites an answer and calls no tools",
                           param="tools")
        if prompts is not None and len(prompts) > 1:
            raise APIError(400, f"a correction Aligner corrects one prompt per request, got {len(prompts)}",
                           param="prompt")
        if messages is not None:
            question = conversation_question(messages)
        else:
            question = prompts[0] if isinstance(prompts[0], str) else self.tokenizer.decode(self.check_ids(prompts[0]),
                                                                                             skip_special=True)
        answer, upstream, usage = body.answer, None, (0, 0)
        if answer is None:
            base_request = self.make_request(body, self.encode(self.chat_prompt(None, messages, None, kwargs)
                                                               if messages is not None
                                                               else question), None, default_max)
            base_request.logprobs = base_request.prompt_logprobs = None  # the log-probabilities are the correction's
            base_request.max_tokens = max(base_request.max_tokens, 1)
            first = await self.complete(base_request, http)
            answer = upstream = first.text
            usage = (first.prompt_tokens, first.completion_tokens)
        if not answer.strip():
            raise APIError(400, "the answer to correct is empty: give a non-empty 'answer'", param="answer")
        return [correction_prompt(question, answer)], upstream, usage

    async def run(self, body: _Body, http: HTTPRequest, messages: Optional[List[Dict[str, str]]],
                  prompts: Optional[List[Union[str, List[int]]]], default_max: Optional[int]):
        """Both endpoints: resolve the model, build one request per prompt and choice, answer as JSON or as a stream
        of chunks (choice p * n + j: prompt p's choice j)."""
        body.check()
        tools = body.tool_spec()
        aligner = await self.resolve(body.model)
        style = call_style(self.template_name(aligner), self.tokenizer)  # the format its tool calls are written in
        grammar = await asyncio.to_thread(self.grammar, body, tools, style)  # a large schema: up to a second
        kind = "chat" if messages is not None else "text"
        try:
            asked, upstream_answer, usage0 = await self.prompt_texts(body, http, aligner, messages, prompts,
                                                                     default_max, tools)
        except ValueError as e:  # e.g. a conversation that does not end with a user message
            raise APIError(400, str(e), param="messages" if messages is not None else "prompt") from None
        ids = [self.encode(p) for p in asked]
        echo = body.echo_prompt()  # each choice's text starts with its prompt as given (token ids: decoded)
        echoed = [p if isinstance(p, str) else self.tokenizer.decode(i) for p, i in zip(asked, ids)] if echo else None
        reqs = []
        for prompt_ids in ids:
            for j in range(body.n):  # choice j samples from seed + j: n different, reproducible answers
                reqs.append(self.make_request(body, prompt_ids, aligner, default_max))
                reqs[-1].seed = None if body.seed is None else body.seed + j
                reqs[-1].grammar = grammar  # the answer's (a correction's, not its upstream answer's)
        if len(reqs) > self.engine.max_queue:
            raise APIError(400, f"{len(ids)} prompts x n={body.n} = {len(reqs)} rows; this server queues at most "
                                f"{self.engine.max_queue} (--max-queue): send fewer prompts per request",
                           param="prompt")
        prompt_of = [echoed[i // body.n] for i in range(len(reqs))] if echo else None
        # think blocks (--reasoning-parser): not in an answer a grammar holds from its first token
        thinks = kind == "chat" and self.reasoning and grammar is None and not echo
        inside = [thinks and opens_thinking(asked[i // body.n]) for i in range(len(reqs))]
        shows_reasoning = getattr(body, "include_reasoning", True)
        logprobs = reqs[0].logprobs is not None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        reads_calls = tools is not None and tools.choice != "none"  # the answers' tool calls are read
        queues = self.submit(*reqs)  # errors (429, 400) before any answer or stream are plain error responses

        def usage(completion_tokens: int, cached: List[int]) -> Dict[str, Any]:  # each prompt once, whatever n
            # cached: each row's prompt tokens from the prefix cache; a prompt's are its first choice's
            return _usage(sum(map(len, ids)) + usage0[0], completion_tokens + usage0[1], sum(cached[::body.n]))

        if not body.stream:
            try:
                dones = await asyncio.gather(*(self.complete(r, http, q) for r, q in zip(reqs, queues)))
            except BaseException:  # one choice failed or the client left: free the others' rows too
                for r in reqs:
                    r.cancel()
                raise
            out = _response(kind, rid, created, body.model,
                            [((prompt_of[i] if echo else "") + d.text, d.finish) for i, d in enumerate(dones)],
                            usage(sum(d.completion_tokens for d in dones), [d.cached_tokens for d in dones]))
            if logprobs:
                for choice, d in zip(out["choices"], dones):
                    choice["logprobs"] = self.logprobs_json(kind, (d.prompt_logprobs or []) + d.logprobs, 0)
            if thinks:
                for i, choice in enumerate(out["choices"]):
                    reasoning, content = split_reasoning(choice["message"]["content"], inside[i])
                    choice["message"]["content"] = content
                    if reasoning is not None and shows_reasoning:
                        choice["message"].update(reasoning_names(reasoning))
            if reads_calls:
                for choice in (c for c in out["choices"] if c["message"]["content"] is not None):
                    content, calls = split_calls(choice["message"]["content"], style, tools)
                    if calls:
                        choice["message"].update(content=content, tool_calls=[c.openai() for c in calls])
                        choice["finish_reason"] = _finish_with_calls(choice["finish_reason"])
            if upstream_answer is not None:
                out["upstream_answer"] = upstream_answer
            return JSONResponse(out)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def choices() -> AsyncIterator[Tuple[int, Optional[Event]]]:
            """The events of every choice as they come, (i, None) when choice i's stream ends."""
            merged: "asyncio.Queue[Tuple[int, Optional[Event]]]" = asyncio.Queue()

            async def pump(i: int) -> None:
                try:
                    async for ev in self.events(reqs[i], queues[i], http):
                        await merged.put((i, ev))
                finally:
                    merged.put_nowait((i, None))

            tasks = [asyncio.create_task(pump(i)) for i in range(len(reqs))]
            try:
                ended = 0
                while ended < len(reqs):
                    item = await merged.get()
                    ended += item[1] is None
                    yield item
            finally:  # the stream ended or broke off: every choice's row is freed (`events` cancels its request)
                for t in tasks:
                    t.cancel()

        async def sse() -> AsyncIterator[str]:
            for i in range(len(reqs)):
                head = _chunk(kind, rid, created, body.model, "", None, role=True, index=i)
                if upstream_answer is not None:
                    head["upstream_answer"] = upstream_answer
                yield _sse(head)
            offsets = [0] * len(reqs)  # characters of each choice's text sent so far (legacy logprobs' text_offset)
            started = [not echo] * len(reqs)  # the echoed prompt goes first, with its log-probabilities
            completion_tokens, cached = 0, [0] * len(reqs)
            # tool calls: each choice's text split into content and whole calls as it comes (`CallStream`); the
            # log-probabilities of text held back go with the next chunk of that choice
            splits = [CallStream(style, tools) for _ in reqs] if reads_calls else None
            reasonings = [ReasoningStream(inside[i]) for i in range(len(reqs))] if thinks else None
            calls, held = [0] * len(reqs), [[] for _ in reqs]
            events = choices()

            def piece_chunk(i: int, text: str, **delta: Any) -> str:
                """Choice i's next piece: its text and other `delta` fields (reasoning, a tool call), with the
                log-probabilities of the tokens held for it since its last chunk."""
                chunk = _chunk(kind, rid, created, body.model, text, None, index=i)
                if delta:  # (chat only: a completion has neither reasoning nor tool calls)
                    chunk["choices"][0]["delta"].update(delta)
                if logprobs:
                    chunk["choices"][0]["logprobs"] = self.logprobs_json(kind, held[i], offsets[i])
                offsets[i] += len(text)
                held[i] = []
                return _sse(chunk)
            try:
                async for i, ev in events:
                    if ev is None:
                        continue
                    if ev.finish == "error":
                        yield _sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error",
                                              "param": None, "code": None}})
                        return
                    if not started[i]:
                        started[i] = True
                        chunk = _chunk(kind, rid, created, body.model, prompt_of[i], None, index=i)
                        if logprobs:
                            chunk["choices"][0]["logprobs"] = self.logprobs_json(kind, ev.prompt_logprobs or [], 0)
                        offsets[i] = len(prompt_of[i])
                        yield _sse(chunk)
                    held[i].extend(ev.logprobs)
                    text = ev.text
                    if reasonings is not None:  # the reasoning first, in its own deltas; the rest is the answer
                        parts = reasonings[i].feed(text) + (reasonings[i].close() if ev.finish is not None else [])
                        text = "".join(t for k, t in parts if k == "content")
                        for t in (t for k, t in parts if k == "reasoning" and shows_reasoning):
                            yield piece_chunk(i, "", **reasoning_names(t))
                    if splits is None:  # the text as it comes (also a token that completes no character yet)
                        pieces = [text] if text or held[i] else []
                    else:
                        pieces = splits[i].feed(text) + (splits[i].close() if ev.finish is not None else [])
                    for piece in pieces:
                        if splits is not None and isinstance(piece, str) and (tools.forced or not piece):
                            continue  # a forced answer's only text is the blank between its calls
                        if isinstance(piece, str):
                            yield piece_chunk(i, piece)
                        else:
                            yield piece_chunk(i, "", tool_calls=[piece.openai(calls[i])])
                            calls[i] += 1
                    if ev.finish is not None:
                        finish = _finish_with_calls(ev.finish) if calls[i] else ev.finish
                        chunk = _chunk(kind, rid, created, body.model, "", finish, index=i)
                        if logprobs and held[i]:
                            chunk["choices"][0]["logprobs"] = self.logprobs_json(kind, held[i], 0)
                        yield _sse(chunk)
                        completion_tokens += ev.completion_tokens
                        cached[i] = ev.cached_tokens
            finally:
                await events.aclose()
            if include_usage:
                tail = _chunk(kind, rid, created, body.model, "", None)
                tail["choices"] = []
                tail["usage"] = usage(completion_tokens, cached)
                yield _sse(tail)
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def logprobs_json(self, kind: str, entries: List[TokenLogprob], offset: int) -> Dict[str, Any]:
        """OpenAI's `logprobs` of a choice or chunk: chat's `content` list (token, logprob, bytes, top_logprobs), or
        the legacy completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset from `offset`; an
        echoed prompt's first token has null for both). A token's text is its own decoding, as vLLM gives it: a piece
        of a multi-byte character reads as U+FFFD."""
        text = self.tokenizer.decode

        def item(token: int, logprob: float) -> Dict[str, Any]:
            s = text([token])
            return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

        if kind == "chat":
            return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                                for e in entries], "refusal": None}
        tokens = [text([e.token]) for e in entries]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.logprob is None else {text([t]): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def tokenizer_info(self) -> Dict[str, Any]:
        """vLLM's /tokenizer_info: the special tokens, the chat template, the context."""
        tok = self.tokenizer

        def token(i: Optional[int]) -> Optional[str]:
            return tok.id_to_token(i) if i is not None else None

        return {"tokenizer_class": type(tok).__name__, "bos_token": token(tok.bos_id), "eos_token": token(tok.eos_id),
                "pad_token": token(tok.pad_id), "add_bos_token": tok.add_bos, "chat_template": tok.chat_template,
                "model_max_length": self.engine.max_seq_length, "vocab_size": tok.vocab_size}

    # --- the app ------------------------------------------------------------------------------------------------------

    def _check_key(self, http: HTTPRequest) -> None:
        if self.api_key is None:
            return
        auth = http.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the server's "
                                "--api-key", type="invalid_request_error", code="invalid_api_key")

    def models(self) -> Dict[str, Any]:
        data = [{"id": self.base_name, "object": "model", "created": self.created, "owned_by": "lit-aligner",
                 "root": self.base_name, "parent": None}]
        for name, listed in self.registry.scan().items():
            data.append({"id": name, "object": "model", "created": int(listed.mtime), "owned_by": "lit-aligner",
                         "root": name, "parent": self.base_name})
        return {"object": "list", "data": data}

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="lit-aligner", docs_url=None, redoc_url=None, openapi_url=None)
        auth = Depends(self._check_key)

        @app.exception_handler(APIError)
        async def api_error(_, e: APIError):
            return e.response()

        @app.exception_handler(RequestValidationError)
        async def bad_body(_, e: RequestValidationError):
            first = e.errors()[0] if e.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            return APIError(400, f"malformed request body: {where + ': ' if where else ''}{first.get('msg', e)}",
                            param=where or None).response()

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_, e: StarletteHTTPException):
            return APIError(e.status_code, str(e.detail), code=None).response()

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": self.base_name, **self.engine.load,
                    "aligners_loaded": len(self.registry.loaded)}

        @app.get("/metrics", dependencies=[auth])  # model names are in its labels: the key guards them too
        async def metrics():
            return Response(self.metrics.render(), media_type=self.metrics.content_type)

        @app.get("/v1/models", dependencies=[auth])
        async def models():
            return await asyncio.to_thread(self.models)

        @app.post("/v1/chat/completions", dependencies=[auth])
        async def chat(body: ChatBody, http: HTTPRequest):
            return await self.run(body, http, [m.as_dict() for m in body.messages], None, None)

        @app.post("/v1/completions", dependencies=[auth])
        async def completions(body: CompletionBody, http: HTTPRequest):
            return await self.run(body, http, None, body.prompts(), COMPLETIONS_DEFAULT_MAX_TOKENS)

        # vLLM's tokenizer endpoints (no key, as vLLM's: they tell only the base's tokenizer): clients that count
        # tokens themselves (lm-evaluation-harness's `tokenizer_backend=remote`) need no copy of the tokenizer.
        @app.post("/tokenize")
        async def tokenize(body: TokenizeBody):
            if (body.prompt is None) == (body.messages is None):
                raise APIError(400, "give either 'prompt' or 'messages'", param="prompt")
            if body.messages is not None:
                body.check_rendering()
                try:
                    tools = parse_tools(body.tools)
                    ids = encode_prompt(self.tokenizer, self.chat_prompt(None, [m.as_dict() for m in body.messages],
                                                                         tools, body.chat_template_kwargs,
                                                                         body.continue_final_message))
                except ToolError as e:
                    raise APIError(400, str(e), param=e.param) from None
                except ValueError as e:
                    raise APIError(400, str(e), param="messages") from None
            elif body.add_special_tokens:
                ids = encode_prompt(self.tokenizer, body.prompt)
            else:
                ids = self.tokenizer.encode(body.prompt, bos=False)
            ids = ids.tolist()
            return {"count": len(ids), "max_model_len": self.engine.max_seq_length, "tokens": ids, "token_strs": None}

        @app.post("/detokenize")
        async def detokenize(body: DetokenizeBody):
            return {"prompt": self.tokenizer.decode(self.check_ids(body.tokens, param="tokens"))}

        @app.get("/tokenizer_info")
        async def tokenizer_info():
            return self.tokenizer_info()

        @app.get("/", response_class=HTMLResponse)
        async def page():
            return resources.files("lit_aligner.serving").joinpath("page.html").read_text(encoding="utf-8")

        return app


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Dict[str, Any]:
    """OpenAI's `usage`; `prompt_tokens_details.cached_tokens`: the prompt tokens the prefix cache gave."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _response(kind: str, rid: str, created: int, model: str, answers: List[Tuple[str, str]], usage: Dict[str, int]):
    """The whole answer: one choice per (text, finish reason)."""
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": None} for i, (text, finish) in enumerate(answers)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": usage}
    choices = [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}
               for i, (text, finish) in enumerate(answers)]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def _finish_with_calls(finish: str) -> str:
    """An answer that called tools and ended by itself ends with "tool_calls" (one cut by max_tokens: "length")."""
    return "tool_calls" if finish == "stop" else finish


def _chunk(kind: str, rid: str, created: int, model: str, text: str, finish: Optional[str], role: bool = False,
           index: int = 0):
    if kind == "chat":
        delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}]}


def reasoning_names(text: str) -> Dict[str, str]:
    """An answer's reasoning under both names clients read: vLLM's `reasoning` and the older `reasoning_content`
    (DeepSeek's API, llama.cpp, SGLang and vLLM before 0.11)."""
    return {"reasoning": text, "reasoning_content": text}


def _sse(data: Dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
