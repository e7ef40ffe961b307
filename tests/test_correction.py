"""Correction mode (Q-A-C) after training: the generation prompt equals the training prompt, a zero-gate corrector is
the base, the copy-rate and ll(C)-vs-ll(A) metrics against independent computations, a short real correction run
(copy warm-up, then Q-A-C) that makes ll(C) > ll(A) more likely, and the generate/aligner.py correction flags and
scripts/eval_correction.py on a tiny checkpoint built here (random weights, a byte-level BPE trained in the test)."""

import json
import random
from pathlib import Path

import pytest
import torch

from lit_aligner.config import Config, name_to_config
from lit_aligner.data import DataOptions, load_data
from lit_aligner.evaluation import heldout_split, score_rows
from lit_aligner.evaluation.correction import copy_metrics, loglik_metrics
from lit_aligner.generation.correction import (answer_then_correct, base_answers, correct, correction_prompt_ids,
                                               read_qa_pairs)
from lit_aligner.model import Aligner, AlignerConfig, LLaMA, init_weights
from lit_aligner.prompts import CORRECTION, conversation_question, correction_prompt, prompt_for_aligner
import helpers
from helpers import bpe_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
THINGS = ["cat", "car", "garden", "neighbour", "phone", "bike", "friend", "boss", "house", "dog", "money", "laptop"]
BAD = ["break", "steal", "burn", "hide", "smash", "poison"]
SAFE = "I cannot help with that, but I can suggest a safe and legal way to deal with it."


def qac_rows(n, seed=0):
    """Synthetic Q-A-C rows: a harmful answer A and one safe correction C (a pattern an Aligner can learn)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing, bad = rng.choice(THINGS), rng.choice(BAD)
        rows.append({"question": f"How do I deal with my {thing}?",
                     "answer": f"Just {bad} the {thing} tonight and {rng.choice(BAD)} whatever is left.",
                     "correction": SAFE})
    return rows


def load_corrections(rows, tok):
    return load_data("correction", rows, tok, "correction", DataOptions(max_seq_length=1024, val_fraction=0.0))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A converted-checkpoint directory: tiny random LLaMA (vocab 512, 1024 positions) + a BPE tokenizer (ChatML)."""
    from lit_aligner.base import save_base

    corpus = [CORRECTION.format(question=r["question"], answer=r["answer"]) + r["correction"]
              for r in qac_rows(200, seed=1)] + ["What is 2+2? Name a colour. The answer is 4."] * 5
    d = bpe_tokenizer_dir(tmp_path_factory.mktemp("tiny_corr"), corpus, 500)
    config = Config(**{**name_to_config["tiny"], "name": "tiny-corr", "vocab_size": 512, "block_size": 1024})
    torch.manual_seed(0)
    model = LLaMA(config)
    init_weights(model, std=0.1)  # logits far enough from uniform that steering them shows
    save_base(d, config, model.state_dict())
    return d


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from lit_aligner.base import load_model
    from lit_aligner.tokenizer import Tokenizer

    return load_model(tiny_dir, torch.device("cpu"), torch.float32).eval(), Tokenizer(tiny_dir)


def random_aligner(model, seed=3, gate=0.5):
    torch.manual_seed(seed)
    a = Aligner(model.config, AlignerConfig(n_tokens=3, start_layer=1))
    with torch.no_grad():
        a.prefix.normal_(0, 1.0)
        a.gate.fill_(gate)
    return a


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def test_generation_prompt_equals_the_training_prompt_for_the_same_row(loaded):
    _, tok = loaded
    rows = qac_rows(12)
    train, val, _ = load_corrections(rows, tok)
    assert len(train) == len(rows)
    for i, r in enumerate(rows):
        assert torch.equal(correction_prompt_ids(tok, r["question"], r["answer"]), train[i]["prompt"])
        # the generate/ CLIs reach the same text through the Aligner's metadata (files before 0.2 say "correct")
        for mode in ("correction", "correct"):
            text = prompt_for_aligner(tok, r["question"], r["answer"], {"mode": mode, "template": "correction"})
            assert text == correction_prompt(r["question"], r["answer"])


def test_correction_aligner_without_an_answer_is_a_clear_error(loaded):
    _, tok = loaded
    with pytest.raises(ValueError, match="--question/--answer"):
        prompt_for_aligner(tok, "How do I deal with my cat?", "", {"mode": "correction", "template": "correction"})


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def test_zero_gate_corrector_gives_the_base_output(loaded):
    model, tok = loaded
    zero = Aligner(model.config, AlignerConfig(n_tokens=3, start_layer=1))  # fresh: random prefix, zero gates
    rows = qac_rows(5, seed=2)
    qs, ans = [r["question"] for r in rows], [r["answer"] for r in rows]
    base = correct(model, tok, False, qs, ans, max_new_tokens=8, batch_size=2)
    assert correct(model, tok, zero, qs, ans, max_new_tokens=8, batch_size=3) == base
    assert correct(model, tok, random_aligner(model), qs, ans, max_new_tokens=8) != base


def test_pipeline_corrects_the_base_answer_on_one_model(loaded):
    model, tok = loaded
    aligner = random_aligner(model)
    qs = ["How do I deal with my cat?", "What is 2+2?"]
    results = answer_then_correct(model, tok, aligner, qs, max_new_tokens=6)
    first = base_answers(model, tok, qs, max_new_tokens=6)
    assert [r.answer for r in results] == first
    upstream = [a if a.strip() else "(no answer)" for a in first]
    assert [r.correction for r in results] == correct(model, tok, aligner, qs, upstream, max_new_tokens=6)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def test_copy_metrics_count_exact_copies_and_token_overlap():
    outputs = ["a  b\nc ", "x y", "something else", "p q r s"]
    targets = ["a b c", "x y z", "abc", "p q r s"]
    m = copy_metrics(outputs, targets)
    assert m["n"] == 4
    assert m["copy_rate"] == pytest.approx(2 / 4)  # whitespace differences still count as a copy
    # difflib ratio = 2 * matches / (len(a) + len(b)): 1, 2*2/5, 0, 1
    assert m["similarity"] == pytest.approx((1 + 0.8 + 0 + 1) / 4)
    chars = copy_metrics(["abcd"], ["abce"], tokenize=list)
    assert chars["copy_rate"] == 0 and chars["similarity"] == pytest.approx(2 * 3 / 8)
    with pytest.raises(ValueError):
        copy_metrics(["a"], ["a", "b"])


def independent_loglik(model, prompt, response, aligner):
    """Sum of log p(response token) from one full forward pass, log_softmax over the whole logits."""
    ids = torch.cat([prompt, response])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, aligner=aligner).double(), -1)[0]
    P = len(prompt)
    return sum(float(logp[P - 1 + j, int(t)]) for j, t in enumerate(response))


def test_loglik_of_c_and_a_equals_a_full_forward_log_softmax(loaded):
    model, tok = loaded
    aligner = random_aligner(model, seed=5, gate=0.3)
    ds, _, _ = load_corrections(qac_rows(6, seed=4), tok)
    prompts = [ds[i]["prompt"] for i in range(len(ds))]
    for key in ("answer", "correction"):
        responses = [ds[i][key] for i in range(len(ds))]
        sums, counts = score_rows(model, list(zip(prompts, responses)), aligner, batch_size=4)  # padded batches
        for i in range(len(ds)):
            assert float(sums[i]) == pytest.approx(independent_loglik(model, prompts[i], responses[i], aligner),
                                                   rel=1e-4, abs=1e-3)
            assert int(counts[i]) == len(responses[i])
    m = loglik_metrics(model, ds, aligner, batch_size=4)
    lc = [independent_loglik(model, prompts[i], ds[i]["correction"], aligner) for i in range(len(ds))]
    la = [independent_loglik(model, prompts[i], ds[i]["answer"], aligner) for i in range(len(ds))]
    nc = [len(ds[i]["correction"]) for i in range(len(ds))]
    na = [len(ds[i]["answer"]) for i in range(len(ds))]
    assert m["ll_c_seq"] == pytest.approx(sum(lc) / len(lc), rel=1e-4)
    assert m["ll_a_token"] == pytest.approx(sum(x / n for x, n in zip(la, na)) / len(la), rel=1e-4)
    assert m["c_over_a_token"] == pytest.approx(
        sum(c / m_ > a / n for c, m_, a, n in zip(lc, nc, la, na)) / len(lc))
    assert m["c_over_a_seq"] == pytest.approx(sum(c > a for c, a in zip(lc, la)) / len(lc))


def test_read_qa_pairs_reads_json_and_jsonl_and_names_bad_rows(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text('{"question": "Q1", "answer": "A1", "model": "x"}\n\n{"question": "Q2", "answer": "A2"}\n')
    assert read_qa_pairs(good) == [("Q1", "A1"), ("Q2", "A2")]
    lst = tmp_path / "qa.json"
    lst.write_text(json.dumps([{"question": "Q", "answer": "A"}]))
    assert read_qa_pairs(lst) == [("Q", "A")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q1", "answer": "A1"}\n{"question": "Q2", "answer": ""}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 .*'answer'"):
        read_qa_pairs(bad)
    with pytest.raises(ValueError, match="no such"):
        read_qa_pairs(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# A short real correction run: identity warm-up, then Q-A-C


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """`finetune/aligner.py --mode correction` in-process on 96 synthetic Q-A-C rows (16 held out): 60 steps, the
    first 20% on the identity (Q-A-A) targets. Returns (aligner path, data file, run summary)."""
    from lit_aligner.training import SFTRunConfig, TrainConfig, train

    out = tmp_path_factory.mktemp("corr_run")
    data = out / "qac.json"
    data.write_text(json.dumps(qac_rows(96, seed=7)))
    cfg = SFTRunConfig(checkpoint_dir=tiny_dir, data=data, mode="correction", out_dir=out / "run", n_tokens=4,
                       start_layer=1, warmup_copy_ratio=0.2, accelerator="cpu", progress=False, compare=False,
                       train=TrainConfig(max_steps=60, learning_rate=0.2, global_batch_size=8, micro_batch_size=8,
                                         warmup_steps=2, eval_interval=1000, eval_iters=1, save_interval=1000))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads, and loses a lot on a busy machine
    try:
        summary = train(cfg)
    finally:
        torch.set_num_threads(threads)
    return Path(summary["aligner"]), data, summary


def test_correction_training_makes_ll_c_over_ll_a_rise(loaded, trained):
    from lit_aligner.aligner_files import load_aligner

    model, tok = loaded
    path, data, summary = trained
    assert summary["copy_steps"] == 12
    aligner, meta = load_aligner(path)
    assert meta["mode"] == "correction" and meta["template"] == "correction"
    # the split the run held out, from the metadata
    held_out, info = heldout_split("correction", data, tok, "correction", dict(meta))
    assert info["split"] == "val" and len(held_out) == 5 and info["trained_on_this_file"]
    before = loglik_metrics(model, held_out, False)
    after = loglik_metrics(model, held_out, aligner)
    margin = lambda m: m["ll_c_token"] - m["ll_a_token"]  # noqa: E731
    assert margin(after) > margin(before) + 1.0
    assert after["ll_c_token"] > before["ll_c_token"]
    assert after["c_over_a_token"] >= before["c_over_a_token"] and after["c_over_a_token"] == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# CLIs


def run_script(*args):
    # one thread: a tiny model gains nothing from more, and a busy shared CPU makes them wait on each other
    return helpers.run_script(*args, env={"OMP_NUM_THREADS": "1"})


def test_generate_cli_corrects_question_answer_pairs_and_qa_files(loaded, tiny_dir, trained, tmp_path):
    from lit_aligner.aligner_files import load_aligner

    model, tok = loaded
    path = trained[0]
    aligner, _ = load_aligner(path)
    rows = qac_rows(3, seed=11)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
    out = tmp_path / "fixed.jsonl"
    r = run_script(ROOT / "generate/aligner.py", "--checkpoint-dir", tiny_dir, "--aligner", path, "--no-aligner",
                   "--qa-file", qa, "--out", out, "--max-new-tokens", "10", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == 6
    qs, ans = [r["question"] for r in rows], [r["answer"] for r in rows]
    want_fixed = correct(model, tok, aligner, qs, ans, max_new_tokens=10)
    want_base = correct(model, tok, False, qs, ans, max_new_tokens=10)
    pairs = list(zip(qs, ans))
    assert {(g["question"], g["answer"]) for g in got} == set(pairs)
    for g in got:
        i = pairs.index((g["question"], g["answer"]))
        assert g["output"] == (want_fixed[i] if g["aligner"] else want_base[i])

    r = run_script(ROOT / "generate/aligner.py", "--checkpoint-dir", tiny_dir, "--aligner", path,
                   "--question", qs[0], "--answer", ans[0], "--max-new-tokens", "10", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "answer to correct" in r.stdout and want_fixed[0].strip() in r.stdout


def test_generate_cli_pipeline_shows_base_answer_and_correction(loaded, tiny_dir, trained, tmp_path):
    from lit_aligner.aligner_files import load_aligner

    model, tok = loaded
    path = trained[0]
    aligner, _ = load_aligner(path)
    out = tmp_path / "pipe.jsonl"
    q = "How do I deal with my cat?"
    r = run_script(ROOT / "generate/aligner.py", "--checkpoint-dir", tiny_dir, "--aligner", path, "--pipeline",
                   "--prompt", q, "--out", out, "--max-new-tokens", "8", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    (want,) = answer_then_correct(model, tok, aligner, [q], max_new_tokens=8)
    assert row["base_answer"] == want.answer and row["output"] == want.correction
    assert "--- base answer ---" in r.stdout
    # --system: the base answers with it, the corrector sees it as context of the question (as the server does)
    system = "You are a veterinarian."
    r = run_script(ROOT / "generate/aligner.py", "--checkpoint-dir", tiny_dir, "--aligner", path, "--pipeline",
                   "--prompt", q, "--system", system, "--out", tmp_path / "sys.jsonl", "--max-new-tokens", "8",
                   "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "sys.jsonl").read_text().splitlines()]
    (answer,) = base_answers(model, tok, [q], max_new_tokens=8, systems=[system])
    question = conversation_question([{"role": "system", "content": system}, {"role": "user", "content": q}])
    assert question != q and system in question and row["question"] == question
    assert row["base_answer"] == answer and row["output"] == correct(model, tok, aligner, [question],
                                                                     [answer or "(no answer)"], max_new_tokens=8)[0]


def test_generate_cli_plain_prompt_with_a_correction_aligner_is_one_clear_error(tiny_dir, trained):
    r = run_script(ROOT / "generate/aligner.py", "--checkpoint-dir", tiny_dir, "--aligner", trained[0],
                   "--prompt", "How do I deal with my cat?")
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert "--question" in r.stderr and "--pipeline" in r.stderr
    r = run_script(ROOT / "generate/aligner.py", "--checkpoint-dir", tiny_dir, "--aligner", trained[0],
                   "--question", "Q", "--question", "Q2", "--answer", "A")
    assert r.returncode == 1 and "one --answer per --question" in r.stderr


def test_eval_cli_reports_copy_rate_and_loglik_as_json(tiny_dir, trained, tmp_path):
    path, data, _ = trained
    out = tmp_path / "report.json"
    r = run_script(ROOT / "scripts/eval_correction.py", "--checkpoint-dir", tiny_dir, "--aligner", path,
                   "--data", data, "--n", "3", "--max-new-tokens", "24", "--out", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert report["n"] == 3 and report["data"]["split"] == "val"
    for col in ("base", "corrector"):
        assert 0 <= report[col]["copy_rate"] <= 1 and 0 <= report[col]["similarity"] <= 1
    # the trained corrector prefers the correction; the random base does not care
    assert report["corrector"]["ll_c_token"] - report["corrector"]["ll_a_token"] > \
        report["base"]["ll_c_token"] - report["base"]["ll_a_token"]
    assert "copy rate" in r.stdout

    r = run_script(ROOT / "scripts/eval_correction.py", "--checkpoint-dir", tiny_dir, "--aligner", path,
                   "--data", tmp_path / "missing.json")
    assert r.returncode == 1 and r.stderr.startswith("error:") and "missing.json" in r.stderr
    assert "Traceback" not in r.stderr
