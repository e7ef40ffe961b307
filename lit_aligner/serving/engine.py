"""Continuous batching of many Aligners on one loaded base: the scheduler behind `serve/aligner.py`.

One decode batch holds up to `max_batch` requests, each with its own Aligner (or none), sampling parameters, stop
tokens and strings and length. At every step boundary the scheduler retires finished and cancelled rows and admits
waiting requests (iteration-level batching, as in Orca and vLLM):

- Rows live in the first `n_active` slots of a static KV cache. The requests admitted at a step boundary are
  prefilled together into the next free slots (`model(..., cache_rows=slice(b, b + k))`), right-padded, in groups of
  at most `max_prefill_tokens` padded tokens (one forward instead of one per request: 32 SmolLM2 requests on a 2-core
  CPU took 4.7 s one by one, 2.7 s together, beside 5-6 s for their 30 decode steps); a row's pad slots lie past its
  length, where decoding writes before it attends. A prompt longer than `max_prefill_tokens` is prefilled in chunks
  of that many tokens, one chunk per step boundary, each attending to the row's slots so far (chunked prefill, as
  vLLM's and Sarathi's): the other rows keep decoding in between instead of waiting for the whole prompt. The decode
  step then runs the first n_active rows together, each at its own position (per-row `input_pos`). A finished row is
  replaced by the last active row (its cache copied up to its length), so the batch stays one contiguous slice and
  never attends over dead rows (a row still prefilling rides along with a pad token, its output dropped).
- Aligners of different N share one batch: every row's prefix keys and values sit in buffers of `max_tokens_per_row`
  slots, padded and masked (`PrefixKV.mask`). Grouping by N would split the batch (and the throughput) as soon as
  two sizes are served; padding costs attention over at most 10 prefix slots instead of N, nothing next to the
  prompt. Bare-base rows have a zero gate and a zero prefix slot (one unmasked slot, so no softmax row is empty).
  Rows whose Aligner starts at a later layer get zero gates below it.
- The prefix keys and values of an Aligner are projected once when it is loaded (`AlignerRegistry`), copied into a
  row's buffers on admission: a step costs the same whether the batch holds one Aligner or sixteen.
- Prefix caching (`prefix_cache_tokens`, as vLLM's automatic prefix caching): the keys and values of prefilled
  prompts are kept in blocks of 16 tokens (`PrefixCache`, least recently used evicted); a new row whose prompt starts
  with cached blocks under the same Aligner copies them into its slots and prefills only the rest, together with
  the other admitted rows, each from its own position. A shared system prompt or a chat's earlier turns are then
  computed once. Rows asking for their prompt's log-probabilities compute the whole prompt.
- A request may ask for its prompt's log-probabilities (`prompt_logprobs`, the completions API's `echo`): its row's
  prefill hidden states go through the output head at every position, in chunks; with `max_tokens` 0 it only scores
  the prompt and finishes at once (how lm-evaluation-harness scores continuations through an API).

The engine runs in its own thread (`start()`); callers submit `Request`s from any thread and receive its events
through the request's `emit` callback (the server forwards them into its event loop). Greedy rows are exactly what a
request served alone gets (same kernels, rows independent); sampled rows draw from their own seeded generator.
"""

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence, Set, Tuple

import torch

from lit_aligner.generation.engine import (Penalties, PenaltyState, Sampling, check_penalties, check_sampling,
                                           draw_noise, find_stop, sample)
from lit_aligner.generation.structured import Grammar, mask_logits
from lit_aligner.model import LLaMA, PrefixKV
from lit_aligner.serving.prefix_cache import PrefixCache

_SERIALS = itertools.count(1)


@dataclass
class ServedAligner:
    """An Aligner ready to serve: its prefix keys and values projected through every gated layer once.
    keys[j], values[j]: (n_kv, N, head_size) for layer start_layer + j; gate: (n_layer - start_layer, n_head)."""

    name: str
    start_layer: int
    n_tokens: int
    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    gate: torch.Tensor
    metadata: dict = field(default_factory=dict)
    # the prefix cache's key: a reloaded or changed file is projected anew and so shares no cached keys and values
    serial: int = field(default_factory=lambda: next(_SERIALS))

    @classmethod
    @torch.no_grad()
    def project(cls, model: LLaMA, name: str, aligner, metadata: Optional[dict] = None) -> "ServedAligner":
        pkv = model.prefix_kv(aligner)
        return cls(name, pkv.start_layer, aligner.n_tokens, [k[0] for k in pkv.keys], [v[0] for v in pkv.values],
                   pkv.gate[0], dict(metadata or {}))


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (the logits before temperature and top-p, as vLLM's default), and
    the k most likely tokens at its position with theirs, most likely first. `logprob` is None for a prompt's first
    token, which nothing predicts."""

    token: int
    logprob: Optional[float]
    top: List[Tuple[int, float]]


@dataclass
class Event:
    """What the engine tells a request: `text` (a new piece of the answer, possibly ""), and at the end `finish` ("stop"
    or "length"; "error" with `error`) with the token counts. `logprobs`: the tokens generated since the last event,
    when the request asked for them (an end token that stopped the answer has none: it is not part of the text; a stop
    string's tokens keep theirs though the text is cut before it). `prompt_logprobs`: every prompt token's entry, in
    an event of its own before any text, when the request asked for them."""

    text: str = ""
    finish: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    logprobs: List[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[List[TokenLogprob]] = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass
class Request:
    prompt_ids: Sequence[int]
    max_tokens: int
    emit: Callable[[Event], None]
    aligner: Optional[ServedAligner] = None
    sampling: Sampling = Sampling()
    penalties: Penalties = Penalties()  # presence / frequency / repetition penalties, logit bias (before sampling)
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    stop_ids: Set[int] = field(default_factory=set)
    min_tokens: int = 0  # vLLM's: no stop id or stop string ends the answer before this many tokens
    logprobs: Optional[int] = None  # each token's log-probability and the k most likely (None: off)
    grammar: Optional[Grammar] = None  # structured output (`structured.compile_grammar`; None: free text)
    prompt_logprobs: Optional[int] = None  # the same for every prompt token (None: off); max_tokens may then be 0
    arrival: float = field(default_factory=time.monotonic)  # when it was made (latency metrics)
    cancelled: bool = False  # set from any thread: the row is freed at the next step boundary

    def cancel(self) -> None:
        self.cancelled = True


SPAN_STEP = 64  # decode attends over the first ceil((longest row + 1) / 64) * 64 cache slots
PROMPT_LOGITS_CHUNK = 512  # prompt positions put through the output head at once (a 32k vocabulary: 64 MiB of fp32)


class QueueFull(Exception):
    """The waiting queue is at its bound (the server answers 429)."""


class _Row:
    """The decoding state of one admitted request."""

    def __init__(self, req: Request, tokenizer, device: torch.device, vocab: int):
        self.req = req
        self.length = len(req.prompt_ids)  # tokens in the cache (the next token is written at this slot)
        self.cached = 0  # prompt tokens copied from the prefix cache (prefill starts after them)
        self.prefilling = False  # a long prompt prefilled in chunks: not decoded until its last chunk
        self.prompt_entries: List[TokenLogprob] = []  # its prompt's log-probabilities so far (prompt_logprobs)
        self.generated = 0
        self.decoder = tokenizer.stream_decoder()
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` already emitted
        self.generator = None
        if req.sampling.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(req.seed if req.seed is not None else int(torch.randint(2**62, ()).item()))
        self.hold = max((len(s) for s in req.stop), default=1) - 1  # a stop string may still be completing
        self.last = -1  # the token to feed next
        self.final: Optional[Event] = None  # a finished row's last event, sent once it has left the batch
        self.logprobs: List[TokenLogprob] = []  # not yet emitted
        self.penalty = PenaltyState.start(req.penalties, [list(req.prompt_ids)], vocab, device)  # None: no penalty
        self.constraint = req.grammar.constraint() if req.grammar is not None else None

    @property
    def finished(self) -> bool:
        return self.final is not None

    def take_logprobs(self) -> List[TokenLogprob]:
        taken, self.logprobs = self.logprobs, []
        return taken


class Engine:
    """The scheduler and decode loop (see the module docstring). `max_seq_length`: the KV cache length per row
    (prompt + completion); `max_batch`: rows decoded together; `max_queue`: requests waiting beyond those (QueueFull
    past it); `max_prefill_tokens`: padded prompt tokens prefilled in one forward (a longer prompt: in chunks);
    `prefix_cache_tokens`: prompt tokens whose keys and values the prefix cache keeps (0: no cache)."""

    def __init__(self, model: LLaMA, tokenizer, *, max_batch: int = 16, max_seq_length: Optional[int] = None,
                 max_queue: int = 64, max_prefix_tokens: int = 10, max_prefill_tokens: int = 2048,
                 prefix_cache_tokens: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        cfg = model.config
        self.max_seq_length = min(max_seq_length or cfg.block_size, cfg.block_size)
        p = model.tok_embeddings.weight
        self.device, self.dtype = p.device, p.dtype
        model.setup_caches(max_batch, self.max_seq_length)
        self.n_layer = cfg.n_layer
        self._alloc_prefix(max_prefix_tokens)
        self.rows: List[_Row] = []
        self.waiting: Deque[Request] = deque()
        self.lock = threading.Condition()
        self.thread: Optional[threading.Thread] = None
        self.running = False
        self.steps = 0

    # --- prefix buffers -----------------------------------------------------------------------------------------------

    def _alloc_prefix(self, n: int) -> None:
        cfg, B = self.model.config, self.max_batch
        shape = (B, cfg.n_query_groups, n, cfg.head_size)
        self.pkeys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layer)]
        self.pvalues = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layer)]
        self.pgate = torch.zeros(B, self.n_layer, cfg.n_head, device=self.device, dtype=self.dtype)
        self.pmask = torch.zeros(B, n, dtype=torch.bool, device=self.device)
        self.pmask[:, 0] = True
        self.pstart = [self.n_layer] * B  # first gated layer of each row (n_layer: bare base)

    def _grow_prefix(self, n: int) -> None:
        """Make room for an Aligner with more tokens than the buffers hold (rows already active keep theirs)."""
        old_k, old_v, old_m, old_n = self.pkeys, self.pvalues, self.pmask, self.pmask.shape[1]
        gate, start = self.pgate, self.pstart
        self._alloc_prefix(n)
        for layer in range(self.n_layer):
            self.pkeys[layer][:, :, :old_n] = old_k[layer]
            self.pvalues[layer][:, :, :old_n] = old_v[layer]
        self.pmask[:, :old_n] = old_m
        self.pgate, self.pstart = gate, start

    def _set_prefix(self, b: int, a: Optional[ServedAligner]) -> None:
        self.pgate[b].zero_()
        self.pmask[b].zero_()
        self.pmask[b, 0] = True
        if a is None:  # slot 0 stays unmasked: its stale keys and values are finite and gated by zero
            self.pstart[b] = self.n_layer
            return
        if a.n_tokens > self.pmask.shape[1]:
            self._grow_prefix(a.n_tokens)
        for j, layer in enumerate(range(a.start_layer, self.n_layer)):
            self.pkeys[layer][b, :, :a.n_tokens] = a.keys[j]
            self.pvalues[layer][b, :, :a.n_tokens] = a.values[j]
        self.pgate[b, a.start_layer:] = a.gate
        self.pmask[b, :a.n_tokens] = True
        self.pstart[b] = a.start_layer

    def _move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's KV cache (its first `length` slots) and prefix into row dst."""
        for block in self.model.layers:
            c = block.attn.kv_cache
            c.k[dst, :, :length] = c.k[src, :, :length]
            c.v[dst, :, :length] = c.v[src, :, :length]
        for layer in range(self.n_layer):
            self.pkeys[layer][dst] = self.pkeys[layer][src]
            self.pvalues[layer][dst] = self.pvalues[layer][src]
        self.pgate[dst], self.pmask[dst] = self.pgate[src], self.pmask[src]
        self.pstart[dst] = self.pstart[src]

    def _prefix(self, rows: slice) -> Optional[PrefixKV]:
        """The PrefixKV of the rows `rows`: None when every one is bare; the mask is dropped when no slot is padding
        (the unmasked kernel is faster)."""
        start = min(self.pstart[rows])
        if start >= self.n_layer:
            return None
        mask = self.pmask[rows]
        width = int(mask.sum(dim=1).max())  # no row uses slots past the widest Aligner
        mask = mask[:, :width]
        return PrefixKV(start, [k[rows, :, :width] for k in self.pkeys[start:]],
                        [v[rows, :, :width] for v in self.pvalues[start:]], self.pgate[rows, start:],
                        None if bool(mask.all()) else mask)

    # --- requests -----------------------------------------------------------------------------------------------------

    def check(self, req: Request) -> None:
        """ValueError for a request that can never run (the server answers 400)."""
        s = req.sampling
        check_sampling(s.temperature, s.top_k, s.top_p, s.min_p)
        check_penalties(req.penalties, self.model.lm_head_weight.shape[0])
        n = len(req.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if req.max_tokens < (0 if req.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be >= 1 (0 only to score the prompt), got {req.max_tokens}")
        if n >= self.max_seq_length:
            raise ValueError(f"the prompt has {n} tokens; this server's context is {self.max_seq_length} tokens "
                             f"(prompt + completion): shorten the prompt")

    def submit(self, req: Request) -> None:
        """Queue a request (any thread). ValueError for a bad request, QueueFull when the queue is at its bound."""
        self.check(req)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue}); "
                                f"retry later")
            self.waiting.append(req)
            self.lock.notify()

    @property
    def load(self) -> dict:
        return {"active": len(self.rows), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "max_queue": self.max_queue, "steps": self.steps,
                "prefix_cache_tokens": self.cache.tokens if self.cache is not None else 0}

    # --- the loop -----------------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="lit-aligner-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self.lock:
                while self.running and not self.rows and not self.waiting:
                    self.lock.wait()
                if not self.running:
                    break
                admit = []
                while self.waiting and len(self.rows) + len(admit) < self.max_batch:
                    admit.append(self.waiting.popleft())
            try:
                self.step(admit)
            except Exception as e:  # a bug must not hang every client: fail the requests in flight, keep serving
                in_flight = [r.req for r in self.rows]
                for row in self.rows:  # a row that had finished still gets its own end
                    row.req.emit(row.final or Event(finish="error", error=f"{type(e).__name__}: {e}"))
                for req in [r for r in admit if not any(r is q for q in in_flight)]:
                    req.emit(Event(finish="error", error=f"{type(e).__name__}: {e}"))
                self.rows = []
        for row in self.rows:
            row.req.emit(row.final or Event(finish="error", error="the server is shutting down"))
        for req in self.waiting:
            req.emit(Event(finish="error", error="the server is shutting down"))

    @torch.no_grad()
    def step(self, admit: Sequence[Request] = ()) -> None:
        """One step boundary: retire cancelled rows, prefill the admitted requests (each emits its first token), then
        one decode step over every active row. Public so that tests and benchmarks can drive the engine without the
        thread."""
        self._retire(lambda r: r.req.cancelled)
        group: List[_Row] = []
        for req in admit:
            if req.cancelled:
                continue
            row = _Row(req, self.tokenizer, self.device, self.model.lm_head_weight.shape[0])
            self._reuse_prefix(len(self.rows), row)
            todo = row.length - row.cached
            longest = max([todo] + [r.length - r.cached for r in group])
            if group and (todo > self.max_prefill_tokens or (len(group) + 1) * longest > self.max_prefill_tokens):
                self._prefill(group)
                group = []
            self._set_prefix(len(self.rows), req.aligner)
            self.rows.append(row)
            if todo > self.max_prefill_tokens:  # chunked, from the next step on
                row.length, row.prefilling = row.cached, True
            else:
                group.append(row)
        if group:
            self._prefill(group)
        chunked = next((r for r in self.rows if r.prefilling and not r.req.cancelled), None)
        if chunked is not None:  # one chunk per step boundary: the other rows keep decoding in between
            self._prefill_chunk(chunked)
        self._retire(lambda r: r.req.cancelled or r.finished)
        if all(r.prefilling for r in self.rows):  # nothing to decode (or no rows at all)
            return
        n = len(self.rows)
        rows = slice(0, n)
        # A row still prefilling rides along (the batch is one contiguous slice): it is fed a pad token whose key and
        # value its next chunk overwrites, and its output is dropped.
        token = torch.tensor([[0 if r.prefilling else r.last] for r in self.rows], device=self.device)
        pos = torch.tensor([[r.length] for r in self.rows], device=self.device)
        # Attend over the slots up to the longest row only (rounded up, so few shapes): not the whole cache.
        span = min(-(-(max(r.length for r in self.rows) + 1) // SPAN_STEP) * SPAN_STEP, self.max_seq_length)
        mask = (torch.arange(span, device=self.device)[None, :] <= pos)[:, None, None, :]  # (n, 1, 1, span)
        logits = self.model(token, input_pos=pos, aligner=self._prefix(rows) or False, mask=mask,
                            positions=pos, cache_rows=rows)[:, -1]
        live = [i for i, r in enumerate(self.rows) if not r.prefilling]
        decoded = [self.rows[i] for i in live]
        for r in decoded:
            r.length += 1
        if len(live) < n:
            logits = logits[torch.tensor(live, device=self.device)]
        self._accept(self._sample(logits, decoded), decoded)
        self._retire(lambda r: r.req.cancelled or r.finished)
        self.steps += 1

    def _cache_key(self, r: _Row) -> int:
        return r.req.aligner.serial if r.req.aligner is not None else 0  # 0: the bare base

    def _reuse_prefix(self, b: int, r: _Row) -> None:
        """Copy the longest cached prefix of row r's prompt into cache row b (not for a row that scores its prompt)."""
        if self.cache is None or r.req.prompt_logprobs is not None:
            return
        n, kv = self.cache.lookup(self._cache_key(r), r.req.prompt_ids)
        if n:
            for layer, block in enumerate(self.model.layers):
                c = block.attn.kv_cache
                c.k[b, :, :n] = kv[layer, 0]
                c.v[b, :, :n] = kv[layer, 1]
            r.cached = n

    def _remember(self, b: int, r: _Row) -> None:
        """Keep row r's prefilled prompt (cache row b) in the prefix cache."""
        if self.cache is None:
            return
        caches = [block.attn.kv_cache for block in self.model.layers]
        self.cache.insert(self._cache_key(r), r.req.prompt_ids,
                          lambda s, e: torch.stack([torch.stack((c.k[b, :, s:e], c.v[b, :, s:e])) for c in caches]))

    def _prefill(self, group: List[_Row]) -> None:
        """Prefill `group`, the newest len(group) rows (consecutive cache slots), in one right-padded forward; a row
        with a cached prefix from its first uncached token on, at its own positions."""
        b, k = len(self.rows) - len(group), len(group)
        todo = torch.tensor([r.length - r.cached for r in group], device=self.device)
        T = int(todo.max())
        ids = torch.zeros(k, T, dtype=torch.long)  # pad id 0: past each row's length, unread
        for i, r in enumerate(group):
            ids[i, :r.length - r.cached] = torch.tensor(list(r.req.prompt_ids[r.cached:]), dtype=torch.long)
        ids = ids.to(self.device)  # one copy to the device
        t = torch.arange(T, device=self.device)
        if not any(r.cached for r in group):
            pos, mask = t, torch.ones(T, T, dtype=torch.bool, device=self.device).tril()[None, None]  # prompts' slots
        else:  # pads past a row's length may reach past the cache: they write (unread) into its last slot
            pos = (torch.tensor([r.cached for r in group], device=self.device)[:, None] + t).clamp(
                max=self.max_seq_length - 1)  # (k, T)
            mask = (torch.arange(int(pos.max()) + 1, device=self.device) <= pos[:, :, None])[:, None]  # (k, 1, T, S)
        hidden = self.model(ids, input_pos=pos, mask=mask, aligner=self._prefix(slice(b, b + k)) or False,
                            cache_rows=slice(b, b + k), return_hidden=True)
        for i, r in enumerate(group):
            if r.req.prompt_logprobs is not None:  # never cached
                r.prompt_entries = self._prompt_logprobs(r.req, hidden[i, :r.length - 1], 0)
            self._remember(b + i, r)
        self._first_tokens(group, hidden[torch.arange(k, device=self.device), todo - 1])

    def _prefill_chunk(self, r: _Row) -> None:
        """The next `max_prefill_tokens` of a long prompt's row, attending to its slots so far; after the last chunk
        the row samples its first token and joins the decoding rows."""
        b, prompt = self.rows.index(r), r.req.prompt_ids
        s, e = r.length, min(r.length + self.max_prefill_tokens, len(prompt))
        pos = torch.arange(s, e, device=self.device)
        mask = (torch.arange(e, device=self.device)[None, :] <= pos[:, None])[None, None]  # (1, 1, e - s, e)
        hidden = self.model(torch.tensor([list(prompt[s:e])], device=self.device), input_pos=pos, mask=mask,
                            aligner=self._prefix(slice(b, b + 1)) or False, cache_rows=slice(b, b + 1),
                            return_hidden=True)[0]
        if r.req.prompt_logprobs is not None:  # positions up to len - 2 predict prompt tokens
            r.prompt_entries += self._prompt_logprobs(r.req, hidden[:min(e, len(prompt) - 1) - s], s)
        r.length = e
        if e == len(prompt):
            r.prefilling = False
            self._remember(b, r)
            self._first_tokens([r], hidden[-1:])

    def _first_tokens(self, rows: List[_Row], last: torch.Tensor) -> None:
        """Prefilled rows (last: each one's hidden state at its last prompt token): send the prompt's log-probabilities
        when asked, finish the rows that only score their prompt, sample the others' first token."""
        for r in rows:
            if r.req.prompt_logprobs is not None:
                r.req.emit(Event(prompt_logprobs=r.prompt_entries))
            if r.req.max_tokens == 0:  # the prompt scored, nothing to generate
                self._finish(r, "length")
        live = [i for i, r in enumerate(rows) if r.req.max_tokens > 0]
        if live:
            logits = torch.nn.functional.linear(last[torch.tensor(live, device=self.device)], self.model.lm_head_weight)
            self._accept(self._sample(logits, [rows[i] for i in live]), [rows[i] for i in live])

    def _prompt_logprobs(self, req: Request, hidden: torch.Tensor, start: int) -> List[TokenLogprob]:
        """The log-probabilities of prompt tokens start + 1 .. start + len(hidden) (and the `req.prompt_logprobs` most
        likely at each position) from the prefill's hidden states at positions start.., with the first token's empty
        entry when start is 0."""
        ids = torch.tensor(list(req.prompt_ids[start + 1:start + 1 + len(hidden)]), dtype=torch.long,
                           device=self.device)
        out = [TokenLogprob(int(req.prompt_ids[0]), None, [])] if start == 0 else []
        k = req.prompt_logprobs
        for s in range(0, len(ids), PROMPT_LOGITS_CHUNK):
            lp = torch.log_softmax(torch.nn.functional.linear(hidden[s:s + PROMPT_LOGITS_CHUNK],
                                                              self.model.lm_head_weight).float(), dim=-1)
            part = ids[s:s + PROMPT_LOGITS_CHUNK]
            chosen = lp.gather(1, part[:, None])[:, 0].tolist()
            top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
            for t, c, tv, ti in zip(part.tolist(), chosen, top_v.tolist(), top_i.tolist()):
                out.append(TokenLogprob(t, c, list(zip(ti, tv))))
        return out

    def _sample(self, raw: torch.Tensor, rows: Optional[List[_Row]] = None) -> List[int]:
        """The next token of each row, from its processed logits (penalties, logit bias); log-probabilities of the
        raw ones."""
        rows = rows if rows is not None else self.rows
        logits = raw
        # min_tokens holds the end tokens off (not in a structured output, which ends where its grammar does)
        early = [i for i, r in enumerate(rows) if r.generated < r.req.min_tokens and r.req.stop_ids
                 and r.constraint is None]
        if early or any(r.penalty is not None for r in rows):
            logits = raw.float().clone()  # raw stays raw (float() of fp32 is no copy)
            for i, r in enumerate(rows):
                if r.penalty is not None:
                    logits[i] = r.penalty.apply(raw[i:i + 1])[0]
            for i in early:
                logits[i, sorted(rows[i].req.stop_ids)] = float("-inf")
        logits = mask_logits(logits, [r.constraint for r in rows])  # structured outputs: only the grammar's tokens
        out = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            s = r.req.sampling
            if s.temperature > 0:
                noise = draw_noise(1, logits.shape[-1], self.device, r.generator)
                out[i] = int(sample(logits[i:i + 1], s.temperature, s.top_k, s.top_p, noise, s.min_p))
        want = [i for i, r in enumerate(rows) if r.req.logprobs is not None]
        if want:  # one log-softmax and top-k over the rows that asked
            lp = torch.log_softmax(raw[want].float(), dim=-1)
            chosen = lp.gather(1, torch.tensor([[out[i]] for i in want], device=lp.device))[:, 0].tolist()
            top_v, top_i = lp.topk(max(rows[i].req.logprobs for i in want), dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for j, i in enumerate(want):
                k = rows[i].req.logprobs
                rows[i].logprobs.append(TokenLogprob(out[i], chosen[j], list(zip(top_i[j][:k], top_v[j][:k]))))
        return out

    def _accept(self, tokens: List[int], rows: Optional[List[_Row]] = None) -> None:
        """Add one sampled token to each row: stream its text, detect stop ids, stop strings and the length limit."""
        for r, t in zip(rows if rows is not None else self.rows, tokens):
            r.last = t
            r.generated += 1
            if r.penalty is not None:
                r.penalty.add(t)
            req = r.req
            if r.constraint is not None and not r.constraint.advance(t):  # masked, so only a grammar engine's fault
                r.final = Event(text=r.text[r.sent:], finish="error", error=f"structured output: {r.constraint.error}")
                continue
            if t in req.stop_ids:
                if req.logprobs is not None:
                    r.logprobs.pop()  # the end token is not part of the answer
                self._finish(r, "stop")
                continue
            r.text += r.decoder.step(t)
            cut = find_stop(r.text, req.stop, r.sent - r.hold) if r.generated >= req.min_tokens else None
            grammar_ended = r.constraint is not None and r.constraint.done
            if cut is not None:
                r.text = r.text[:cut]
                self._finish(r, "stop")
            elif r.generated >= req.max_tokens or r.length >= self.max_seq_length or grammar_ended:
                r.text += r.decoder.flush()
                cut = find_stop(r.text, req.stop, r.sent - r.hold)
                if cut is not None:
                    r.text = r.text[:cut]
                self._finish(r, "stop" if cut is not None or grammar_ended else "length")
            else:
                keep = len(r.text) - r.hold
                if keep > r.sent:  # with the tokens since the last piece (held text holds theirs too)
                    req.emit(Event(text=r.text[r.sent:keep], logprobs=r.take_logprobs()))
                    r.sent = keep

    def _finish(self, r: _Row, reason: str) -> None:
        # Sent by _retire, after the row has left the batch: a client that has its answer's end never finds its
        # request still counted as running (/metrics, /health's load).
        r.final = Event(text=r.text[r.sent:], finish=reason, prompt_tokens=len(r.req.prompt_ids),
                        completion_tokens=r.generated, logprobs=r.take_logprobs(), cached_tokens=r.cached)
        r.sent = len(r.text)

    def _retire(self, done: Callable[[_Row], bool]) -> None:
        b, ended = 0, []
        while b < len(self.rows):
            if done(self.rows[b]):
                ended.append(self.rows[b])
                last = len(self.rows) - 1
                if b != last:
                    self._move_row(last, b, self.rows[last].length)
                self.rows[b] = self.rows[last]
                self.rows.pop()
            else:
                b += 1
        for r in ended:
            if r.final is not None:
                r.req.emit(r.final)

