"""Training-step throughput of an Aligner on a frozen base: tokens/s, peak memory and model FLOPs utilisation.

Random base weights (speed does not depend on them) of a named config, built on the target device in the target dtype;
random token batches of --batch rows x --seq-len tokens, the first quarter of each row is prompt (no loss). One row of
the results table per (mode, checkpointing policy). Warm-up steps are excluded; the median timed step is reported.
Then, in the same run, the peer a user would pick instead for SFT: PEFT LoRA r=8 (q, v) and PEFT prefix tuning (10
virtual tokens) on a transformers model of the same shape and dtype, the same rows, under no checkpointing and under
transformers' gradient checkpointing (the counterpart of `block`).

    python benchmarks/train.py --config tiny --batch 2 --seq-len 32 --steps 2     # seconds, on any CPU
    python benchmarks/train.py --config Llama-2-7b-hf --batch 8 --seq-len 512 \\
        --mode sft dpo --checkpointing none selective mlp block                   # the issue's H100 targets
"""

import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BenchmarkError, build_model, build_peer_model, check_out, default_out, format_table,  # noqa: E402
                    load_config, machine_info, median, out_of_memory_hint, peer_lora_config,
                    peer_prefix_tuning_config, peer_versions, pick_device, pick_dtype, require, sync, timed,
                    training_step, write_json, write_partial)

from lit_aligner.cli import run_cli  # noqa: E402
from lit_aligner.model import LLaMA  # noqa: E402
from lit_aligner.perf import (PEAK_MEMORY_METHOD, activation_bytes_per_token, configure_backends,  # noqa: E402
                              peak_memory_bytes, random_items, reset_peak_memory, should_compile,
                              train_flops_per_token)

SYSTEM = "Aligner (lit-aligner)"
LORA = "LoRA r=8 (PEFT)"  # the peer our SFT rows are compared with (`vs_lora`)
PEERS = {LORA: peer_lora_config, "prefix tuning 10 (PEFT)": peer_prefix_tuning_config}
PEER_POLICIES = ("none", "block")  # transformers has no counterpart of selective or mlp
UNSUPPORTED = {("prefix tuning 10 (PEFT)", "block")}  # PEFT refuses prefix tuning with gradient checkpointing


def time_steps(step, warmup: int, steps: int, batch: int, seq_len: int, device: torch.device) -> Dict[str, Any]:
    """The median of `steps` timed calls of `step` after `warmup` untimed ones, and the peak memory over all."""
    times = []
    reset_peak_memory(device)
    for i in range(warmup + steps):
        with timed(device, times):
            loss = step()
    peak = peak_memory_bytes(device)
    # What nvidia-smi sees (tensors + the allocator's cache): the number to compare with a card's size.
    reserved = torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None
    step_s = median(times[warmup:])
    return {"batch": batch, "seq_len": seq_len, "step_s": step_s, "step_times_s": times, "warmup_steps": warmup,
            "tokens_per_s": batch * seq_len / step_s, "peak_memory_gb": peak / 1e9, "peak_reserved_gb": reserved,
            "loss": float(loss.detach())}


def run_one(model: LLaMA, config, mode: str, policy: str, batch: int, seq_len: int, n_tokens: int, start_layer: int,
            chunked: bool, warmup: int, steps: int, device: torch.device, peak_tflops: Optional[float],
            compiled: bool) -> Dict[str, Any]:
    """One row: the median step of `mode`'s objective on `batch` random rows, under checkpointing `policy`."""
    step = training_step(model, mode, policy, batch, seq_len, 1024 if chunked else 0, device, compiled)
    r = time_steps(step, warmup, steps, batch, seq_len, device)
    flops = train_flops_per_token(config, seq_len, n_tokens, start_layer, mode, batch).total
    achieved = flops * r["tokens_per_s"]
    return {"system": SYSTEM, "mode": mode, "checkpointing": policy, **r, "flops_per_token": flops,
            "achieved_tflops": achieved / 1e12, "mfu": achieved / (peak_tflops * 1e12) if peak_tflops else None,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_peer(config, system: str, policy: str, batch: int, seq_len: int, warmup: int, steps: int,
             device: torch.device, dtype: torch.dtype, compiled: bool) -> Dict[str, Any]:
    """One row of the peer: PEFT's `system` on a transformers model of the same shape (random weights, built on the
    device in the dtype), an SFT step as a PEFT user runs it (the model's own loss over full logits, AdamW), on the
    same rows and prompt mask as ours; `block` is transformers' gradient checkpointing of every decoder layer. With
    `compiled` (when ours is), every decoder layer is compiled in place as ours are (`nn.Module.compile`)."""
    import peft

    model = build_peer_model(config, device, dtype)
    if policy == "block":  # transformers 5.24 renamed it; the older name still works there, with a warning
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, PEERS[system]()).train()
    if compiled:
        for layer in model.get_base_model().model.layers:
            layer.compile()
    g = torch.Generator().manual_seed(0)  # the rows of `training_step`
    items = random_items("sft", config.vocab_size, batch, seq_len, g)
    ids = torch.stack([torch.cat([i["prompt"], i["response"]]) for i in items]).to(device)
    labels = ids.clone()
    labels[:, :len(items[0]["prompt"])] = -100  # the prompt carries no loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    r = time_steps(step, warmup, steps, batch, seq_len, device)
    return {"system": system, "mode": "sft", "checkpointing": policy, **r, "compile": compiled,
            "trainable_params": sum(p.numel() for p in params)}


def main(
    config: str = "tiny",
    batch: int = 2,
    seq_len: int = 64,
    n_tokens: int = 10,
    start_layer: int = 2,
    mode: Tuple[Literal["sft", "dpo"], ...] = ("sft",),
    checkpointing: Tuple[Literal["none", "selective", "mlp", "block"], ...] = ("none",),
    loss: Literal["chunked", "plain"] = "chunked",
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: Optional[bool] = None,
    warmup: int = 1,
    steps: int = 3,
    device: str = "auto",
    peak_tflops: Optional[float] = None,
    threads: Optional[int] = None,
    n_layer: Optional[int] = None,
    peer: bool = True,
    out: Optional[Path] = None,
    force: bool = False,
) -> Dict[str, Any]:
    """Training-step throughput (tokens/s), peak memory and MFU of an Aligner on a frozen random-weight base.

    Args:
        config: named model shape (lit_aligner.config), e.g. tiny, SmolLM2-135M, Llama-2-7b-hf.
        batch: rows per step (sequences). DPO uses batch / 2 pairs (chosen + rejected rows), so `--batch 16 --mode
            sft dpo` compares SFT-16 with DPO on 8 pairs.
        seq_len: tokens per row (the first quarter is prompt, without loss).
        n_tokens: Aligner prefix tokens N.
        start_layer: first gated layer.
        mode: one or more of sft, dpo (DPO: policy forward + backward and a no-grad reference forward of the bare base).
        checkpointing: one or more activation-checkpointing policies (lit_aligner.perf.apply_activation_checkpointing).
        loss: chunked (LM head + CE a chunk at a time, lit_aligner.losses) or plain (full (B, T, vocab) logits).
        precision: 32-true, bf16-true or 16-true weights and activations (default: bf16-true on CUDA, 32-true on CPU).
        compile: torch.compile every block (default: on CUDA only).
        warmup: untimed steps first (compilation, allocator warm-up).
        steps: timed steps; the median is reported.
        device: auto (CUDA if available), cpu, cuda, cuda:1, ...
        peak_tflops: the device's dense peak for MFU (H100 SXM bf16: 989; default 989 on CUDA, none on the CPU).
        threads: torch CPU threads (default: torch's choice).
        n_layer: keep only this many layers of the config (per-layer figures such as the activation bytes of a 7B
            shape on a small machine; tokens/s and MFU then describe the truncated model).
        peer: also time the peer in the same run (transformers and PEFT, the `eval` extra) when SFT runs under
            `none` or `block`: PEFT LoRA r=8 on q and v and PEFT prefix tuning (10 virtual tokens), its decoder
            layers compiled when ours are; --no-peer skips it.
        out: JSON results file (default:
            benchmarks/results/train-<config>[-L<n_layer>]-b<batch>-t<seq_len>-<machine>.json).
        force: replace an existing results file.
    """
    if batch < 1 or seq_len < 2 or warmup < 0 or steps < 1:
        raise BenchmarkError("--batch >= 1, --seq-len >= 2, --warmup >= 0 and --steps >= 1 are required")
    if "dpo" in mode and batch % 2:
        raise BenchmarkError(f"--mode dpo needs an even --batch (chosen + rejected rows), got {batch}")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    dtype = pick_dtype(precision, dev)
    cfg = load_config(config)
    if n_layer is not None:
        if n_layer < 1:
            raise BenchmarkError(f"--n-layer must be >= 1, got {n_layer}")
        cfg = dataclasses.replace(cfg, n_layer=n_layer)
    if not 0 <= start_layer < cfg.n_layer:
        raise BenchmarkError(f"--start-layer must be in [0, {cfg.n_layer}) for {config}, got {start_layer}")
    if seq_len > cfg.block_size:
        raise BenchmarkError(f"--seq-len {seq_len} exceeds {config}'s context of {cfg.block_size} tokens")
    if peak_tflops is None and dev.type == "cuda":
        peak_tflops = 989.0
    peer_policies = [p for p in checkpointing if p in PEER_POLICIES] if peer and "sft" in mode else []
    if peer and not peer_policies:
        print("note: no peer rows: the peer (PEFT) runs SFT under --checkpointing none or block", file=sys.stderr)
    if peer_policies:
        require("transformers", "peft", extra="eval", or_flag="--no-peer")
    layers = f"-L{n_layer}" if n_layer is not None else ""
    path = check_out(out or default_out("train", f"{config}{layers}-b{batch}-t{seq_len}", dev), force)
    configure_backends(dev)
    compiled = should_compile(dev, compile)
    rows = []
    payload = {
        "benchmark": "train", "config": config, "n_layer": cfg.n_layer, "n_tokens": n_tokens,
        "start_layer": start_layer,
        "precision": str(dtype), "loss": loss, "compile": compiled, "peak_tflops": peak_tflops,
        "peak_memory_method": PEAK_MEMORY_METHOD[dev.type], "peers": list(PEERS) if peer_policies else [],
        "peer_versions": peer_versions() if peer_policies else None,
        "complete": False,
        "activation_bytes_per_token_per_gated_layer": {}, "machine": machine_info(dev), "results": rows,
    }
    with out_of_memory_hint("lower --batch or --seq-len, or add --checkpointing selective / block"):
        model = build_model(cfg, dev, dtype, n_tokens, start_layer)
        for m in mode:
            for policy in checkpointing:
                r = run_one(model, cfg, m, policy, batch, seq_len, n_tokens, start_layer, loss == "chunked", warmup,
                            steps, dev, peak_tflops, compiled)
                rows.append(r)
                print(f"{m} {policy}: {r['tokens_per_s']:,.1f} tokens/s, step {r['step_s']:.3f} s, peak "
                      f"{r['peak_memory_gb']:.1f} GB", file=sys.stderr)
                write_partial(path, payload)
        # What each policy trades: bytes per token and gated layer that autograd keeps (measured eagerly, batch 1).
        if cfg.n_layer - start_layer >= 2:
            payload["activation_bytes_per_token_per_gated_layer"] = {
                p: activation_bytes_per_token(model, p, seq_len=seq_len) for p in checkpointing}
    if peer_policies:
        del model  # the peer's own copy of the weights takes its place (on CUDA the peak then counts the peer's alone)
        if dev.type == "cuda":
            torch._dynamo.reset()  # compiled blocks' caches could keep the model alive
            torch.cuda.empty_cache()
        with out_of_memory_hint("lower --batch or --seq-len, or --no-peer"):
            for policy in peer_policies:
                for system in (s for s in PEERS if (s, policy) not in UNSUPPORTED):
                    try:
                        r = run_peer(cfg, system, policy, batch, seq_len, warmup, steps, dev, dtype, compiled)
                    except Exception as e:  # the peer failing to compile must not cost the run its eager figure
                        if not compiled:
                            raise
                        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        print(f"warning: {system} did not compile ({error}); timing it eager", file=sys.stderr)
                        torch._dynamo.reset()
                        r = {**run_peer(cfg, system, policy, batch, seq_len, warmup, steps, dev, dtype, False),
                             "compile_error": error}
                    rows.append(r)
                    print(f"{system} {policy}: {r['tokens_per_s']:,.1f} tokens/s, step {r['step_s']:.3f} s, peak "
                          f"{r['peak_memory_gb']:.1f} GB", file=sys.stderr)
                    write_partial(path, payload)
        lora = {r["checkpointing"]: r["tokens_per_s"] for r in rows if r["system"] == LORA}
        for r in rows:
            if r["mode"] == "sft" and r["checkpointing"] in lora:
                r["vs_lora"] = r["tokens_per_s"] / lora[r["checkpointing"]]
    sync(dev)
    columns = ["system", "mode", "checkpointing", "trainable_params", "tokens_per_s", "vs_lora", "step_s",
               "peak_memory_gb", "achieved_tflops", "mfu"]
    print(f"{config} ({cfg.n_layer} layers): batch {batch} x seq {seq_len}, N={n_tokens}, start_layer={start_layer}, "
          f"{dtype}, loss {loss}, compile {compiled}, device {dev}")
    print(format_table(rows, columns))
    payload["complete"] = True
    print(f"wrote {write_json(path, payload)}")
    return payload


if __name__ == "__main__":
    run_cli(main)
