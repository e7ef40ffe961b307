"""Decoding throughput with `lit_aligner.generation.generate`: batch 1 and batch B, with and without an
Aligner, and B different Aligners in one batch (one per row) against B rows sharing one; then, in the same run, the peer
a user would pick instead on the same shape, prompts and dtype: Hugging Face transformers `generate` for the bare base
and PEFT LoRA r=8 (q, v) for the alignments, one adapter and B different adapters in one batch (PEFT's mixed-adapter
batches).

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
from common import (BenchmarkError, build_model, build_peer_model, check_out, default_out, format_table,  # noqa: E402
                    load_config, machine_info, median, out_of_memory_hint, peer_lora_config, peer_versions,
                    pick_device, pick_dtype, random_aligner, require, timed, write_json, write_partial)

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
    peer: bool = True,
    out: Optional[Path] = None,
    force: bool = False,
) -> Dict[str, Any]:
    """Decode tokens/s of the bare base and with Aligners, at batch 1 and batch `batch`, and of the peer.

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
        peer: also time the peer in the same run (transformers and PEFT, the `eval` extra): its base, one LoRA r=8
            on q and v, and `batch` different LoRAs in one batch; --no-peer skips it.
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
    if peer:
        require("transformers", "peft", extra="eval", or_flag="--no-peer")
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
        "peer": PEER if peer else None, "peer_versions": peer_versions() if peer else None,
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
            "system": OURS, "case": name, "batch": b, "decode_tokens_per_s": tps,
            "per_sequence_tokens_per_s": tps / b,
            "prefill_tokens_per_s": median([s.prefill_tokens_per_s for s in runs]),
            "decode_s": [s.decode_s for s in runs], "decode_steps": runs[0].decode_steps,
        })
        print(f"{name:>24} batch {b:>3}: {tps:,.1f} tokens/s", file=sys.stderr)
        write_partial(path, payload)

    theirs: Dict[Any, str] = {}  # our (case, batch) -> the peer's case
    if peer:
        del model, shared, many  # the peer's own copy of the weights takes their place
        theirs = {(ours, b): peer_case for (ours, b, _), peer_case in zip(cases, (
            "base", "LoRA r=8", "LoRA r=8 (shared)", f"{batch} different LoRAs", "base"))}
        time_peer(cfg, dev, dtype, prompts, new_tokens, repeats, theirs, rows, lambda: write_partial(path, payload))

    by = {(r["system"], r["case"], r["batch"]): r["decode_tokens_per_s"] for r in rows}
    for r in rows:
        system = r["system"]
        if r["case"] != "base":
            r["vs_base"] = r["decode_tokens_per_s"] / by[(system, "base", r["batch"])]
        if r["case"].startswith(f"{batch} different"):
            shared_case = "aligner (shared)" if system == OURS else theirs[("aligner (shared)", batch)]
            r["vs_shared"] = r["decode_tokens_per_s"] / by[(system, shared_case, batch)]
        if system == OURS and peer:
            r["vs_peer"] = r["decode_tokens_per_s"] / by[(PEER, theirs[(r["case"], r["batch"])], r["batch"])]

    print(f"{config}: prompt {prompt_len} + {new_tokens} new tokens, N={n_tokens}, start_layer={start_layer}, "
          f"{dtype}, compile {compiled}, device {dev}; weights read per step: {bytes_per_token / 1e9:.2f} GB"
          + (f", batch-1 bandwidth bound {roofline:,.0f} tokens/s" if roofline else ""))
    print(format_table(rows, ["system", "case", "batch", "decode_tokens_per_s", "per_sequence_tokens_per_s",
                              "vs_base", "vs_shared", "vs_peer", "prefill_tokens_per_s"]))
    payload["complete"] = True
    print(f"wrote {write_json(path, payload)}")
    return payload


OURS, PEER = "lit-aligner", "transformers + PEFT"


def time_peer(cfg, dev: torch.device, dtype: torch.dtype, prompts: List[torch.Tensor], new_tokens: int, repeats: int,
              cases: Dict[Any, str], rows: List[Dict[str, Any]], save) -> None:
    """The peer's rows, appended to `rows`: Hugging Face transformers `generate` as a user calls it (greedy, its
    default KV cache, no compile) on a model of the same shape (`Config.to_hf_config`, random weights), then PEFT LoRA
    r=8 on q and v: one adapter, and one per row in a single batch (`adapter_names`). PEFT's LoRA starts at B = 0, a
    no-op whose matmuls still run: speed does not depend on the values. transformers does not time prefill and decode
    apart, so a case's decode time is a run of `new_tokens` minus a run of one new token (the prefill and the first
    token), like our `decode_steps` = new_tokens - 1."""
    import peft

    model = build_peer_model(cfg, dev, dtype).eval()
    batch = max(b for _, b in cases)
    lora = peer_lora_config()
    names = [f"lora{i}" for i in range(batch)]

    def run(m, b: int, n: int, **kwargs) -> float:
        ids = torch.stack(prompts[:b]).to(dev)
        into: List[float] = []
        with timed(dev, into), torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, **kwargs)
        if out.shape != (b, ids.shape[1] + n):
            raise BenchmarkError(f"transformers returned {tuple(out.shape)} tokens for {b} x {ids.shape[1]} + {n}")
        return into[0]

    # the bare base before PEFT changes the model
    for (_, b), case in sorted(cases.items(), key=lambda c: c[1] != "base"):
        if case != "base" and not isinstance(model, peft.PeftModel):
            model = peft.get_peft_model(model, lora, adapter_name=names[0])
            for name in names[1:]:
                model.add_adapter(name, lora)
            model.eval()
        kwargs = {"adapter_names": names[:b]} if case.endswith("different LoRAs") else {}
        decode_s, first_s = [], []
        for r in range(repeats + 1):
            with out_of_memory_hint("lower --batch or --new-tokens, or --no-peer"):
                full, one = run(model, b, new_tokens, **kwargs), run(model, b, 1, **kwargs)
            if r:  # the first run is warm-up
                decode_s.append(full - one)
                first_s.append(one)
        tps = median([b * (new_tokens - 1) / s if s > 0 else float("nan") for s in decode_s])
        rows.append({
            "system": PEER, "case": case, "batch": b, "decode_tokens_per_s": tps, "per_sequence_tokens_per_s": tps / b,
            "prefill_tokens_per_s": median([b * prompts[0].numel() / s for s in first_s]), "decode_s": decode_s,
            "decode_steps": new_tokens - 1,
        })
        print(f"{PEER}: {case:>20} batch {b:>3}: {tps:,.1f} tokens/s", file=sys.stderr)
        save()


if __name__ == "__main__":
    run_cli(main)
