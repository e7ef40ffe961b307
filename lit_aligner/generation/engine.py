"""The decoding engine: text generation with a static KV cache (gpt-fast style), for the bare base and for one or
many Aligners at once.

`prefill` runs the (left-padded) prompts once and `decode_one_token` produces one token per row per call; the KV cache
is allocated once at full size (`model.setup_caches`), so shapes never change and `decode_one_token` can be compiled.
Several prompts run as one batch: rows are left-padded, a (B, 1, T, S) mask hides the pad keys and per-row RoPE
positions start at 0 on each row's first real token, so a row gets the same tokens as when it runs alone. Aligners are
arguments, not part of the loaded model: one base serves any number of them, one Aligner per row if need be, and the
prefix keys and values are projected once per call (`model.prefix_kv`), not once per step.

Prompts are built in `lit_aligner.prompts`; many prompts x many Aligners are answered by
`lit_aligner.generation.answers`.
"""

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import tyro

from lit_aligner.files import read_json_object, read_text
from lit_aligner.generation.structured import (GrammarRows, OutputFormat, StructuredOutputError, check_format,
                                               compile_grammar)
from lit_aligner.model import LLaMA, Aligner, PrefixKV, stack_aligners
from lit_aligner.perf import should_compile

# What `generate(aligners=...)` accepts: one Aligner (or a stacked one, one per row), precomputed prefix K/V, a list
# with one Aligner or None (bare base) per prompt, None (the model's own `model.aligner`, if any) or False (bare base).
Aligners = Union[None, bool, Aligner, PrefixKV, Sequence[Optional[Aligner]]]
OnToken = Callable[[int, int], None]

# On CUDA, asking "has every row stopped?" blocks the host until the GPU catches up, so it is asked every few tokens
# (a few wasted steps at most); on the CPU the answer is already there.
_STOP_CHECK_EVERY_CUDA = 8


@dataclass
class GenerationStats:
    """Timing of one `generate` call. Seconds are wall-clock (the device is synchronised at the two boundaries)."""

    batch_size: int
    prompt_tokens: int  # real (unpadded) prompt tokens, all rows
    new_tokens: int  # tokens returned, all rows (stop tokens and tokens after them excluded)
    decode_steps: int  # calls of decode_one_token (the first new token comes from the prefill)
    prefill_s: float
    decode_s: float
    first_step_s: float = 0.0  # a compiled step's first call's share of decode_s: it compiles there (~30-45 s)
    compiled: bool = False

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens computed per second over all rows of the batch (batch 1: the per-sequence speed)."""
        return self.batch_size * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_s:.2f} s "
                f"({self.prefill_tokens_per_s:.1f} tokens/s); "
                f"decode: {self.decode_steps} steps x batch {self.batch_size} in {self.decode_s:.2f} s "
                f"({self.decode_tokens_per_s:.1f} tokens/s{first_step_note([self])}); {self.new_tokens} new tokens "
                f"returned")


def first_step_note(stats: Sequence[GenerationStats]) -> str:
    """'' or, when the decode step was compiled, the speed after each call's first step with that step's seconds: its
    first call in a process compiles it for that batch size (~30-45 s), which no later call pays again."""
    compiled = [s for s in stats if s.compiled and s.decode_steps > 1]
    if not compiled:
        return ""
    later = sum((s.decode_steps - 1) * s.batch_size for s in compiled)
    later_s = sum(s.decode_s - s.first_step_s for s in compiled)
    return (f"; {later / max(later_s, 1e-9):.1f} tokens/s after the first step, which took "
            f"{sum(s.first_step_s for s in compiled):.1f} s: --compile compiles it once per batch size, "
            f"--compile off skips that")


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    noise: Optional[torch.Tensor] = None,
    min_p: Optional[float] = None,
) -> torch.Tensor:
    """logits: (B, vocab) -> next token ids (B,). Greedy (argmax) when temperature == 0; otherwise softmax(logits /
    temperature) restricted to the top_k most likely tokens, to the smallest set whose probability reaches top_p
    (nucleus) and to the tokens at least min_p times as likely as the most likely one (min-p, as vLLM's and
    transformers'; the three filters commute: each keeps the most likely token, and renormalising keeps the ratios),
    sampled with `noise`: (B, vocab) Exp(1) draws (see `draw_noise`). Taking argmax(p / noise) is an exact draw from
    p that needs no host sync, unlike torch.multinomial."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p; the most likely token is always kept.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)  # argmax needs no renorm
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(dim=-1)


def draw_noise(batch: int, vocab: int, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """(batch, vocab) Exp(1) draws for `sample`, from `generator` (on its own device) when given."""
    g_device = generator.device if generator is not None else device
    noise = torch.empty(batch, vocab, device=g_device).exponential_(1, generator=generator)
    return noise.to(device, non_blocking=True)


def check_sampling(temperature: float, top_k: Optional[int] = None, top_p: Optional[float] = None,
                   min_p: Optional[float] = None) -> None:
    """ValueError naming the parameter for a negative or non-finite temperature, top_k < 1, top_p outside (0, 1] or
    min_p outside [0, 1]."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not (math.isfinite(min_p) and 0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p}")


@dataclass(frozen=True)
class Penalties:
    """The logits processing of the OpenAI API and vLLM, before temperature and sampling (see `penalize`): `presence`
    and `frequency` (OpenAI's -2 to 2) lower the logit of every token already generated, by `presence` once and by
    `frequency` per occurrence; `repetition` (vLLM's and transformers', > 0, 1 = off) divides a positive logit and
    multiplies a negative one for every token of the prompt or the output; `logit_bias` adds (token, bias) pairs."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    logit_bias: Tuple[Tuple[int, float], ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or self.repetition != 1.0 or self.logit_bias)


NO_PENALTIES = Penalties()


def as_flag(message: str) -> str:
    """A `check_sampling` / `check_penalties` message as a CLI says it: "min_p must be ..." (the API's field name)
    -> "--min-p must be ..." (the flag)."""
    return re.sub(r"^(\w+) must", lambda m: f"--{m.group(1).replace('_', '-')} must", message)


def check_penalties(p: Penalties, vocab: Optional[int] = None) -> None:
    """ValueError naming the parameter for a non-finite penalty, a repetition penalty <= 0, or a logit bias on a token
    outside the vocabulary (checked when `vocab` is given) or not finite."""
    if not (math.isfinite(p.repetition) and p.repetition > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {p.repetition}")
    for name, value in (("presence_penalty", p.presence), ("frequency_penalty", p.frequency)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number (0 = off), got {value}")
    for token, bias in p.logit_bias:
        if vocab is not None and not 0 <= token < vocab:
            raise ValueError(f"logit_bias: token id {token} is outside the vocabulary (0 to {vocab - 1})")
        if not math.isfinite(bias):
            raise ValueError(f"logit_bias: the bias of token id {token} is not a finite number: {bias}")


@dataclass
class PenaltyState:
    """`Penalties` as they stand for a batch of rows being decoded: counts (B, vocab) how often each token was
    generated so far, seen (B, vocab) the tokens of the prompt or the output (what the repetition penalty looks at),
    bias (vocab,) the logit bias, dense. Only tensor ops: `apply` runs inside a compiled decoding step."""

    penalties: Penalties
    counts: torch.Tensor
    seen: torch.Tensor
    bias: Optional[torch.Tensor] = None
    allowed: Optional[torch.Tensor] = None  # (B, vocab) bool: structured output, the tokens each row's grammar allows

    @classmethod
    def start(cls, penalties: Penalties, prompts: Sequence[Sequence[int]], vocab: int,
              device: torch.device, masked: bool = False) -> Optional["PenaltyState"]:
        """The state before the first new token of each prompt (token ids); None when no penalty is active and no
        grammar mask will be (`masked`)."""
        if not penalties.active and not masked:
            return None
        seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, torch.as_tensor(p, device=device).long()] = True
        bias = None
        if penalties.logit_bias:
            ids, values = zip(*penalties.logit_bias)
            bias = torch.zeros(vocab, device=device).index_add_(0, torch.tensor(ids, device=device),
                                                                torch.tensor(values, device=device))
        return cls(penalties, torch.zeros(len(prompts), vocab, device=device), seen, bias)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (B, vocab) -> the processed logits (fp32)."""
        p = self.penalties
        logits = logits.float()
        if p.repetition != 1.0:
            hit = torch.where(logits > 0, logits / p.repetition, logits * p.repetition)
            logits = torch.where(self.seen, hit, logits)
        if p.frequency or p.presence:
            logits = logits - p.frequency * self.counts - p.presence * (self.counts > 0).float()
        if self.bias is not None:
            logits = logits + self.bias
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed, float("-inf"))
        return logits

    def add(self, tokens: Union[int, torch.Tensor]) -> None:
        """Count one new token per row: (B,) ids, or an int for a single row."""
        if isinstance(tokens, int):
            self.counts[:, tokens] += 1
            self.seen[:, tokens] = True
            return
        t = tokens.view(-1, 1)
        self.counts.scatter_add_(1, t, torch.ones(t.shape, dtype=self.counts.dtype, device=t.device))
        self.seen.scatter_(1, t, True)


# ---------------------------------------------------------------------------------------------------------------------
# Prefill and one decoding step


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked (see `sample`): greedy at temperature 0."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None


GREEDY = Sampling()


@dataclass
class DecodingArgs:
    """How the generate CLIs decode: their sampling, penalty and stop flags, in one place (see `sample`, `Penalties`
    and `generate`'s stop_strings)."""

    temperature: float = 0.0
    """0 = greedy (deterministic); > 0 samples from softmax(logits / temperature)."""
    top_k: Optional[int] = None
    """when sampling, keep only the k most likely tokens."""
    top_p: Optional[float] = None
    """when sampling, keep the smallest set of tokens whose probability reaches top_p (nucleus)."""
    min_p: Optional[float] = None
    """when sampling, keep only the tokens at least min_p times as likely as the most likely one (min-p)."""
    repetition_penalty: float = 1.0
    """divide the positive logits (multiply the negative ones) of the tokens already in the prompt or the answer by
    this: > 1 discourages repeating (transformers' and vLLM's repetition_penalty; 1.1 to 1.3 is usual); 1 = off."""
    presence_penalty: float = 0.0
    """subtract this from the logits of the tokens the answer already holds (OpenAI's presence_penalty); 0 = off."""
    frequency_penalty: float = 0.0
    """subtract this times each token's count in the answer so far from its logit (OpenAI's frequency_penalty)."""
    seed: int = 1234
    """seed of the sampling generator (same seed, same text)."""
    stop: tyro.conf.UseAppendAction[List[str]] = field(default_factory=list)
    """end the answer before this text; repeat the flag for several (a backslash-n in it is a newline, backslash-t a
    tab)."""
    json_schema: Optional[str] = None
    """structured output: every answer a JSON value that follows this JSON schema (a .json file, or the schema's
    text)."""
    json_object: tyro.conf.FlagCreatePairsOff[bool] = False
    """structured output: every answer a JSON object."""
    regex: Optional[str] = None
    """structured output: every answer matches this regular expression."""
    choice: tyro.conf.UseAppendAction[List[str]] = field(default_factory=list)
    """structured output: every answer is one of these texts; repeat the flag for each."""
    grammar: Optional[Path] = None
    """structured output: every answer follows this Lark grammar file (llguidance's Lark dialect)."""

    @property
    def penalties(self) -> Penalties:
        return Penalties(self.presence_penalty, self.frequency_penalty, self.repetition_penalty)

    @property
    def stop_strings(self) -> List[str]:
        escapes = {"n": "\n", "t": "\t", "\\": "\\"}
        return [re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), m.group(0)), s) for s in self.stop]

    def output_format(self) -> Optional[OutputFormat]:
        """The structured-output flag given (None: free text); StructuredOutputError on two or a bad schema."""
        given = [(k, v) for k, v in (("json_schema", self.json_schema), ("json_object", self.json_object or None),
                                     ("regex", self.regex), ("choice", self.choice or None),
                                     ("grammar", self.grammar)) if v is not None]
        if len(given) > 1:
            flags = " and ".join("--" + k.replace("_", "-") for k, _ in given)
            raise StructuredOutputError(f"give one structured-output flag, not {flags}")
        if not given:
            return None
        kind, value = given[0]
        if kind == "json_schema":
            return OutputFormat(kind, _json_schema(value))
        if kind == "grammar":
            return OutputFormat(kind, read_text(value, "Lark grammar file (--grammar)", StructuredOutputError))
        return OutputFormat(kind, None if kind == "json_object" else value)

    def check(self) -> Optional[OutputFormat]:
        """ValueError naming the first bad flag (a structured-output format is compiled here, before any model);
        returns the structured-output format (its schema or grammar file read once, here), None for free text."""
        try:
            check_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
            check_penalties(self.penalties)
        except ValueError as e:
            raise ValueError(as_flag(str(e))) from None
        if "" in self.stop:
            raise ValueError("--stop takes a non-empty text")
        fmt = self.output_format()
        if fmt is not None:
            check_format(fmt)
        return fmt

    def generate_kwargs(self, device: torch.device, tokenizer, vocab_size: int,
                        fmt: Optional[OutputFormat] = None) -> Dict[str, Any]:
        """The keyword arguments of `generate` these flags stand for, with a seeded generator on `device`, the
        tokenizer's decoder for the stop strings, and the structured output's grammar for `vocab_size` (the model's
        output rows); `fmt`: the format `check` returned (else the flags' files are read again)."""
        fmt = fmt if fmt is not None else self.output_format()
        grammar = compile_grammar(fmt, tokenizer, vocab_size) if fmt is not None else None
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    penalties=self.penalties, generator=torch.Generator(device).manual_seed(self.seed),
                    stop_strings=self.stop_strings, decode=tokenizer.decode, grammar=grammar)


def _json_schema(value: str) -> Dict[str, Any]:
    """--json-schema: a .json file, or the schema's own text."""
    if value.lstrip()[:1] not in ("{", "["):
        return read_json_object(value, "JSON schema file (--json-schema)", StructuredOutputError)
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as e:
        raise StructuredOutputError(f"--json-schema is neither a file nor valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise StructuredOutputError("--json-schema must be a JSON object (a schema)")
    return schema


def find_stop(text: str, stop_strings: Sequence[str], since: int = 0) -> Optional[int]:
    """The index of the earliest of `stop_strings` in `text` (searching from `since`, where a new match can begin);
    None when there is none."""
    since = max(since, 0)
    return min((i for i in (text.find(s, since) for s in stop_strings if s) if i >= 0), default=None)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first of `stop_strings` in it (all of it when none is)."""
    i = find_stop(text, stop_strings)
    return text if i is None else text[:i]


def prefill(model: LLaMA, idx: torch.Tensor, pad: torch.Tensor, valid: torch.Tensor, prefix: Optional[PrefixKV],
            sampling: Sampling = GREEDY, noise: Optional[torch.Tensor] = None,
            penalty: Optional[PenaltyState] = None) -> torch.Tensor:
    """Run the left-padded prompts idx: (B, T) through the model, filling cache slots 0..T-1, and sample the first new
    token (B,). pad: (B,) pad tokens at the start of each row; valid: (B, S) bool, True for the cache slots that hold
    (or will hold) a real token of the row; penalty: the penalties to apply before sampling, if any. A pad query may
    attend to itself only: a fully masked row would give NaN, which would leak into real rows through 0 * NaN."""
    B, T = idx.shape
    S = valid.shape[1]
    t = torch.arange(T, device=idx.device)
    slots = torch.arange(S, device=idx.device)
    causal = slots[None, :] <= t[:, None]  # (T, S)
    mask = (causal[None] & valid[:, None, :]) | (slots[None, :] == t[:, None])[None]  # (B, T, S)
    positions = (t[None, :] - pad[:, None]).clamp(min=0)  # (B, T): every row's first real token is at position 0
    hidden = model(idx, input_pos=t, aligner=_no_aligner(prefix), mask=mask[:, None], positions=positions,
                   return_hidden=True)
    logits = torch.nn.functional.linear(hidden[:, -1], model.lm_head_weight)  # (B, vocab): last position only
    if penalty is not None:
        logits = penalty.apply(logits)
    return sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, noise, sampling.min_p)


def decode_one_token(model: LLaMA, token: torch.Tensor, input_pos: torch.Tensor, pad: torch.Tensor,
                     valid: torch.Tensor, prefix: Optional[PrefixKV], sampling: Sampling = GREEDY,
                     noise: Optional[torch.Tensor] = None, penalty: Optional[PenaltyState] = None) -> torch.Tensor:
    """token: (B, 1) the last token of every row, written at cache slot input_pos: (1,) -> the next token (B,).
    Only tensor ops: no host sync, fixed shapes (compilable, CUDA-graph friendly)."""
    slots = torch.arange(valid.shape[1], device=token.device)
    mask = (valid & (slots <= input_pos))[:, None, None, :]  # (B, 1, 1, S)
    positions = (input_pos - pad)[:, None]  # (B, 1)
    logits = model(token, input_pos=input_pos, aligner=_no_aligner(prefix), mask=mask, positions=positions)[:, -1]
    if penalty is not None:
        logits = penalty.apply(logits)
    return sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, noise, sampling.min_p)


def _no_aligner(prefix: Optional[PrefixKV]) -> Union[bool, PrefixKV]:
    # The model reads aligner=None as "use model.aligner"; here None has already been resolved, so it means bare base.
    return False if prefix is None else prefix


_compiled: Dict[str, Callable] = {}


def _decode_fn(compile: bool, device: torch.device) -> Callable:
    if not compile:
        return decode_one_token
    key = device.type
    if key not in _compiled:
        # CUDA graphs remove the per-kernel launch cost that dominates decoding small batches on a GPU. Static shapes:
        # one graph per batch size. With dynamo's automatic dynamic shapes, the graph compiled when the batch size
        # first changed (1 -> 16) was generic and updated the KV cache with whole-buffer copies: 8.4 instead of 5.6 ms
        # per step for LLaMA-2-7B at batch 16 on an H200 (benchmarks/profile_steps.py).
        mode = "reduce-overhead" if device.type == "cuda" else None
        _compiled[key] = torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False)
    return _compiled[key]


# ---------------------------------------------------------------------------------------------------------------------
# generate


def resolve_prefix(model: LLaMA, aligners: Aligners, batch_size: int) -> Optional[PrefixKV]:
    """The prefix K/V that `generate` uses for `aligners` (see `Aligners`), computed once; None for the bare base."""
    if aligners is False:
        return None
    if aligners is None:
        aligners = model.aligner
        if aligners is None:
            return None
    if isinstance(aligners, (list, tuple)):
        if len(aligners) != batch_size:
            raise ValueError(f"got {len(aligners)} aligners for {batch_size} prompts: pass one (or None) per prompt")
        if all(a is None for a in aligners):
            return None
        for a in aligners:
            if a is not None:
                _check_aligner(model, a)
        aligners = stack_aligners(list(aligners), model.config)
    if isinstance(aligners, Aligner):
        _check_aligner(model, aligners)
        with torch.no_grad():
            prefix = model.prefix_kv(aligners)
        prefix.gate = prefix.gate.detach()  # inference: as a stack's gate, so both take the same compiled graph
    elif isinstance(aligners, PrefixKV):
        prefix = aligners
    else:
        raise TypeError(f"aligners must be an Aligner, a PrefixKV, a list of Aligner/None, None or False, "
                        f"got {type(aligners).__name__}")
    rows = prefix.gate.shape[0]
    if rows not in (1, batch_size):
        raise ValueError(f"the Aligner stack has {rows} rows for a batch of {batch_size} prompts")
    return prefix


def _check_aligner(model: LLaMA, aligner: Aligner) -> None:
    from lit_aligner.aligner_files import check_compatible

    check_compatible(aligner, model.config)
    device = model.tok_embeddings.weight.device
    if aligner.prefix.device != device:
        raise ValueError(f"Aligner is on {aligner.prefix.device}, the model on {device}: load it onto the model's "
                         f"device")


def _static_prefix(model: LLaMA, prefix: PrefixKV) -> PrefixKV:
    """`prefix` copied into buffers kept on the model (one set per shape) whose addresses never change and are marked
    static: a CUDA graph copies every input tensor it cannot assume fixed into its own buffer at each replay, which
    for the prefix K/V was 60 copy kernels per step for LLaMA-2-7B (0.08 of the 0.22 ms an Aligner added to a 4.36 ms
    step on an H200, benchmarks/results/profile-Llama-2-7b-hf-decode-h200-run2.json). Now a call copies them once."""
    if any(v is None for v in prefix.values):  # raw prefixes that each layer projects: not what generate passes
        return prefix
    tensors = [*prefix.keys, *prefix.values, prefix.gate] + ([] if prefix.mask is None else [prefix.mask])
    store = model.__dict__.setdefault("_static_prefix_buffers", {})
    key = tuple((t.shape, t.dtype, t.device) for t in tensors)
    if key not in store:
        with torch.inference_mode(False):  # normal tensors: a later call outside inference mode refills them too
            store[key] = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        for b in store[key]:
            torch._dynamo.mark_static_address(b)
    buffers = store[key]
    for b, t in zip(buffers, tensors):
        b.copy_(t)
    n = len(prefix.keys)
    return PrefixKV(prefix.start_layer, buffers[:n], buffers[n:2 * n], buffers[2 * n],
                    None if prefix.mask is None else buffers[2 * n + 1])


def _ensure_caches(model: LLaMA, batch_size: int, seq_len: int) -> int:
    """Allocate the KV cache for seq_len slots rounded up to 128, or reuse the model's current one when it is at least
    that long but not twice as long (no reallocation, and no recompiling, across calls of similar lengths; a much
    longer cache would make every step attend over masked slots). Returns the cache length S."""
    S = min(-(-seq_len // 128) * 128, max(seq_len, model.config.block_size))
    cache = model.layers[0].attn.kv_cache
    if (cache is not None and cache.k.shape[0] >= batch_size and S <= cache.k.shape[2] < 2 * S
            and cache.k.dtype == model.tok_embeddings.weight.dtype):
        return cache.k.shape[2]
    model.setup_caches(batch_size, S)
    return S


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StopStrings:
    """Which rows' texts hold one of their stop strings, and after how many tokens (`ends`). `check` reads the tokens
    generated since its last call (a host sync) and decodes only a window at the end of each row: a string of L
    characters lies within the last 4L + 8 tokens (a character takes at most 4 byte tokens)."""

    def __init__(self, stop_strings: Union[Sequence[str], Sequence[Sequence[str]]], batch: int,
                 decode: Optional[Callable[[List[int]], str]]):
        if isinstance(stop_strings, str):
            raise ValueError("stop_strings must be a list of strings (or one list per prompt), not a single string")
        shared = all(isinstance(s, str) for s in stop_strings)
        rows = [tuple(stop_strings)] * batch if shared else [tuple(s) for s in stop_strings]
        if len(rows) != batch:
            raise ValueError(f"got stop strings for {len(rows)} prompts, not {batch}: one list for all, or one each")
        self.rows = [tuple(s for s in r if s) for r in rows]
        if any(self.rows) and decode is None:
            raise ValueError("stop_strings need decode=: a function from token ids to text (e.g. tokenizer.decode)")
        self.decode = decode
        self.window = [4 * max(map(len, r), default=0) + 8 for r in self.rows]
        self.ends: List[Optional[int]] = [None] * batch
        self.checked = 0  # tokens already looked at

    def __bool__(self) -> bool:
        return any(self.rows)

    def check(self, out: torch.Tensor, n: int, done: torch.Tensor) -> None:
        """out[:, :n] are the tokens so far; a row whose string is complete gets its end and is marked in `done`."""
        if not self or n <= self.checked:
            return
        start = max(0, self.checked + 1 - max(self.window))
        ids = out[:, start:n].tolist()  # every window this call decodes
        for b, strings in enumerate(self.rows):
            if not strings or self.ends[b] is not None:
                continue
            for j in range(self.checked + 1, n + 1):  # the first token count at which the text holds a string
                text = self.decode(ids[b][max(0, j - self.window[b]) - start:j - start])
                if any(s in text for s in strings):
                    self.ends[b] = j
                    done[b] = True
                    break
        self.checked = n


@torch.no_grad()
def generate(
    model: LLaMA,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    penalties: Penalties = NO_PENALTIES,
    stop_ids: Union[Set[int], Sequence[int]] = (),
    stop_strings: Union[Sequence[str], Sequence[Sequence[str]]] = (),
    decode: Optional[Callable[[List[int]], str]] = None,
    aligners: Aligners = None,
    generator: Optional[torch.Generator] = None,
    on_token: Optional[OnToken] = None,
    compile: Optional[bool] = None,
    return_stats: bool = False,
    grammar: Any = None,
) -> Union[List[torch.Tensor], Tuple[List[torch.Tensor], GenerationStats]]:
    """Continue each prompt (1-D LongTensor of token ids; lengths may differ) by up to `max_new_tokens` tokens, all
    prompts in one left-padded batch. Returns the new tokens of every prompt (1-D LongTensor on the CPU), cut before
    the first token in `stop_ids` (which is not included); with return_stats, also the `GenerationStats`.

    stop_strings: a row also stops after the token that completes one of these strings in its text (one list for every
    row, or one list per row; lm-evaluation-harness's `until`, OpenAI's `stop`); `decode` (token ids -> text) reads
    the text. The tokens that hold the string are returned: cut the text at it.

    aligners: one Aligner for every row (or a stacked Aligner, one row each), a PrefixKV (precomputed), a list with
    one Aligner or None (bare base) per prompt, None (the model's own `model.aligner`, if any) or False (the bare
    base). The prefix K/V are projected once per call.
    temperature 0 is greedy; otherwise top_k / top_p (nucleus) / min_p filtering, with draws from `generator` (same
    seed, same tokens). penalties: repetition / presence / frequency penalties and a logit bias, applied to every row's
    logits before the sampling (also when greedy). on_token(row, token_id) is called for every returned token, in
    order (this syncs the host every step).
    compile: torch.compile `decode_one_token` (None: on CUDA only, and not for a quantized base); the eager path
        gives the same tokens.
    grammar: structured output, a `structured.Grammar` for every row (or a list: one or None per prompt): a row
        samples only the tokens its grammar allows and ends where the grammar does (after its last token, like a
        stop string); the masks come from the host at every step, so this decodes eagerly.
    Raises ValueError on bad arguments (empty prompts, prompt + max_new_tokens longer than the model's context,
    non-finite sampling parameters, an Aligner of another base, ...)."""
    check_sampling(temperature, top_k, top_p, min_p)
    check_penalties(penalties, model.config.vocab_size)
    if not prompts:
        raise ValueError("no prompts to generate from")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.tok_embeddings.weight.device
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if p.dim() != 1 or p.numel() == 0 or p.is_floating_point():
            raise ValueError(f"prompt {i}: expected a non-empty 1-D tensor of token ids, got shape {tuple(p.shape)} "
                             f"and dtype {p.dtype}")
    lengths = [int(p.numel()) for p in prompts]
    B, T = len(prompts), max(lengths)
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(f"the longest prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {model.config.block_size} tokens: shorten the prompt or lower max_new_tokens")
    prefix = resolve_prefix(model, aligners, B)
    if prefix is not None:
        prefix = prefix.per_row(B)  # a shared Aligner and per-row ones: one path, one compiled graph
    S = _ensure_caches(model, B, T + max_new_tokens)

    # Checked on the host, before the copy: no device sync.
    if any(len(p) and (int(p.min()) < 0 or int(p.max()) >= vocab) for p in (q.cpu() for q in prompts)):
        raise ValueError(f"prompt token ids must be in [0, {vocab}): the tokenizer does not match this model")
    idx = torch.zeros(B, T, dtype=torch.long, device=device)  # pad id 0: never attended to, so any id does
    for b, p in enumerate(prompts):
        idx[b, T - lengths[b]:] = p.to(device)
    pad = torch.tensor([T - n for n in lengths], device=device)
    valid = torch.arange(S, device=device)[None, :] >= pad[:, None]  # (B, S)
    stop_set = set(stop_ids)
    stop = torch.tensor(sorted(stop_set), dtype=torch.long, device=device)
    strings = _StopStrings(stop_strings, B, decode)
    sampling = Sampling(temperature, top_k, top_p, min_p)
    grammar = GrammarRows(grammar, B, vocab) if grammar is not None else None
    penalty = PenaltyState.start(penalties, prompts, vocab, device, masked=grammar is not None)

    def next_noise():
        return draw_noise(B, vocab, device, generator) if temperature > 0 else None

    # bitsandbytes' layers under torch.compile and CUDA graphs were not measured here: eager unless asked for
    compiled = should_compile(device, False if (compile is None and model.quantize) or grammar else compile)
    decode = _decode_fn(compiled, device)
    if compiled and prefix is not None:
        prefix = _static_prefix(model, prefix)
    check_every = _STOP_CHECK_EVERY_CUDA if device.type == "cuda" and on_token is None and not grammar else 1
    host_done = [False] * B  # only kept when streaming: the callback needs the tokens on the host anyway
    grammar_ends: List[Optional[int]] = [None] * B

    def follow(tok: torch.Tensor, n: int) -> None:
        """Structured output: each row's grammar takes its new token; a row whose grammar ended is done. (The next
        step's mask is computed just before that step, so none is computed after the last.)"""
        for b in grammar.advance(tok.tolist()):
            grammar_ends[b] = n
            done[b] = True

    def emit(tok: torch.Tensor) -> None:
        for b, t in enumerate(tok.tolist()):
            if host_done[b]:
                continue
            if t in stop_set:
                host_done[b] = True
            else:
                on_token(b, t)
                host_done[b] = strings.ends[b] is not None or grammar_ends[b] is not None

    _sync(device)
    t0 = time.perf_counter()
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    if grammar is not None:
        penalty.allowed = grammar.allowed(device)
    tok = prefill(model, idx, pad, valid, prefix, sampling, next_noise(), penalty)
    out[:, 0] = tok
    if penalty is not None:
        penalty.add(tok)
    done = torch.isin(tok, stop)
    if grammar is not None:
        follow(tok, 1)
    if on_token is not None:
        strings.check(out, 1, done)
        emit(tok)
    _sync(device)
    t1 = time.perf_counter()

    input_pos = torch.tensor([T], device=device)
    n, first_step_s = 1, 0.0
    for i in range(1, max_new_tokens):
        if on_token is not None:
            if all(host_done):
                break
        elif (stop_set or strings or grammar) and i % check_every == 0:  # nothing to stop at: never done, never sync
            strings.check(out, i, done)
            if bool(done.all()):
                break
        if grammar is not None:
            penalty.allowed = grammar.allowed(device)
        tok = decode(model, tok.view(B, 1), input_pos, pad, valid, prefix, sampling, next_noise(), penalty)
        if compiled:
            tok = tok.clone()  # a CUDA-graph output is overwritten by the next replay
            if i == 1:  # timed apart: its first call compiles it (one sync per call)
                _sync(device)
                first_step_s = time.perf_counter() - t1
        out[:, i] = tok
        if penalty is not None:
            penalty.add(tok)
        done |= torch.isin(tok, stop)
        input_pos += 1
        n = i + 1
        if grammar is not None:
            follow(tok, n)
        if on_token is not None:
            strings.check(out, n, done)
            emit(tok)
    strings.check(out, n, done)
    _sync(device)
    t2 = time.perf_counter()

    results = []
    for row, string_end, grammar_end in zip(out[:, :n].cpu(), strings.ends, grammar_ends):
        ids = row.tolist()
        end = next((j for j, t in enumerate(ids) if t in stop_set), len(ids))
        results.append(row[:min(end, string_end or end, grammar_end or end)].clone())
    stats = GenerationStats(B, sum(lengths), sum(len(r) for r in results), n - 1, t1 - t0, t2 - t1, first_step_s,
                            compiled)
    return (results, stats) if return_stats else results
