"""Serving throughput of serve/aligner.py: the real server in a child process, queried over HTTP by concurrent
streaming clients with the `openai` client library.

For every concurrency in --clients (default 1, 8, 32), two cases: every client with its own Aligner (up to
--aligners different ones, N cycling through 1..--n-tokens, so the batch mixes prefix sizes) and every client sharing
one Aligner of N=--n-tokens. Each client sends --requests-per-client chat requests one after another (greedy,
`ignore_eos`: exactly --max-tokens tokens each). Reported: completion tokens/s over the wall time of the case, time
to first token and request latency (p50, p95). Targets: "different" >= 0.9x "shared" at each concurrency, and 8
concurrent clients >= 3x the throughput of serving the same requests one after another (the 1-client case, which is
what a user gets from `generate/aligner.py` or a server without batching).

    python benchmarks/serve.py                                   # the embedded SmolLM2, a few minutes on 2 cores
    python benchmarks/serve.py --checkpoint-dir checkpoints/meta-llama/Llama-2-7b-hf --clients 1 8 32 64 --max-batch 64
"""

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BenchmarkError, check_out, format_table, machine_info, machine_name, pick_device,  # noqa: E402
                    require, write_json)

import torch  # noqa: E402

from lit_aligner.cli import run_cli  # noqa: E402
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR  # noqa: E402

PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?", "Write a haiku about rain.",
           "Explain photosynthesis in one sentence.", "Name three colors.", "How do I boil an egg?",
           "What is 7 times 6?", "Describe the sea to a child."]


def percentile(xs: List[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def write_aligners(checkpoint_dir: Path, adir: Path, count: int, n_tokens: int) -> None:
    """`count` random Aligners with N cycling through 1..n_tokens (the "different" case) and one of N=n_tokens
    ("shared"); small random gates so the prefix path does real work."""
    from lit_aligner.aligner_files import save_aligner
    from lit_aligner.base import load_config
    from lit_aligner.model import Aligner, AlignerConfig

    config = load_config(checkpoint_dir)
    g = torch.Generator().manual_seed(0)
    for i in range(count + 1):
        n = n_tokens if i == count else 1 + i % n_tokens
        a = Aligner(config, AlignerConfig(n))
        with torch.no_grad():
            a.prefix.copy_(torch.randn(a.prefix.shape, generator=g))
            a.gate.copy_(0.02 * torch.randn(a.gate.shape, generator=g))
        save_aligner(a, adir / ("shared.safetensors" if i == count else f"a{i:02d}.safetensors"), config.name)


async def run_case(base_url: str, models: List[str], requests_per_client: int, max_tokens: int) -> Dict[str, Any]:
    """len(models) clients at once, client c using models[c]; each sends its requests one after another."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
    ttft, latency, tokens = [], [], [0]

    async def one_client(c: int, model: str) -> None:
        for r in range(requests_per_client):
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            t0 = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
                if chunk.usage:
                    tokens[0] += chunk.usage.completion_tokens
            end = time.perf_counter()
            ttft.append((first or end) - t0)
            latency.append(end - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c, m) for c, m in enumerate(models)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"requests": len(latency), "completion_tokens": tokens[0], "wall_s": wall,
            "tokens_per_s": tokens[0] / wall, "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "latency_p50_s": percentile(latency, 0.5), "latency_p95_s": percentile(latency, 0.95)}


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    clients: List[int] = [1, 8, 32],  # noqa: B006 (tyro reads the default)
    requests_per_client: int = 2,
    sequential_requests: int = 8,
    max_tokens: int = 32,
    aligners: int = 16,
    n_tokens: int = 10,
    max_batch: int = 32,
    device: str = "auto",
    dtype: str = "auto",
    out: Optional[Path] = None,
    force: bool = False,
) -> Dict[str, Any]:
    """Throughput, time to first token and latency of the server at several concurrencies, with one Aligner per
    client vs one shared Aligner.

    Args:
        checkpoint_dir: the converted base model the server loads.
        clients: concurrencies to measure (1 = requests one after another).
        requests_per_client: requests each client sends, one after another (concurrency > 1).
        sequential_requests: requests the single client sends (concurrency 1).
        max_tokens: completion tokens per request (exactly: end tokens are ignored).
        aligners: different Aligners for the "different" case (client c uses Aligner c mod this).
        n_tokens: N of the shared Aligner; the different ones cycle N through 1..n_tokens.
        max_batch: the server's --max-batch (rows decoded together).
        device: the server's --device.
        dtype: the server's --dtype.
        out: JSON results file (default benchmarks/results/serve-<model>-<machine>.json).
        force: replace an existing results file.
    """
    require("openai", "fastapi", "uvicorn", extra="serve,test")
    from lit_aligner.serving.process import ServerProcess

    if min(clients) < 1 or requests_per_client < 1 or sequential_requests < 1 or max_tokens < 1 or aligners < 1:
        raise BenchmarkError("--clients, --requests-per-client, --sequential-requests, --max-tokens and --aligners "
                             "must be >= 1")
    if not (Path(checkpoint_dir) / "config.json").is_file():
        raise BenchmarkError(f"--checkpoint-dir {checkpoint_dir}: no converted model there (config.json missing); "
                             f"run python scripts/convert_gguf.py --default")
    from lit_aligner.base import load_config

    name = load_config(checkpoint_dir).name or Path(checkpoint_dir).name
    dev = pick_device(device)
    path = check_out(out or Path(__file__).parent / "results" / f"serve-{name}-{machine_name(dev)}.json", force)

    adir = Path(tempfile.mkdtemp(prefix="lit-aligner-bench-"))
    rows = []
    try:
        write_aligners(Path(checkpoint_dir), adir, aligners, n_tokens)
        args = ["--checkpoint-dir", str(checkpoint_dir), "--aligners-dir", str(adir), "--max-batch", str(max_batch),
                "--max-queue", str(max(max(clients), 64)), "--max-loaded-aligners", str(aligners + 1),
                "--device", device, "--dtype", dtype]
        with ServerProcess(args) as server:
            # warm-up: load every Aligner once, allocate the cache
            asyncio.run(run_case(server.base_url, [f"a{i:02d}" for i in range(aligners)] + ["shared"], 1, 2))
            for n in clients:
                for case in (["shared"] if n == 1 else ["different", "shared"]):
                    models = ["shared"] * n if case == "shared" else [f"a{c % aligners:02d}" for c in range(n)]
                    per_client = sequential_requests if n == 1 else requests_per_client
                    result = asyncio.run(run_case(server.base_url, models, per_client, max_tokens))
                    row = {"clients": n, "aligners": "1 shared" if case == "shared" else
                           f"{min(n, aligners)} different", **result}
                    rows.append(row)
                    print(f"{n} clients, {row['aligners']}: {row['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    finally:
        shutil.rmtree(adir, ignore_errors=True)

    sequential = rows[0]["tokens_per_s"] if rows and rows[0]["clients"] == 1 else None
    for r in rows:
        r["x_sequential"] = r["tokens_per_s"] / sequential if sequential else None
        shared = next((s for s in rows if s["clients"] == r["clients"] and s["aligners"] == "1 shared"), None)
        r["x_shared"] = r["tokens_per_s"] / shared["tokens_per_s"] if shared else None
    columns = ["clients", "aligners", "requests", "tokens_per_s", "x_shared", "x_sequential", "ttft_p50_s",
               "ttft_p95_s", "latency_p50_s", "latency_p95_s"]
    table = format_table(rows, columns)
    print(f"serving {name}: {max_tokens} tokens per request, --max-batch {max_batch}")
    print(table)
    payload = {"benchmark": "serve", "model": name, "max_tokens": max_tokens, "max_batch": max_batch,
               "n_tokens": n_tokens, "machine": machine_info(dev), "rows": rows, "table": table}
    write_json(path, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    run_cli(main, description=__doc__)
