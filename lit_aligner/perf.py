"""Speed and memory levers for training and serving an Aligner on a frozen base, and the arithmetic behind them.

Levers (small functions the trainer and the benchmarks call; each leaves parameter names and results unchanged):
- `compile_blocks(model)`: `torch.compile` every `Block` in place (one compiled graph reused by all layers).
- `apply_activation_checkpointing(model, policy)`: `none`, `block` (keep only each gated block's input, recompute
  the block in backward), `selective` (recompute only the cheap elementwise parts that hold many bytes: both RMSNorms,
  whose fp32 copies are large, and the SwiGLU product; no matmul is recomputed) or `mlp` (selective, plus the MLP
  branch kept as its input only: recomputes the w1 and w3 matmuls).
- `configure_backends(device)`: TF32 matmuls and cuDNN autotuning on CUDA (no-op on the CPU).
- `model.prefix_kv(aligner)` (in model.py): project the prefix once per Aligner when serving.

Arithmetic: `train_flops_per_token` (model FLOPs of a step with a frozen base and a trainable prefix, for MFU),
`activation_bytes_per_token` (bytes autograd keeps for backward, measured by hooking what it saves), `loss_peak_bytes`
(what the plain vs chunked loss adds), `decode_bytes_per_token` (weights read per decoding step) and the peak-memory
probes `reset_peak_memory` / `peak_memory_bytes` (CUDA allocator or the process's peak RSS, see PEAK_MEMORY_METHOD).

Why a frozen base is cheap to train: the weights need no gradients, so every matmul's backward computes only the input
gradient (one matmul instead of two) and autograd does not save the matmul inputs at all (they are only needed for
weight gradients). Layers before `start_layer` see no trainable input, so they save nothing and run no backward.
"""

import inspect
import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lit_aligner.config import Config
from lit_aligner.model import LLaMA

POLICIES = ("none", "selective", "mlp", "block")
BLOCK_RECOMPILE_LIMIT = 64  # compile_blocks: room for every variant of the one compiled block forward

# ---------------------------------------------------------------------------------------------------------------------
# torch.compile


def compile_blocks(model: LLaMA, mode: Optional[str] = None, dynamic: Optional[bool] = None,
                   backend: str = "inductor") -> LLaMA:
    """Compile every transformer `Block` in place with `torch.compile` (`nn.Module.compile`, so parameter names and
    state dicts do not change). All blocks share one code object, so the graph is compiled once and reused (recompiles
    only for the layers with / without a prefix and for new shapes). mode: a `torch.compile` mode (None: the default;
    "max-autotune" tunes matmuls longer). backend: a `torch.compile` backend ("aot_eager" traces without generating
    code: a quick check that a model compiles). Works on the CPU (inductor C++) and on CUDA (triton). Apply after
    `apply_activation_checkpointing` so the checkpointed forward is what gets compiled; apply before wrapping the model
    with Fabric (`fabric.setup_module`), which leaves the blocks alone. Returns the model."""
    # One code object, so its variants share dynamo's per-function limit (8): with / without a prefix, an input that
    # needs grad or not (the layers before, at and after start_layer), grad mode (training, validation, generation),
    # each first static, then dynamic in the batch and sequence dims. A 6-step training run met 13; past the limit a
    # variant runs eager for good, so the limit is raised: for these blocks alone where torch.compile takes a limit
    # per call (torch >= 2.13), else dynamo's setting for the process (only ever raised).
    limit = {}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        limit["recompile_limit"] = BLOCK_RECOMPILE_LIMIT
    else:
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), BLOCK_RECOMPILE_LIMIT))
    for block in model.layers:
        block.compile(mode=mode, dynamic=dynamic, backend=backend, **limit)
    return model


# Compiling the decoding step (CUDA graphs) costs ~40 s per batch size on an H200, then decodes 5-11x faster at batch 1
# than eager: SmolLM2-135M shape 33.9 -> 389.5 tokens/s after 41.5 s of compiling, LLaMA-2-7B 32-43 -> 223 after ~45 s
# (benchmarks/results/gpu-session42-h200.log, generate-Llama-2-7b-hf-*-h200*.json). So it pays for itself after
# ~1,500 (135M) to ~1,700-2,400 (7B) decoding steps; fewer are quicker eager.
COMPILE_PAYS_AFTER_STEPS = 2048


def should_compile(device: torch.device, compile: Optional[bool] = None, decode_steps: Optional[int] = None) -> bool:
    """The default of the `--compile` flags: on for CUDA (where launch overhead and fusions pay) unless the run's
    `decode_steps` (when known: its batches x max new tokens) are too few for compiling to pay
    (`COMPILE_PAYS_AFTER_STEPS`); off on the CPU (where compiling costs more time than a short run saves)."""
    if compile is not None:
        return compile
    return torch.device(device).type == "cuda" and (decode_steps is None or decode_steps >= COMPILE_PAYS_AFTER_STEPS)


def compile_flag(flag: str, device: torch.device, decode_steps: Optional[int] = None) -> Optional[bool]:
    """The `compile` argument of `generate` for a CLI's `--compile auto|on|off`: auto is False where
    `should_compile` says compiling does not pay, else None (so `generate` still keeps a quantized base or a grammar
    eager)."""
    if flag != "auto":
        return flag == "on"
    return None if should_compile(device, None, decode_steps) else False


def decode_steps_bound(requests: int, batch_size: int, max_new_tokens: int) -> int:
    """About the decoding steps of `requests` answers of up to `max_new_tokens` in batches of `batch_size` (answers
    that stop early take fewer; Aligners of different shapes batch apart, which takes more)."""
    return -(-requests // batch_size) * max_new_tokens


def configure_backends(device: torch.device) -> None:
    """TF32 for fp32 matmuls and cuDNN autotuning on CUDA (fp32 runs ~3x faster on Ampere+, bf16 unaffected).
    A no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------------------------------------------------------
# Activation checkpointing

_ORIG = "_lit_aligner_eager_forward"  # where a wrapped module keeps its own forward


def _call_checkpointed(fn: Callable, *args):
    if not torch.is_grad_enabled():  # inference: nothing is saved, so there is nothing to recompute
        return fn(*args)
    _SavedCounter.note_inputs(args)
    # Non-reentrant: works with tuples of tensors (the prefix K/V), with inputs that do not require grad (the first
    # gated block) and under torch.compile.
    return checkpoint(fn, *args, use_reentrant=False)


def _wrap(module: nn.Module, forward: Callable) -> None:
    module.__dict__[_ORIG] = module.forward
    module.forward = forward  # an instance attribute: nn.Module.__call__ (and Module.compile) calls it


def _swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


def apply_activation_checkpointing(model: LLaMA, policy: str = "block", start_layer: Optional[int] = None) -> int:
    """Trade recomputation for activation memory in the gated blocks (layers >= start_layer; default: the model's
    Aligner's start_layer, else 0). Earlier layers keep nothing for backward anyway (no trainable input reaches them).

    Policies, with the bytes per token and gated layer that autograd keeps for the LLaMA-2-7B shape in bf16 (measured
    by `activation_bytes_per_token` at seq_len 512; see howto/performance.md) and what they recompute:
    "none"      ~154 KiB  nothing recomputed.
    "selective" ~116 KiB  only elementwise work, never a matmul: both RMSNorms (their fp32 intermediates, 2 x 16 KiB)
                          and silu(w1 x) * (w3 x) (one bf16 intermediate_size-wide tensor, 22 KiB).
    "mlp"       ~ 73 KiB  selective, and the MLP branch keeps only its input: ffn_norm, w1, w3 and SwiGLU are
                          recomputed (2 of the layer's 7 matmul units: ~+20% step time for a frozen base).
    "block"     ~  8 KiB  each gated block keeps its input x only and reruns its whole forward in backward (~+50%).
    Loss and gradients are identical to "none" (same kernels, same order). Under `compile_blocks` "none" already keeps
    what "selective" does (inductor's partitioner recomputes elementwise work itself: 118 KB per token and layer for
    both, same speed, on an H200), so there the choice is "none", "mlp" or "block". Call before `compile_blocks`;
    "none" undoes a previous policy. Returns the number of modules wrapped."""
    if policy not in POLICIES:
        raise ValueError(f"checkpointing policy must be one of {POLICIES}, got {policy!r}")
    for m in model.modules():  # idempotent: start from the eager forwards
        if _ORIG in m.__dict__:
            m.__dict__.pop(_ORIG)
            m.__dict__.pop("forward", None)
    if policy == "none":
        return 0
    if start_layer is None:
        start_layer = model.aligner.start_layer if model.aligner is not None else 0
    wrapped = 0
    for block in model.layers[start_layer:]:
        if policy == "block":
            _wrap(block, _checkpointed_forward(block.forward))
            wrapped += 1
            continue
        norm, mlp = block.ffn_norm, block.feed_forward
        _wrap(block.attention_norm, _checkpointed_forward(block.attention_norm.forward))
        if policy == "selective":
            _wrap(norm, _checkpointed_forward(norm.forward))
            _wrap(mlp, _selective_mlp_forward(mlp))
        else:
            # Block.forward computes feed_forward(ffn_norm(x)): make ffn_norm the identity and let feed_forward run
            # norm + MLP as one checkpointed function of x (no change to the model's code or parameter names).
            _wrap(norm, _identity)
            _wrap(mlp, _checkpointed_forward(_norm_then(norm.__dict__[_ORIG], mlp.forward)))
        wrapped += 3
    return wrapped


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _norm_then(norm_forward: Callable, mlp_forward: Callable) -> Callable:
    # A function per layer (a lambda in the loop would see only the last layer's modules).
    def run(x):
        return mlp_forward(norm_forward(x))

    return run


def _checkpointed_forward(forward: Callable) -> Callable:
    def run(*args):
        return _call_checkpointed(forward, *args)

    return run


def _selective_mlp_forward(mlp: nn.Module) -> Callable:
    def run(x):
        # The matmul inputs are not saved (frozen weights); silu's input a and the product's inputs silu(a), b would be:
        # keep a and b only, recompute silu(a) * b in backward (elementwise, ~free).
        return mlp.w2(_call_checkpointed(_swiglu, mlp.w1(x), mlp.w3(x)))

    return run


def checkpointing_policy(model: LLaMA) -> str:
    """The policy currently applied to `model` ("none", "selective", "mlp" or "block")."""
    for block in model.layers:
        if _ORIG in block.__dict__:
            return "block"
        if _ORIG in block.ffn_norm.__dict__ and block.ffn_norm.forward is _identity:
            return "mlp"
        if _ORIG in block.feed_forward.__dict__:
            return "selective"
    return "none"


# ---------------------------------------------------------------------------------------------------------------------
# Measuring what autograd keeps


class _SavedCounter:
    """Counts distinct storages saved for backward (and checkpoint inputs, which a checkpoint keeps alive itself),
    skipping the model's parameters and buffers (they are resident anyway)."""

    active: Optional["_SavedCounter"] = None

    def __init__(self, exclude: Set[int]):
        self.exclude = exclude
        self.storages: Dict[int, torch.UntypedStorage] = {}

    # Never traced: it reads storage addresses, on which a compiled block would guard and recompile for every tensor
    # (80 recompiles in three measurements of a 4-layer model). Only a measurement calls it, so only there does it cost
    # a graph break.
    @torch.compiler.disable
    def add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        s = t.untyped_storage()
        if s.data_ptr() not in self.exclude and s.data_ptr() not in self.storages:
            # Keep the storage alive while counting: a tensor freed during the forward would otherwise hand its address
            # to a later one, which would then go uncounted.
            self.storages[s.data_ptr()] = s

    @classmethod
    def note_inputs(cls, args) -> None:
        if cls.active is not None:
            for a in args:
                for t in (a if isinstance(a, (tuple, list)) else (a,)):
                    cls.active.add(t)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())


@contextmanager
def count_saved_bytes(model: nn.Module) -> Iterator[_SavedCounter]:
    """Within the block, count the bytes of every distinct tensor storage autograd saves for backward (plus activation
    checkpoint inputs), parameters and buffers of `model` excluded. Read `.nbytes` after the block."""
    exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    counter = _SavedCounter(exclude)

    def pack(t):
        counter.add(t)
        return t

    prev, _SavedCounter.active = _SavedCounter.active, counter
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counter
    finally:
        _SavedCounter.active = prev


def activation_bytes_per_token(model: LLaMA, policy: Optional[str] = None, seq_len: int = 64, batch: int = 1) -> float:
    """Bytes that one gated layer keeps for backward, per token: measured on a forward pass of random tokens (batch,
    seq_len) with `count_saved_bytes`, as the median over the gated layers after the first (the first gated layer gets
    an input that needs no gradient and keeps less). Per-step tensors (the prefix K/V) are amortised over the tokens,
    so use a realistic seq_len. policy: apply this checkpointing policy for the measurement and restore the current
    one afterwards (None: measure as the model is). Needs a model with an Aligner and >= 2 gated layers."""
    if model.aligner is None:
        raise ValueError("activation_bytes_per_token needs a model with an Aligner (LLaMA(config, AlignerConfig(...)))")
    start = model.aligner.start_layer
    if model.config.n_layer - start < 2:
        raise ValueError(f"activation_bytes_per_token needs >= 2 gated layers (n_layer {model.config.n_layer}, "
                         f"start_layer {start})")
    current = checkpointing_policy(model)
    if policy is not None:
        apply_activation_checkpointing(model, policy)
    deltas, handles, before = [], [], {}
    try:
        device = model.tok_embeddings.weight.device
        idx = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
        with torch.enable_grad(), count_saved_bytes(model) as counter:
            for i, block in enumerate(model.layers[start + 1:]):
                handles.append(block.register_forward_pre_hook(lambda m, a, i=i: before.__setitem__(i, counter.nbytes)))
                handles.append(block.register_forward_hook(
                    lambda m, a, o, i=i: deltas.append(counter.nbytes - before[i])))
                # A checkpointed block's input is noted inside its call, i.e. after the pre-hook: counted in its delta.
            hidden = model(idx, return_hidden=True)
        del hidden
    finally:
        for h in handles:
            h.remove()
        apply_activation_checkpointing(model, current)
    deltas.sort()
    return deltas[len(deltas) // 2] / (batch * seq_len)


def loss_peak_bytes(config: Config, scored_tokens: int, chunked: bool, chunk_size: int = 1024) -> int:
    """Peak bytes the loss adds on top of the model's activations, for `scored_tokens` labelled positions in a step
    (analytic). Plain: the fp32 logits and the log-softmax that cross-entropy saves, 2 x 4 x vocab bytes per token,
    all alive until backward. Chunked (`lit_aligner.losses`): one chunk's logits and log-softmax at a time, recomputed
    in backward, so the peak does not grow with the batch: 2 x 4 x vocab x min(chunk_size, scored_tokens)."""
    per_token = 2 * 4 * config.vocab_size
    return per_token * (min(chunk_size, scored_tokens) if chunked else scored_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs


@dataclass
class StepFlops:
    """Model FLOPs per sequence token of one training step (recomputation by activation checkpointing is not counted:
    MFU conventionally counts model FLOPs, not hardware FLOPs)."""

    forward: float  # the policy forward: all layers + LM head
    backward: float  # input gradients only: gated layers + LM head (+ the prefix's gradient)
    reference: float  # the forwards without grad: DPO's reference; KTO's reference and mismatched rows; 0 for SFT
    attention: float  # the part of the total in attention scores and weighted values (QK^T, PV); the rest is matmuls
    # with weights (what torch's FlopCounterMode counts as aten.mm on the CPU)

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.reference


def train_flops_per_token(config: Config, seq_len: int, n_tokens: int = 10, start_layer: int = 2,
                          mode: str = "sft", batch: int = 1) -> StepFlops:
    """FLOPs per sequence token of one step with a frozen base and a trainable Aligner (multiply-add = 2 FLOPs).

    Per layer and token, with C = n_embd, hs = head_size, nh = n_head, kv = n_query_groups, I = intermediate_size,
    T = seq_len, N = n_tokens, V = vocab_size:
        qkv     = 2 * C * (nh + 2 kv) * hs          fused q, k, v projection
        rest    = 2 * (nh hs * C + 3 * C * I)       output projection and SwiGLU (w1, w3, w2)
        attn    = 2 * 2 * nh * hs * (T + 1) / 2     QK^T and PV, causal: (T + 1) / 2 keys on average
        prefix  = 2 * 2 * nh * hs * N               the gated layers' prefix attention
        head    = 2 * C * V
    Forward = n_layer * (qkv + rest + attn) + gated * prefix + head, gated = n_layer - start_layer.
    Backward of a frozen base: no weight gradients, so each matmul costs 1x its forward (the input gradient) instead of
    2x, and attention (dQ, dK, dV, dP) 2x its forward. Layers before start_layer run no backward. The first gated layer
    gets an input that needs no gradient: its q, k, v need none, so it skips the qkv input gradient and the causal
    attention backward, and its prefix attention computes dK, dV and dP but not dQ (1.5x forward):
        backward = (gated - 1) * (qkv + rest + 2 * (attn + prefix)) + rest + 1.5 * prefix + head
                 + 2 * 2 * gated * N * C * 2 kv hs / (batch * T)      the prefix's K/V projection, forward + backward,
                                                                       once per step (so per token: / (batch * T))
    So a step costs ~ (2 + 2 * gated / n_layer) * params FLOPs per token, against 6 * params for full fine-tuning.
    DPO (mode "dpo") adds the reference forward: the same base, no grad, the same tokens; SimPO (mode "simpo", on
    pairs too) has none, so it costs what SFT does per token. KTO (mode "kto", tokens counted on the matched rows)
    adds three forwards without grad: the reference on the matched rows and on as many mismatched ones, and the policy
    on the mismatched ones (for z). `batch` only matters for the per-step prefix projection (negligible unless
    batch * T is tiny)."""
    if mode not in ("sft", "dpo", "simpo", "kto"):
        raise ValueError(f"mode must be 'sft', 'dpo', 'simpo' or 'kto', got {mode!r}")
    c = config
    hs, nh, kv, C, I = c.head_size, c.n_head, c.n_query_groups, c.n_embd, c.intermediate_size
    qkv = 2 * C * (nh + 2 * kv) * hs
    rest = 2 * (nh * hs * C + 3 * C * I)
    attn = 2 * 2 * nh * hs * (seq_len + 1) / 2
    prefix = 2 * 2 * nh * hs * n_tokens
    head = 2 * C * c.vocab_size
    gated = c.n_layer - start_layer
    projection = 2 * gated * n_tokens * C * 2 * kv * hs / (batch * seq_len)
    forward = c.n_layer * (qkv + rest + attn) + gated * prefix + head + projection
    backward = (gated - 1) * (qkv + rest + 2 * (attn + prefix)) + rest + 1.5 * prefix + head + projection
    base = c.n_layer * (qkv + rest + attn) + head  # the bare base's forward
    reference = {"dpo": base, "kto": 2 * base + forward}.get(mode, 0.0)
    policy_attention = c.n_layer * attn + gated * prefix
    attention = policy_attention + (gated - 1) * 2 * (attn + prefix) + 1.5 * prefix \
        + {"dpo": c.n_layer * attn, "kto": 2 * c.n_layer * attn + policy_attention}.get(mode, 0.0)
    return StepFlops(forward, backward, reference, attention)


def decode_bytes_per_token(config: Config, bytes_per_param: float = 2.0) -> float:
    """Weight bytes read per decoding step (batch 1 is memory-bound: every weight is read once per token). The KV cache
    read is left out (small for short contexts)."""
    c = config
    per_layer = c.n_embd * (c.n_head + 2 * c.n_query_groups) * c.head_size + c.n_head * c.head_size * c.n_embd \
        + 3 * c.n_embd * c.intermediate_size + 2 * c.n_embd
    params = c.n_layer * per_layer + c.n_embd + c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)
    return params * bytes_per_param


# ---------------------------------------------------------------------------------------------------------------------
# Peak memory


PEAK_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated (tensors only; reset before the first step)",
    "cpu": "peak resident set size of the whole process (VmHWM from /proc/self/status, reset by writing 5 to "
           "/proc/self/clear_refs before the first step): weights, activations, optimizer state, allocator slack and "
           "the Python interpreter",
}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA allocator statistics, or the process's peak RSS on Linux (writing 5 to
    /proc/self/clear_refs resets VmHWM; elsewhere the peak stays the process lifetime's)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # blocks cached by an earlier window would count in this window's reserved peak
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since `reset_peak_memory`: `torch.cuda.max_memory_allocated` on CUDA (tensors only), peak resident
    set size of the process on the CPU (everything: weights, activations, the Python interpreter, libraries)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------------------------------------------------------------
# One training step on random tokens (benchmarks, memory probes)


def random_items(data_kind: str, vocab_size: int, sequences: int, seq_len: int,
                 generator: Optional[torch.Generator] = None) -> List[Dict[str, torch.Tensor]]:
    """Items of `data_kind` ("sft", "preference" or "unpaired") for `sequences` rows of `seq_len` random tokens each,
    the first quarter of every row the prompt (no loss). Preference items pair rows i and P + i (P = sequences / 2);
    unpaired rows are desirable and undesirable in turn."""
    ids = torch.randint(0, vocab_size, (sequences, seq_len), generator=generator)
    q = seq_len // 4
    if data_kind == "sft":
        return [{"prompt": r[:q], "response": r[q:]} for r in ids]
    if data_kind == "unpaired":
        return [{"prompt": r[:q], "completion": r[q:], "label": torch.tensor([1 - i % 2])} for i, r in enumerate(ids)]
    if data_kind != "preference" or sequences % 2:
        raise ValueError(f"random items: sft or unpaired rows, or preference pairs from an even number of rows (got "
                         f"{data_kind}, {sequences})")
    P = sequences // 2
    return [{"prompt": ids[i, :q], "chosen": ids[i, q:], "rejected": ids[P + i, q:]} for i in range(P)]


def step_peak_memory(model: LLaMA, objective, sequences: int, seq_len: int, seed: int = 0) -> Dict[str, Any]:
    """Peak memory of ONE optimizer step of `model`'s Aligner (forward, backward, AdamW step) under `objective`
    (`lit_aligner.training.objectives`: SFT, or DPO on sequences / 2 pairs whose reference runs through the same base)
    on random tokens (`random_items`). Returns {"objective", "sequences", "seq_len", "before_bytes" (memory in use
    before the step), "peak_bytes", "step_bytes" (peak - before: what the step itself adds), "seconds", "method"}.
    CUDA: allocator figures; CPU: the process's resident set (see PEAK_MEMORY_METHOD): call it in a fresh process,
    once, for a clean figure."""
    import time

    device = model.tok_embeddings.weight.device
    g = torch.Generator().manual_seed(seed)
    batch = objective.collate(random_items(objective.data_kind, model.config.vocab_size, sequences, seq_len, g))
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:  # AdamW state allocated up front: it is part of the steady state, not of the step's peak
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}

    def current_bytes() -> int:
        if device.type == "cuda":
            return torch.cuda.memory_allocated(device)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    reset_peak_memory(device)
    before = current_bytes()  # after the reset: the peak of the window is at least this (memory freed in between
    # would otherwise leave the peak below `before`)
    t0 = time.perf_counter()
    objective(model, batch)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    # The window's peak is at least its start. On the CPU, Linux's RSS counters are per-CPU and read approximately
    # (off by some 100 KB), so a VmHWM can read below the VmRSS read just after the reset.
    peak = max(peak_memory_bytes(device), before)
    return {"objective": objective.name, "sequences": sequences, "seq_len": seq_len, "before_bytes": before,
            "peak_bytes": peak, "step_bytes": peak - before, "seconds": seconds,
            "method": PEAK_MEMORY_METHOD[device.type]}
