"""The continuous-batching engine and the Aligner directory behind serve/aligner.py, driven in-process (no HTTP)."""

import os
import shutil

import pytest
import torch

from lit_aligner.aligner_files import save_aligner
from lit_aligner.base import load_base
from lit_aligner.generation.engine import Sampling, generate
from lit_aligner.model import Aligner, AlignerConfig
from lit_aligner.serving.engine import Engine, Request, ServedAligner
from lit_aligner.serving.registry import AlignerRegistry, BadAligner, UnknownAligner


@pytest.fixture(scope="module")
def base(tiny_checkpoint_dir):
    return load_base(tiny_checkpoint_dir, device="cpu")


def random_aligner(model, n_tokens, start_layer=2, seed=0, scale=0.5):
    torch.manual_seed(seed)
    a = Aligner(model.config, AlignerConfig(n_tokens=n_tokens, start_layer=start_layer))
    with torch.no_grad():
        a.gate.normal_(0, scale)
    return a


class Collect:
    """A request's events: the streamed pieces, the finish reason and the token counts."""

    def __init__(self):
        self.pieces, self.finish, self.usage = [], None, None

    def __call__(self, ev):
        assert self.finish is None, "an event after the request finished"
        self.pieces.append(ev.text)
        if ev.finish:
            self.finish, self.usage = ev.finish, (ev.prompt_tokens, ev.completion_tokens)

    @property
    def text(self):
        return "".join(self.pieces)


def run(engine, requests, admit_per_step=None):
    """Drive the engine by hand: admit up to `admit_per_step` waiting requests at each step boundary (None: as many
    as fit), until every request has finished."""
    waiting = list(requests)
    while waiting or engine.rows:
        room = engine.max_batch - len(engine.rows)
        k = room if admit_per_step is None else min(room, admit_per_step)
        admit, waiting = waiting[:k], waiting[k:]
        engine.step(admit)


def prompts_for(tokenizer, texts):
    return [tokenizer.encode(t).tolist() for t in texts]


TEXTS = ["Add 12 and 30.", "Name a colour of the sky, please, and say why it looks that way at noon.",
         "What is the capital of France?", "Sort: 3 1 2", "Write one word."]


def test_mixed_batch_equals_generate_alone(base):
    """Rows with Aligners of different N and start layers, and bare rows, admitted at different step boundaries and
    retired at different lengths, get exactly the tokens `generate` gives each request on its own."""
    model, tok = base
    aligners = [random_aligner(model, 1, 2, 1), random_aligner(model, 4, 0, 2), random_aligner(model, 10, 3, 3),
                random_aligner(model, 12, 1, 4), None]  # 12 > the engine's initial 10 prefix slots: buffers grow
    served = [ServedAligner.project(model, f"a{i}", a) if a is not None else None for i, a in enumerate(aligners)]
    ids = prompts_for(tok, TEXTS)
    engine = Engine(model, tok, max_batch=6, max_seq_length=256)
    jobs = []
    for i, p in enumerate(ids):
        for j, s in enumerate(served):
            c = Collect()
            jobs.append((i, j, c, Request(p, 6 + (i + j) % 7, c, aligner=s)))
    run(engine, [r for *_, r in jobs], admit_per_step=2)
    assert engine.pmask.shape[1] == 12
    for i, j, c, req in jobs:
        ref = generate(model, [torch.tensor(ids[i])], req.max_tokens, aligners=[aligners[j]])[0]
        assert c.text == tok.decode(ref), (i, j)
        assert c.finish == "length" and c.usage == (len(ids[i]), req.max_tokens)
    assert not engine.rows


def test_admitted_requests_are_prefilled_together_within_the_token_budget(base):
    """Requests admitted at one boundary share prefill forwards of at most max_prefill_tokens padded tokens; a longer
    prompt is prefilled in chunks of that many tokens, one per step, while the other rows decode; every row still gets
    exactly what `generate` gives it alone."""
    model, tok = base
    ids = prompts_for(tok, TEXTS)
    lengths = sorted(len(p) for p in ids)
    budget = 2 * lengths[-2]  # two of the shorter prompts fit together; the longest one does not fit at all
    assert lengths[-1] > budget
    engine = Engine(model, tok, max_batch=5, max_seq_length=256, max_prefill_tokens=budget)
    groups, chunks, prefill, prefill_chunk = [], [], engine._prefill, engine._prefill_chunk
    outs = [Collect() for _ in ids]
    engine._prefill = lambda group: (groups.append([r.length for r in group]), prefill(group))
    engine._prefill_chunk = lambda r: (chunks.append((r.length, sum(len(c.pieces) for c in outs))), prefill_chunk(r))
    aligner = random_aligner(model, 3, 1, 5)
    served = ServedAligner.project(model, "a", aligner)
    run(engine, [Request(p, 5, c, aligner=served if i % 2 else None) for i, (p, c) in enumerate(zip(ids, outs))])
    assert sum(map(len, groups)) == len(ids) - 1 and max(map(len, groups)) >= 2
    assert all(len(g) * max(g) <= budget for g in groups), groups
    # the longest prompt: chunks of `budget` tokens at successive steps, the others' tokens arriving in between
    assert [s for s, _ in chunks] == list(range(0, lengths[-1], budget)) and len(chunks) >= 2
    assert all(a < b for (_, a), (_, b) in zip(chunks, chunks[1:])), chunks
    for i, (p, c) in enumerate(zip(ids, outs)):
        ref = generate(model, [torch.tensor(p)], 5, aligners=[aligner if i % 2 else None])[0]
        assert c.text == tok.decode(ref), i



@pytest.mark.parametrize("budget", [2048, 7])
def test_prompt_logprobs_in_a_shared_prefill(base, monkeypatch, budget):
    """Rows that score their prompt (`prompt_logprobs`, max_tokens 0 or more) prefilled in one right-padded forward
    with plain rows, or in chunks of 7 tokens: each prompt token's log-probability and top alternatives equal a
    forward pass over that prompt alone (padding unread, the output head run in pieces of 3 positions here); a
    scoring-only row finishes at once with no token; the other rows still get what `generate` gives them."""
    import lit_aligner.serving.engine as engine_module

    monkeypatch.setattr(engine_module, "PROMPT_LOGITS_CHUNK", 3)
    model, tok = base
    ids = prompts_for(tok, TEXTS[:4])
    aligner = random_aligner(model, 4, 1, 6)
    served = ServedAligner.project(model, "a", aligner)
    events = [[] for _ in ids]
    reqs = [Request(ids[0], 0, events[0].append, aligner=served, prompt_logprobs=2),
            Request(ids[1], 4, events[1].append, prompt_logprobs=0, logprobs=1),
            Request(ids[2], 4, events[2].append, aligner=served),
            Request(ids[3], 0, events[3].append, prompt_logprobs=1)]
    engine = Engine(model, tok, max_batch=4, max_seq_length=256, max_prefill_tokens=budget)
    run(engine, reqs)
    for p, req, evs in zip(ids, reqs, events):
        scored = [e.prompt_logprobs for e in evs if e.prompt_logprobs is not None]
        if req.prompt_logprobs is None:
            assert not scored
            ref = generate(model, [torch.tensor(p)], 4, aligners=[aligner])[0]
            assert "".join(e.text for e in evs) == tok.decode(ref)
            continue
        (entries,) = scored
        assert evs[0].prompt_logprobs is entries  # before any text
        with torch.no_grad():
            a = aligner if req.aligner is not None else None
            lp = torch.log_softmax(model(torch.tensor([p]), aligner=a)[0, :-1].float(), -1)
        assert [e.token for e in entries] == p and entries[0].logprob is None
        assert [e.logprob for e in entries[1:]] == pytest.approx(
            lp.gather(1, torch.tensor(p[1:])[:, None])[:, 0].tolist(), abs=1e-4)
        top_v, top_i = lp.topk(max(req.prompt_logprobs, 1), dim=-1)
        for e, vs, ts in zip(entries[1:], top_v.tolist(), top_i.tolist()):
            k = req.prompt_logprobs
            assert [t for t, _ in e.top] == ts[:k] and [v for _, v in e.top] == pytest.approx(vs[:k], abs=1e-4)
        generated = sum(len(e.logprobs) for e in evs)
        assert evs[-1].finish == "length" and evs[-1].completion_tokens == req.max_tokens == generated
        if req.max_tokens:  # generation after scoring is what it is without
            ref = generate(model, [torch.tensor(p)], 4)[0]
            assert "".join(e.text for e in evs) == tok.decode(ref)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.check(Request(ids[0], 0, print))


def test_penalised_rows_in_a_batch_equal_each_alone(base):
    """Rows with penalties or a logit bias decoded beside plain rows (greedy and sampled) get what each gets alone; a
    repetition penalty and a logit bias change the greedy answer (this random model rarely repeats a token, so the
    presence and frequency penalties are checked against a reference decoder in test_serve.py)."""
    from lit_aligner.generation.engine import Penalties

    model, tok = base
    ids = prompts_for(tok, TEXTS)
    kinds = [Penalties(repetition=1.5), Penalties(presence=1.0, frequency=1.0), Penalties(),
             Penalties(logit_bias=((5, 100.0), (7, -100.0))), Penalties(frequency=2.0)]

    def make(i, emit):
        sampling = Sampling(temperature=0.9) if i % 2 else Sampling()
        return Request(ids[i], 8, emit, penalties=kinds[i], sampling=sampling, seed=i, stop_ids=set())

    together = [Collect() for _ in ids]
    run(Engine(model, tok, max_batch=5, max_seq_length=256), [make(i, c) for i, c in enumerate(together)])
    for i in range(len(ids)):
        alone, plain = Collect(), Collect()
        run(Engine(model, tok, max_batch=1, max_seq_length=256), [make(i, alone)])
        assert together[i].text == alone.text, i
        if i in (0, 3):
            req = make(i, plain)
            req.penalties = Penalties()
            run(Engine(model, tok, max_batch=1, max_seq_length=256), [req])
            assert plain.text != alone.text, i

SYSTEM = ("You are a careful assistant. Answer in one short sentence, plainly, for a reader who is new to the subject, "
          "and say so when you do not know. ")


def test_prefix_cache_reuses_shared_prompts_per_aligner_and_equals_an_uncached_engine(base):
    """Prompts that share a system prompt: the later ones copy its cached blocks (per Aligner: the same tokens under
    another Aligner or the bare base share nothing) and prefill only the rest, in one batch with rows at different
    offsets, or in chunks after the cached part. Every row gets the text of an engine without a cache, log-
    probabilities within float tolerance, and `cached_tokens` says how much came from the cache: the longest whole
    16-token blocks it shares with an earlier prompt of its Aligner, never the last token."""
    from lit_aligner.serving.prefix_cache import BLOCK

    model, tok = base
    a, b = (ServedAligner.project(model, n, random_aligner(model, 3, 1, s)) for n, s in (("a", 11), ("b", 12)))
    ids = prompts_for(tok, [SYSTEM + t for t in TEXTS])
    assert len(prompts_for(tok, [SYSTEM])[0]) > 3 * BLOCK
    long_prompt = prompts_for(tok, [SYSTEM + " ".join(TEXTS) * 3])[0]
    next_turn = ids[1] + prompts_for(tok, [" And at sunset?"])[0]  # a chat's next turn: its whole first turn cached
    waves = [[(ids[0], a)],  # fills the cache
             [(ids[1], a), (ids[2], a), (ids[1], b), (ids[3], None), (ids[0], a)],  # a: hits; b, bare: misses
             [(ids[4], b), (next_turn, a), (ids[3], None), (long_prompt, a)]]  # b, bare: hits; the long one chunked

    def serve(cache_tokens):
        engine = Engine(model, tok, max_batch=6, max_seq_length=512, max_prefill_tokens=100,
                        prefix_cache_tokens=cache_tokens)
        outs = []
        for wave in waves:
            reqs = []
            for p, al in wave:
                events = []
                outs.append(events)
                reqs.append(Request(p, 6, events.append, aligner=al, logprobs=1))
            run(engine, reqs)
        return engine, outs

    cached_engine, cached = serve(4096)
    _, plain = serve(0)
    seen = {}
    for (p, al), got, ref in zip([x for w in waves for x in w], cached, plain):
        assert "".join(e.text for e in got) == "".join(e.text for e in ref)
        lp = [t.logprob for e in got for t in e.logprobs]
        assert lp == pytest.approx([t.logprob for e in ref for t in e.logprobs], abs=1e-4)
        shared = max((next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q)))
                      for q in seen.get(id(al), [])), default=0)
        assert got[-1].cached_tokens == min(shared, len(p) - 1) // BLOCK * BLOCK
        assert ref[-1].cached_tokens == 0
        seen.setdefault(id(al), []).append(p)
    counts = [e[-1].cached_tokens for e in cached]
    assert counts[1] > 3 * BLOCK and counts[3] == counts[4] == 0 and counts[6] > 0 and counts[8] > 0
    assert cached_engine.cache.hit_tokens == sum(counts)


def test_prefix_cache_bound_evicts_chains_from_their_end_and_skips_prompt_scoring_rows(base):
    """The cache holds at most its budget of whole blocks, evicting the least recently used, a chain's deepest blocks
    first (its start stays usable); a row that scores its prompt (`prompt_logprobs`) computes the whole prompt."""
    from lit_aligner.serving.prefix_cache import BLOCK, PrefixCache

    cache = PrefixCache(4 * BLOCK)
    kv = torch.randn(2, 2, 1, 4 * BLOCK, 3)
    first, second = list(range(3 * BLOCK + 1)), list(range(1000, 1000 + 3 * BLOCK + 1))
    for p in (first, second):
        cache.insert("k", p, lambda s, e: kv[:, :, :, s:e])
    assert cache.tokens == 4 * BLOCK
    n, got = cache.lookup("k", first)
    assert n == BLOCK and torch.equal(got, kv[:, :, :, :BLOCK])  # its last two blocks went first
    assert cache.lookup("k", second)[0] == 3 * BLOCK and cache.lookup("other key", second) == (0, None)
    assert cache.lookup("k", first[:BLOCK])[0] == 0  # the last token is always computed

    model, tok = base
    engine = Engine(model, tok, max_batch=2, max_seq_length=256, prefix_cache_tokens=1024)
    p = prompts_for(tok, [SYSTEM + TEXTS[0]])[0]
    events = [[], [], []]
    run(engine, [Request(p, 2, events[0].append)])
    run(engine, [Request(p, 2, events[1].append, prompt_logprobs=1), Request(p, 2, events[2].append)])
    assert [e[-1].cached_tokens for e in events] == [0, 0, (len(p) - 1) // BLOCK * BLOCK]
    assert engine.load["prefix_cache_tokens"] == len(p) // BLOCK * BLOCK


def test_aligners_change_the_answer(base):
    model, tok = base
    ids = prompts_for(tok, TEXTS[:1])[0]
    engine = Engine(model, tok, max_batch=4, max_seq_length=128)
    outs = [Collect() for _ in range(3)]
    als = [None, ServedAligner.project(model, "a", random_aligner(model, 3, 0, 7, scale=2.0)),
           ServedAligner.project(model, "b", random_aligner(model, 3, 0, 8, scale=2.0))]
    run(engine, [Request(ids, 12, c, aligner=a) for c, a in zip(outs, als)])
    assert len({c.text for c in outs}) == 3


def test_stop_ids_and_stop_strings(base):
    model, tok = base
    ids = prompts_for(tok, TEXTS[1:2])[0]
    engine = Engine(model, tok, max_batch=4, max_seq_length=256)
    full = Collect()
    run(engine, [Request(ids, 24, full)])
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut = text.index(stop)
    # a stop string: the text ends before its first occurrence, and no streamed piece ever showed any of it
    c = Collect()
    run(engine, [Request(ids, 24, c, stop=["never-there", stop])])
    assert c.text == text[:cut] and c.finish == "stop"
    assert stop not in "".join(c.pieces)
    # a stop token: the generated token itself ends the row and is not in the text
    ref = generate(model, [torch.tensor(ids)], 24)[0].tolist()
    stop_id = ref[4]
    c = Collect()
    run(engine, [Request(ids, 24, c, stop_ids={stop_id})])
    assert c.finish == "stop" and c.usage[1] == ref.index(stop_id) + 1
    assert c.text == tok.decode(ref[:ref.index(stop_id)])


def test_a_finished_requests_last_event_comes_after_its_row_left_the_batch(base):
    """A client that has its answer's end (a stop token, the length limit, at prefill or in decoding) never finds its
    request still counted as running: the last event is sent once the row has left the engine's batch."""
    model, tok = base
    engine = Engine(model, tok, max_batch=4, max_seq_length=256)
    seen = []

    def watcher(req_box):
        def emit(ev):
            if ev.finish:
                seen.append((ev.finish, any(r.req is req_box[0] for r in engine.rows), engine.load["active"]))
        return emit

    reqs = []
    for i, n in enumerate((1, 3, 8)):  # one ends at its prefill, the others in decoding
        box = []
        box.append(Request(prompts_for(tok, [TEXTS[i]])[0], n, watcher(box)))
        reqs.append(box[0])
    run(engine, reqs)
    assert len(seen) == 3 and not any(still for _, still, _ in seen)
    assert [active for *_, active in seen] == [2, 1, 0]  # the others were still running


def test_seeded_sampling_is_the_same_alone_and_batched(base):
    model, tok = base
    ids = prompts_for(tok, TEXTS)
    engine = Engine(model, tok, max_batch=8, max_seq_length=256)
    hot = Sampling(temperature=1.0, top_p=0.9)
    alone = Collect()
    run(engine, [Request(ids[0], 16, alone, sampling=hot, seed=42)])
    batch = [Collect() for _ in ids] + [Collect()]
    reqs = [Request(p, 16, c, sampling=hot, seed=42) for p, c in zip(ids, batch)]
    reqs.append(Request(ids[0], 16, batch[-1], sampling=hot, seed=43))
    run(engine, reqs)
    assert batch[0].text == alone.text
    assert batch[-1].text != alone.text  # another seed, another draw


def test_cancelled_rows_are_freed_and_others_continue(base):
    model, tok = base
    ids = prompts_for(tok, TEXTS)
    engine = Engine(model, tok, max_batch=3, max_seq_length=256)
    cs = [Collect() for _ in range(3)]
    reqs = [Request(ids[i], 40, cs[i]) for i in range(3)]
    engine.step(reqs)
    assert len(engine.rows) == 3
    reqs[0].cancel()
    engine.step()
    assert len(engine.rows) == 2 and cs[0].finish is None
    late = Collect()
    run(engine, [Request(ids[3], 5, late)])
    ref = generate(model, [torch.tensor(ids[3])], 5)[0]
    assert late.text == tok.decode(ref)
    assert cs[1].finish == cs[2].finish == "length"


def test_context_limit_and_bad_requests(base):
    model, tok = base
    ids = prompts_for(tok, TEXTS[1:2])[0]
    S = len(ids) + 10
    engine = Engine(model, tok, max_batch=2, max_seq_length=S)
    c = Collect()
    run(engine, [Request(ids, 1000, c)])  # the completion stops where the cache ends
    assert c.finish == "length" and c.usage == (len(ids), 11)
    with pytest.raises(ValueError, match="context"):
        engine.submit(Request(list(range(1, S + 1)), 1, Collect()))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request([], 1, Collect()))
    with pytest.raises(ValueError, match="temperature"):
        engine.submit(Request(ids, 1, Collect(), sampling=Sampling(temperature=-1)))


def test_engine_thread_serves_requests(base):
    import threading

    model, tok = base
    engine = Engine(model, tok, max_batch=4, max_seq_length=128).start()
    try:
        done = threading.Event()
        cs = [Collect() for _ in range(6)]
        left = [len(cs)]

        def emitter(c):
            def emit(ev):
                c(ev)
                if ev.finish:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            return emit

        ids = prompts_for(tok, TEXTS)
        for i, c in enumerate(cs):
            engine.submit(Request(ids[i % len(ids)], 5, emitter(c)))
        assert done.wait(60)
        assert all(c.finish == "length" for c in cs)
    finally:
        engine.stop()


# --- the Aligner directory --------------------------------------------------------------------------------------------


def test_registry_names_loading_and_safety(base, tmp_path):
    model, tok = base
    adir, outside = tmp_path / "aligners", tmp_path / "outside"
    (adir / "runs" / "sft1" / "state").mkdir(parents=True)
    outside.mkdir()
    save_aligner(random_aligner(model, 2), adir / "helpful.safetensors", model.config.name)
    save_aligner(random_aligner(model, 3), adir / "runs" / "sft1" / "aligner.safetensors", model.config.name)
    (adir / "runs" / "sft1" / "state" / "last.pt").write_bytes(b"not an aligner")
    save_aligner(random_aligner(model, 1), outside / "secret.safetensors", model.config.name)
    os.symlink(outside / "secret.safetensors", adir / "escape.safetensors")
    (adir / ".hidden.safetensors").write_bytes(b"x")

    reg = AlignerRegistry(adir, model, model.config.name, max_loaded=2)
    assert reg.names() == ["helpful", "runs/sft1"]
    assert reg.get("helpful").n_tokens == 2
    assert reg.get("runs/sft1").n_tokens == 3
    for name in ["escape", "../outside/secret", str(outside / "secret"), "runs/sft1/state/last", ".hidden", "nope"]:
        with pytest.raises(UnknownAligner):
            reg.get(name)

    # hot-loading: a new file is found without a restart; a changed file is reloaded; the LRU keeps 2
    save_aligner(random_aligner(model, 5), adir / "new.safetensors", model.config.name)
    assert reg.get("new").n_tokens == 5 and list(reg.loaded) == ["runs/sft1", "new"]
    loads = reg.loads
    reg.get("new")
    assert reg.loads == loads  # cached
    save_aligner(random_aligner(model, 7), adir / "new.safetensors", model.config.name)
    st = (adir / "new.safetensors").stat()
    os.utime(adir / "new.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert reg.get("new").n_tokens == 7 and reg.loads == loads + 1

    # a broken file fails that name only; a removed file is unknown
    (adir / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BadAligner, match="broken"):
        reg.get("broken")
    assert reg.get("helpful").n_tokens == 2
    (adir / "new.safetensors").unlink()
    with pytest.raises(UnknownAligner):
        reg.get("new")
    shutil.rmtree(outside)


def test_registry_refuses_an_aligner_of_another_shape(base, tmp_path):
    import dataclasses

    model, tok = base
    other = dataclasses.replace(model.config, n_embd=model.config.n_embd * 2, name="wider")
    save_aligner(Aligner(other, AlignerConfig(2)), tmp_path / "wide.safetensors", "wider")
    reg = AlignerRegistry(tmp_path, model, model.config.name)
    with pytest.raises(BadAligner, match="does not fit"):
        reg.get("wide")


def test_registry_needs_a_directory(base, tmp_path):
    from lit_aligner.files import UserError

    model, _ = base
    with pytest.raises(UserError, match="no such directory"):
        AlignerRegistry(tmp_path / "missing", model, "x")
