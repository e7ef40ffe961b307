"""serve/aligner.py for real: the server runs in a child process on a free localhost port with the embedded SmolLM2,
and is queried with the `openai` client library (and raw HTTP where the client would hide the response)."""

import asyncio
import json
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import helpers  # noqa: E402
from lit_aligner.aligner_files import save_aligner  # noqa: E402
from lit_aligner.model import Aligner, AlignerConfig  # noqa: E402
from lit_aligner.serving.process import ServerProcess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key-123"
# 8 Aligners of every size and start layer the method allows (N 1..10), small random gates: each answers differently.
SHAPES = [(1, 2), (2, 0), (3, 5), (5, 2), (7, 10), (10, 2), (10, 0), (4, 29)]


def make_aligner(config, n_tokens, start_layer, seed, scale=0.03):
    torch.manual_seed(seed)
    a = Aligner(config, AlignerConfig(n_tokens=n_tokens, start_layer=start_layer))
    with torch.no_grad():
        a.gate.normal_(0, scale)
    return a


@pytest.fixture(scope="module")
def adir(smollm2_dir, tmp_path_factory):
    from lit_aligner.base import load_config

    config = load_config(smollm2_dir)
    d = tmp_path_factory.mktemp("aligners")
    for i, (n, start) in enumerate(SHAPES):
        save_aligner(make_aligner(config, n, start, i), d / f"a{i}.safetensors", config.name)
    save_aligner(make_aligner(config, 2, 2, 99), d / "fixer.safetensors", config.name, {"mode": "correction"})
    return d


@pytest.fixture(scope="module")
def server(smollm2_dir, adir):
    args = ["--checkpoint-dir", str(smollm2_dir), "--aligners-dir", str(adir), "--max-batch", "16",
            "--max-queue", "32", "--max-seq-length", "512", "--max-loaded-aligners", "4", "--reasoning-parser", "think"]
    with ServerProcess(args, env={"LIT_ALIGNER_API_KEY": KEY}) as s:
        yield s


def test_server_process_that_exits_while_starting_is_one_error_with_its_output(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where its log goes (tempfile reads TMPDIR once: reset it)
    monkeypatch.setattr("tempfile.tempdir", None)
    boom = [sys.executable, "-c", "import sys; print('no such checkpoint'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="the server exited with status 3:\nno such checkpoint"):
        with ServerProcess(command=boom, timeout=60):
            pass
    assert list(tmp_path.iterdir()) == []  # its log went with it


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_name(smollm2_dir):
    from lit_aligner.base import load_config

    return load_config(smollm2_dir).name


@pytest.fixture(scope="module")
def local_model(smollm2_dir):
    """The same base loaded in this process: what the tests compute apart from the server."""
    from lit_aligner.base import load_base

    return load_base(smollm2_dir, device="cpu")[0]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from lit_aligner.base import load_tokenizer

    return load_tokenizer(smollm2_dir)


def http(url, body=None, headers=None):
    """(status, JSON) of a raw request: what a client without the openai library sees."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(client, model, text, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def test_models_lists_the_base_and_every_aligner(client, base_name):
    ids = [m.id for m in client.models.list().data]
    assert ids == [base_name, "a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "fixer"]


def test_chat_and_completion_streaming_and_not(client, base_name, tokenizer):
    from lit_aligner.prompts import build_prompt, encode_prompt

    r = chat(client, base_name, "What is the capital of France?", max_tokens=20)
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(encode_prompt(tokenizer, build_prompt(tokenizer, "What is the capital of France?")))
    assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    # the same request streamed: same text, pieces in order, usage in the last chunk
    pieces, finish, usage = [], None, None
    for chunk in chat(client, base_name, "What is the capital of France?", max_tokens=20, stream=True,
                      stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == text and finish == r.choices[0].finish_reason
    assert usage.prompt_tokens == n_prompt and usage.completion_tokens == r.usage.completion_tokens

    # completions: raw text, no template; the length limit gives finish_reason "length" and that many tokens
    c = client.completions.create(model=base_name, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 5
    assert c.usage.prompt_tokens == len(tokenizer.encode("The capital of France is"))
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=base_name, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True) if ch.choices)
    assert streamed == c.choices[0].text and "Paris" in streamed


def test_logprobs_equal_the_model_scoring_its_own_answer(client, local_model, adir, tokenizer):
    """Chat and legacy completions, streamed or not, with an Aligner: every generated token's log-probability and its
    top alternatives equal a forward pass of the base + that Aligner over prompt + answer, computed here apart from
    the server; the tokens spell the answer."""
    from lit_aligner.aligner_files import load_aligner
    from lit_aligner.generation import generate
    from lit_aligner.prompts import encode_prompt

    model = local_model
    aligner, _ = load_aligner(adir / "a5.safetensors", model)
    prompt = "The three primary colors are"
    ids = encode_prompt(tokenizer, prompt)
    new = generate(model, [ids], 8, aligners=[aligner])[0]
    with torch.no_grad():
        logits = model(torch.cat([ids, new[:-1]])[None], aligner=aligner)[0, len(ids) - 1:]
    expect = torch.log_softmax(logits.float(), -1)
    chosen, (top_v, top_i) = expect.gather(1, new[:, None])[:, 0], expect.topk(3, dim=-1)
    words = [tokenizer.decode([int(t)]) for t in new]

    c = client.completions.create(model="a5", prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert lp.tokens == words and "".join(lp.tokens) == c.choices[0].text
    assert lp.token_logprobs == pytest.approx(chosen.tolist(), abs=2e-3)
    assert lp.text_offset == [sum(map(len, words[:i])) for i in range(len(words))]
    for row, vs, ts in zip(lp.top_logprobs, top_v.tolist(), top_i.tolist()):
        assert list(row) == [tokenizer.decode([t]) for t in ts] and list(row.values()) == pytest.approx(vs, abs=2e-3)
    streamed = [ch.choices[0].logprobs for ch in client.completions.create(
        model="a5", prompt=prompt, max_tokens=8, temperature=0, logprobs=3, stream=True) if ch.choices]
    assert [t for s in streamed if s for t in s.tokens] == words
    assert [o for s in streamed if s for o in s.text_offset] == lp.text_offset

    r = client.chat.completions.create(model="a5", messages=[{"role": "user", "content": "Name three colors."}],
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob) and t.logprob >= t.top_logprobs[1].logprob
        assert bytes(t.bytes).decode() == t.token and t.logprob <= 0
    chunks = [ch.choices[0].logprobs for ch in client.chat.completions.create(
        model="a5", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=2, stream=True) if ch.choices and ch.choices[0].logprobs]
    assert [t.logprob for ch in chunks for t in ch.content] == pytest.approx([t.logprob for t in content], abs=1e-5)
    plain = chat(client, "a5", "Name three colors.", max_tokens=8)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_echo_scores_the_prompt_as_the_model_does(server, client, local_model, adir, tokenizer, base_name):
    """`echo` with `logprobs` (legacy completions): the choice's text and logprobs start with the prompt's, every
    prompt token's log-probability and top alternatives equal a forward pass of the base + Aligner computed here;
    the same streamed; `max_tokens` 0 scores the prompt only; token-id prompts; several prompts x n choices, each
    what a single request gets; vLLM's tokenizer endpoints agree with the tokenizer."""
    from lit_aligner.aligner_files import load_aligner

    model = local_model
    aligner, _ = load_aligner(adir / "a5.safetensors", model)
    prompt = "The three primary colors are red, yellow and"
    ids = tokenizer.encode(prompt).tolist()
    c = client.completions.create(model="a5", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    plain = client.completions.create(model="a5", prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    ch, lp = c.choices[0], c.choices[0].logprobs
    assert ch.text == prompt + plain.choices[0].text and c.usage.prompt_tokens == len(ids)
    assert lp.tokens == [tokenizer.decode([t]) for t in ids] + plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    with torch.no_grad():
        expect = torch.log_softmax(model(torch.tensor([ids]), aligner=aligner)[0, :-1].float(), -1)
        bare = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)
    chosen = expect.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(chosen.tolist(), abs=2e-3)
    assert lp.token_logprobs[1:len(ids)] != pytest.approx(
        bare.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(), abs=2e-3)  # the Aligner is applied
    top_v, top_i = expect.topk(2, dim=-1)
    for row, vs, ts in zip(lp.top_logprobs[1:len(ids)], top_v.tolist(), top_i.tolist()):
        assert list(row) == [tokenizer.decode([t]) for t in ts] and list(row.values()) == pytest.approx(vs, abs=2e-3)
    streamed = [x.choices[0] for x in client.completions.create(
        model="a5", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True, stream=True) if x.choices]
    assert "".join(s.text for s in streamed) == ch.text
    assert [t for s in streamed if s.logprobs for t in s.logprobs.tokens] == lp.tokens
    assert [o for s in streamed if s.logprobs for o in s.logprobs.text_offset] == lp.text_offset

    # token ids in, max_tokens 0: the prompt scored, nothing generated
    z = client.completions.create(model="a5", prompt=ids, max_tokens=0, logprobs=0, echo=True)
    assert z.choices[0].text == prompt and z.choices[0].finish_reason == "length" and z.usage.completion_tokens == 0
    assert z.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:len(ids)], abs=1e-5)
    z = client.completions.create(model="a5", prompt=ids, max_tokens=0, echo=True)
    assert z.choices[0].text == prompt and z.choices[0].logprobs is None

    # several prompts (texts or token-id lists) x n choices: choice p * n + j is prompt p's choice j
    kw = dict(model="a3", max_tokens=5, temperature=1.0, seed=3)
    prompts = ["Once upon a time", "The best food is"]
    many = client.completions.create(prompt=prompts, n=2, **kw)
    as_ids = client.completions.create(prompt=[tokenizer.encode(p).tolist() for p in prompts], n=2, **kw)
    singles = [client.completions.create(prompt=p, **{**kw, "seed": 3 + j}).choices[0].text
               for p in prompts for j in range(2)]
    assert [x.index for x in many.choices] == [0, 1, 2, 3]
    assert [x.text for x in many.choices] == [x.text for x in as_ids.choices] == singles
    assert many.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)

    # vLLM's tokenizer endpoints (no key needed, as vLLM's)
    def post(path, body):
        return http(server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})[1]

    assert post("/tokenize", {"prompt": prompt})["tokens"] == ids
    assert post("/detokenize", {"tokens": ids}) == {"prompt": prompt}
    info = http(server.url + "/tokenizer_info")[1]
    assert info["eos_token"] == tokenizer.id_to_token(tokenizer.eos_id) and info["chat_template"]
    messages = [{"role": "user", "content": "Hi"}]
    assert post("/tokenize", {"messages": messages})["count"] == \
        chat(client, base_name, "Hi", max_tokens=1).usage.prompt_tokens

    for bad, match in [(dict(prompt="hi", max_tokens=0), "needs echo"), (dict(prompt=[10**7]), "vocabulary"),
                       (dict(prompt=["a"] * 20, n=2), "--max-queue"), (dict(prompt=[[]]), "empty")]:
        with pytest.raises(openai.BadRequestError, match=match):
            client.completions.create(model=base_name, **bad)
    with pytest.raises(openai.BadRequestError, match="echo"):
        chat(client, base_name, "hi", extra_body={"echo": True})
    with pytest.raises(openai.BadRequestError, match="one prompt per request"):
        client.completions.create(model="fixer", prompt=["a", "b"], extra_body={"answer": "c"})


def test_lm_eval_harness_evaluates_a_served_aligner(server, local_model, adir, tokenizer, tmp_path, monkeypatch):
    """lm-evaluation-harness's own API model (`local-completions`, the one users point at a vLLM server) against
    this server, on a multiple-choice and a generation task: it finds the tokenizer endpoints by itself, sends token
    ids in batches of 3 over 2 connections, and every log-likelihood, greedy flag and generated answer equals the
    base + Aligner computed here."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("aiohttp")
    from lm_eval.tasks import TaskManager

    from lit_aligner.aligner_files import load_aligner
    from lit_aligner.generation import generate

    d, mc, gen = helpers.harness_tasks(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer key
    res = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(d)),
        model_args={"model": "a5", "base_url": server.base_url + "/completions", "num_concurrent": 2,
                    "batch_size": 3, "max_retries": 1}, log_samples=True)
    model = local_model
    aligner, _ = load_aligner(adir / "a5.safetensors", model)
    right = 0
    for sample in res["samples"]["tiny_mc"]:
        scores = []
        for (ctx, cont), ((ll, greedy),) in zip(sample["arguments"], sample["resps"]):
            c, w = tokenizer.encode(ctx, bos=False).tolist(), tokenizer.encode(ctx + cont, bos=False).tolist()
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([w[:-1]]), aligner=aligner).float(), -1)[0, len(c) - 1:]
            target = torch.tensor(w[len(c):])
            assert ll == pytest.approx(float(lp.gather(-1, target[:, None]).sum()), abs=2e-3)
            assert greedy == bool((lp.argmax(-1) == target).all())
            scores.append(ll)
        right += max(range(3), key=scores.__getitem__) == sample["doc"]["label"]
    assert len(res["samples"]["tiny_mc"]) == len(mc)
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(right / len(mc))
    assert len(res["samples"]["tiny_gen"]) == len(gen)
    for sample in res["samples"]["tiny_gen"]:
        out = generate(model, [tokenizer.encode(sample["doc"]["question"], bos=False)], 6, aligners=[aligner],
                       stop_ids=tokenizer.stop_ids)[0]
        assert sample["resps"][0][0] == tokenizer.decode(out, skip_special=True).split("\n")[0]


def scrape(server):
    """GET /metrics (with the key: its labels name the Aligners), parsed by prometheus_client's own parser:
    {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    assert http(server.url + "/metrics")[0] == 401
    req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_the_requests_tokens_and_latencies_per_model(server, client, base_name):
    before = scrape(server)
    answers = [chat(client, "a2", "Name a fruit.", max_tokens=6), chat(client, "a2", "Name a tree.", max_tokens=5, n=2),
               chat(client, base_name, "Name a bird.", max_tokens=4)]
    stream = list(chat(client, "a2", "Name a fish.", max_tokens=3, stream=True, stream_options={"include_usage": True}))
    after = scrape(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    usage = stream[-1].usage
    finished = [c.finish_reason for r in answers[:2] for c in r.choices]
    finished += [c.finish_reason for ch in stream for c in ch.choices if c.finish_reason]
    for reason in ("stop", "length"):
        assert delta("lit_aligner_requests_total", model="a2", finish_reason=reason) == finished.count(reason)
    assert delta("lit_aligner_generation_tokens_total", model="a2") == \
        sum(r.usage.completion_tokens for r in answers[:2]) + usage.completion_tokens
    # every choice is prefilled: n=2 counts its prompt twice (its usage counts it once)
    assert delta("lit_aligner_prompt_tokens_total", model="a2") == \
        answers[0].usage.prompt_tokens + 2 * answers[1].usage.prompt_tokens + usage.prompt_tokens
    assert delta("lit_aligner_generation_tokens_total", model=base_name) == answers[2].usage.completion_tokens
    for name in ("lit_aligner_time_to_first_token_seconds_count", "lit_aligner_e2e_request_latency_seconds_count"):
        assert delta(name, model="a2") == 4 and delta(name, model=base_name) == 1
    assert 0 < delta("lit_aligner_time_to_first_token_seconds_sum", model="a2") <= \
        delta("lit_aligner_e2e_request_latency_seconds_sum", model="a2")
    assert after[("lit_aligner_num_requests_running", ())] == 0 == after[("lit_aligner_num_requests_waiting", ())]
    assert after[("lit_aligner_aligners_loaded", ())] >= 1


def test_a_shared_system_prompt_comes_from_the_prefix_cache_and_answers_as_computed(server, client, local_model, adir,
                                                                                     tokenizer):
    """Two chats under one Aligner with the same long system prompt: the second one's usage says how many prompt
    tokens came from the cache (the whole 16-token blocks the two prompts share), the /metrics counter agrees, and its
    answer and log-probabilities are those of the base + Aligner computed here apart from the server; another Aligner
    shares none of them."""
    from lit_aligner.aligner_files import load_aligner
    from lit_aligner.generation import generate

    system = ("You answer questions about the weather in the mountains for hikers planning a trip next week; be "
              "brief, name the season and say how sure you are. ") * 2

    def ask(model, question):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        ids = http(server.url + "/tokenize", json.dumps({"messages": messages}).encode(),
                   {"Content-Type": "application/json"})[1]["tokens"]
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True)
        return ids, r

    before = scrape(server)
    first_ids, first = ask("a5", "Will it snow in March?")
    ids, second = ask("a5", "Is July warm?")
    _, other = ask("a6", "Is July warm?")
    hits = scrape(server)[("lit_aligner_prefix_cache_hits_total", (("model", "a5"),))] - \
        before.get(("lit_aligner_prefix_cache_hits_total", (("model", "a5"),)), 0)
    shared = next(i for i, (x, y) in enumerate(zip(ids, first_ids)) if x != y)
    assert shared > 32 and first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == min(shared, len(ids) - 1) // 16 * 16 == hits
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    aligner, _ = load_aligner(adir / "a5.safetensors", local_model)
    new = generate(local_model, [torch.tensor(ids)], 8, aligners=[aligner])[0]
    with torch.no_grad():
        logits = local_model(torch.tensor(ids + new[:-1].tolist())[None], aligner=aligner)[0, len(ids) - 1:]
    chosen = torch.log_softmax(logits.float(), -1).gather(1, new[:, None])[:, 0]
    content = second.choices[0].logprobs.content
    assert "".join(t.token for t in content) == second.choices[0].message.content
    assert [t.token for t in content] == [tokenizer.decode([int(t)]) for t in new[:len(content)]]
    assert [t.logprob for t in content] == pytest.approx(chosen.tolist()[:len(content)], abs=2e-3)


def test_an_aligner_answers_with_its_own_prompt_and_changes_the_answer(client, base_name):
    base = chat(client, base_name, "Name three colors.", max_tokens=16).choices[0].message.content
    steered = [chat(client, f"a{i}", "Name three colors.", max_tokens=16).choices[0].message.content for i in (0, 5)]
    assert base not in steered and steered[0] != steered[1]


def test_stop_strings(client, base_name):
    full = chat(client, base_name, "Count from 1 to 10, separated by commas.", max_tokens=30)
    text = full.choices[0].message.content
    assert "4" in text
    r = chat(client, base_name, "Count from 1 to 10, separated by commas.", max_tokens=30, stop=["4"])
    assert r.choices[0].message.content == text[:text.index("4")] and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in chat(client, base_name, "Count from 1 to 10, separated by "
              "commas.", max_tokens=30, stop=["4", "never"], stream=True) if c.choices]
    assert "".join(pieces) == text[:text.index("4")]


def test_n_choices_are_the_seeded_samples_of_single_requests(client, base_name):
    """n > 1: choice i is what one request with seed + i gets, streamed or not; the prompt counts once in usage."""
    kw = dict(temperature=1.0, seed=11, max_tokens=10)
    r = chat(client, "a1", "Tell me a story.", n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [chat(client, "a1", "Tell me a story.", **{**kw, "seed": 11 + i}) for i in range(3)]
    assert [c.message.content for c in r.choices] == [s.choices[0].message.content for s in singles]
    assert len({c.message.content for c in r.choices}) == 3
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    texts, finishes, usage = ["", "", ""], [None] * 3, None
    for chunk in chat(client, "a1", "Tell me a story.", n=3, stream=True, stream_options={"include_usage": True},
                      **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [c.message.content for c in r.choices] and None not in finishes
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    c = client.completions.create(model=base_name, prompt="The capital of France is", max_tokens=4, temperature=0,
                                  n=2, logprobs=1)
    assert c.choices[0].text == c.choices[1].text and c.choices[1].logprobs.tokens  # greedy: the same twice


def test_penalties_logit_bias_and_top_k_equal_a_reference_decoder(client, local_model, adir, tokenizer, base_name):
    """presence / frequency / repetition penalties and logit_bias (greedy, with an Aligner) give exactly the tokens
    of a plain decoding loop written here (full forward per token, the formulas of OpenAI's and transformers' docs);
    the log-probabilities stay the raw model's; top_k 1 samples the greedy answer."""
    from collections import Counter

    from lit_aligner.aligner_files import load_aligner

    model = local_model
    aligner, _ = load_aligner(adir / "a3.safetensors", model)
    prompt = "Say it again and again: la la la la la la la la"
    ids = tokenizer.encode(prompt).tolist()

    def reference(n, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
        seq, out, counts, raw = list(ids), [], Counter(), []
        for _ in range(n):
            with torch.no_grad():
                logits = model(torch.tensor([seq]), aligner=aligner)[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            for t in set(seq):
                if repetition != 1.0:
                    logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
            for t, c in counts.items():
                logits[t] -= frequency * c + presence
            for t, b in (bias or {}).items():
                logits[t] += b
            t = int(logits.argmax())
            if t in tokenizer.stop_ids:
                break
            out.append(t)
            raw.append(float(lp[t]))
            seq.append(t)
            counts[t] += 1
        return out, raw

    plain = client.completions.create(model="a3", prompt=prompt, max_tokens=10, temperature=0).choices[0].text
    first = reference(1)[0][0]
    cases = [dict(repetition=1.3), dict(presence=0.5, frequency=0.8), dict(bias={first: -100.0, 28: 3.0})]
    for case in cases:
        kw = dict(presence_penalty=case.get("presence", 0.0), frequency_penalty=case.get("frequency", 0.0),
                  logit_bias={str(t): b for t, b in case.get("bias", {}).items()} or None)
        r = client.completions.create(model="a3", prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                      extra_body={"repetition_penalty": case.get("repetition", 1.0)},
                                      **{k: v for k, v in kw.items() if v is not None})
        tokens, raw = reference(10, **case)
        assert r.choices[0].text == tokenizer.decode(tokens) != plain, case
        assert r.choices[0].logprobs.token_logprobs == pytest.approx(raw, abs=2e-3), case  # raw, not penalised
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # each keeps only the most likely token: greedy
        sampled = client.completions.create(model="a3", prompt=prompt, max_tokens=10, temperature=1.0, seed=5,
                                            extra_body=extra)
        assert sampled.choices[0].text == plain, extra
    for bad, match in [(dict(logit_bias={"x": 1}), "logit_bias"), (dict(logit_bias={"10000000": 1}), "vocabulary"),
                       (dict(logit_bias={"5": 101}), "logit_bias"), (dict(presence_penalty=2.5), "presence_penalty"),
                       (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
                       (dict(extra_body={"min_p": 1.5}), "min_p")]:
        with pytest.raises(openai.BadRequestError, match=match):
            client.completions.create(model=base_name, prompt="hi", max_tokens=2, **bad)

def test_seed_gives_the_same_sample(client, base_name):
    a, b, c = (chat(client, base_name, "Tell me a story.", temperature=1.0, seed=s, max_tokens=16)
               .choices[0].message.content for s in (7, 7, 8))
    assert a == b and a != c


def test_error_paths(server, client, base_name):
    # 404 unknown model, also for names that look like paths out of the directory
    for name in ["no-such-aligner", "../a0", str(Path(server.base_url)), "/etc/passwd", "a0.safetensors"]:
        with pytest.raises(openai.NotFoundError) as e:
            chat(client, name, "hi")
        assert e.value.body["code"] == "model_not_found"
    # 400: too long a prompt, max_tokens past the context, n > 1, unsupported fields, malformed bodies
    with pytest.raises(openai.BadRequestError, match="context"):
        chat(client, base_name, "word " * 600)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(client, base_name, "hi", max_tokens=600)
    with pytest.raises(openai.BadRequestError, match="n: Input should be less than or equal to 16"):
        chat(client, base_name, "hi", n=17)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        chat(client, base_name, "hi", extra_body={"best_of": 2})
    with pytest.raises(openai.BadRequestError, match="'audio' is not supported"):
        chat(client, base_name, "hi", audio={"voice": "alloy", "format": "wav"})
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        chat(client, base_name, "hi", top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        chat(client, base_name, "hi", logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(client, base_name, "hi", temperature=-1)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in [b"{not json", b'{"model": "x"}', b'{"model": "x", "messages": "hi"}', b"[]",
                 json.dumps({"model": base_name, "messages": [{"role": "assistant", "content": "hi"}]}).encode()]:
        status, answer = http(server.base_url + "/chat/completions", body, headers)
        assert status == 400, body
        err = answer["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    # 401 without or with a wrong key, on every /v1 route
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        chat(bad, base_name, "hi")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, answer = http(server.base_url + "/models")  # no Authorization header at all
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert http(server.url + "/health") == (200, http(server.url + "/health")[1])


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                         "population": {"type": "integer"}},
        "required": ["city", "population"], "additionalProperties": False}


def test_structured_outputs_hold_answers_to_a_schema_a_regex_and_choices(server, client, base_name):
    """response_format (OpenAI) and structured_outputs (vLLM; also under its older guided_* names): every answer
    parses and fits, greedy or sampled, from the base or an Aligner, streamed or not; the same question unconstrained
    is prose, so the constraint did it."""

    q = "Name a big city and its population."
    free = chat(client, base_name, q, max_tokens=40).choices[0].message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for model, kw in ((base_name, {}), ("a3", {"temperature": 1.0, "seed": 5, "n": 2})):
        r = chat(client, model, q, max_tokens=80, response_format=schema, **kw)
        for choice in r.choices:
            value = json.loads(choice.message.content)
            assert set(value) == {"city", "population"} and isinstance(value["city"], str) and \
                isinstance(value["population"], int) and choice.finish_reason == "stop", choice
    stream = chat(client, "a0", q, max_tokens=60, response_format={"type": "json_object"}, stream=True)
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), dict)
    # completions: a regex and a choice (vLLM's extra field)
    r = client.completions.create(model=base_name, prompt="A product code:", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2,5}"}})
    assert re.fullmatch("[0-9]{3}-[a-z]{2,5}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = chat(client, base_name, "Is the sky green? Answer yes or no.", max_tokens=5,
             extra_body={"structured_outputs": {"choice": ["Yes, it is", "No"]}})
    assert r.choices[0].message.content in ("Yes, it is", "No")
    r = client.completions.create(model=base_name, prompt="A product code:", max_tokens=20, temperature=0,
                                  extra_body={"guided_regex": "[0-9]{3}-[a-z]{2,5}"})  # vLLM's older name
    assert re.fullmatch("[0-9]{3}-[a-z]{2,5}", r.choices[0].text)
    # bad formats: one 400 naming the field
    for kw, param in [({"response_format": {"type": "xml"}}, "response_format"),
                      ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
                       "response_format"),
                      ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "structured_outputs"),
                      ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
                      ({"response_format": {"type": "json_object"},
                        "extra_body": {"structured_outputs": {"regex": "a"}}}, "structured_outputs"),
                      ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
                      ({"extra_body": {"guided_regex": "a", "structured_outputs": {"regex": "a"}}},
                       "structured_outputs"),
                      ({"extra_body": {"prompt_logprobs": 2}}, "prompt_logprobs")]:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, base_name, q, **kw)
        assert e.value.body["param"] == param, kw


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                   "required": ["timezone"], "additionalProperties": False}}}


def next_turn(server, q, call, result):
    """The next turn (the call and its result sent back), its token ids from /tokenize and the prompt they spell."""
    turn = q + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": result}]
    status, tokens = http(server.url + "/tokenize", json.dumps({"messages": turn, "tools": [WEATHER]}).encode(),
                          {"Content-Type": "application/json"})
    assert status == 200, tokens
    prompt = http(server.url + "/detokenize", json.dumps({"tokens": tokens["tokens"]}).encode(),
                  {"Content-Type": "application/json"})[1]["prompt"]
    return turn, tokens, prompt


def weather_call(call) -> dict:
    args = json.loads(call.function.arguments)
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather", call
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit")
    return args


def test_min_tokens_and_stop_token_ids(client, base_name, tokenizer):
    """vLLM's min_tokens: the end token is held off until that many tokens (the answer goes on along the same greedy
    path); stop_token_ids: more tokens that end the answer (not included), also with ignore_eos. Bad values: 400s."""
    q = "Say hello."  # a greedy answer of a few words, then the end token
    plain = chat(client, base_name, q, max_tokens=60)
    n, text = plain.usage.completion_tokens, plain.choices[0].message.content
    assert plain.choices[0].finish_reason == "stop" and n < 50 and "," in text
    longer = chat(client, base_name, q, max_tokens=60, extra_body={"min_tokens": n + 8})
    assert longer.usage.completion_tokens >= n + 8 and longer.choices[0].message.content.startswith(text)
    cut = chat(client, base_name, q, max_tokens=60,
               extra_body={"stop_token_ids": [tokenizer.token_to_id(",")], "ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.index(",")]
    for extra, param in [({"min_tokens": 61}, "min_tokens"), ({"stop_token_ids": [10 ** 9]}, "stop_token_ids"),
                         ({"use_beam_search": True}, "use_beam_search")]:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, base_name, q, max_tokens=60, extra_body=extra)
        assert e.value.body["param"] == param, extra


def test_continue_final_message_continues_the_assistants_words(server, client, base_name, smollm2_dir):
    """vLLM's continue_final_message (a prefill): the prompt ends inside the assistant's turn, after its words (as
    /tokenize shows with the same flags), and the answer is what the completions endpoint writes after that prompt;
    a named template (alpaca) continues after its response header; the flags' wrong uses are 400s."""
    from lit_aligner.base import load_tokenizer
    from lit_aligner.prompts import ALPACA_NO_INPUT
    from lit_aligner.tools import tool_prompt

    q = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is"}]
    flags = {"continue_final_message": True, "add_generation_prompt": False}
    status, tokens = http(server.url + "/tokenize", json.dumps({"messages": q, **flags}).encode(),
                          {"Content-Type": "application/json"})
    shown = http(server.url + "/detokenize", json.dumps({"tokens": tokens["tokens"]}).encode(),
                 {"Content-Type": "application/json"})[1]["prompt"]
    assert status == 200 and shown.endswith("<|im_start|>assistant\nThe capital of France is")
    r = client.chat.completions.create(model=base_name, messages=q, max_tokens=8, temperature=0, extra_body=flags)
    c = client.completions.create(model=base_name, prompt=tokens["tokens"], max_tokens=8, temperature=0)
    assert r.choices[0].message.content == c.choices[0].text and r.usage.prompt_tokens == tokens["count"]
    assert tool_prompt("alpaca", load_tokenizer(smollm2_dir), q, None, continue_final=True) == \
        ALPACA_NO_INPUT.format(instruction=q[0]["content"]) + q[1]["content"]
    for extra, param in [({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
                         ({"add_generation_prompt": False}, "add_generation_prompt"),
                         ({"continue_final_message": True}, "messages")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=base_name, messages=q[:1] if param == "messages" else q,
                                           max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == param, extra


def test_reasoning_parser_reads_a_think_block_apart_whole_and_streamed(server, client, base_name):
    """--reasoning-parser think (this module's server; every other chat test here shows it leaves a plain answer as
    written): an answer that starts inside a think block (a prefill ending in <think>) comes back as
    reasoning_content, the completions endpoint's text after the same prompt read as `split_reasoning` reads it,
    streamed the same; include_reasoning false leaves it out."""
    from lit_aligner.reasoning import split_reasoning

    q = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "<think>"}]
    flags = {"continue_final_message": True, "add_generation_prompt": False}
    ids = http(server.url + "/tokenize", json.dumps({"messages": q, **flags}).encode(),
               {"Content-Type": "application/json"})[1]["tokens"]
    raw = client.completions.create(model=base_name, prompt=ids, max_tokens=16, temperature=0).choices[0].text
    reasoning, content = split_reasoning(raw, inside=True)
    assert reasoning
    ask = dict(model=base_name, messages=q, max_tokens=16, temperature=0)
    message = client.chat.completions.create(**ask, extra_body=flags).choices[0].message
    assert (message.model_extra["reasoning"], message.content) == (reasoning, content)
    assert message.model_extra["reasoning_content"] == reasoning  # the older name, for the clients that read it
    said, answered = "", ""
    for chunk in client.chat.completions.create(**ask, extra_body=flags, stream=True):
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            assert extra.get("reasoning") == extra.get("reasoning_content")
            said += extra.get("reasoning") or ""
            answered += choice.delta.content or ""
    assert (said, answered or None) == (reasoning, content)
    hidden = client.chat.completions.create(**ask, extra_body={**flags, "include_reasoning": False}).choices[0]
    assert not {"reasoning", "reasoning_content"} & set(hidden.message.model_extra or {})
    assert hidden.message.content == content


def test_tool_calls_forced_read_back_streamed_and_their_errors(server, client, base_name):
    """tools / tool_choice with the real client: a named function and "required" give calls whose arguments fit the
    function (greedy on the base, sampled with n=2 on an Aligner, streamed), "none" gives prose; under "auto" the calls
    the model writes are read (its answer forced here by a regex, as a tool-calling model would write it), streamed or
    not; the next turn sends the call and its result back. Every bad field is a 400 naming it."""
    q = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=base_name, messages=q, tools=[WEATHER, CLOCK], tool_choice=named,
                                       max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert "Paris" in weather_call(choice.message.tool_calls[0])["city"]
    named_args = choice.message.tool_calls[0].function.arguments
    r = client.chat.completions.create(model="a3", messages=q, tools=[WEATHER, CLOCK], tool_choice="required", n=2,
                                       parallel_tool_calls=False, max_tokens=60, temperature=1.0, seed=3)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
        call = choice.message.tool_calls[0]
        assert call.function.name in ("get_weather", "get_time") and json.loads(call.function.arguments)
    prose = client.chat.completions.create(model=base_name, messages=q, tools=[WEATHER], tool_choice="none",
                                           max_tokens=30, temperature=0).choices[0]
    assert prose.message.tool_calls is None and prose.message.content and "<tool_call>" not in prose.message.content
    stream = client.chat.completions.create(model=base_name, messages=q, tools=[WEATHER, CLOCK], tool_choice=named,
                                            max_tokens=60, temperature=0, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and chunks[-1].finish_reason == "tool_calls"
    assert deltas[0].function.arguments == named_args and deltas[0].function.name == "get_weather"
    assert not "".join(c.delta.content or "" for c in chunks)
    # auto: the model's own calls are read, its words around them stay the content
    written = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' \
              '\n</tool_call>'
    force = {"structured_outputs": {"regex": re.escape(written)}}
    r = client.chat.completions.create(model=base_name, messages=q, tools=[WEATHER, CLOCK], max_tokens=60,
                                       temperature=0, extra_body=force)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Let me check."
    assert weather_call(message.tool_calls[0]) == {"city": "Paris", "unit": "celsius"}
    stream = list(client.chat.completions.create(model=base_name, messages=q, tools=[WEATHER, CLOCK], max_tokens=60,
                                                 temperature=0, extra_body=force, stream=True, logprobs=True,
                                                 stream_options={"include_usage": True}))
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.delta.content or "" for c in chunks).strip() == "Let me check."
    # every token's log-probability is sent once, also those of text held back while a call was read
    assert sum(len(c.logprobs.content) for c in chunks if c.logprobs) == stream[-1].usage.completion_tokens
    assert [d.function.name for c in chunks for d in (c.delta.tool_calls or [])] == ["get_weather"]
    assert chunks[-1].finish_reason == "tool_calls"
    # the next turn: the call and its result go back in, as the template renders them (here: as text)
    turn, tokens, prompt = next_turn(server, q, message.tool_calls[0], '{"sky": "sunny", "c": 21}')
    assert '<|im_start|>user\n<tool_response>\n{"sky": "sunny", "c": 21}\n</tool_response>' in prompt
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": ' \
           '"celsius"}}\n</tool_call><|im_end|>' in prompt and prompt.count('"get_weather"') == 2
    answer = client.chat.completions.create(model=base_name, messages=turn, tools=[WEATHER], max_tokens=20,
                                            temperature=0)
    assert answer.usage.prompt_tokens == tokens["count"]
    # errors: one 400 naming the field
    for kw, param in [({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
                      ({"tools": [WEATHER, WEATHER]}, "tools"),
                      ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
                       "tools"),
                      ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                       "tool_choice"),
                      ({"tool_choice": "required"}, "tool_choice"),
                      ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
                       "tool_choice"),
                      ({"extra_body": {"functions": [WEATHER["function"]]}}, "functions")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=base_name, messages=q, max_tokens=5, **kw)
        assert e.value.body["param"] == param, kw
    with pytest.raises(openai.BadRequestError, match="correction Aligner"):
        client.chat.completions.create(model="fixer", messages=q, max_tokens=5, tools=[WEATHER])
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.completions.create(model=base_name, prompt="hi", max_tokens=5, extra_body={"tools": [WEATHER]})


def test_auto_tool_choice_is_refused_where_calls_would_not_be_read(smollm2_dir):
    """A chat template that renders tools in a format other than Hermes' and Llama 3's (LFM2's): its model's own calls
    would not be read, so "auto" is a 400 that says what works instead; "required" renders with the template's
    tools."""
    trl = pytest.importorskip("trl")
    from importlib import resources

    from lit_aligner.base import load_tokenizer
    from lit_aligner.serving.app import AlignerServer, APIError
    from lit_aligner.tools import parse_tools

    tok = load_tokenizer(smollm2_dir)
    tok.chat_template = (resources.files(trl) / "chat_templates" / "lfm2.jinja").read_text()
    server = AlignerServer(None, None, tok, "base")
    q = [{"role": "user", "content": "Weather in Paris?"}]
    with pytest.raises(APIError, match="use tool_choice .required. or a named function") as e:
        server.chat_prompt(None, q, parse_tools([WEATHER]))
    assert e.value.status == 400 and e.value.param == "tool_choice"
    assert '"get_weather"' in server.chat_prompt(None, q, parse_tools([WEATHER], "required"))


OWN_FORMATS = {  # a chat template (TRL's file, or helpers' Mistral one): how its model writes the call, and what the
    # next turn renders ({id}: the call's id as the template shows it)
    "llama3_1": ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
                 ['<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": '
                  '"Paris", "unit": "celsius"}}<|eot_id|>',
                  '<|start_header_id|>ipython<|end_header_id|>\n\n"21 degrees, sunny"']),
    "mistral": ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
                ['[/INST][TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, '
                 '"id": "{id}"}]', '[TOOL_RESULTS] {"content": "21 degrees, sunny", "call_id": "{id}"}']),
}  # (the markup formats take the same path: test_structured.py and test_generate.py read and force them)


def test_chat_template_kwargs_reach_the_chat_template(smollm2_dir):
    """vLLM's chat_template_kwargs: Qwen3's `enable_thinking: false` closes the thinking block in the prompt; a named
    template (an Aligner trained on alpaca) has no variables to take, and the request's own fields are not theirs."""
    trl = pytest.importorskip("trl")
    from importlib import resources

    from lit_aligner.base import load_tokenizer
    from lit_aligner.serving.app import AlignerServer, APIError, ChatBody
    from lit_aligner.tools import tool_prompt

    tok = load_tokenizer(smollm2_dir)
    tok.chat_template = (resources.files(trl) / "chat_templates" / "qwen3.jinja").read_text()
    server, q = AlignerServer(None, None, tok, "base"), [{"role": "user", "content": "hi"}]
    assert server.chat_prompt(None, q, None, {"enable_thinking": False}).endswith("<think>\n\n</think>\n\n")
    assert server.chat_prompt(None, q).endswith("<|im_start|>assistant\n")
    assert tool_prompt("alpaca", tok, q, None, {"enable_thinking": False}) == tool_prompt("alpaca", tok, q, None)
    with pytest.raises(APIError, match="cannot set messages, tools") as e:
        ChatBody(model="base", messages=q, chat_template_kwargs={"tools": [], "messages": [], "x": 1}).check()
    assert e.value.param == "chat_template_kwargs"
    # an earlier answer's reasoning_content, sent back in a tool-calling loop, reaches the template (Qwen3 writes it)
    call = {"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}
    loop = ChatBody(model="base", messages=[*q, {"role": "assistant", "content": None, "tool_calls": [call],
                                                  "reasoning_content": "I need the time."},
                                            {"role": "tool", "tool_call_id": "c1", "content": "12:00"}])
    assert "<think>\nI need the time.\n</think>" in server.chat_prompt(None, [m.as_dict() for m in loop.messages])


def test_default_chat_template_kwargs_are_under_an_aligners_saved_ones_and_the_requests(smollm2_dir, tmp_path):
    """serve's --default-chat-template-kwargs (vLLM's flag) reach every rendering; an Aligner's saved variables and a
    request's chat_template_kwargs win over them; a malformed value is refused before the model loads."""
    trl = pytest.importorskip("trl")
    from importlib import resources
    from types import SimpleNamespace

    from lit_aligner.files import UserError
    from lit_aligner.serving import ServeConfig, build_server

    ckpt = helpers.templated_checkpoint(smollm2_dir, tmp_path / "qwen3",
                                        (resources.files(trl) / "chat_templates" / "qwen3.jinja").read_text())
    server = build_server(ServeConfig(checkpoint_dir=ckpt, aligners_dir=tmp_path, device="cpu", max_batch=1,
                                      max_seq_length=64, default_chat_template_kwargs='{"enable_thinking": false}'))
    try:
        q, closed = [{"role": "user", "content": "hi"}], "<think>\n\n</think>\n\n"
        thinking = SimpleNamespace(metadata={"template": "chat", "template_variables": '{"enable_thinking": true}'})
        assert server.chat_prompt(None, q).endswith(closed)
        assert not server.chat_prompt(None, q, None, {"enable_thinking": True}).endswith(closed)
        assert not server.chat_prompt(thinking, q).endswith(closed)
    finally:
        server.engine.stop()
    with pytest.raises(UserError, match="--default-chat-template-kwargs is not valid JSON"):
        ServeConfig(default_chat_template_kwargs="{nope").check()


def test_a_forced_function_that_a_markup_format_cannot_write_is_a_400_naming_tools(smollm2_dir):
    """Under a template in Qwen3-Coder's markup (one element per argument), forcing a function whose parameters are an
    anyOf at the top is a 400 on `tools`, before any model work."""
    from lit_aligner.base import load_tokenizer
    from lit_aligner.serving.app import AlignerServer, APIError, ChatBody

    server = AlignerServer(None, None, load_tokenizer(smollm2_dir), "base")
    either = {"type": "function", "function": {"name": "f", "parameters": {"anyOf": [{"type": "object"}]}}}
    body = ChatBody(model="base", messages=[{"role": "user", "content": "hi"}], tools=[either], tool_choice="required")
    with pytest.raises(APIError, match="object schema") as e:
        server.grammar(body, body.tool_spec(), "qwen3_coder")
    assert e.value.status == 400 and e.value.param == "tools"


@pytest.mark.parametrize("template", OWN_FORMATS)
def test_a_template_with_its_own_call_format_reads_and_forces_calls_in_it(smollm2_dir, tmp_path, template):
    """A base whose chat template is Llama 3.1's or in Mistral's format (swapped into a copy of SmolLM2's tokenizer
    config): under "auto" a call written in that template's format (forced here by a regex, as its model
    writes it) comes back as tool_calls, streamed or not; "required" holds the answer to that format (a Hermes call
    would not read back here); the next turn renders the call as the template writes it, and its result (Mistral's
    with the 9-letter id its template wants, from the server's). Llama 3.1's template also takes a `date_string` from
    chat_template_kwargs, in the chat endpoint and /tokenize alike."""
    trl = pytest.importorskip("trl")
    from importlib import resources

    from helpers import MISTRAL_TOOLS, templated_checkpoint
    from lit_aligner.base import load_config

    ckpt = templated_checkpoint(smollm2_dir, tmp_path / "templated", MISTRAL_TOOLS if template == "mistral" else
                                (resources.files(trl) / "chat_templates" / f"{template}.jinja").read_text())
    base, q = load_config(ckpt).name, [{"role": "user", "content": "What is the weather like in Paris today?"}]
    written, rendered = OWN_FORMATS[template]
    force = {"structured_outputs": {"regex": re.escape(written)}}
    (tmp_path / "none").mkdir()  # (no Aligners: the base alone)
    args = ["--checkpoint-dir", str(ckpt), "--aligners-dir", str(tmp_path / "none"), "--max-seq-length", "1024"]
    with ServerProcess(args, env={"LIT_ALIGNER_API_KEY": KEY}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)
        r = client.chat.completions.create(model=base, messages=q, tools=[WEATHER, CLOCK], max_tokens=100,
                                           temperature=0, extra_body=force)
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and message.content is None
        assert weather_call(message.tool_calls[0]) == {"city": "Paris", "unit": "celsius"}
        chunks = [c.choices[0] for c in client.chat.completions.create(
            model=base, messages=q, tools=[WEATHER, CLOCK], max_tokens=100, temperature=0, extra_body=force,
            stream=True) if c.choices]
        assert not "".join(c.delta.content or "" for c in chunks) and chunks[-1].finish_reason == "tool_calls"
        assert [d.function.name for c in chunks for d in (c.delta.tool_calls or [])] == ["get_weather"]
        r = client.chat.completions.create(model=base, messages=q, tools=[WEATHER, CLOCK], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        assert r.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
        prompt = next_turn(server, q, message.tool_calls[0], "21 degrees, sunny")[2]
        if template == "llama3_1":  # chat_template_kwargs reach the template (Llama 3.1's date), in both endpoints
            kwargs = {"date_string": "1 January 2030, a Tuesday"}
            status, tokens = http(server.url + "/tokenize", json.dumps(
                {"messages": q, "chat_template_kwargs": kwargs}).encode(), {"Content-Type": "application/json"})
            shown = http(server.url + "/detokenize", json.dumps({"tokens": tokens["tokens"]}).encode(),
                         {"Content-Type": "application/json"})[1]["prompt"]
            assert status == 200 and "Today Date: 1 January 2030, a Tuesday\n" in shown
            r = client.chat.completions.create(model=base, messages=q, max_tokens=1,
                                               extra_body={"chat_template_kwargs": kwargs})
            plain = client.chat.completions.create(model=base, messages=q, max_tokens=1)
            assert r.usage.prompt_tokens == tokens["count"] != plain.usage.prompt_tokens
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=base, messages=q, max_tokens=1,
                                               extra_body={"chat_template_kwargs": {"messages": []}})
            assert e.value.body["param"] == "chat_template_kwargs"
    for text in rendered:
        assert text.replace("{id}", message.tool_calls[0].id[-9:]) in prompt, prompt


def test_correction_aligner_with_an_answer_and_two_stage(client, base_name):
    question = "What is the capital of France?"
    given = chat(client, "fixer", question, extra_body={"answer": "Berlin is the capital of France."})
    assert given.choices[0].message.content and not (given.model_extra or {}).get("upstream_answer")
    base = chat(client, base_name, question)
    two = chat(client, "fixer", question)  # no answer: the base answers first, then the Aligner rewrites it
    extra = two.model_extra or {}
    assert extra["upstream_answer"] == base.choices[0].message.content
    assert two.usage.completion_tokens > base.usage.completion_tokens  # both stages counted
    # the same through /v1/completions: the prompt is the question
    c = client.completions.create(model="fixer", prompt=question, max_tokens=8, temperature=0,
                                  extra_body={"answer": "Berlin."})
    assert c.usage.prompt_tokens > 20  # the Q-A-C template around the question and the answer
    with pytest.raises(openai.BadRequestError, match="answer"):
        chat(client, "fixer", question, extra_body={"answer": "  "})


def test_hot_loading_and_a_broken_file(server, client, adir, base_name):
    shutil.copy(adir / "a0.safetensors", adir / "hot.safetensors")
    (adir / "broken.safetensors").write_bytes(b"\x00" * 100)
    try:
        assert "hot" in [m.id for m in client.models.list().data]
        assert chat(client, "hot", "Name three colors.").choices[0].message.content == \
            chat(client, "a0", "Name three colors.").choices[0].message.content
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, "broken", "hi")
        assert "broken" in e.value.body["message"] and e.value.body["code"] == "invalid_aligner"
        assert chat(client, base_name, "hi").choices[0].message.content  # the server keeps serving
    finally:
        (adir / "hot.safetensors").unlink()
        (adir / "broken.safetensors").unlink()


@pytest.mark.slow
def test_32_concurrent_requests_equal_each_served_alone(server, base_name):
    """32 greedy requests over 8 Aligners and the bare base, all at once (one continuous batch of 16 plus a queue),
    give exactly the text each gets when served alone."""
    prompts = ["Name three colors.", "What is 7 times 6?", "Give me a synonym for happy.", "Say hello in French."]
    models = [base_name] + [f"a{i}" for i in range(8)]
    distinct = [(models[i % 9], prompts[i % 4], 8 + i % 5) for i in range(16)]
    jobs = distinct * 2  # each twice: 16 rows decode while 16 requests wait in the queue

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)

        async def one(model, prompt, n):
            r = await aclient.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=n, temperature=0)
            return r.choices[0].message.content, r.usage.completion_tokens

        batched = await asyncio.gather(*(one(*j) for j in jobs))
        single = {j: await one(*j) for j in distinct}
        await aclient.close()
        return batched, [single[j] for j in jobs]

    batched, single = asyncio.run(main())
    assert batched == single
    assert len({t for t, _ in batched}) > 9  # the Aligners really answer differently


@pytest.mark.slow
def test_queue_bound_429_and_disconnects_free_rows(server, base_name):
    """80 streams at once: at most 16 rows + 32 waiting are taken, the rest get 429. Closing every stream frees the
    rows, and the next request is served."""

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)

        async def start():
            try:
                return await aclient.chat.completions.create(
                    model=base_name, messages=[{"role": "user", "content": "Write a long essay about the sea."}],
                    max_tokens=400, temperature=0, stream=True)
            except openai.RateLimitError as e:
                return e

        results = await asyncio.gather(*(start() for _ in range(80)))
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        streams = [r for r in results if not isinstance(r, openai.RateLimitError)]
        assert limited and all(e.status_code == 429 and e.body["code"] == "rate_limit_exceeded" for e in limited)
        assert len(streams) <= 48
        first = await streams[0].__anext__()  # streams really stream
        assert first.choices[0].delta.role == "assistant"
        for s in streams:
            await s.close()
        await aclient.close()
        return len(streams)

    accepted = asyncio.run(main())
    assert accepted >= 16
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        load = http(server.url + "/health")[1]
        if load["active"] == 0 and load["waiting"] == 0:
            break
        time.sleep(0.2)
    assert load["active"] == 0 and load["waiting"] == 0, load
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    assert chat(client, base_name, "hi", max_tokens=4).usage.completion_tokens >= 1


def test_cli_errors_are_one_line(smollm2_dir, tmp_path):
    import socket

    with socket.socket() as taken:  # a port another server holds: said at once, before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, expect in [(["--aligners-dir", str(tmp_path / "missing")], "no such directory"),
                             (["--max-batch", "0"], "--max-batch must be >= 1"),
                             (["--checkpoint-dir", str(tmp_path)], str(tmp_path)),
                             (["--port", port], f"--host 127.0.0.1 --port {port}: cannot listen there"),
                             (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: not an address"),
                             (["--host", "192.0.2.1"], "; give an address of this machine"),  # TEST-NET-1: not ours
                             (["--api-key", ""], "--api-key is empty")]:  # `--api-key "$KEY"`, KEY unset
            p = helpers.run_script(REPO / "serve" / "aligner.py", "--checkpoint-dir", smollm2_dir, "--port", "0",
                                   *args, cwd=tmp_path)
            assert p.returncode == 1, p.stderr
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], p.stderr


def browser_or_skip():
    """A headless Chromium driven by Selenium, or a skip that says what is missing."""
    pytest.importorskip("selenium", reason="the page test needs selenium (pip install -e '.[test]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = next((p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless browser here: install Debian's `chromium` and `chromium-driver` (scripts/test.sh "
                    "does when it runs as root with apt-get)")
    opts = Options()
    opts.binary_location = chromium
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"]:
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(driver))


def test_comparison_page_in_a_real_browser(server, client, base_name, tmp_path):
    """GET / in headless Chromium: the key unlocks the model list, three models are picked, the answers stream into
    side-by-side columns and equal what the API answers; "Follow up" sends the next message, each column answering
    with its own conversation, as the API answers that conversation."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser_or_skip()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "error" in d.find_element(By.ID, "models").get_attribute("innerHTML"))  # 401 shown
        key = driver.find_element(By.ID, "api_key")
        key.send_keys(KEY)
        driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models input")) == 10)
        picked = [base_name, "a0", "a5"]
        for box in driver.find_elements(By.CSS_SELECTOR, "#models input"):
            if box.is_selected() != (box.get_attribute("value") in picked):
                box.click()
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Name three colors.")
        for field, value in [("max_tokens", "12"), ("temperature", "0")]:
            el = driver.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer[data-done]")) == 3)
        driver.save_screenshot(str(tmp_path / "page.png"))
        columns = {c.get_attribute("data-model"): c for c in driver.find_elements(By.CSS_SELECTOR, ".answer")}
        assert list(columns) == picked
        first = {}
        for name, col in columns.items():
            shown = col.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
            first[name] = chat(client, name, "Name three colors.").choices[0].message.content
            assert shown == first[name]
            assert "tokens in" in col.find_element(By.CSS_SELECTOR, ".meta").text
        assert (tmp_path / "page.png").stat().st_size > 10_000
        prompt.clear()
        prompt.send_keys("And two animals?")
        driver.find_element(By.ID, "followup").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer[data-done][data-turns='2']")) == 3)
        second = {}
        for name, col in columns.items():
            texts = [t.get_attribute("textContent") for t in col.find_elements(By.CSS_SELECTOR, ".turn .text")]
            conversation = [{"role": "user", "content": "Name three colors."},
                            {"role": "assistant", "content": first[name]},
                            {"role": "user", "content": "And two animals?"}]
            want = client.chat.completions.create(model=name, messages=conversation, max_tokens=12, temperature=0)
            assert texts == [first[name], want.choices[0].message.content]
            second[name] = texts[1]
        assert any(second[n] != chat(client, n, "And two animals?").choices[0].message.content
                   for n in columns)  # the history changes some answer
    finally:
        driver.quit()
