"""Where a step's time goes: torch.profiler over training steps or decoding, kernels grouped by kind.

Random base weights of a named config (as benchmarks/train.py and generate.py). For each case: device time per step,
kernels launched per step, and the time by kind of kernel (matmul, attention, fused elementwise/reduction, copies,
other), plus the top kernels. This is what explains a missed target: e.g. what an Aligner adds to a decoding step.

    python benchmarks/profile_steps.py --config tiny --seq-len 64 --new-tokens 16   # seconds, on any CPU
    python benchmarks/profile_steps.py --config Llama-2-7b-hf --what train decode   # on a GPU
"""

import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BenchmarkError, build_model, check_out, default_out, format_table, load_config,  # noqa: E402
                    machine_info, median, pick_device, pick_dtype, random_aligner, sync, timed, training_step,
                    write_json, write_partial)

from lit_aligner.cli import run_cli  # noqa: E402
from lit_aligner.generation import generate  # noqa: E402
from lit_aligner.perf import (apply_activation_checkpointing, configure_backends, peak_memory_bytes,  # noqa: E402
                              reset_peak_memory, should_compile)

KINDS = [  # first match wins; CPU op names are matched too, so the table reads the same on a CPU
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma|matmul|\bmm\b|addmm|bmm|linear", re.I)),
    ("fused (triton)", re.compile(r"^triton_", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|cat|fill", re.I)),
]


def kind_of(name: str) -> str:
    return next((k for k, pattern in KINDS if pattern.search(name)), "other")


def summarise(prof, steps: int, device: torch.device, top: int) -> Dict[str, Any]:
    """Per step: device time and kernel count by kind, from the profiler's events (GPU kernels on CUDA, top-level
    operators on the CPU)."""
    events = [e for e in prof.events() if (e.device_type == torch.autograd.DeviceType.CUDA) == (device.type == "cuda")]
    if device.type != "cuda":  # CPU: count top-level operators only (nested ones would be counted twice)
        events = [e for e in events if e.cpu_parent is None]
    time_of = (lambda e: e.device_time) if device.type == "cuda" else (lambda e: e.cpu_time_total)
    by_kind: Dict[str, float] = defaultdict(float)
    by_name: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        us = time_of(e)
        by_kind[kind_of(e.name)] += us
        by_name[e.name][0] += us
        by_name[e.name][1] += 1
    total_us = sum(by_kind.values())
    return {
        "device_ms_per_step": total_us / 1e3 / steps,
        "kernels_per_step": len(events) / steps,
        "ms_per_step_by_kind": {k: v / 1e3 / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:120], "ms_per_step": t / 1e3 / steps, "calls_per_step": c / steps}
                for n, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def activities(device: torch.device) -> List[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profile_train(model, policy: str, batch: int, seq_len: int, steps: int, device, compiled: bool,
                  top: int) -> Dict[str, Any]:
    step = training_step(model, "sft", policy, batch, seq_len, 1024, device, compiled)
    for _ in range(2):  # compilation and allocator warm-up
        step()
    times = []
    reset_peak_memory(device)
    for _ in range(steps):  # timed without the profiler (it slows kernel launches)
        with timed(device, times):
            step()
    peak = peak_memory_bytes(device)
    with profile(activities=activities(device)) as p:
        for _ in range(steps):
            step()
        sync(device)
    return {"what": "train", "case": f"sft {policy}", "batch": batch, "tokens_per_s": batch * seq_len / median(times),
            "peak_memory_gb": peak / 1e9, **summarise(p, steps, device, top)}


def profile_decode(model, name: str, prompts, aligners, new_tokens: int, device, compiled: bool,
                   top: int) -> Dict[str, Any]:
    generate(model, prompts, new_tokens, aligners=aligners, compile=compiled)  # compilation, CUDA-graph recording
    _, stats = generate(model, prompts, new_tokens, aligners=aligners, compile=compiled, return_stats=True)
    with profile(activities=activities(device)) as p:
        generate(model, prompts, new_tokens, aligners=aligners, compile=compiled)
    # One prefill and new_tokens - 1 decoding steps: per step is close enough to per decoding step for new_tokens >> 1.
    return {"what": "decode", "case": name, "batch": len(prompts), "tokens_per_s": stats.decode_tokens_per_s,
            **summarise(p, new_tokens - 1, device, top)}


def main(
    config: str = "tiny",
    what: Tuple[Literal["train", "decode"], ...] = ("train", "decode"),
    batch: int = 8,
    seq_len: int = 512,
    checkpointing: Tuple[Literal["none", "selective", "mlp", "block"], ...] = ("none",),
    decode_batch: int = 16,
    new_tokens: int = 64,
    decode_cases: Tuple[Literal["base-1", "aligner-1", "shared-B", "different-B", "base-B"], ...] = (
        "base-1", "aligner-1", "shared-B", "different-B"),
    n_tokens: int = 10,
    start_layer: int = 2,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: Optional[bool] = None,
    steps: int = 2,
    top: int = 12,
    device: str = "auto",
    out: Optional[Path] = None,
    force: bool = False,
) -> Dict[str, Any]:
    """Profile training steps and/or decoding of an Aligner on a random-weight base: device time and kernels per step
    by kind of kernel, and the top kernels.

    Args:
        config: named model shape (lit_aligner.config), e.g. tiny, SmolLM2-135M, Llama-2-7b-hf.
        what: train (SFT steps, one case per --checkpointing policy) and/or decode (the --decode-cases).
        batch: training rows per step.
        seq_len: training tokens per row.
        checkpointing: activation-checkpointing policies to profile for training.
        decode_batch: B of the batch-B decoding cases.
        new_tokens: tokens generated per decoding case (a 32-token prompt).
        decode_cases: base-1 / aligner-1 (batch 1 without / with an Aligner), shared-B (one Aligner for B rows),
            different-B (B different Aligners), base-B.
        n_tokens: Aligner prefix tokens N.
        start_layer: first gated layer.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on CUDA, 32-true on the CPU).
        compile: torch.compile (blocks for training; the decoding step with CUDA graphs) (default: on CUDA only).
        steps: profiled training steps (after two warm-up steps).
        top: kernels listed per case.
        device: auto (CUDA if available), cpu, cuda, ...
        out: JSON results file (default benchmarks/results/profile-<config>-<machine>.json).
        force: replace an existing results file.
    """
    if batch < 1 or seq_len < 2 or decode_batch < 2 or new_tokens < 2 or steps < 1:
        raise BenchmarkError("--batch >= 1, --seq-len >= 2, --decode-batch >= 2, --new-tokens >= 2 and --steps >= 1 "
                             "are required")
    dev = pick_device(device)
    dtype = pick_dtype(precision, dev)
    cfg = load_config(config)
    if seq_len > cfg.block_size or 32 + new_tokens > cfg.block_size:
        raise BenchmarkError(f"--seq-len or 32 + --new-tokens exceeds {config}'s context of {cfg.block_size} tokens")
    path = check_out(out or default_out("profile", config, dev), force)
    configure_backends(dev)
    compiled = should_compile(dev, compile)
    rows: List[Dict[str, Any]] = []
    payload = {"benchmark": "profile", "config": config, "n_tokens": n_tokens, "start_layer": start_layer,
               "precision": str(dtype), "compile": compiled, "seq_len": seq_len, "new_tokens": new_tokens,
               "complete": False, "machine": machine_info(dev), "results": rows}

    def done(row):
        rows.append(row)
        print(f"{row['what']} {row['case']}: {row['device_ms_per_step']:.3f} ms, {row['kernels_per_step']:.0f} "
              f"kernels per step", file=sys.stderr)
        write_partial(path, payload)

    if "train" in what:
        model = build_model(cfg, dev, dtype, n_tokens, start_layer)
        for policy in checkpointing:
            done(profile_train(model, policy, batch, seq_len, steps, dev, compiled, top))
        apply_activation_checkpointing(model, "none")
        del model
        torch._dynamo.reset()
    if "decode" in what:
        model = build_model(cfg, dev, dtype).eval()
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, cfg.vocab_size, (32,), generator=g) for _ in range(decode_batch)]
        shared = random_aligner(model, n_tokens, start_layer, seed=1)
        aligners = {"base-1": (1, False), "aligner-1": (1, shared), "shared-B": (decode_batch, shared),
                    "different-B": (decode_batch, [random_aligner(model, n_tokens, start_layer, seed=100 + i)
                                                   for i in range(decode_batch)]),
                    "base-B": (decode_batch, False)}
        for case in decode_cases:
            b, a = aligners[case]
            done(profile_decode(model, case, prompts[:b], a, new_tokens, dev, compiled, top))
    print(f"{config}: N={n_tokens}, start_layer={start_layer}, {dtype}, compile {compiled}, device {dev}")
    print(format_table(rows, ["what", "case", "batch", "tokens_per_s", "peak_memory_gb", "device_ms_per_step",
                              "kernels_per_step"]))
    kinds = sorted({k for r in rows for k in r["ms_per_step_by_kind"]})
    print(format_table([{"case": f"{r['what']} {r['case']}", **{k: r["ms_per_step_by_kind"].get(k, 0.0)
                                                                for k in kinds}} for r in rows], ["case"] + kinds))
    payload["complete"] = True
    print(f"wrote {write_json(path, payload)}")
    return payload


if __name__ == "__main__":
    run_cli(main)
