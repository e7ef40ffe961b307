"""Generation: batched == one at a time, many Aligners in one batch == each alone, seeded sampling, stop ids,
streaming, prefix K/V computed once per call; and the `generate/` CLIs on the real SmolLM2."""

import json
from pathlib import Path

import pytest
import torch

import helpers
from lit_aligner.config import Config
from lit_aligner.generation import (AlignerEntry, Penalties, PromptItem, TextStreamer, answer_prompts, generate,
                                   read_prompts, sample)
from lit_aligner.prompts import build_prompt
from lit_aligner.model import LLaMA, Aligner, AlignerConfig, CausalSelfAttention, init_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LLaMA(Config.from_name("tiny"))
    init_weights(m, std=0.15)  # peaked logits: greedy choices are not decided by float rounding
    return m.eval()


def make_aligner(model, seed, n_tokens=3, start_layer=1):
    torch.manual_seed(seed)
    a = Aligner(model.config, AlignerConfig(n_tokens, start_layer))
    with torch.no_grad():
        a.gate.normal_(0, 1.0)  # nonzero gates: a zero-gate Aligner is the bare base
    return a


def prompts(lengths, seed=1, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def greedy_reference(model, prompt, n, aligner):
    """Independent of the KV cache, padding and masks: re-run the whole sequence every step, take the argmax."""
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq[None], aligner=aligner if aligner is not None else False)
            seq = torch.cat([seq, logits[0, -1].argmax()[None]])
    return seq[len(prompt):]


@pytest.mark.parametrize("with_aligner", [False, True])
def test_greedy_matches_full_recompute_without_cache(model, with_aligner):
    aligner = make_aligner(model, 10) if with_aligner else None
    for p in prompts([5, 12]):
        out = generate(model, [p], 10, aligners=aligner if with_aligner else False)[0]
        assert torch.equal(out, greedy_reference(model, p, 10, aligner))


@pytest.mark.parametrize("with_aligner", [False, True])
def test_batched_greedy_equals_one_at_a_time(model, with_aligner):
    aligner = make_aligner(model, 11) if with_aligner else False
    ps = prompts([3, 17, 8, 1])
    batched = generate(model, ps, 12, aligners=aligner)
    alone = [generate(model, [p], 12, aligners=aligner)[0] for p in ps]
    for b, a in zip(batched, alone):
        assert torch.equal(b, a)
    assert len({tuple(b.tolist()) for b in batched}) > 1


def test_different_aligners_in_one_batch_equal_each_alone(model):
    aligners = [make_aligner(model, s) for s in (20, 21, 22)] + [None]
    ps = prompts([6, 9, 4, 11], seed=2)
    p = ps[0]
    # The same prompt under every Aligner (and the bare base) ...
    mixed = generate(model, [p] * 4, 10, aligners=aligners)
    alone = [generate(model, [p], 10, aligners=a if a is not None else False)[0] for a in aligners]
    assert all(torch.equal(m, a) for m, a in zip(mixed, alone))
    assert len({tuple(m.tolist()) for m in mixed}) == 4  # the Aligners really steer
    # ... and different prompts of different lengths, one Aligner each.
    mixed = generate(model, ps, 10, aligners=aligners)
    alone = [generate(model, [q], 10, aligners=a if a is not None else False)[0] for q, a in zip(ps, aligners)]
    assert all(torch.equal(m, a) for m, a in zip(mixed, alone))


def test_aligner_argument_defaults_to_the_models_own(model):
    p = prompts([7])
    own = make_aligner(model, 30)
    model.aligner = own
    try:
        assert torch.equal(generate(model, p, 8)[0], generate(model, p, 8, aligners=own)[0])
        bare = generate(model, p, 8, aligners=False)[0]
    finally:
        model.aligner = None
    assert torch.equal(bare, generate(model, p, 8)[0])
    assert not torch.equal(bare, generate(model, p, 8, aligners=own)[0])


def test_prefix_kv_is_computed_once_per_call(model, monkeypatch):
    aligner = make_aligner(model, 40, start_layer=1)
    calls = []
    original = CausalSelfAttention.project_prefix
    monkeypatch.setattr(CausalSelfAttention, "project_prefix", lambda self, x: calls.append(1) or original(self, x))
    out = generate(model, prompts([4, 9]), 15, aligners=aligner)
    assert len(calls) == model.config.n_layer - aligner.start_layer  # once per gated layer, not per step
    # A precomputed PrefixKV is used as is.
    calls.clear()
    pkv = model.prefix_kv(aligner)
    assert torch.equal(generate(model, prompts([4, 9]), 15, aligners=pkv)[1], out[1])
    assert len(calls) == model.config.n_layer - aligner.start_layer


def test_same_seed_same_sample_different_seed_differs(model):
    ps = prompts([5, 8])
    kw = dict(temperature=1.0, aligners=make_aligner(model, 50))

    def run(seed):
        return generate(model, ps, 20, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    ps = prompts([5, 13])
    greedy = generate(model, ps, 12)
    g = torch.Generator().manual_seed(0)
    top_k = generate(model, ps, 12, temperature=1.5, top_k=1, generator=g)
    top_p = generate(model, ps, 12, temperature=1.5, top_p=1e-6, generator=g)
    min_p = generate(model, ps, 12, temperature=1.5, min_p=1.0, generator=g)
    for x, y, z, w in zip(greedy, top_k, top_p, min_p):
        assert torch.equal(x, y) and torch.equal(x, z) and torch.equal(x, w)
    with pytest.raises(ValueError, match="min_p"):
        generate(model, ps, 2, temperature=1.0, min_p=1.5)


def test_top_k_and_top_p_draw_only_from_the_kept_tokens():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)

    def draws(**kw):
        noise = torch.empty(4000, 4).exponential_(1, generator=g)
        return sample(logits, temperature=1.0, noise=noise, **kw)

    assert set(draws(top_p=0.7).tolist()) == {1, 3}  # 0.5 + 0.3 reaches 0.7
    assert set(draws(top_k=3).tolist()) == {1, 2, 3}
    assert set(draws(min_p=0.5).tolist()) == {1, 3}  # at least 0.5 x 0.5
    assert set(draws(min_p=0.5, top_k=1).tolist()) == {1}
    freq = torch.bincount(draws(), minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)  # unfiltered draws follow the softmax
    kept = torch.bincount(draws(min_p=0.2), minlength=4).float() / 4000  # 0.05 < 0.2 x 0.5: dropped, the rest
    assert kept[0] == 0 and torch.allclose(kept, probs * (probs >= 0.1) / 0.95, atol=0.03)  # in proportion


def test_stop_ids_stop_before_the_stop_token(model):
    ps = prompts([6, 10], seed=3)
    full = generate(model, ps, 16)
    stop = int(full[0][5])
    first = full[0].tolist().index(stop)
    out = generate(model, ps, 16, stop_ids={stop})
    assert out[0].tolist() == full[0].tolist()[:first]
    row1 = full[1].tolist()
    assert out[1].tolist() == row1[:row1.index(stop)] if stop in row1 else row1


def test_stop_strings_end_each_row_after_the_token_that_completes_one(model):
    """A row stops after the first token at which its decoded text holds one of its stop strings (found by scanning
    the unstopped answer's text here), the other rows are unchanged, streaming sees the same tokens, and decoding
    ends early once every row has stopped."""

    def decode(ids):
        return "".join(f"<{i}>" for i in ids)  # several characters per token: strings span tokens

    ps = prompts([4, 9, 6])
    free = generate(model, ps, 24)
    assert all(len(f) == 24 for f in free)

    def first_end(ids, strings):
        return next(j for j in range(1, len(ids) + 1) if any(s in decode(ids[:j].tolist()) for s in strings))

    s0 = decode(free[0][5:7].tolist())  # tokens 5 and 6 of row 0: it stops at 7 tokens (or sooner, on a repeat)
    s2 = decode(free[2][2:3].tolist())[1:]  # part of token 2 of row 2
    per_row = [[s0], [], ["never", s2]]
    got, stats = generate(model, ps, 24, stop_strings=per_row, decode=decode, return_stats=True)
    assert torch.equal(got[0], free[0][:first_end(free[0], [s0])]) and len(got[0]) <= 7
    assert torch.equal(got[1], free[1])
    assert torch.equal(got[2], free[2][:first_end(free[2], [s2])]) and len(got[2]) <= 3
    shared, stats = generate(model, ps[:1] + ps[2:], 24, stop_strings=[s0, s2], decode=decode, return_stats=True)
    assert stats.decode_steps < 23  # every row stopped: no more steps
    assert [len(x) for x in shared] == [first_end(free[0], [s0, s2]), first_end(free[2], [s0, s2])]
    seen = {0: [], 1: [], 2: []}
    streamed = generate(model, ps, 24, stop_strings=per_row, decode=decode,
                        on_token=lambda row, tok: seen[row].append(tok))
    assert all(seen[b] == streamed[b].tolist() == got[b].tolist() for b in range(3))
    with pytest.raises(ValueError, match="decode="):
        generate(model, ps, 4, stop_strings=["x"])
    with pytest.raises(ValueError, match="not a single string"):
        generate(model, ps, 4, stop_strings="x", decode=decode)


def test_streaming_callback_sees_exactly_the_returned_tokens(model):
    ps = prompts([6, 10, 3], seed=4)
    aligner = make_aligner(model, 60)
    stop = int(generate(model, ps[:1], 16, aligners=aligner)[0][4])
    seen = {0: [], 1: [], 2: []}
    out = generate(model, ps, 16, stop_ids={stop}, aligners=aligner, on_token=lambda row, tok: seen[row].append(tok))
    assert [seen[b] for b in range(3)] == [o.tolist() for o in out]
    assert len(out[0]) < 16


def penalized_reference(model, prompt, n, aligner, p: Penalties):
    """Independent of the KV cache, padding, masks and PenaltyState: re-run the whole sequence every step, apply
    transformers' repetition penalty processor, then the presence / frequency penalties and the bias one token at a
    time, take the argmax."""
    from transformers import RepetitionPenaltyLogitsProcessor

    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq[None], aligner=aligner if aligner is not None else False)[:, -1].float()
            logits = RepetitionPenaltyLogitsProcessor(p.repetition)(seq[None], logits)[0]
            for t, c in zip(*seq[len(prompt):].unique(return_counts=True)):
                logits[t] -= p.frequency * c + p.presence
            for t, b in p.logit_bias:
                logits[t] += b
            seq = torch.cat([seq, logits.argmax()[None]])
    return seq[len(prompt):]


def test_penalties_in_a_batch_equal_an_independent_reference_and_change_the_answer(model):
    """Greedy decoding with penalties, rows of different lengths in one batch (one with an Aligner): every row gets
    the tokens of a reference that recomputes the sequence and applies the penalties itself (transformers'
    repetition processor); each kind of penalty changes some answer."""
    aligner = make_aligner(model, 60)
    ps = prompts([3, 11, 6], seed=2)
    # this random model repeats readily when the prompt is its own greedy continuation
    loop = generate(model, ps[:1], 16)[0]
    ps.append(torch.cat([ps[0], loop, loop]))
    plain = generate(model, ps, 16, aligners=[None, aligner, None, None])
    kinds = [Penalties(repetition=1.5), Penalties(presence=1.0, frequency=1.5), Penalties(logit_bias=((7, 5.0),)),
             Penalties(repetition=0.8, frequency=-0.5)]
    for p in kinds:
        got = generate(model, ps, 16, aligners=[None, aligner, None, None], penalties=p)
        for i, (row, prompt) in enumerate(zip(got, ps)):
            assert torch.equal(row, penalized_reference(model, prompt, 16, aligner if i == 1 else None, p)), (p, i)
        assert any(not torch.equal(a, b) for a, b in zip(got, plain)), p
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, ps, 2, penalties=Penalties(repetition=0.0))
    with pytest.raises(ValueError, match="logit_bias: token id 99999"):
        generate(model, ps, 2, penalties=Penalties(logit_bias=((99999, 1.0),)))


def test_stats_count_tokens(model):
    ps = prompts([4, 9])
    out, stats = generate(model, ps, 7, return_stats=True)
    assert (stats.batch_size, stats.prompt_tokens, stats.new_tokens, stats.decode_steps) == (2, 13, 14, 6)
    assert stats.decode_tokens_per_s > 0 and stats.prefill_tokens_per_s > 0


def test_bad_arguments_raise_clear_errors(model):
    with pytest.raises(ValueError, match="context"):
        generate(model, prompts([200]), 100)
    with pytest.raises(ValueError, match="one \\(or None\\) per prompt"):
        generate(model, prompts([3, 4]), 5, aligners=[make_aligner(model, 1)])
    with pytest.raises(ValueError, match="share n_tokens"):
        generate(model, prompts([3, 4]), 5, aligners=[make_aligner(model, 1, n_tokens=2), make_aligner(model, 2)])
    other = Aligner(Config.from_name("tiny", n_embd=32, n_head=2, intermediate_size=64))
    with pytest.raises(ValueError, match="does not fit the base"):
        generate(model, prompts([3]), 5, aligners=other)
    with pytest.raises(ValueError, match="1-D"):
        generate(model, [torch.zeros(2, 3, dtype=torch.long)], 5)


class CharTokenizer:
    """Byte-level stand-in for the real tokenizer (answer_prompts only needs encode/decode)."""

    has_chat_template = False

    def encode(self, text, bos=None, eos=False):
        return torch.tensor(list(text.encode()), dtype=torch.long)

    def decode(self, ids):
        return bytes(i for i in torch.as_tensor(ids).tolist() if i < 256).decode(errors="replace")


def test_answer_prompts_equals_generate_per_prompt_and_aligner(model):
    tok = CharTokenizer()
    entries = [AlignerEntry("a", make_aligner(model, 70, n_tokens=2)), AlignerEntry("base"),
               AlignerEntry("b", make_aligner(model, 71, n_tokens=3)),
               AlignerEntry("c", make_aligner(model, 72, n_tokens=2))]
    items = [PromptItem("hi"), PromptItem("Name a colour", "sky"), PromptItem("a longer question here?")]
    answers, stats = answer_prompts(model, tok, items, entries, 6, batch_size=3)
    assert len(stats) >= 4  # 12 requests in batches of at most 3
    for i, item in enumerate(items):
        ids = tok.encode(build_prompt(tok, item.instruction, input=item.input))
        for j, e in enumerate(entries):
            alone = generate(model, [ids], 6, aligners=e.aligner if e.aligner is not None else False)[0]
            assert torch.equal(answers[i][j].tokens, alone), (i, e.name)


def test_read_prompts_formats_and_errors(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["a", {"prompt": "b"}, {"instruction": "c", "input": "d"}, {"prompt": "e", "system": "f"}]))
    assert read_prompts(f) == [PromptItem("a"), PromptItem("b"), PromptItem("c", "d"), PromptItem("e", system="f")]
    f = tmp_path / "p.jsonl"
    f.write_text('{"instruction": "x"}\n\n"y"\n')
    assert read_prompts(f) == [PromptItem("x"), PromptItem("y")]
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    f.write_text(json.dumps({"prompt": turns}) + "\n")  # TRL's conversational prompt-only row
    assert read_prompts(f) == [PromptItem("v", system="s", history=turns[1:3])]
    f.write_text('{"instruction": "x"}\n{"output": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl: line 2 has no 'prompt'"):
        read_prompts(f)
    f.write_text('{"instruction": "x", "system": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl: line 1 .*non-string 'input' or 'system'"):
        read_prompts(f)
    f.write_text('{"instruction": "x"}\n{broken\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_prompts(f)
    with pytest.raises(ValueError, match="no such file"):
        read_prompts(tmp_path / "missing.json")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not a UTF-8 text file"):
        read_prompts(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match=r"is a directory"):
        read_prompts(tmp_path)
    # plain text: one prompt per non-empty line, taken as it is (quotes and braces included)
    (tmp_path / "p.txt").write_text('What is 2 + 2?\n\n  {"not": "json"}  \n"Quoted"\n')
    assert read_prompts(tmp_path / "p.txt") == [PromptItem("What is 2 + 2?"), PromptItem('{"not": "json"}'),
                                                PromptItem('"Quoted"')]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"blank.txt: no prompts in the file"):
        read_prompts(tmp_path / "blank.txt")


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(model):
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    ps = prompts([5, 9])
    aligner, other = make_aligner(model, 80), make_aligner(model, 81)
    eager, eager_stats = generate(model, ps, 10, aligners=aligner, compile=False, return_stats=True)
    compiled, stats = generate(model, ps, 10, aligners=aligner, compile=True, return_stats=True)
    assert all(torch.equal(e, c) for e, c in zip(eager, compiled))
    # The first step compiled the graph: most of the decode time, timed apart and named in the summary.
    assert stats.compiled and stats.first_step_s > 0.5 * stats.decode_s and "after the first step" in stats.summary()
    assert not eager_stats.compiled and "after the first step" not in eager_stats.summary()
    # One shared Aligner and per-row Aligners at the same batch size run the same compiled graph (a 7B graph takes
    # ~45 s to compile), and a new batch size gets its own static graph, with the eager tokens.
    graphs = counters["stats"]["unique_graphs"]
    mixed = generate(model, ps, 10, aligners=[other, aligner], compile=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(mixed[1], eager[1]) and torch.equal(mixed[0], generate(model, ps[:1], 10, aligners=other)[0])
    one = generate(model, ps[1:], 10, aligners=aligner, compile=True)
    assert torch.equal(one[0], generate(model, ps[1:], 10, aligners=aligner)[0])
    # Penalties run inside the compiled step: the eager tokens.
    p = Penalties(repetition=1.5, frequency=0.5)
    assert all(torch.equal(e, c) for e, c in zip(generate(model, ps, 10, aligners=aligner, penalties=p),
                                                 generate(model, ps, 10, aligners=aligner, penalties=p, compile=True)))


def test_compiled_decoding_reads_the_prefix_from_fixed_buffers_refilled_by_each_call(model, monkeypatch):
    """A CUDA graph copies every input it cannot assume fixed at each replay (on an H200, 60 copies per LLaMA-2-7B step
    for the prefix K/V); the compiled step gets the prefix in buffers at fixed addresses, marked static, that each
    call refills: the same addresses for two different Aligners, each with its own eager tokens. (The CPU twin of
    tests/test_cuda.py's graph test: the eager step stands in for the graph.)"""
    from lit_aligner.generation import engine

    seen = []

    def recording(compile, device):
        def step(model, tok, input_pos, pad, valid, prefix, *rest):
            seen.append([(t.data_ptr(), getattr(t, "_dynamo_static_input_type", None))
                         for t in (*prefix.keys, *prefix.values, prefix.gate)])
            return engine.decode_one_token(model, tok, input_pos, pad, valid, prefix, *rest)
        return step if compile else engine.decode_one_token

    monkeypatch.setattr(engine, "_decode_fn", recording)
    ps = prompts([5, 9])
    for seed in (90, 91):
        a = make_aligner(model, seed)
        assert all(torch.equal(c, e) for c, e in zip(generate(model, ps, 6, aligners=a, compile=True),
                                                     generate(model, ps, 6, aligners=a, compile=False)))
    assert len(seen) == 2 * 5 and all(s == seen[0] for s in seen)  # 5 decoding steps a call, both calls
    assert all(kind == "unguarded" for _, kind in seen[0])


def test_generating_under_inference_mode_leaves_the_model_usable_outside_it(monkeypatch):
    """`with torch.inference_mode(): generate(...)` is common: what it allocates (the KV caches, the compiled step's
    prefix buffers) are normal tensors, which a later call outside it can write (inference tensors refuse that): the
    same tokens, and the model still trains."""
    from lit_aligner.generation import engine

    monkeypatch.setattr(engine, "_decode_fn", lambda compile, device: engine.decode_one_token)  # eager for the graph
    torch.manual_seed(0)
    m = LLaMA(Config.from_name("tiny"))
    init_weights(m, std=0.15)
    a = make_aligner(m, 5)
    ps = prompts([5, 9])
    with torch.inference_mode():
        inside = generate(m, ps, 6, aligners=a, compile=True)
    outside = generate(m, ps, 6, aligners=a, compile=True)
    assert all(torch.equal(x, y) for x, y in zip(inside, outside))
    m(torch.stack([p[:5] for p in ps]), aligner=a).sum().backward()
    assert a.gate.grad is not None and a.gate.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# CLIs


def run_script(*args, cwd=ROOT, input=None):
    return helpers.run_script(*args, cwd=cwd, timeout=600, input=input)


def smollm2(request):
    try:
        return request.getfixturevalue("smollm2_dir")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py provides no smollm2_dir fixture")


def test_base_cli_missing_checkpoint_says_how_to_convert(tmp_path):
    r = run_script(str(ROOT / "generate/base.py"), "--checkpoint-dir", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 1
    assert r.stderr.startswith("error:") and "convert" in r.stderr and "Traceback" not in r.stderr
    # a bad flag is named as the flag, before anything loads (here: before the missing checkpoint is found)
    r = run_script(str(ROOT / "generate/base.py"), "--checkpoint-dir", str(tmp_path / "nope"), "--max-new-tokens", "0")
    assert r.returncode == 1 and r.stderr == "error: --max-new-tokens must be >= 1, got 0\n"


def test_base_cli_answers_what_is_2_plus_2(request):
    ckpt = smollm2(request)
    r = run_script(str(ROOT / "generate/base.py"), "--checkpoint-dir", str(ckpt), "--prompt", "What is 2+2?",
                   "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "4" in r.stdout
    assert "tokens/s" in r.stderr


def test_base_cli_penalty_flags_reach_the_decoder(request):
    """--repetition-penalty / --frequency-penalty: the CLI prints what `generate` gives with those penalties (in this
    process, same base), which is not the unpenalised answer; a bad value is one error line."""
    from lit_aligner.base import load_base
    from lit_aligner.prompts import build_prompt, encode_prompt

    ckpt = smollm2(request)
    question = "List the numbers from 1 to 30, separated by commas."
    r = run_script(str(ROOT / "generate/base.py"), "--checkpoint-dir", str(ckpt), "--prompt", question,
                   "--max-new-tokens", "24", "--repetition-penalty", "1.3", "--frequency-penalty", "0.2")
    assert r.returncode == 0, r.stderr
    model, tok = load_base(ckpt, "cpu", "float32")
    ids = [encode_prompt(tok, build_prompt(tok, question))]
    answer = {p: tok.decode(generate(model, ids, 24, stop_ids=tok.stop_ids, penalties=p)[0]).strip()
              for p in (Penalties(repetition=1.3, frequency=0.2), Penalties())}
    assert r.stdout.strip() == answer[Penalties(repetition=1.3, frequency=0.2)] != answer[Penalties()]
    bad = run_script(str(ROOT / "generate/base.py"), "--checkpoint-dir", str(ckpt), "--repetition-penalty", "-1")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --repetition-penalty must") and \
        "Traceback" not in bad.stderr


def test_text_streamer_ends_before_a_stop_string_split_over_tokens():
    import io

    class Pieces:  # a tokenizer whose token i decodes to PIECES[i]
        def stream_decoder(self):
            return type("D", (), {"step": lambda self, i: PIECES[i], "flush": lambda self: ""})()

    PIECES = ["ab", "c\n", "de", "f"]
    for stop, printed in ((["c\nd"], "ab"), (["zz", "f"], "abc\nde"), ([], "abc\ndef"), (["xyz"], "abc\ndef")):
        out = io.StringIO()
        s = TextStreamer(Pieces(), file=out, stop=stop)
        for i in range(4):
            s(0, i)
        assert s.finish() == out.getvalue() == printed, stop


def test_cli_stop_strings_cut_the_answer_and_end_decoding(request, tmp_path):
    """--stop (repeatable; backslash-n is a newline): streamed (generate/base.py) and written (generate/aligner.py
    --out) answers are the unstopped answer cut before the first stop string, and decoding ends there."""
    from lit_aligner.base import load_base
    from lit_aligner.prompts import build_prompt, encode_prompt

    ckpt = smollm2(request)
    questions = ["List the numbers from 1 to 30, separated by commas.", "Give three tips for staying healthy."]
    model, tok = load_base(ckpt, "cpu", "float32")
    free = [tok.decode(generate(model, [encode_prompt(tok, build_prompt(tok, q))], 40, stop_ids=tok.stop_ids)[0])
            for q in questions]
    assert ", 7" in free[0] and "\n" in free[1].strip()
    r = run_script(str(ROOT / "generate/base.py"), "--checkpoint-dir", str(ckpt), "--prompt", questions[0],
                   "--max-new-tokens", "40", "--stop", ", 7", "--stop", "never")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == free[0][:free[0].index(", 7")].strip()
    assert int(r.stderr.split(" new tokens returned")[0].split()[-1]) < 40
    out = tmp_path / "answers.jsonl"
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--no-aligner", "--prompt",
                   questions[0], "--prompt", questions[1], "--max-new-tokens", "40", "--stop", "\\n", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["output"] for row in rows] == [f[:f.index("\n")] if "\n" in f else f for f in free]
    assert {row["template"] for row in rows} == {"chat"}  # the base alone: its tokenizer's chat template


def test_cli_reasoning_parser_reads_the_think_block_its_template_opens(request, tmp_path):
    """--reasoning-parser think under a template whose generation prompt opens a think block (DeepSeek-R1's way): every
    answer's reasoning and content in --out are its raw output read as `split_reasoning` reads it from inside a
    block, and the printout shows the reasoning apart; correction mode refuses the flag."""
    from lit_aligner.reasoning import split_reasoning

    opens = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    ckpt = helpers.templated_checkpoint(smollm2(request), tmp_path / "thinking", opens)
    out = tmp_path / "answers.jsonl"
    r = run_script("generate/aligner.py", "--checkpoint-dir", ckpt, "--no-aligner", "--prompt", "What is 2 + 3?",
                   "--prompt", "Name a colour.", "--max-new-tokens", "12", "--reasoning-parser", "think", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        reasoning, content = split_reasoning(row["output"], inside=True)
        assert reasoning and (row["reasoning"], row["content"]) == (reasoning, content)
        assert f"reasoning: {reasoning.strip()}" in r.stdout
    bad = run_script("generate/aligner.py", "--checkpoint-dir", ckpt, "--question", "q", "--answer", "a",
                     "--aligner", "x.safetensors", "--reasoning-parser", "think")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --reasoning-parser reads the answers to prompts")


def test_cli_chat_template_kwargs_reach_the_chat_template(request, tmp_path):
    """--chat-template-kwargs '{"enable_thinking": false}' under Qwen3's template (TRL's, on a copy of SmolLM2): the
    answer is the base's on the prompt with the thinking block closed, not the one without the flag; reserved or
    malformed variables are one error line before the model loads."""
    trl = pytest.importorskip("trl")
    from importlib import resources

    from lit_aligner.base import load_base
    from lit_aligner.prompts import encode_prompt
    from lit_aligner.tokenizer import read_template_variables

    ckpt = helpers.templated_checkpoint(smollm2(request), tmp_path / "qwen3-templated",
                                        (resources.files(trl) / "chat_templates" / "qwen3.jinja").read_text())
    model, tok = load_base(ckpt, "cpu", "float32")
    q = [{"role": "user", "content": "Name a colour."}]

    def answer(**variables):
        ids = encode_prompt(tok, tok.apply_chat_template(q, **variables))
        return tok.decode(generate(model, [ids], 12, stop_ids=tok.stop_ids)[0]).strip()

    closed, plain = answer(enable_thinking=False), answer()
    assert closed != plain
    base = ["generate/aligner.py", "--checkpoint-dir", ckpt, "--no-aligner", "--prompt", q[0]["content"],
            "--max-new-tokens", "12"]
    r = run_script(*base, "--chat-template-kwargs", '{"enable_thinking": false}')
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("--- base ---\n", 1)[1].strip() == closed
    bad = run_script(*base, "--chat-template-kwargs", '{"tools": []}')
    assert bad.returncode == 1 and bad.stderr.startswith("error: --chat-template-kwargs cannot set tools")
    for value, message in [("{nope", "is not valid JSON"), ('["x"]', "must be a JSON object")]:
        with pytest.raises(ValueError, match=f"--chat-template-kwargs {message}"):
            read_template_variables(value)


def test_cli_system_message_reaches_the_chat_template(request, tmp_path):
    """--system (and a prompts file's own "system", which wins): the answers are those of the base on the prompt
    rendered with that system turn, not the template's default one; correction mode refuses it."""
    from lit_aligner.base import load_base
    from lit_aligner.prompts import build_prompt, encode_prompt

    ckpt = smollm2(request)
    model, tok = load_base(ckpt, "cpu", "float32")

    def answer(q, system=None):
        ids = encode_prompt(tok, build_prompt(tok, q, system=system))
        return tok.decode(generate(model, [ids], 16, stop_ids=tok.stop_ids)[0]).strip()

    q, pirate = "Name a colour.", "You are a pirate. Always talk like a pirate."
    assert answer(q, pirate) != answer(q)
    r = run_script(str(ROOT / "generate/base.py"), "--checkpoint-dir", str(ckpt), "--prompt", q, "--system", pirate,
                   "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == answer(q, pirate)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "Name a colour.", "system": "Reply with one word only."}) + "\n")
    out = tmp_path / "answers.jsonl"
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--no-aligner", "--prompt", q,
                   "--prompts-file", str(prompts_file), "--system", pirate, "--max-new-tokens", "16", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["system"] for row in rows] == [pirate, "Reply with one word only."]
    assert [row["output"].strip() for row in rows] == [answer(q, pirate), answer(q, "Reply with one word only.")]
    bad = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--no-aligner", "--question",
                     "Q?", "--answer", "A.", "--system", pirate)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --system") and "Traceback" not in bad.stderr


def test_cli_interactive_chat_keeps_each_columns_own_conversation(request, tmp_path):
    """--interactive: the bare base and an Aligner each answer a message with their own earlier turns in the prompt
    (rendered by their own templates), as in-process generation on that conversation gives; "/reset" starts over;
    --out rows carry the history; a conversation past the context leaves its oldest exchange out, with a note; a
    message that cannot fit at all is an error line, not the end of the chat."""
    from lit_aligner.aligner_files import save_aligner
    from lit_aligner.base import load_base, load_config
    from lit_aligner.prompts import build_prompt, encode_prompt, prompt_for_aligner

    ckpt = smollm2(request)
    model, tok = load_base(ckpt, "cpu", "float32")
    config = load_config(ckpt)
    steered = Aligner(config, AlignerConfig(n_tokens=2, start_layer=2))
    with torch.no_grad():
        steered.gate.fill_(0.3)
    save_aligner(steered, tmp_path / "steered.safetensors", config.name, {"template": "alpaca", "mode": "sft"})

    def answer(q, history, aligner=None):
        text = prompt_for_aligner(tok, q, metadata={"template": "alpaca"}, history=history) if aligner else \
            build_prompt(tok, q, "alpaca", history=history)  # the bare base takes the Aligners' shared template
        out = generate(model, [encode_prompt(tok, text)], 24, aligners=aligner or False, stop_ids=tok.stop_ids)
        return tok.decode(out[0]).strip()

    def turns(*qa):
        return [{"role": r, "content": t} for q, a in qa for r, t in (("user", q), ("assistant", a))]

    q1, q2 = "What is 2+2?", "Now multiply that by three."
    base1, steer1 = answer(q1, []), answer(q1, [], steered)
    base2, steer2 = answer(q2, turns((q1, base1))), answer(q2, turns((q1, steer1)), steered)
    fresh_base2, fresh_steer2 = answer(q2, []), answer(q2, [], steered)
    assert (base2, steer2) != (fresh_base2, fresh_steer2)  # the history changes some answer
    out = tmp_path / "chat.jsonl"
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--aligner",
                   str(tmp_path / "steered.safetensors"), "--no-aligner", "--interactive", "--max-new-tokens", "24",
                   "--out", str(out), input=f"{q1}\n{q2}\n/reset\n{q2}\n")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["prompt"], row["aligner"] is None) for row in rows] == \
        [(q1, False), (q1, True), (q2, False), (q2, True), (q2, False), (q2, True)]
    assert [row["output"].strip() for row in rows] == [steer1, base1, steer2, base2, fresh_steer2, fresh_base2]
    assert rows[2]["history"] == turns((q1, steer1)) and rows[3]["history"] == turns((q1, base1))
    assert "history" not in rows[4] and "(new conversation)" in r.stderr
    assert {row["template"] for row in rows} == {"alpaca"}  # the base's rows too: it answered with the Aligner's

    # a context with room for one exchange only: the second message is answered without the first
    room = len(encode_prompt(tok, build_prompt(tok, q2))) + 4
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--no-aligner", "--interactive",
                   "--max-new-tokens", str(config.block_size - room), input=f"{q1}\n{q2}\n{'word ' * 100}\n")
    assert r.returncode == 0, r.stderr  # a message too long on its own is one error line, and the chat goes on
    assert "oldest 1 exchange(s) left out" in r.stderr and "error: the longest prompt" in r.stderr
    chat_fresh = tok.decode(generate(model, [encode_prompt(tok, build_prompt(tok, q2))], 24,
                                     stop_ids=tok.stop_ids)[0]).strip()
    assert r.stdout.split(f"=== {q2} ===\n--- base ---\n")[1].strip().startswith(chat_fresh)


def test_prompts_file_conversations_continue_from_their_history(request, tmp_path):
    """A prompts file's "messages" row (a leading system turn, earlier turns, the user turn to answer; or ShareGPT's
    "conversations") is answered as in-process generation on that conversation rendered by the chat template."""
    from lit_aligner.base import load_base
    from lit_aligner.prompts import build_prompt, encode_prompt

    ckpt = smollm2(request)
    model, tok = load_base(ckpt, "cpu", "float32")
    system, history = "You are a pirate.", [{"role": "user", "content": "What is 2+2?"},
                                            {"role": "assistant", "content": "Arr, it be 4."}]
    q = "Now multiply that by three."
    text = build_prompt(tok, q, system=system, history=history)
    assert text == tok.apply_chat_template([{"role": "system", "content": system}, *history,
                                            {"role": "user", "content": q}], add_generation_prompt=True)
    want = tok.decode(generate(model, [encode_prompt(tok, text)], 24, stop_ids=tok.stop_ids)[0]).strip()
    assert want != tok.decode(generate(model, [encode_prompt(tok, build_prompt(tok, q))], 24,
                                       stop_ids=tok.stop_ids)[0]).strip()
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in history]
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "system", "content": system}, *history,
                                                {"role": "user", "content": q}]}) + "\n"
                       + json.dumps({"conversations": sharegpt + [{"from": "human", "value": q}],
                                     "system": system}) + "\n")
    out = tmp_path / "answers.jsonl"
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--no-aligner",
                   "--prompts-file", str(prompts), "--max-new-tokens", "24", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["output"].strip() for row in rows] == [want, want]
    assert all(row["history"] == history and row["system"] == system and row["prompt"] == q for row in rows)
    assert "(after 2 earlier turns)" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": history}) + "\n")
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--no-aligner",
                   "--prompts-file", str(bad))
    assert r.returncode == 1 and r.stderr.startswith("error:") and "bad.jsonl: line 1" in r.stderr
    assert "must end with a non-empty user turn" in r.stderr and "Traceback" not in r.stderr


def test_aligner_cli_base_column_writes_jsonl(request, tmp_path):
    ckpt = smollm2(request)
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps([{"instruction": "What is 2+2?"}, "What is the capital of France?"]))
    out = tmp_path / "results.jsonl"
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--no-aligner",
                   "--prompts-file", str(prompts_file), "--out", str(out), "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["What is 2+2?", "What is the capital of France?"]
    assert all(row["aligner"] is None for row in rows)
    assert "4" in rows[0]["output"] and "Paris" in rows[1]["output"]


def test_aligner_cli_bad_prompts_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"output": "x"}\n')
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(tmp_path), "--no-aligner",
                   "--prompts-file", str(bad))
    assert r.returncode == 1 and r.stderr.startswith("error:") and "bad.jsonl" in r.stderr
    assert "Traceback" not in r.stderr


def test_aligner_cli_zero_gate_aligner_equals_base_and_trained_one_differs(request, tmp_path):
    from lit_aligner.aligner_files import save_aligner
    from lit_aligner.base import load_config

    ckpt = smollm2(request)
    config = load_config(ckpt)
    zero = Aligner(config, AlignerConfig(n_tokens=2, start_layer=2))  # zero gates: exactly the base
    steered = Aligner(config, AlignerConfig(n_tokens=2, start_layer=2))
    with torch.no_grad():
        steered.gate.fill_(0.5)
    save_aligner(zero, tmp_path / "zero.safetensors", config.name, {"template": "alpaca", "mode": "sft"})
    save_aligner(steered, tmp_path / "steered.safetensors", config.name, {"template": "alpaca", "mode": "sft"})
    out = tmp_path / "results.jsonl"
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--no-aligner",
                   "--aligner", str(tmp_path / "zero.safetensors"), "--aligner", str(tmp_path / "steered.safetensors"),
                   "--prompt", "What is 2+2?", "--prompt", "Name a colour.", "--out", str(out),
                   "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    by = {(row["prompt"], Path(row["aligner"]).stem if row["aligner"] else "base"): row for row in rows}
    for p in ("What is 2+2?", "Name a colour."):
        assert by[(p, "zero")]["template"] == by[(p, "base")]["template"] == "alpaca"  # what each prompt used
        assert by[(p, "zero")]["output"] == by[(p, "base")]["output"]  # the base uses the Aligners' shared template
        assert by[(p, "steered")]["output"] != by[(p, "base")]["output"]
    assert "--- " + str(tmp_path / "steered.safetensors") in r.stdout


def test_aligner_cli_refuses_an_aligner_of_another_base(request, tmp_path):
    from lit_aligner.aligner_files import save_aligner

    ckpt = smollm2(request)
    other = Aligner(Config.from_name("tiny"), AlignerConfig(n_tokens=1, start_layer=2))
    save_aligner(other, tmp_path / "tiny.safetensors", "tiny")
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt),
                   "--aligner", str(tmp_path / "tiny.safetensors"), "--prompt", "hi")
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert "tiny.safetensors" in r.stderr and "does not fit" in r.stderr


def test_aligner_cli_without_aligner_answers_with_the_default_training_runs_output(tiny_checkpoint_dir, tmp_path):
    # `python generate/aligner.py --prompt ...` after `python finetune/aligner.py`: the Aligner that run wrote
    from lit_aligner.aligner_files import save_aligner
    from lit_aligner.base import load_config

    config = load_config(tiny_checkpoint_dir)
    args = (str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(tiny_checkpoint_dir), "--prompt", "hi",
            "--max-new-tokens", "4", "--out", "answers.jsonl")
    r = run_script(*args, cwd=tmp_path)
    expected = Path("out") / "aligner" / config.name / "aligner.safetensors"
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert str(expected) in r.stderr and "python finetune/aligner.py" in r.stderr
    a = Aligner(config, AlignerConfig(n_tokens=2, start_layer=1))
    with torch.no_grad():
        a.gate.fill_(0.5)
    save_aligner(a, tmp_path / expected, config.name, {"mode": "sft"})
    r = run_script(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"answering with {expected}" in r.stderr
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [row["aligner"] for row in rows] == [str(expected)]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_cli_tools_a_forced_call_is_read_out_and_written_in_openai_form(request, tmp_path):
    ckpt = smollm2(request)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": [WEATHER]}))  # (or the bare list)
    out = tmp_path / "calls.jsonl"
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--no-aligner", "--tools", tools,
                   "--tool-choice", "get_weather", "--prompt", "What is the weather like in Paris?", "--prompt",
                   "Is it raining in Oslo?", "--max-new-tokens", "80", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        (call,) = row["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        assert call["id"].startswith("call_")
        assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
        assert row["output"].startswith("<tool_call>\n{") and row["content"] is None
        assert f"tool call: get_weather {call['function']['arguments']}" in r.stdout
    assert rows[0]["tool_calls"][0]["function"]["arguments"] != rows[1]["tool_calls"][0]["function"]["arguments"]


def test_prompts_file_rows_carry_their_own_tools_and_go_on_from_a_tools_result(request, tmp_path):
    """A row's "tools" are listed in its prompt as the server lists them; a conversation that ends with a tool's result
    is answered from that result (the answer changes with it)."""
    from lit_aligner.base import load_base
    from lit_aligner.tools import SYSTEM

    ckpt = smollm2(request)
    model, tok = load_base(ckpt, "cpu", "float32")
    q = {"role": "user", "content": "What is the weather like in Paris?"}
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    rows = [{"messages": [q, call, {"role": "tool", "tool_call_id": "call_1", "content": f"{t} degrees, {sky}"}],
             "tools": [WEATHER]} for t, sky in (("31", "sunny"), ("-12", "snowing"))]
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    items = read_prompts(prompts)
    answers, _ = answer_prompts(model, tok, items, [AlignerEntry("base")], 30, stop_ids=tok.stop_ids)
    for a, row in zip((row[0] for row in answers), rows):  # SmolLM2's template has no tools: Hermes' text turns
        assert a.prompt_text == tok.apply_chat_template([
            {"role": "system", "content": SYSTEM.format(tools=json.dumps(WEATHER))}, q,
            {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                             '</tool_call>'},
            {"role": "user", "content": f"<tool_response>\n{row['messages'][-1]['content']}\n</tool_response>"}],
            add_generation_prompt=True)
    assert answers[0][0].text != answers[1][0].text  # the answer reads the result
    out = tmp_path / "answers.jsonl"
    r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(ckpt), "--no-aligner",
                   "--prompts-file", prompts, "--max-new-tokens", "30", "--out", out)
    assert r.returncode == 0, r.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["output"] for w in written] == [row[0].text for row in answers]
    assert [w["after"][-1]["content"] for w in written] == ["31 degrees, sunny", "-12 degrees, snowing"]
    assert "(going on from 1 tool result)" in r.stdout


def test_cli_tool_flags_bad_input_is_one_clear_error(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    not_tools = tmp_path / "not_tools.json"
    not_tools.write_text(json.dumps({"name": "get_weather"}))
    cases = [(["--tool-choice", "required"], "--tool-choice and --no-parallel-tool-calls go with --tools"),
             (["--tools", not_tools], "not_tools.json: tools must be a list"),
             (["--tools", tmp_path / "missing.json"], "missing.json"),
             (["--tools", tools, "--tool-choice", "get_time"], "--tool-choice get_time: tool_choice names"),
             (["--tools", tools, "--interactive"], "--interactive, which has no way to give a call its result"),
             (["--tools", tools, "--tool-choice", "required", "--json-object"], "drop the structured-output flag"),
             (["--tools", tools, "--pipeline", "--aligner", tmp_path / "c.safetensors"], "calls no tools")]
    for flags, message in cases:
        r = run_script(str(ROOT / "generate/aligner.py"), "--checkpoint-dir", str(tmp_path), "--no-aligner",
                       "--prompt", "hi", *flags)
        assert r.returncode == 1 and r.stderr.startswith("error:") and message in r.stderr, (flags, r.stderr)
        assert "Traceback" not in r.stderr


FORECAST = {"type": "function", "function": {"name": "forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}


@pytest.mark.parametrize("template,listed,written", [
    ("llama3_1", "Environment: ipython", '{"name": "forecast", "parameters": {'),
    ("qwen3_6", "<function=example_function_name>", "<tool_call>\n<function=forecast>\n<parameter=city>\n")],
    ids=["llama3_1", "qwen3_6"])
def test_each_answer_is_forced_and_read_in_the_format_of_its_own_template(request, template, listed, written):
    """One batch, two templates: an Aligner saved with the chat template (Llama 3.1's, Qwen3.6's) writes the forced
    call in that template's format (Llama's JSON alone with "parameters", Qwen3-Coder's markup), one saved with the
    alpaca template (tools as text) in Hermes' tags; each reads back as the call, its integer as an integer."""
    trl = pytest.importorskip("trl")
    from importlib import resources

    from lit_aligner.base import load_base
    from lit_aligner.tools import parse_tools

    model, tok = load_base(smollm2(request), "cpu", "float32")
    tok.chat_template = (resources.files(trl) / "chat_templates" / f"{template}.jinja").read_text()
    entries = [AlignerEntry(t, Aligner(model.config, AlignerConfig(1, 2)), {"template": t}) for t in ("chat", "alpaca")]
    items = [PromptItem("What is the weather like in Paris?", tools=parse_tools([FORECAST], "required", False))]
    (own, hermes), = answer_prompts(model, tok, items, entries, 80, stop_ids=tok.stop_ids)[0]  # (zero gates)
    assert listed in own.prompt_text and "<tools>" in hermes.prompt_text
    assert own.text.startswith(written) and hermes.text.startswith('<tool_call>\n{"name": "forecast"')
    for a in (own, hermes):
        assert a.content is None and [c.name for c in a.calls] == ["forecast"], a.text
        assert isinstance(json.loads(a.calls[0].arguments)["days"], int), a.text


def test_cli_compile_auto_counts_the_decoding_steps_of_the_run(tiny_checkpoint_dir, tmp_path, monkeypatch):
    """--compile auto decides from the run's decoding steps (batches x --max-new-tokens: compiling, ~40 s on a GPU, pays
    after ~2,000); the answers are written either way."""
    from lit_aligner import perf
    from lit_aligner.aligner_files import save_aligner
    from lit_aligner.base import load_config

    config = load_config(tiny_checkpoint_dir)
    save_aligner(Aligner(config, AlignerConfig(n_tokens=2, start_layer=1)), tmp_path / "a.safetensors", config.name)
    seen = []

    def recording(flag, device, decode_steps=None):
        seen.append((flag, decode_steps))
        return perf.compile_flag(flag, device, decode_steps)

    cli = helpers.load_script("generate/aligner.py")
    monkeypatch.setattr(cli, "compile_flag", recording)
    # 3 prompts x (the Aligner + the bare base) = 6 answers in batches of 4: 2 batches of up to 5 steps
    cli.main(aligner=[tmp_path / "a.safetensors"], no_aligner=True, prompt=["a", "b", "c"], batch_size=4,
             max_new_tokens=5, checkpoint_dir=tiny_checkpoint_dir, out=tmp_path / "out.jsonl")
    assert seen == [("auto", 10)] and len((tmp_path / "out.jsonl").read_text().splitlines()) == 6
    base = helpers.load_script("generate/base.py")
    monkeypatch.setattr(base, "compile_flag", recording)
    base.main(prompt="a", max_new_tokens=3, checkpoint_dir=tiny_checkpoint_dir, compile="off")
    assert seen[-1] == ("off", 3)
