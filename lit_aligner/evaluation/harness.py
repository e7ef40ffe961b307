"""lm-evaluation-harness on a base model with Aligners: `AlignerLM`, an `lm_eval` LM (registered as "lit-aligner").

One loaded base serves every Aligner being evaluated: each batch mixes rows of different Aligners (a stacked Aligner,
one per row; the bare base is a row with zero gates), so scoring K Aligners costs one pass over the requests with K
rows each, not K passes. `AlignerLM` computes the answers of every Aligner the first time a request is seen and
caches them; `view(name)` is the LM that lm_eval sees for one of them.

- loglikelihood: log P(continuation | context), and whether the continuation is the greedy one, token for token;
  context and continuation are encoded together (a space at the end of the context moves to the continuation, as
  the harness's Hugging Face model does) and cut from the left to the model's length.
- loglikelihood_rolling: the summed log-likelihood of a whole text, in windows of max_length tokens.
- generate_until: greedy (or sampled, from gen_kwargs) generation, stopped at the `until` strings (a row stops
  decoding once its text holds one) and max_gen_toks, batched through `lit_aligner.generation.generate` with an
  Aligner per row. gen_kwargs are read as the harness's Hugging Face model reads them: sampling only with do_sample
  (temperature, top_k, top_p, min_p), the repetition, presence and frequency penalties either way; other keys
  (num_beams, ...) are ignored with a warning.
- reasoning (`reasoning_parser=think` in lm_eval's --model_args): a thinking model's generation is read past its
  think block (`lit_aligner.reasoning`) and the `until` strings cut the answer after it.
- apply_chat_template / tokenizer_name / chat_template: lm_eval's --apply_chat_template, through the tokenizer's own
  chat template (the prompt format of an Aligner trained with the default `chat` template).

    python evaluate/aligner.py harness --tasks arc_easy hellaswag --aligners out/aligner/X/aligner.safetensors

From Python, `lm_eval.simple_evaluate(model="lit-aligner", model_args="checkpoint_dir=...,aligner=...")` works once
this module is imported (it registers the name).
"""

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lit_aligner.generation.engine import Penalties, check_penalties, check_sampling, cut_at_stop
from lit_aligner.model import Aligner, LLaMA, stack_aligners
from lit_aligner.prompts import encode_prompt
from lit_aligner.reasoning import opens_thinking, split_reasoning

try:
    import lm_eval.models  # noqa: F401  lm_eval lists its own models only into an empty registry: fill it before ours
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the `eval` extra is not installed: the module still imports, the LM cannot be used
    LM = object

    def register_model(*names):
        return lambda cls: cls

BASE = "base"


def _shape(aligner: Optional[Aligner]):
    return None if aligner is None else (aligner.n_tokens, aligner.start_layer)


class _Cache:
    def __init__(self):
        self.values: Dict[Tuple[str, str, Any], Any] = {}
        self.ignored: set = set()  # gen_kwargs keys already warned about


# The gen_kwargs generate_until reads; max_gen_toks and until are lm_eval's own.
_DECODING_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty"}


def decoding(kwargs: Dict[str, Any]) -> Tuple[float, Optional[int], Optional[float], Optional[float], Penalties]:
    """(temperature, top_k, top_p, min_p, penalties) of a request's gen_kwargs, read as lm_eval's Hugging Face model
    reads them: sampled only with do_sample and a temperature > 0 (else greedy, and the sampling filters do not
    matter); penalties apply either way. ValueError naming the key for a value out of range."""
    try:
        return _decoding(kwargs)
    except TypeError as e:
        raise ValueError(str(e)) from None


def _decoding(kwargs: Dict[str, Any]) -> Tuple[float, Optional[int], Optional[float], Optional[float], Penalties]:
    penalties = Penalties(float(kwargs.get("presence_penalty", 0.0)), float(kwargs.get("frequency_penalty", 0.0)),
                          float(kwargs.get("repetition_penalty", 1.0)))
    check_penalties(penalties)
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
    if temperature == 0:
        return 0.0, None, None, None, penalties
    top_k, top_p, min_p = kwargs.get("top_k"), kwargs.get("top_p"), kwargs.get("min_p")
    top_k, top_p, min_p = (None if top_k is None else int(top_k), None if top_p is None else float(top_p),
                           None if min_p is None else float(min_p))
    check_sampling(temperature, top_k, top_p, min_p)
    return temperature, top_k, top_p, min_p, penalties


@register_model("lit-aligner")
class AlignerLM(LM):
    """An lm_eval LM over one loaded base and several named Aligners (None: the bare base). `view(name)` gives the LM
    for one of them; they share the answers computed so far."""

    def __init__(self, model: Optional[LLaMA] = None, tokenizer=None, aligners: Optional[Dict[str, Any]] = None,
                 batch_size: int = 8, max_length: Optional[int] = None, max_gen_toks: int = 256,
                 active: Optional[str] = None, _cache: Optional[_Cache] = None, reasoning: bool = False,
                 **kwargs: Any):
        if LM is object:
            raise ImportError("lm_eval is not installed: pip install -e '.[eval]'")
        super().__init__()
        if model is None:  # built by lm_eval from --model_args checkpoint_dir=...,aligner=...,device=...
            model, tokenizer, aligners = _from_args(**kwargs)
            reasoning = kwargs.get("reasoning_parser", "none") != "none"
        # a thinking model's answers: the think block is read off (`lit_aligner.reasoning`) and `until` cuts the answer
        # after it, as lm_eval's think_end_token does for transformers models
        self.reasoning = reasoning
        self.model, self.tok = model, tokenizer
        self.aligners = dict(aligners or {BASE: None})
        self.rows_per_batch = max(1, int(batch_size))
        self.max_length = int(max_length or model.config.block_size)
        self.max_gen_toks = int(max_gen_toks)
        self.active = active or next(iter(self.aligners))
        self.cache = _cache or _Cache()
        self._device = model.tok_embeddings.weight.device

    def view(self, name: str) -> "AlignerLM":
        if name not in self.aligners:
            raise KeyError(f"no Aligner named {name!r}; known: {', '.join(self.aligners)}")
        return AlignerLM(self.model, self.tok, self.aligners, self.rows_per_batch, self.max_length,
                         self.max_gen_toks, active=name, _cache=self.cache, reasoning=self.reasoning)

    # --- tokens -------------------------------------------------------------------------------------------------------

    def _encode(self, text: str, bos: Optional[bool] = None) -> List[int]:
        """Token ids; bos None: the tokenizer's own default, not doubled when a chat template wrote BOS (as training
        and generation encode prompts)."""
        if bos is None and self.tok.bos_id is not None:
            return encode_prompt(self.tok, text).tolist()
        return self.tok.encode(text, bos=bos if self.tok.bos_id is not None else False).tolist()

    # --- chat templates (lm_eval's --apply_chat_template) --------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        """What lm_eval's request cache keys chat-templated requests by."""
        return str(self.tok.checkpoint_dir)

    def chat_template(self, chat_template: Any = False) -> str:
        return (self.tok.chat_template or "") if chat_template else ""

    def apply_chat_template(self, chat_history: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of lm_eval's chat history, rendered by the tokenizer's chat template. Without a generation
        prompt the history ends with the start of the answer (a task's gen_prefix), which the text must end with
        (transformers' continue_final_message): the template's end-of-turn after it is cut off."""
        text = self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt or not chat_history or chat_history[-1].get("role") != "assistant":
            return text
        last = chat_history[-1]["content"].strip()
        return text[:text.rindex(last) + len(last)] if last in text else text

    @property
    def prefix_token(self) -> int:
        """What an empty context (or the first rolling window) is conditioned on: BOS, else the end-of-text token."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def _pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        if not context:
            return [self.prefix_token], self._encode(continuation, bos=False)
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    # --- scoring ------------------------------------------------------------------------------------------------------

    def _missing(self, kind: str, keys: Sequence[Any]) -> List[Any]:
        seen, out = set(), []
        for k in keys:
            if (self.active, kind, k) not in self.cache.values and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def _groups(self):
        """Names of the Aligners in batches that share a shape (the bare base joins the first group)."""
        groups: Dict[Any, List[str]] = {}
        first = next((_shape(a) for a in self.aligners.values() if a is not None), None)
        for name, a in self.aligners.items():
            groups.setdefault(_shape(a) or first, []).append(name)
        return list(groups.values())

    def _aligner_arg(self, names: Sequence[str]):
        rows = [self.aligners[n] for n in names]
        if all(a is None for a in rows):
            return False
        return stack_aligners(rows, self.model.config)

    @torch.no_grad()
    def _score(self, pairs: Sequence[Tuple[List[int], List[int]]], names: Sequence[str]) -> List[Tuple[float, bool]]:
        """(log-likelihood, is greedy) of each (context ids, continuation ids) row under Aligner names[i]."""
        rows = []
        for ctx, cont in pairs:
            ids = (ctx + cont)[-(self.max_length + 1):]  # cut from the left: the continuation is always scored
            rows.append((ids[:-1], min(len(cont), len(ids) - 1)))
        T = max(len(r[0]) for r in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        for b, (ids, _) in enumerate(rows):
            idx[b, :len(ids)] = torch.tensor(ids)
        # right padding: causal, exact. Logits only where a continuation is scored: (rows x context x vocab) floats
        # would be 16 GB for 64 rows of 2048 tokens with a 32k vocabulary.
        hidden = self.model(idx.to(self._device), aligner=self._aligner_arg(names), return_hidden=True)
        out = []
        for b, ((ids, n), (ctx, cont)) in enumerate(zip(rows, pairs)):
            L = len(ids)
            target = torch.tensor(cont[-n:], device=self._device)
            lp = F.log_softmax(F.linear(hidden[b, L - n:L], self.model.lm_head_weight).float(), dim=-1)
            out.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def _fill(self, kind: str, keys: List[Any], pairs_of) -> None:
        """Score every key for every Aligner in batches of rows (key, Aligner), longest first."""
        if not keys:
            return
        pairs = {k: pairs_of(k) for k in keys}
        order = sorted(keys, key=lambda k: -sum(len(x) for x in pairs[k]))
        for names in self._groups():
            jobs = [(k, n) for k in order for n in names]
            step = self.rows_per_batch * len(names)
            for s in range(0, len(jobs), step):
                chunk = jobs[s:s + step]
                scores = self._score([pairs[k] for k, _ in chunk], [n for _, n in chunk])
                for (k, n), v in zip(chunk, scores):
                    self.cache.values[(n, kind, k)] = v

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        keys = [tuple(r.args[:2]) for r in requests]
        self._fill("ll", self._missing("ll", keys), lambda k: self._pair(*k))
        return [self.cache.values[(self.active, "ll", k)] for k in keys]

    def loglikelihood_rolling(self, requests) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in requests:
            key = r.args[0]
            if (self.active, "rolling", key) not in self.cache.values:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self._encode(key, bos=False), prefix_token=self.prefix_token,
                    max_seq_len=self.max_length, context_len=1)]
                for names in self._groups():
                    total = {n: 0.0 for n in names}
                    for ctx, piece in windows:
                        for n, (lp, _) in zip(names, self._score([(list(ctx), list(piece))] * len(names), names)):
                            total[n] += lp
                    for n, v in total.items():
                        self.cache.values[(n, "rolling", key)] = v
            out.append(self.cache.values[(self.active, "rolling", key)])
        return out

    def _text(self, ids) -> str:
        return self.tok.decode(ids, skip_special=True)

    def generate_until(self, requests) -> List[str]:
        from lit_aligner.generation import generate
        from lit_aligner.perf import compile_flag, decode_steps_bound

        keys = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            keys.append((context, tuple(until), int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                         decoding(kwargs)))
            ignored = set(kwargs) - _DECODING_KEYS - self.cache.ignored
            if ignored:
                self.cache.ignored |= ignored
                warnings.warn(f"lm_eval gen_kwargs {', '.join(sorted(ignored))} are ignored: lit-aligner decodes "
                              f"greedily or by sampling (temperature, top_k, top_p, min_p, penalties)")
        missing = self._missing("gen", keys)
        groups = self._groups()
        # compiled on CUDA only when this call's answers are many enough to pay for it (a task of a few rows: eager)
        compile = compile_flag("auto", self._device, len(groups) * decode_steps_bound(
            len(missing), self.rows_per_batch, max((k[2] for k in missing), default=0)))
        for names in groups:
            jobs = [(k, n) for k in missing for n in names]
            # same length limit and decoding per batch; contexts of similar length together (less padding)
            jobs.sort(key=lambda j: (j[0][2], repr(j[0][3]), -len(j[0][0])))
            step = self.rows_per_batch * len(names)
            s = 0
            while s < len(jobs):
                chunk = [j for j in jobs[s:s + step] if j[0][2:] == jobs[s][0][2:]]
                s += len(chunk)
                (_, _, max_new, (temperature, top_k, top_p, min_p, penalties)) = chunk[0][0]
                prompts = []
                for (context, *_), _ in chunk:
                    ids = self._encode(context)[-(self.max_length - max_new):]
                    prompts.append(torch.tensor(ids, dtype=torch.long, device=self._device))
                outs = generate(self.model, prompts, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, penalties=penalties, stop_ids=self.tok.stop_ids,
                                stop_strings=[() if self.reasoning else key[1] for key, _ in chunk],
                                decode=self._text, aligners=[self.aligners[n] for _, n in chunk], compile=compile)
                for (key, n), ids in zip(chunk, outs):
                    text = self._text(ids)
                    if self.reasoning:  # (no stop string inside the reasoning: the stops apply to the answer)
                        text = split_reasoning(text, opens_thinking(key[0]))[1] or ""
                    self.cache.values[(n, "gen", key)] = cut_at_stop(text, key[1])
        self.model.clear_caches()
        return [self.cache.values[(self.active, "gen", k)] for k in keys]


def _from_args(checkpoint_dir: str, aligner: Optional[str] = None, device: str = "auto", dtype: str = "auto",
               quantize: str = "none", **_: Any):
    """What `lm_eval --model lit-aligner --model_args checkpoint_dir=...,aligner=...` builds."""
    from lit_aligner.aligner_files import load_aligner
    from lit_aligner.base import load_base

    model, tokenizer = load_base(checkpoint_dir, device, dtype, quantize)
    aligners = {BASE: None} if not aligner else {str(aligner): load_aligner(aligner, model)[0]}
    return model, tokenizer, aligners


def run_harness(lm: AlignerLM, tasks: Sequence[str], include_path: Optional[str] = None,
                num_fewshot: Optional[int] = None, limit: Optional[float] = None, seed: int = 1234,
                log_samples: bool = False, **options: Any) -> Dict[str, Any]:
    """lm_eval.simple_evaluate for every Aligner of `lm`: {name: {task: {metric: value}}} plus the task versions, the
    per-task sample counts and, with log_samples=True, every request's prompt and answer ("_logged"). `options`: more
    simple_evaluate arguments (apply_chat_template, fewshot_as_multiturn, system_instruction, gen_kwargs)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    results: Dict[str, Any] = {}
    for name in lm.aligners:
        out = lm_eval.simple_evaluate(model=lm.view(name), tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, bootstrap_iters=0,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, log_samples=log_samples, **options)
        results[name] = {task: {k: v for k, v in metrics.items() if k != "alias" and not isinstance(v, str)}
                         for task, metrics in out["results"].items()}
        results.setdefault("_samples", out.get("n-samples", {}))
        results.setdefault("_versions", out.get("versions", {}))
        if log_samples:
            results.setdefault("_logged", {})[name] = {task: [_logged(row) for row in rows]
                                                      for task, rows in out.get("samples", {}).items()}
    return results


def _logged(row: Dict[str, Any]) -> Dict[str, Any]:
    """One of lm_eval's logged samples, kept to what a reader checks: the document, the requests (context and
    continuation or generation settings), the answers after the task's filters and the sample's metrics."""
    keep = {k: row[k] for k in ("doc_id", "doc", "target", "arguments", "filtered_resps") if k in row}
    keep.update({m: float(row[m]) for m in row.get("metrics", []) if isinstance(row.get(m), (int, float))})
    return keep
