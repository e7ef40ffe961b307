"""Serving throughput of serve/aligner.py: the real server in a child process, queried over HTTP by concurrent
streaming clients with the `openai` client library.

For every concurrency in --clients (default 1, 8, 32), three cases: every client with its own Aligner (up to
--aligners different ones, N cycling through 1..--n-tokens, so the batch mixes prefix sizes), every client sharing
one Aligner of N=--n-tokens, and the bare base. Each client sends --requests-per-client chat requests one after another
(greedy, exactly --max-tokens tokens each: end tokens are ignored). Reported: completion tokens/s over the wall time of
the case, time to first token and request latency (p50, p95). Targets: "different" >= 0.9x "shared" at each
concurrency, and 8 concurrent clients >= 3x the throughput of serving the same requests one after another (the
1-client case, which is what a user gets from `generate/aligner.py` or a server without batching).

Then the stall a long prompt causes: while --stall-clients clients stream, one more request arrives with a prompt of
--long-prompt-tokens tokens. Reported: the longest gap between two tokens of the streaming clients from its arrival to
its first token (what they wait while it is prefilled), and its own time to first token; for our server with
--max-prefill-tokens 2048 (the default: the prompt prefilled in one forward) and --chunk-tokens (chunked prefill, one
chunk per decode step), and for the peer with the same two budgets (`--long-prompt-tokens 0` skips this).

Then prefix caching: --system-clients clients each send --requests-per-client chats that share a system prompt of
--system-prompt-tokens tokens (after one request has carried it, as on a server that has been up a while), each with
its own question. Reported: time to first token, latency, tokens/s and the share of prompt tokens the cache gave, for
our server with its prefix cache (the default) and with --prefix-cache-tokens 0, and for the peer, whose paged cache
shares prompt blocks too (`--system-prompt-tokens 0` skips this).

The peer, in the same run (`--no-peer` skips it): `transformers serve --continuous-batching` (transformers' own
OpenAI-compatible server, paged attention) on the same base, exported with scripts/export_hf.py in the same dtype, the
same clients and requests (`min_new_tokens` through its `generation_config` field for the exact length). It serves no
adapters, so its rows are the bare base; x_peer divides each row's tokens/s by the peer's at the same concurrency.

    python benchmarks/serve.py                                   # the embedded SmolLM2, a few minutes on 2 cores
    python benchmarks/serve.py --checkpoint-dir checkpoints/meta-llama/Llama-2-7b-hf --clients 1 8 32 64 --max-batch 64

On a GPU, vLLM with `--enable-lora` is the peer a user serving many LoRAs would pick; it needs CUDA and is not run here.
"""

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BenchmarkError, check_out, format_table, machine_info, machine_name, pick_device,  # noqa: E402
                    require, sigterm_as_interrupt, write_json, write_partial)

import torch  # noqa: E402

from lit_aligner.cli import run_cli  # noqa: E402
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR  # noqa: E402

PEER = "transformers serve"
PEER_PAGE_TOKENS = 256  # tokens per KV-cache block of transformers' continuous batching (its page_size default)
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


def exact_length(server: str, max_tokens: int) -> Dict[str, Any]:
    """The request fields that make a server generate exactly max_tokens tokens, ignoring end tokens."""
    if server == PEER:
        return {"generation_config": json.dumps({"min_new_tokens": max_tokens, "max_new_tokens": max_tokens,
                                                 "do_sample": False})}
    return {"ignore_eos": True}


FOX = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. "
RULES = "You are the help desk of a hiking club: answer in one friendly sentence and never invent trail names. "


def long_prompt(checkpoint_dir: Path, tokens: int, sentence: str = FOX) -> str:
    """A message of about `tokens` tokens of the base's tokenizer (the same tokenizer for the peer): `sentence`
    repeated."""
    from lit_aligner.base import load_tokenizer

    tok = load_tokenizer(checkpoint_dir)
    per = max(1, len(tok.encode(sentence, bos=False)))
    text = sentence * (tokens // per + 1)
    ids = tok.encode(text, bos=False)[:tokens]
    return tok.decode(ids)


async def stall_case(base_url: str, model: str, clients: int, max_tokens: int, long_text: str,
                     extra_body: Dict[str, Any]) -> Dict[str, Any]:
    """`clients` greedy streams of max_tokens tokens; once each has its first token, one request with the long prompt
    (1 token). The longest gap between two tokens of a stream while the long request waits for its first token, the
    longest gap over the whole case, and the long request's time to first token."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
    gaps: List[tuple] = []
    streaming, window = asyncio.Event(), {}
    started = [0]

    async def stream(c: int) -> None:
        last = None
        s = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[c % len(PROMPTS)]}], max_tokens=max_tokens,
            temperature=0, stream=True, extra_body=extra_body)
        async for chunk in s:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                if last is None:
                    started[0] += 1
                    if started[0] == clients:
                        streaming.set()
                else:
                    gaps.append((last, now))
                last = now

    async def long_request() -> None:
        await streaming.wait()
        window["sent"] = time.perf_counter()
        s = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": long_text}], max_tokens=1, temperature=0, stream=True)
        async for chunk in s:  # (a first chunk may carry only the role, with empty content)
            if "first" not in window and chunk.choices and chunk.choices[0].delta.content:
                window["first"] = time.perf_counter()
        window.setdefault("first", time.perf_counter())

    await asyncio.gather(*(stream(c) for c in range(clients)), long_request())
    await client.close()
    sent, first = window["sent"], window["first"]
    during = [b - a for a, b in gaps if b >= sent and a <= first]
    return {"stall_max_gap_s": max(during, default=float("nan")),
            "max_gap_s": max((b - a for a, b in gaps), default=float("nan")), "long_ttft_s": first - sent,
            "streams_outlasted_it": max((b for _, b in gaps), default=0.0) > first}


async def run_case(base_url: str, models: List[str], requests_per_client: int, max_tokens: int,
                   extra_body: Optional[Dict[str, Any]] = None, system: str = "") -> Dict[str, Any]:
    """len(models) clients at once, client c using models[c]; each sends its requests one after another, with the
    system prompt `system` when given."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
    ttft, latency, tokens, prompt_tokens, cached = [], [], [0], [0], [0]
    head = [{"role": "system", "content": system}] if system else []

    async def one_client(c: int, model: str) -> None:
        for r in range(requests_per_client):
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            t0 = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model=model, messages=head + [{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body=extra_body or {"ignore_eos": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
                if chunk.usage:
                    tokens[0] += chunk.usage.completion_tokens
                    prompt_tokens[0] += chunk.usage.prompt_tokens
                    details = chunk.usage.prompt_tokens_details
                    cached[0] += (details.cached_tokens or 0) if details else 0
            end = time.perf_counter()
            ttft.append((first or end) - t0)
            latency.append(end - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c, m) for c, m in enumerate(models)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"requests": len(latency), "completion_tokens": tokens[0], "wall_s": wall,
            "prompt_tokens": prompt_tokens[0], "cached_share": cached[0] / max(prompt_tokens[0], 1),
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
    peer: bool = True,
    long_prompt_tokens: int = 1800,
    chunk_tokens: int = 256,
    stall_clients: int = 8,
    stall_max_tokens: int = 96,
    system_prompt_tokens: int = 1024,
    system_clients: int = 8,
    out: Optional[Path] = None,
    force: bool = False,
) -> Dict[str, Any]:
    """Throughput, time to first token and latency of the server at several concurrencies, with one Aligner per
    client vs one shared Aligner vs the bare base, beside `transformers serve` on the same base.

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
        dtype: the server's --dtype (the peer gets the same weights in the same dtype).
        peer: also measure `transformers serve --continuous-batching` on the same base (the bare base: it serves no
            adapters); --no-peer skips it.
        long_prompt_tokens: tokens of the prompt that arrives during decoding in the stall case (0 skips the case).
        chunk_tokens: our server's --max-prefill-tokens in the chunked row of the stall case.
        stall_clients: clients streaming when the long prompt arrives.
        stall_max_tokens: tokens each of them streams.
        system_prompt_tokens: tokens of the system prompt the clients of the prefix-caching case share (0 skips it).
        system_clients: clients of that case (each sends --requests-per-client requests).
        out: JSON results file (default benchmarks/results/serve-<model>-<machine>.json).
        force: replace an existing results file.
    """
    require("openai", "fastapi", "uvicorn", "prometheus_client", extra="serve,test")
    if peer:
        require("transformers", extra="eval", or_flag="--no-peer")
        import importlib.util

        import transformers

        if importlib.util.find_spec("transformers.cli.serve") is None:
            raise BenchmarkError(f"the peer is `transformers serve` (transformers 5 or newer), which transformers "
                                 f"{transformers.__version__} lacks: pip install -U transformers (or --no-peer)")
    from lit_aligner.devices import resolve_dtype
    from lit_aligner.serving import DEFAULT_MAX_SEQ_LENGTH, ServeConfig
    from lit_aligner.serving.process import ServerProcess

    if min(clients) < 1 or requests_per_client < 1 or sequential_requests < 1 or max_tokens < 1 or aligners < 1:
        raise BenchmarkError("--clients, --requests-per-client, --sequential-requests, --max-tokens and --aligners "
                             "must be >= 1")
    if long_prompt_tokens < 0 or chunk_tokens < 1 or stall_clients < 1 or stall_max_tokens < 2:
        raise BenchmarkError("--long-prompt-tokens must be >= 0, --chunk-tokens and --stall-clients >= 1, "
                             "--stall-max-tokens >= 2")
    if system_prompt_tokens < 0 or system_clients < 1:
        raise BenchmarkError("--system-prompt-tokens must be >= 0, --system-clients >= 1")
    if not (Path(checkpoint_dir) / "config.json").is_file():
        raise BenchmarkError(f"--checkpoint-dir {checkpoint_dir}: no converted model there (config.json missing); "
                             f"run python scripts/convert_gguf.py --default")
    from lit_aligner.base import load_config

    name = load_config(checkpoint_dir).name or Path(checkpoint_dir).name
    dev = pick_device(device)
    path = check_out(out or Path(__file__).parent / "results" / f"serve-{name}-{machine_name(dev)}.json", force)

    def against(server, label: str, case) -> Dict[str, Any]:
        """Run the coroutine `case` against `server`; a failure names the server and shows its last output."""
        try:
            return asyncio.run(case)
        except Exception as e:  # a server that dropped a connection: its last lines say why
            raise BenchmarkError(f"{label}: {type(e).__name__}: {e}; its last output:\n{server.output(30)}") from e

    def measure(server, label: str, cases: Dict[str, List[str]], warm_up: List[List[str]]) -> None:
        """Every concurrency, every case (label -> the model each client asks for, cycled), after the `warm_up`
        rounds (one 2-token request per model listed, at once; not recorded)."""
        for models in warm_up:
            against(server, label, run_case(server.base_url, models, 1, 2, exact_length(label, 2)))
        for n in clients:
            for case, names in cases.items():
                if n == 1 and case == "different":
                    continue  # one client has one Aligner: "shared" is that row
                models = [names[c % len(names)] for c in range(n)]
                result = against(server, label, run_case(server.base_url, models, sequential_requests if n == 1 else
                                                         requests_per_client, max_tokens,
                                                         exact_length(label, max_tokens)))
                aligners_col = f"{min(n, len(names))} different" if case == "different" else case
                rows.append({"server": label, "clients": n, "aligners": aligners_col, **result})
                write_partial(path, payload)
                print(f"{label}, {n} clients, {aligners_col}: {result['tokens_per_s']:.1f} tokens/s", file=sys.stderr)

    context = min(load_config(checkpoint_dir).block_size, DEFAULT_MAX_SEQ_LENGTH)
    if long_prompt_tokens and long_prompt_tokens + 16 >= context:
        raise BenchmarkError(f"--long-prompt-tokens {long_prompt_tokens}: the server's context is {context} tokens; "
                             f"give at most {context - 17} (or 0 to skip the stall case)")
    if system_prompt_tokens and system_prompt_tokens + 64 + max_tokens >= context:
        raise BenchmarkError(f"--system-prompt-tokens {system_prompt_tokens}: the server's context is {context} "
                             f"tokens; give at most {context - 65 - max_tokens} (or 0 to skip the prefix-cache case)")
    long_text = long_prompt(Path(checkpoint_dir), long_prompt_tokens) if long_prompt_tokens else ""
    system_text = long_prompt(Path(checkpoint_dir), system_prompt_tokens, RULES) if system_prompt_tokens else ""
    rows: List[Dict[str, Any]] = []
    stalls: List[Dict[str, Any]] = []
    prefix_rows: List[Dict[str, Any]] = []
    # Written beside the results file after every case (<name>.partial.json): a run stopped by a time limit keeps them.
    payload = {"benchmark": "serve", "model": name, "max_tokens": max_tokens, "max_batch": max_batch,
               "n_tokens": n_tokens, "complete": False, "machine": machine_info(dev), "peers": [PEER] if peer else [],
               **({"peer_versions": {"transformers": transformers.__version__}} if peer else {}), "rows": rows,
               "stall_rows": stalls, "prefix_rows": prefix_rows}

    def shared_system(server, label: str, model: str, cache: str) -> None:
        """The prefix-caching case, after one request has carried the system prompt (not recorded)."""
        if not system_prompt_tokens:
            return

        async def case():
            await run_case(server.base_url, [model], 1, 2, exact_length(label, 2), system=system_text)
            return await run_case(server.base_url, [model] * system_clients, requests_per_client, max_tokens,
                                  exact_length(label, max_tokens), system=system_text)

        result = against(server, label, case())
        prefix_rows.append({"server": label, "prefix_cache": cache, "clients": system_clients,
                            "system_prompt_tokens": system_prompt_tokens, **result})
        write_partial(path, payload)
        print(f"{label}, prefix cache {cache}: time to first token p50 {result['ttft_p50_s']:.2f} s with a shared "
              f"{system_prompt_tokens}-token system prompt", file=sys.stderr)

    def stall(server, label: str, model: str, budget: int) -> None:
        if not long_prompt_tokens:
            return
        result = against(server, label, stall_case(server.base_url, model, stall_clients, stall_max_tokens, long_text,
                                                    exact_length(label, stall_max_tokens)))
        stalls.append({"server": label, "prefill_budget": budget, "clients": stall_clients,
                       "long_prompt_tokens": long_prompt_tokens, **result})
        write_partial(path, payload)
        print(f"{label}, prefill budget {budget}: a {long_prompt_tokens}-token prompt stalled {stall_clients} "
              f"streams for up to {result['stall_max_gap_s']:.2f} s", file=sys.stderr)

    # SIGTERM too: the servers stop with the benchmark and the folder goes
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="lit-aligner-bench-",
                                                             ignore_cleanup_errors=True) as t:
        tmp = Path(t)
        adir = tmp / "aligners"
        write_aligners(Path(checkpoint_dir), adir, aligners, n_tokens)
        args = ["--checkpoint-dir", str(checkpoint_dir), "--aligners-dir", str(adir), "--max-batch", str(max_batch),
                "--max-queue", str(max(max(clients), 64)), "--max-loaded-aligners", str(aligners + 1),
                "--device", device, "--dtype", dtype]
        different = [f"a{i:02d}" for i in range(aligners)]
        with ServerProcess(args) as server:
            measure(server, "lit-aligner", {"different": different, "1 shared": ["shared"], "bare base": [name]},
                    warm_up=[different + ["shared"]])  # loads every Aligner, allocates the cache
            stall(server, "lit-aligner", name, ServeConfig.max_prefill_tokens)
            shared_system(server, "lit-aligner", name, "on")
        if system_prompt_tokens:
            with ServerProcess(args + ["--prefix-cache-tokens", "0"]) as server:
                shared_system(server, "lit-aligner", name, "off")
        if long_prompt_tokens:
            chunked = args + ["--max-prefill-tokens", str(chunk_tokens)]
            with ServerProcess(chunked) as server:
                asyncio.run(run_case(server.base_url, [name] * stall_clients, 1, 2))  # warm up
                stall(server, "lit-aligner", name, chunk_tokens)
        if peer:
            from lit_aligner.convert.export import export_hf

            hf_dir = tmp / "hf"
            export_hf(checkpoint_dir, hf_dir, dtype=resolve_dtype(dtype, dev))
            # The KV-cache room and the prefill budget of ours (max_batch rows of the server's context, its
            # --max-prefill-tokens): left to size its cache from free memory, transformers spent 15-20 s of a CPU
            # on it at the first request.
            def peer_command(budget: int) -> List[str]:
                return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(hf_dir),
                        "--continuous-batching", "--device", str(dev), "--dtype", "auto",
                        "--cb-num-blocks", str(-(-max_batch * context // PEER_PAGE_TOKENS)),
                        "--cb-max-batch-tokens", str(budget)]

            with ServerProcess(command=peer_command(ServeConfig.max_prefill_tokens), timeout=600) as server:
                # its first request starts the batching manager: alone, then a batch
                measure(server, PEER, {"bare base": [str(hf_dir)]},
                        warm_up=[[str(hf_dir)], [str(hf_dir)] * min(8, max(clients))])
                stall(server, PEER, str(hf_dir), ServeConfig.max_prefill_tokens)
                shared_system(server, PEER, str(hf_dir), "block sharing")
            if long_prompt_tokens:  # the peer with our chunk budget too (its scheduler splits prompts by it)
                with ServerProcess(command=peer_command(chunk_tokens), timeout=600) as server:
                    for models in ([str(hf_dir)], [str(hf_dir)] * stall_clients):
                        asyncio.run(run_case(server.base_url, models, 1, 2, exact_length(PEER, 2)))
                    stall(server, PEER, str(hf_dir), chunk_tokens)

    def find(server: str, n: int, aligners_col: str) -> Optional[Dict[str, Any]]:
        return next((r for r in rows if (r["server"], r["clients"], r["aligners"]) == (server, n, aligners_col)), None)

    for r in rows:
        # against the same case served to one client (one client with "different" Aligners is "1 shared")
        sequential = find(r["server"], 1, r["aligners"]) or find(r["server"], 1, "1 shared")
        shared = find(r["server"], r["clients"], "1 shared")
        r["x_sequential"] = r["tokens_per_s"] / sequential["tokens_per_s"] if sequential else None
        r["x_shared"] = r["tokens_per_s"] / shared["tokens_per_s"] if shared else None
        other = find(PEER, r["clients"], "bare base")
        r["x_peer"] = r["tokens_per_s"] / other["tokens_per_s"] if other else None
    columns = ["server", "clients", "aligners", "requests", "tokens_per_s", "x_shared", "x_sequential", "x_peer",
               "ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s"]
    table = format_table(rows, columns)
    print(f"serving {name}: {max_tokens} tokens per request, --max-batch {max_batch}")
    print(table)
    stall_table = format_table(stalls, ["server", "prefill_budget", "clients", "long_prompt_tokens", "stall_max_gap_s",
                                        "long_ttft_s", "max_gap_s"]) if stalls else ""
    if stalls:
        print(f"a {long_prompt_tokens}-token prompt arriving while {stall_clients} clients stream "
              f"{stall_max_tokens} tokens each:")
        print(stall_table)
    prefix_table = format_table(prefix_rows, ["server", "prefix_cache", "clients", "system_prompt_tokens", "requests",
                                              "cached_share", "ttft_p50_s", "ttft_p95_s", "latency_p50_s",
                                              "tokens_per_s"]) if prefix_rows else ""
    if prefix_rows:
        print(f"{system_clients} clients sharing a {system_prompt_tokens}-token system prompt:")
        print(prefix_table)
    payload.update(complete=True, table=table, stall_table=stall_table, prefix_table=prefix_table)
    write_json(path, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    run_cli(main, description=__doc__)
