"""Decoding throughput with `lit_aligner.generation.generate`: batch 1 and batch B, with and without an
Aligner, and B different Aligners in one batch (one per row) against B rows sharing one.

Random base weights and Aligners (speed does not depend on them), random prompts of --prompt-len tokens, greedy
decoding of exactly --new-tokens tokens (no stop tokens). Decode tokens/s counts the tokens of all rows per second of
the decode loop (the prefill is timed apart). Each case runs once untimed (compilation, cache allocation), then
--repeats times; the median is reported.

    python benchmarks/generate.py --config tiny --prompt-len 8 --new-tokens 8      # seconds, on any CPU
    python benchmarks/generate.py --config Llama-2-7b-hf                           # the issue's H100 targets
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BenchmarkError, build_model, check_out, default_out, format_table, load_config,  # noqa: E402
                    machine_info, median, out_of_memory_hint, pick_device, pick_dtype, random_aligner,
                    write_json, write_partial)

from lit_aligner.cli import run_cli  # noqa: E402
from lit_aligner.generation import generate  # noqa: E402
from lit_aligner.perf import configure_backends, decode_bytes_per_token, should_compile  # noqa: E402


def main(
    config: str = "tiny",
    batch: int = 16,
    prompt_len: int = 32,
    new_tokens: int = 128,
    n_tokens: int = 10,
    start_layer: int = 2,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: Optional[bool] = None,
    repeats: int = 3,
    device: str = "auto",
    bandwidth_gbps: Optional[float] = None,
    threads: Optional[int] = None,
    out: Optional[Path] = None,
    force: bool = False,
) -> Dict[str, Any]:
    """Decode tokens/s of the bare base and with Aligners, at batch 1 and batch `batch`.

    Args:
        config: named model shape (lit_aligner.config), e.g. tiny, SmolLM2-135M, Llama-2-7b-hf.
        batch: the large batch size (the cases are batch 1 and this).
        prompt_len: prompt tokens per row.
        new_tokens: tokens generated per row (all of them: there are no stop tokens).
        n_tokens: Aligner prefix tokens N.
        start_layer: first gated layer.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on CUDA, 32-true on the CPU).
        compile: torch.compile the decoding step (default: on CUDA only, with CUDA graphs).
        repeats: timed runs per case; the median is reported.
        device: auto (CUDA if available), cpu, cuda, ...
        bandwidth_gbps: memory bandwidth for the batch-1 roofline column (default 3350 on CUDA = H100 SXM; none on
            the CPU).
        threads: torch CPU threads (default: torch's choice).
        out: JSON results file (default benchmarks/results/generate-<config>-<machine>.json).
        force: replace an existing results file.
    """
    if batch < 2 or prompt_len < 1 or new_tokens < 2 or repeats < 1:
        raise BenchmarkError("--batch >= 2, --prompt-len >= 1, --new-tokens >= 2 and --repeats >= 1 are required")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    dtype = pick_dtype(precision, dev)
    cfg = load_config(config)
    if prompt_len + new_tokens > cfg.block_size:
        raise BenchmarkError(f"--prompt-len + --new-tokens exceeds {config}'s context of {cfg.block_size} tokens")
    if not 0 <= start_layer < cfg.n_layer:
        raise BenchmarkError(f"--start-layer must be in [0, {cfg.n_layer}) for {config}, got {start_layer}")
    if bandwidth_gbps is None and dev.type == "cuda":
        bandwidth_gbps = 3350.0
    path = check_out(out or default_out("generate", config, dev), force)
    configure_backends(dev)
    model = build_model(cfg, dev, dtype).eval()
    compiled = should_compile(dev, compile)
    shared = random_aligner(model, n_tokens, start_layer, seed=1)
    many = [random_aligner(model, n_tokens, start_layer, seed=100 + i) for i in range(batch)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g) for _ in range(batch)]

    # The cases of the targets first (each compiled case compiles its own graph: a run stopped midway keeps them).
    cases = [
        ("base", 1, False),
        ("aligner", 1, shared),
        ("aligner (shared)", batch, shared),
        (f"{batch} different aligners", batch, many),
        ("base", batch, False),
    ]
    bytes_per_token = decode_bytes_per_token(cfg, torch.finfo(dtype).bits / 8)
    roofline = bandwidth_gbps * 1e9 / bytes_per_token if bandwidth_gbps else None
    rows: List[Dict[str, Any]] = []
    payload = {
        "benchmark": "generate", "config": config, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "n_tokens": n_tokens, "start_layer": start_layer, "precision": str(dtype), "compile": compiled,
        "weight_bytes_per_step": bytes_per_token, "bandwidth_gbps": bandwidth_gbps,
        "batch1_bandwidth_bound_tokens_per_s": roofline, "complete": False, "machine": machine_info(dev),
        "results": rows,
    }
    for name, b, aligners in cases:
        runs = []
        for r in range(repeats + 1):
            with out_of_memory_hint("lower --batch or --new-tokens"):
                _, stats = generate(model, prompts[:b], new_tokens, aligners=aligners, compile=compiled,
                                    return_stats=True)
            if r:  # the first run is warm-up
                runs.append(stats)
        tps = median([s.decode_tokens_per_s for s in runs])
        rows.append({
            "case": name, "batch": b, "decode_tokens_per_s": tps,
            "per_sequence_tokens_per_s": tps / b,
            "prefill_tokens_per_s": median([s.prefill_tokens_per_s for s in runs]),
            "decode_s": [s.decode_s for s in runs], "decode_steps": runs[0].decode_steps,
        })
        print(f"{name:>24} batch {b:>3}: {tps:,.1f} tokens/s", file=sys.stderr)
        write_partial(path, payload)

    by = {(r["case"], r["batch"]): r["decode_tokens_per_s"] for r in rows}
    for r in rows:
        if r["case"] != "base":
            r["vs_base"] = r["decode_tokens_per_s"] / by[("base", r["batch"])]
    different = next(r for r in rows if r["case"] == f"{batch} different aligners")
    different["vs_shared"] = different["decode_tokens_per_s"] / by[("aligner (shared)", batch)]

    print(f"{config}: prompt {prompt_len} + {new_tokens} new tokens, N={n_tokens}, start_layer={start_layer}, "
          f"{dtype}, compile {compiled}, device {dev}; weights read per step: {bytes_per_token / 1e9:.2f} GB"
          + (f", batch-1 bandwidth bound {roofline:,.0f} tokens/s" if roofline else ""))
    print(format_table(rows, ["case", "batch", "decode_tokens_per_s", "per_sequence_tokens_per_s", "vs_base",
                              "vs_shared", "prefill_tokens_per_s"]))
    payload["complete"] = True
    print(f"wrote {write_json(path, payload)}")
    return payload


if __name__ == "__main__":
    run_cli(main)
