"""evaluate/aligner.py: every subcommand on the tiny checkpoint, offline, checked against independent computations."""

import json
import math
from pathlib import Path

import pytest
import torch

import helpers
from lit_aligner.aligner_files import save_aligner
from lit_aligner.base import load_base
from lit_aligner.model import Aligner, AlignerConfig

REPO = Path(__file__).resolve().parent.parent


def cli(*args, cwd=None):
    return helpers.run_script(REPO / "evaluate" / "aligner.py", *args, cwd=cwd)


def last_json(p):
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def base(tiny_checkpoint_dir):
    return load_base(tiny_checkpoint_dir, device="cpu")


@pytest.fixture(scope="module")
def aligners(base, tmp_path_factory):
    """zero.safetensors (zero gates: the base exactly), steer.safetensors (large random gates), fixer (correction)."""
    model, _ = base
    d = tmp_path_factory.mktemp("aligners")
    torch.manual_seed(0)
    zero = Aligner(model.config, AlignerConfig(3, 1))
    steer = Aligner(model.config, AlignerConfig(5, 0))
    with torch.no_grad():
        steer.gate.normal_(0, 1.0)
    save_aligner(zero, d / "zero.safetensors", model.config.name, {"template": "plain"})
    save_aligner(steer, d / "steer.safetensors", model.config.name, {"template": "plain"})
    save_aligner(steer, d / "fixer.safetensors", model.config.name, {"mode": "correction", "template": "correction"})
    return d


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    from lit_aligner.data import default as default_data

    rows = default_data.generate_rows(40, seed=5)
    d = tmp_path_factory.mktemp("sftdata")
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, '{"instruction": "no output field"}')  # malformed: skipped and counted
    lines.insert(7, json.dumps({"instruction": "long " * 400, "input": "", "output": "x"}))  # too long: dropped
    (d / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return d / "sft.jsonl"


# --- loss -------------------------------------------------------------------------------------------------------------


def test_loss_equals_an_independent_cross_entropy_and_counts_rows(tiny_checkpoint_dir, base, aligners, sft_file,
                                                                  tmp_path):
    from lit_aligner.aligner_files import load_aligner
    from lit_aligner.data import DataOptions, load_data
    from lit_aligner.losses import cross_entropy
    from lit_aligner.data import pad_rows

    out = tmp_path / "loss.json"
    p = cli("loss", "--checkpoint-dir", tiny_checkpoint_dir, "--data", sft_file, "--template", "plain",
            "--max-seq-length", "256", "--aligners", aligners / "zero.safetensors", aligners / "steer.safetensors",
            "--out", out)
    result = last_json(p)
    assert json.loads(out.read_text())["results"] == result["results"]
    by = {Path(r["name"]).stem: r for r in result["results"]}
    counts = result["data"]["plain"]
    assert counts["rows_read"] == 42 and counts["skipped"] == 1 and counts["dropped"] == 1 and counts["evaluated"] == 40
    assert by["zero"]["loss"] == pytest.approx(by["base"]["loss"], abs=1e-6)  # zero gates: the base
    assert abs(by["steer"]["loss"] - by["base"]["loss"]) > 1e-3
    assert by["base"]["perplexity"] == pytest.approx(math.exp(by["base"]["loss"]))

    # independently: per-token mean cross-entropy of the full logits over the same rows
    model, tok = base
    train, _, _ = load_data("sft", sft_file, tok, "plain", DataOptions(max_seq_length=256, val_fraction=0.0), 42)
    steer, _ = load_aligner(aligners / "steer.safetensors", model)
    for name, a in (("base", False), ("steer", steer)):
        total, count = 0.0, 0
        for s in range(0, len(train), 8):
            b = pad_rows(train.rows()[s:s + 8], tok.pad_id)
            n = int((b["labels"][:, 1:] != -100).sum())
            with torch.no_grad():
                total += float(cross_entropy(model(b["input_ids"], aligner=a), b["labels"])) * n
            count += n
        assert by[name]["loss"] == pytest.approx(total / count, rel=1e-5), name
        assert by[name]["tokens"] == count
    assert "perplexity" in p.stdout and "skipped 1 malformed" in p.stdout


def test_loss_on_prepared_data_scores_every_system_on_its_rendering_and_labels_it_so(tiny_checkpoint_dir, base,
                                                                                     aligners, sft_file, tmp_path):
    """A prepared directory holds rows rendered by its template: the Aligners (template plain) and the base are scored
    on those rows, labelled with that template, with a note; the losses are those of the file under that template."""
    from lit_aligner.data import DataOptions, prepare

    _, tok = base
    prepare("sft", sft_file, tmp_path / "prepared", tok, "alpaca", DataOptions(max_seq_length=256, val_fraction=0.0))
    systems = ["--aligners", aligners / "zero.safetensors", aligners / "steer.safetensors"]
    p = cli("loss", "--checkpoint-dir", tiny_checkpoint_dir, "--data", tmp_path / "prepared", *systems)
    result = last_json(p)
    assert {r["template"] for r in result["results"]} == {"alpaca"} and list(result["data"]) == ["alpaca"]
    assert "was prepared with the 'alpaca' template; it is used as is" in p.stderr
    raw = last_json(cli("loss", "--checkpoint-dir", tiny_checkpoint_dir, "--data", sft_file, "--template", "alpaca",
                        "--max-seq-length", "256", *systems))
    assert [(r["name"], r["template"], r["tokens"]) for r in result["results"]] == \
        [(r["name"], r["template"], r["tokens"]) for r in raw["results"]]
    assert [r["loss"] for r in result["results"]] == pytest.approx([r["loss"] for r in raw["results"]], rel=1e-6)


def test_loss_on_every_answer_of_conversations_equals_one_row_per_answer(tiny_checkpoint_dir, base, aligners,
                                                                         tmp_path):
    """--turns all scores every answer of a conversation in one sequence: the same per-token loss and token count as
    one row per answer, each with the conversation before it rendered by the chat template (scored here with the
    model's plain logits)."""
    from lit_aligner.aligner_files import load_aligner
    from lit_aligner.data import DataOptions, load_data
    from lit_aligner.losses import cross_entropy

    convs = [[{"role": "system", "content": "Be brief."}] + [
        {"role": r, "content": f"{'Question' if r == 'user' else 'The answer is'} {i * 7 + k} plus {k}."}
        for k in range(1 + i % 3) for r in ("user", "assistant")] for i in range(9)]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    out = tmp_path / "loss.json"
    p = cli("loss", "--checkpoint-dir", tiny_checkpoint_dir, "--data", f, "--template", "chat", "--turns", "all",
            "--aligners", aligners / "steer.safetensors", "--out", out)
    result = last_json(p)
    assert result["data"]["chat"]["evaluated"] == 9 and result["data"]["chat"]["answers"] == 18
    assert "9 rows (18 answers) of" in p.stdout
    model, tok = base
    steer, _ = load_aligner(aligners / "steer.safetensors", model)
    one_per_answer = [{"messages": c[:2 * k + 3]} for c in convs for k in range(len(c) // 2)]
    rows = load_data("sft", one_per_answer, tok, "chat", DataOptions(val_fraction=0.0))[0]
    assert len(rows) == 18 and rows.answers() == 18
    for r in result["results"]:
        total, count = 0.0, 0
        for it in rows:
            ids = torch.cat([it["prompt"], it["response"]])[None]
            labels = torch.cat([torch.full_like(it["prompt"], -100), it["response"]])[None]
            with torch.no_grad():
                logits = model(ids, aligner=steer if r["name"] != "base" else False)
            total += float(cross_entropy(logits, labels)) * (len(it["response"]))
            count += len(it["response"])
        assert r["tokens"] == count and r["loss"] == pytest.approx(total / count, rel=1e-5), r["name"]


# --- inspect ----------------------------------------------------------------------------------------------------------


def independent_inspection(model, aligner, ids, labels):
    """The inspect figures from scratch: each gated layer's queries through its own weight rows and a RoPE written
    here (complex rotation of (i, i + hs/2) pairs), the prefix keys and values through its k and v rows; checked to
    be the attention the module really adds (wo(gate * attention @ values) = with - without)."""
    c = model.config
    nh, nkv, hs = c.n_head, c.n_query_groups, c.head_size
    B, T = ids.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    w[:, :-1] = (labels[:, 1:] != -100).double()
    angles = torch.arange(T, dtype=torch.float64)[:, None] * c.rope_base ** (-torch.arange(0, hs, 2).double() / hs)
    rotation = torch.polar(torch.ones_like(angles), angles)  # (T, hs/2)
    x, out = model.tok_embeddings(ids), []
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    for i, block in enumerate(model.layers):
        xn = block.attention_norm(x)
        if i >= aligner.start_layer:
            W = block.attn.wqkv.weight.double()
            q = (xn.double() @ W[:nh * hs].T).view(B, T, nh, hs)
            q = torch.view_as_real(torch.complex(q[..., :hs // 2], q[..., hs // 2:]) * rotation[:, None])
            q = torch.cat([q[..., 0], q[..., 1]], -1).transpose(1, 2)  # (B, nh, T, hs)
            P = aligner.prefix.double()
            k = (P @ W[nh * hs:(nh + nkv) * hs].T).view(-1, nkv, hs).repeat_interleave(nh // nkv, 1).transpose(0, 1)
            v = (P @ W[(nh + nkv) * hs:].T).view(-1, nkv, hs).repeat_interleave(nh // nkv, 1).transpose(0, 1)
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs), -1)  # (B, nh, T, N)
            gate = aligner.gate[i - aligner.start_layer].double()
            bare = block.attn(xn, cos, sin, None, None, None).double()
            added = (gate[:, None, None] * (p @ v)).transpose(1, 2).reshape(B, T, nh * hs)
            added = added @ block.attn.wo.weight.double().T
            steered = block.attn(xn, cos, sin, None, None, (aligner.prefix, None, gate[None].float(), None)).double()
            torch.testing.assert_close(steered - bare, added, atol=1e-5, rtol=1e-4)
            n = w.sum()
            mean_p = (p * w[:, None, :, None]).sum((0, 2)) / n  # (nh, N)
            out.append({"effective_tokens": math.exp(float((-(p * p.log()).sum(-1) * w[:, None]).sum() / nh / n)),
                        "tokens_used": float(torch.exp(-(mean_p * mean_p.log()).sum(-1)).mean()),
                        "shift": float((((added + bare) - bare).norm(dim=-1) / bare.norm(dim=-1) * w).sum() / n),
                        "gate_mean_abs": float(gate.abs().mean()), "attention": mean_p})
        x = block(x, cos, sin, None, None, None if i < aligner.start_layer else
                  (aligner.prefix, None, aligner.gate[i - aligner.start_layer][None], None))
    return out


@torch.no_grad()
def test_inspect_equals_an_independent_computation_of_the_prefix_attention(base, sft_file):
    from lit_aligner.data import DataOptions, load_data, pad_rows
    from lit_aligner.evaluation.inspect import inspect_aligner

    model, tok = base
    torch.manual_seed(1)
    aligner = Aligner(model.config, AlignerConfig(4, 1))
    aligner.gate.normal_(0, 0.5)
    train, _, _ = load_data("sft", sft_file, tok, "plain", DataOptions(max_seq_length=256, val_fraction=0.0), 42)
    batch = pad_rows(train.rows()[:6], tok.pad_id)
    result = inspect_aligner(model, aligner, [pad_rows(train.rows()[:4], tok.pad_id),
                                              pad_rows(train.rows()[4:6], tok.pad_id)])  # two batches, one average
    expected = independent_inspection(model, aligner, batch["input_ids"], batch["labels"])
    assert result["positions"] == int((batch["labels"][:, 1:] != -100).sum())
    assert [r["layer"] for r in result["layers"]] == list(range(1, model.config.n_layer))
    for got, want in zip(result["layers"], expected):
        for key in ("effective_tokens", "tokens_used", "shift", "gate_mean_abs"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    share = torch.stack([e["attention"] for e in expected]).mean((0, 1))
    assert [t["attention_share"] for t in result["tokens"]] == pytest.approx(share.tolist(), rel=1e-5)
    assert 1 < result["mean"]["effective_tokens"] < 4 and result["mean"]["shift"] > 0.01  # a real, partial effect


def test_inspect_cli_zero_gates_move_nothing_and_refuses_the_bare_base(tiny_checkpoint_dir, aligners, sft_file,
                                                                       tmp_path):
    args = ("inspect", "--checkpoint-dir", tiny_checkpoint_dir, "--data", sft_file, "--n", "8")
    result = last_json(cli(*args, "--aligners", aligners / "zero.safetensors", aligners / "steer.safetensors"))
    by = {Path(r["name"]).stem: r for r in result["results"]}
    assert all(layer["shift"] == 0 and layer["gate_max_abs"] == 0 for layer in by["zero"]["layers"])
    assert len(by["zero"]["layers"]) == 3 and len(by["steer"]["layers"]) == 4  # start layers 1 and 0
    assert all(layer["shift"] > 0 for layer in by["steer"]["layers"])
    assert by["steer"]["rows"] == 8 and sum(t["attention_share"] for t in by["steer"]["tokens"]) == pytest.approx(1)
    # a correction Aligner on Q-A-C rows: the positions that predict C
    qac = tmp_path / "qac.json"
    qac.write_text(json.dumps([{"question": f"Question {i}?", "answer": f"A careless answer {i}.",
                                "correction": f"A careful answer {i}."} for i in range(5)]))
    fixed = last_json(cli("inspect", "--checkpoint-dir", tiny_checkpoint_dir, "--data", qac, "--mode", "correction",
                          "--aligners", aligners / "fixer.safetensors"))["results"][0]
    scored = last_json(cli("loss", "--checkpoint-dir", tiny_checkpoint_dir, "--data", qac, "--mode", "correction",
                           "--no-base", "--aligners", aligners / "fixer.safetensors"))["results"][0]
    assert fixed["template"] == "correction" and fixed["rows"] == 5 and fixed["positions"] == scored["tokens"]
    for bad in (["--aligners", "none"], []):
        p = cli(*args, *bad)
        assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("error: inspect looks into")


# --- preference -------------------------------------------------------------------------------------------------------


def test_preference_metrics_use_trl_names_and_equal_the_dpo_eval_only(tiny_checkpoint_dir, aligners, tmp_path):
    from lit_aligner.data import default as default_data

    rows = default_data.generate_preference_rows(30, seed=2)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = cli("preference", "--checkpoint-dir", tiny_checkpoint_dir, "--data", data, "--template", "plain",
            "--max-seq-length", "256", "--aligners", "none", aligners / "steer.safetensors")
    res = last_json(p)["results"]
    bare, steer = res
    assert bare["rewards/accuracies"] == 0.5 and bare["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert bare["rewards/margins"] == 0.0 and steer["rewards/accuracies"] != 0.5
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert k in steer
    assert steer["rewards/margins"] == pytest.approx(steer["rewards/chosen"] - steer["rewards/rejected"], abs=1e-5)
    # the old path, finetune/aligner_dpo.py --eval-only, on the whole file as its validation split
    old = helpers.run_script(REPO / "finetune" / "aligner_dpo.py", "--eval-only", "--checkpoint-dir",
                             tiny_checkpoint_dir, "--data", data, "--template", "plain", "--max-seq-length", "256",
                             "--val-size", "29", "--eval-iters", "all", "--accelerator", "cpu",
                             "--init-aligner", aligners / "steer.safetensors", "--reference-aligner", "none")
    assert old.returncode == 0, old.stderr
    old_m = json.loads(old.stdout.strip().splitlines()[-1])
    p2 = cli("preference", "--checkpoint-dir", tiny_checkpoint_dir, "--data", data, "--template", "plain",
             "--max-seq-length", "256", "--split", "val", "--val-size", "29", "--aligners",
             aligners / "steer.safetensors")
    new = last_json(p2)["results"][0]
    assert new["pairs"] == old_m["pairs"] == 29
    assert new["loss"] == pytest.approx(old_m["loss"], rel=1e-5)
    assert new["rewards/accuracies"] == pytest.approx(old_m["reward_accuracy"])


# --- kto --------------------------------------------------------------------------------------------------------------


def test_kto_metrics_of_many_aligners_equal_the_kto_eval_only(tiny_checkpoint_dir, aligners, tmp_path):
    from lit_aligner.data import default as default_data

    data = tmp_path / "pairs.jsonl"  # pairs: each one a desirable and an undesirable completion
    data.write_text("\n".join(json.dumps(r) for r in default_data.generate_preference_rows(20, seed=3)) + "\n")
    common = ("--checkpoint-dir", tiny_checkpoint_dir, "--data", data, "--template", "plain", "--max-seq-length",
              "256", "--beta", "0.3", "--undesirable-weight", "1.2")
    bare, steer = last_json(cli("kto", *common, "--aligners", "none", aligners / "steer.safetensors"))["results"]
    assert bare["completions"] == steer["completions"] == 40
    # the bare base is its own reference: no reward, z = 0, every loss w (1 - sigmoid(0)), accuracy at chance
    assert bare["reward"] == 0.0 and bare["kl"] == 0.0 and bare["reward_accuracy"] == 0.5
    assert bare["loss"] == pytest.approx((20 * 0.5 + 20 * 1.2 * 0.5) / 40, rel=1e-6)
    assert steer["reward"] != 0.0 and steer["loss"] != pytest.approx(bare["loss"], rel=1e-3)
    # the trainer's --eval-only on the same held-out rows (a preference file's pair stays on one side of the split)
    old = helpers.run_script(REPO / "finetune" / "aligner_kto.py", "--eval-only", *common[:-4], "--beta", "0.3",
                             "--undesirable-weight", "1.2", "--val-size", "6", "--eval-iters", "all",
                             "--micro-batch-size", "4", "--accelerator", "cpu", "--init-aligner",
                             aligners / "steer.safetensors", "--reference-aligner", "none")
    assert old.returncode == 0, old.stderr
    old_m = json.loads(old.stdout.strip().splitlines()[-1])
    new = last_json(cli("kto", *common, "--split", "val", "--val-size", "6", "--batch-size", "4", "--aligners",
                        aligners / "steer.safetensors"))["results"][0]
    assert new["completions"] == old_m["completions"] == 12
    for k in ("loss", "kl", "reward_accuracy", "reward", "logp"):
        assert new[k] == pytest.approx(old_m[k], rel=1e-5, abs=1e-6), k
    one = cli("kto", *common, "--batch-size", "1", "--aligners", "none")
    assert one.returncode == 1 and "--batch-size must be at least 2" in one.stderr


# --- correction -------------------------------------------------------------------------------------------------------


def test_correction_reports_copy_rate_and_margins_and_refuses_a_plain_aligner(tiny_checkpoint_dir, aligners):
    p = cli("correction", "--checkpoint-dir", tiny_checkpoint_dir, "--aligners", aligners / "fixer.safetensors",
            "--split", "all", "--n", "4", "--max-new-tokens", "8", "--max-seq-length", "256")
    r = last_json(p)["results"][0]
    assert r["n"] == 4 and 0 <= r["corrector"]["copy_rate"] <= 1 and "c_over_a_token" in r["base"]
    bad = cli("correction", "--checkpoint-dir", tiny_checkpoint_dir, "--aligners", aligners / "steer.safetensors")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error:") and "not a correction Aligner" in bad.stderr


# --- harness ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return helpers.harness_tasks(tmp_path_factory.mktemp("tasks"))


def test_aligner_lm_mixed_batches_equal_one_aligner_at_a_time(base, aligners):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from lit_aligner.aligner_files import load_aligner
    from lit_aligner.evaluation.harness import AlignerLM

    model, tok = base
    steer, _ = load_aligner(aligners / "steer.safetensors", model)
    zero, _ = load_aligner(aligners / "zero.safetensors", model)
    reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in
            enumerate([("The sky is", " blue"), ("2 + 2 =", " 4"), ("", "hello"), ("Once upon a time ", "there")])]
    rolling = [Instance("loglikelihood_rolling", {}, ("A long text. " * 40,), 0)]
    mixed = AlignerLM(model, tok, {"base": None, "steer": steer, "zero": zero}, batch_size=2, max_length=64)
    for name, a in (("base", None), ("steer", steer), ("zero", zero)):
        alone = AlignerLM(model, tok, {name: a}, batch_size=1, max_length=64)
        for x, y in zip(mixed.view(name).loglikelihood(reqs), alone.loglikelihood(reqs)):
            assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1] == y[1]
        assert mixed.view(name).loglikelihood_rolling(rolling)[0] == pytest.approx(
            alone.loglikelihood_rolling(rolling)[0], abs=1e-3)
    # the independent computation: log-softmax of the full forward on context + continuation
    ctx = tok.encode("The sky is").tolist()
    cont = tok.encode("The sky is blue").tolist()[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids[:, :-1], aligner=steer).float(), -1)[0, len(ctx) - 1:]
    expect = float(lp.gather(-1, torch.tensor(cont)[:, None]).sum())
    assert mixed.view("steer").loglikelihood(reqs[:1])[0][0] == pytest.approx(expect, abs=1e-4)
    assert mixed.view("base").loglikelihood(reqs[:1])[0][0] != pytest.approx(expect, abs=1e-3)
    # a rolling window over 64 tokens covers the whole text: sum over every token after the first
    text_ids = tok.encode("A long text. " * 40, bos=False).tolist()
    assert len(text_ids) > 64


def mc_accuracy(model, tok, aligner, mc, render=lambda text: text, delimiter=" "):
    """tiny_mc's accuracy, independently: argmax over the choices' summed log-likelihoods after the rendered context.
    The harness puts `delimiter` before a choice (none after a chat template's assistant header); whitespace ending the
    context is scored as part of the continuation (as lm_eval's Hugging Face model does)."""
    right = 0
    for doc in mc:
        ctx = render(f"Question: {doc['question']}\nAnswer:")
        scores = []
        for choice in doc["choices"]:
            c = tok.encode(ctx.rstrip()).tolist()
            w = tok.encode(ctx + delimiter + choice).tolist()
            ids = torch.tensor([w])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids[:, :-1], aligner=aligner).float(), -1)[0, len(c) - 1:]
            scores.append(float(lp.gather(-1, torch.tensor(w[len(c):])[:, None]).sum()))
        right += max(range(3), key=scores.__getitem__) == doc["label"]
    return right / len(mc)


def gen_outputs(model, tok, aligner, gen, render=lambda text: text, **kw):
    """tiny_gen's answers, independently: greedy generation cut at the first newline."""
    from lit_aligner.generation import generate

    outs = []
    for doc in gen:
        out = generate(model, [tok.encode(render(doc["question"]))], 6, stop_ids=tok.stop_ids,
                       aligners=[aligner if aligner is not False else None], **kw)[0]
        outs.append(tok.decode(out, skip_special=True).split("\n")[0].strip())
    return outs


def exact_match(outs, gen):
    return sum(o == doc["answer"] for o, doc in zip(outs, gen)) / len(gen)


def test_harness_runs_local_multiple_choice_and_generation_tasks(tiny_checkpoint_dir, base, aligners, tasks):
    pytest.importorskip("lm_eval")
    from lit_aligner.aligner_files import load_aligner

    d, mc, gen = tasks
    p = cli("harness", "--checkpoint-dir", tiny_checkpoint_dir, "--tasks", "tiny_mc", "tiny_gen", "--include-path",
            d, "--aligners", aligners / "steer.safetensors", "--batch-size", "4")
    res = last_json(p)
    assert res["samples"]["tiny_mc"]["effective"] == 6 and res["samples"]["tiny_gen"]["effective"] == 4
    model, tok = base
    steer, _ = load_aligner(aligners / "steer.safetensors", model)
    for name, a in (("base", False), (str(aligners / "steer.safetensors"), steer)):
        assert res["results"][name]["tiny_mc"]["acc,none"] == pytest.approx(mc_accuracy(model, tok, a, mc)), name
        assert res["results"][name]["tiny_gen"]["exact_match,none"] == pytest.approx(
            exact_match(gen_outputs(model, tok, a, gen), gen)), name
    unknown = cli("harness", "--checkpoint-dir", tiny_checkpoint_dir, "--tasks", "no_such_task_xyz")
    assert unknown.returncode == 1 and unknown.stderr.strip().startswith("error: --tasks no_such_task_xyz:")
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_harness_chat_template_and_gen_kwargs(tiny_checkpoint_dir, base, aligners, tasks, tmp_path):
    """--apply-chat-template renders every request with the tokenizer's chat template (a system instruction as its
    system turn; --chat-template-kwargs, here a variable the template prints, reach it) and --gen-kwargs reach the
    decoder: the scores, and the logged answers, equal a direct computation on the rendered prompts (and differ from
    the answers without the penalty)."""
    pytest.importorskip("lm_eval")
    from lit_aligner.generation import Penalties

    d, mc, gen = tasks
    noted = helpers.templated_checkpoint(Path(tiny_checkpoint_dir), tmp_path / "noted",
                                         "{% if note is defined %}[{{ note }}] {% endif %}" + helpers.CHATML)
    p = cli("harness", "--checkpoint-dir", noted, "--tasks", "tiny_mc", "tiny_gen", "--include-path",
            d, "--apply-chat-template", "--system-instruction", "Be brief.", "--gen-kwargs", "repetition_penalty=1.5",
            "--chat-template-kwargs", '{"note": "graded"}', "--aligners", aligners / "steer.safetensors", "--no-base",
            "--log-samples")
    res = last_json(p)
    assert res["apply_chat_template"] and res["gen_kwargs"] == "repetition_penalty=1.5"
    assert "trained with the 'plain' template" in p.stderr  # the Aligner's own template is not the chat one
    model, tok = base
    steer = load_aligner_file(aligners / "steer.safetensors", model)
    assert tok.has_chat_template

    def render(text):  # (the tiny checkpoint's template is ChatML: the noted one writes the note before it)
        return "[graded] " + tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": text}])

    name = str(aligners / "steer.safetensors")
    got, logged = res["results"][name], res["logged_samples"][name]
    assert got["tiny_mc"]["acc,none"] == pytest.approx(mc_accuracy(model, tok, steer, mc, render, delimiter=""))
    answers = gen_outputs(model, tok, steer, gen, render, penalties=Penalties(repetition=1.5))
    assert got["tiny_gen"]["exact_match,none"] == pytest.approx(exact_match(answers, gen))
    rows = sorted(logged["tiny_gen"], key=lambda r: r["doc_id"])
    assert [r["arguments"][0][0] for r in rows] == [render(doc["question"]) for doc in gen]
    assert [r["filtered_resps"][0].strip() for r in rows] == answers != gen_outputs(model, tok, steer, gen, render)
    assert len(logged["tiny_mc"]) == len(mc) and all("acc" in r for r in logged["tiny_mc"])
    bad = cli("harness", "--checkpoint-dir", tiny_checkpoint_dir, "--tasks", "tiny_gen", "--include-path", d,
              "--gen-kwargs", "top_p=2,do_sample=True,temperature=1")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --gen-kwargs top_p=2") and "top_p must" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    lone = cli("harness", "--checkpoint-dir", tiny_checkpoint_dir, "--tasks", "tiny_gen", "--include-path", d,
               "--fewshot-as-multiturn")
    assert lone.returncode == 1 and "--apply-chat-template" in lone.stderr
    bad = cli("harness", "--checkpoint-dir", tiny_checkpoint_dir, "--tasks", "tiny_gen", "--chat-template-kwargs",
              "{nope")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --chat-template-kwargs is not valid JSON")


def load_aligner_file(path, model):
    from lit_aligner.aligner_files import load_aligner

    return load_aligner(path, model)[0]


def test_harness_generate_until_reads_gen_kwargs_as_transformers_does(base, aligners):
    """Greedy unless do_sample; top_k=1 sampling is greedy (so top_k is honoured); penalties apply to greedy decoding
    too; keys it cannot honour (num_beams) are ignored with one warning; a continued assistant message is not closed."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from lit_aligner.evaluation.harness import AlignerLM
    from lit_aligner.generation import Penalties, generate
    from lit_aligner.reasoning import split_reasoning

    model, tok = base
    steer = load_aligner_file(aligners / "steer.safetensors", model)
    lm = AlignerLM(model, tok, {"steer": steer}, batch_size=2, max_length=128)
    contexts = ["Say yes:", "The colour of the sky is", "One, two, three,"]

    def ask(**kw):
        return lm.generate_until([Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 8, **kw}), i)
                                  for i, c in enumerate(contexts)])

    def direct(**kw):
        outs = generate(model, [tok.encode(c) for c in contexts], 8, stop_ids=tok.stop_ids, aligners=steer, **kw)
        return [tok.decode(o, skip_special=True).split("\n\n")[0] for o in outs]

    greedy = direct()
    assert ask() == greedy
    assert ask(do_sample=True, temperature=1.0, top_k=1) == greedy
    assert ask(temperature=1.0) == greedy  # no do_sample: greedy, as transformers' generate
    with pytest.warns(UserWarning, match="num_beams"):
        penalised = ask(repetition_penalty=3.0, frequency_penalty=1.0, num_beams=4)
    assert penalised == direct(penalties=Penalties(frequency=1.0, repetition=3.0)) != greedy
    sampled = ask(do_sample=True, temperature=1.5)
    assert sampled != greedy
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]
    assert lm.apply_chat_template(chat, add_generation_prompt=False).endswith("The answer is")
    # --reasoning-parser: a plain answer is the same; one the prompt opened a think block for is read past the block
    # (its stop strings cut the answer after it, not the reasoning)
    thinking = AlignerLM(model, tok, {"steer": steer}, batch_size=2, max_length=128, reasoning=True)
    contexts[1] += " <think>"
    raw = [tok.decode(o, skip_special=True) for o in
           generate(model, [tok.encode(c) for c in contexts], 8, stop_ids=tok.stop_ids, aligners=steer)]
    got = thinking.generate_until([Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 8}), i)
                                   for i, c in enumerate(contexts)])
    assert got[0] == greedy[0] and got[2] == greedy[2]
    assert got[1] == (split_reasoning(raw[1], inside=True)[1] or "").split("\n\n")[0] != raw[1].split("\n\n")[0]
    assert lm.apply_chat_template(chat[:1]).endswith(tok.apply_chat_template(chat[:1]))


# --- judge ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, says", [(dict(limit=0.0), "--limit is a number of documents"),
                                         (dict(limit=2.5), "--limit is a number of documents"),
                                         (dict(num_fewshot=-1), "--num-fewshot must be >= 0"),
                                         (dict(max_length=0), "--max-length must be >= 2"),
                                         (dict(max_gen_toks=0), "--max-gen-toks must be >= 1")])
def test_harness_flags_are_checked_before_anything_loads(tmp_path, flags, says):
    pytest.importorskip("lm_eval")
    from lit_aligner.evaluation.commands import Harness

    with pytest.raises(ValueError, match=says):  # the base does not exist: nothing was loaded
        Harness(tasks=["arc_easy"], checkpoint_dir=tmp_path / "no-base", **flags).run()


def test_harness_without_a_tasks_data_is_one_line(tiny_checkpoint_dir):
    """A registered task whose dataset is neither cached nor reachable (offline here): one error line with the fix,
    not the datasets library's ConnectionError with the Hub client's retry warnings above it."""
    r = helpers.run_script(REPO / "evaluate" / "aligner.py", "harness", "--checkpoint-dir", tiny_checkpoint_dir,
                           "--tasks", "arc_easy", "--limit", "1", fresh=True,  # the Hub reads these at import
                           env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and r.stderr.startswith("error: --tasks arc_easy: Couldn't reach") and \
        "run it once where the Hub can be reached" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_outcomes_bootstrap_and_win_rate():
    from lit_aligner.evaluation.judge import bootstrap_interval, outcome, win_rate

    assert outcome("A", "B") == 1.0 and outcome("B", "A") == 0.0
    assert outcome("A", "A") == outcome("B", "B") == outcome("C", "A") == outcome("C", "C") == 0.5
    assert bootstrap_interval([1.0] * 10) == (1.0, 1.0)
    r = win_rate([1.0] * 6 + [0.5] * 2 + [0.0] * 2, iters=500)
    assert (r["wins"], r["ties"], r["losses"]) == (6, 2, 2) and r["score"] == pytest.approx(0.7)
    assert r["ci95"][0] < 0.7 < r["ci95"][1]


def test_an_answers_file_is_matched_by_id_or_text_and_by_order_only_without_ids(tmp_path):
    from lit_aligner.evaluation.judge import Question, read_answers

    qs = [Question("1", "What is 2+2?", "math"), Question("2", "Name a colour.", "writing")]
    f = tmp_path / "answers.jsonl"
    f.write_text('{"question_id": 2, "answer": "blue"}\n{"question": "What is 2+2?", "answer": "4"}\n')
    assert read_answers(f, qs) == [["4"], ["blue"]]
    f.write_text('{"answer": "4"}\n{"answer": "blue"}\n')  # no ids, no questions: one answer per question, in order
    assert read_answers(f, qs) == [["4"], ["blue"]]
    # as many rows as questions, but keyed by ids of which one is not a question's: never another question's answer
    f.write_text('{"question_id": 1, "answer": "4"}\n{"question_id": 3, "answer": "blue"}\n')
    with pytest.raises(ValueError, match="answers.jsonl: no answer for question '2'"):
        read_answers(f, qs)


def test_judge_both_orders_categories_and_answers_files(tiny_checkpoint_dir, aligners, tmp_path):
    prompts = tmp_path / "questions.jsonl"
    qs = [{"question_id": i, "category": "math" if i % 2 else "writing", "turns": [f"Question number {i}?"]}
          for i in range(6)]
    prompts.write_text("\n".join(map(json.dumps, qs)) + "\n")
    same = tmp_path / "same.jsonl"
    same.write_text("\n".join(json.dumps({"question_id": q["question_id"], "answer": f"Answer {q['question_id']}"})
                              for q in qs) + "\n")
    # identical answers: both orders show the judge the same prompt, so no system can win: every prompt is a tie
    r = last_json(cli("judge", "--checkpoint-dir", tiny_checkpoint_dir, "--prompts", prompts, "--a", same, "--b", same,
                      "--bootstrap", "200"))
    assert r["score"] == 0.5 and r["ties"] == 6 and r["ci95"] == [0.5, 0.5]
    assert all(row["verdict_a_first"] == row["verdict_b_first"] for row in r["rows"])
    assert set(r["categories"]) == {"math", "writing"} and r["categories"]["math"]["n"] == 3
    # an Aligner against the base, answers generated, both orders judged
    out = tmp_path / "judge.json"
    r = last_json(cli("judge", "--checkpoint-dir", tiny_checkpoint_dir, "--prompts", prompts, "--a",
                      aligners / "steer.safetensors", "--b", "base", "--max-new-tokens", "6", "--out", out))
    assert r["n"] == 6 and r["wins"] + r["ties"] + r["losses"] == 6 and r["ci95"][0] <= r["score"] <= r["ci95"][1]
    for row in r["rows"]:
        assert abs(sum(row["probs_a_first"]) - 1) < 1e-5
        assert row["outcome"] == {("A", "B"): 1.0, ("B", "A"): 0.0}.get(
            (row["verdict_a_first"], row["verdict_b_first"]), 0.5)
    assert json.loads(out.read_text())["score"] == r["score"]
    missing = tmp_path / "partial.jsonl"
    missing.write_text(json.dumps({"question_id": 0, "answer": "x"}) + "\n")
    bad = cli("judge", "--checkpoint-dir", tiny_checkpoint_dir, "--prompts", prompts, "--a", missing)
    assert bad.returncode == 1 and "no answer for question" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_judge_multi_turn_answers_follow_ups_in_each_systems_own_conversation(base, tiny_checkpoint_dir, aligners,
                                                                              tmp_path):
    """--multi-turn (MT-Bench's second turns): a generated follow-up answer is what the system gives with its own first
    answer in the conversation; the later turn is judged on both whole conversations (the multi-turn prompt); scores
    per turn; an answers file without the follow-ups is one error line."""
    from lit_aligner.aligner_files import load_aligner
    from lit_aligner.evaluation.judge import JUDGE_SYSTEM_MULTI, Judge
    from lit_aligner.generation import generate
    from lit_aligner.prompts import encode_prompt, prompt_for_aligner

    model, tok = base
    qs = [{"question_id": i, "category": "math", "turns": [f"Question number {i}?", f"Now double it, {i}."]}
          for i in range(3)] + [{"question_id": 3, "turns": ["Only one turn?"]}]
    prompts = tmp_path / "mt.jsonl"
    prompts.write_text("\n".join(map(json.dumps, qs)) + "\n")
    r = last_json(cli("judge", "--checkpoint-dir", tiny_checkpoint_dir, "--prompts", prompts, "--a",
                      aligners / "steer.safetensors", "--b", "base", "--max-new-tokens", "6", "--multi-turn",
                      "--bootstrap", "100"))
    assert r["n"] == 7 and (r["turns"]["1"]["n"], r["turns"]["2"]["n"]) == (4, 3)
    steer, meta = load_aligner(aligners / "steer.safetensors", model)
    rows = {(row["question_id"], row["turn"]): row for row in r["rows"]}
    for q in qs[:3]:
        first = rows[(str(q["question_id"]), 1)]["answer_a"]
        history = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": first}]
        ids = encode_prompt(tok, prompt_for_aligner(tok, q["turns"][1], metadata=meta, history=history))
        want = tok.decode(generate(model, [ids], 6, aligners=steer, stop_ids=tok.stop_ids)[0]).strip()
        assert rows[(str(q["question_id"]), 2)]["answer_a"] == want
    judge = Judge(model, tok)
    text = judge.prompt(["q1", "q2"], ["a1", "a2"], ["b1", "b2"])
    assert JUDGE_SYSTEM_MULTI in text and "### User:\nq2\n\n### Assistant A:\na2" in text and \
        text.index("Assistant A's Conversation") < text.index("### Assistant B:\nb1")
    one = tmp_path / "one_turn.jsonl"
    one.write_text("\n".join(json.dumps({"question_id": q["question_id"], "answer": "x"}) for q in qs) + "\n")
    bad = cli("judge", "--checkpoint-dir", tiny_checkpoint_dir, "--prompts", prompts, "--a", one, "--multi-turn")
    assert bad.returncode == 1 and "choices[0].turns" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    both = tmp_path / "both.jsonl"
    both.write_text("\n".join(json.dumps({"question_id": q["question_id"], "choices": [{"turns": ["x", "y"][:len(
        q["turns"])]}]}) for q in qs) + "\n")
    r = last_json(cli("judge", "--checkpoint-dir", tiny_checkpoint_dir, "--prompts", prompts, "--a", both, "--b",
                      both, "--multi-turn", "--bootstrap", "100"))
    assert r["n"] == 7 and r["ties"] == 7  # the same conversations: no side can win either turn


def test_out_refuses_an_input_and_an_existing_file(tiny_checkpoint_dir, aligners, tmp_path):
    p = cli("loss", "--checkpoint-dir", tiny_checkpoint_dir, "--aligners", aligners / "zero.safetensors", "--out",
            aligners / "zero.safetensors")
    assert p.returncode == 1 and "one of this command's inputs" in p.stderr
    (tmp_path / "x.json").write_text("{}")
    p = cli("loss", "--checkpoint-dir", tiny_checkpoint_dir, "--out", tmp_path / "x.json")
    assert p.returncode == 1 and "--force" in p.stderr


def test_registering_our_lm_keeps_lm_evals_own_models():
    """lm_eval fills its registry with its own models only while it is empty: registering `lit-aligner` must not
    hide them (`local-completions` evaluates a served Aligner)."""
    pytest.importorskip("lm_eval")
    import lit_aligner.evaluation.harness  # noqa: F401
    from lm_eval.api.registry import get_model

    assert get_model("lit-aligner").__name__ == "AlignerLM"
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"


def test_judge_reads_a_thinking_systems_answer_past_its_think_block(tiny_checkpoint_dir, tmp_path):
    """judge --reasoning-parser think: under a template whose generation prompt opens a think block, the answer the
    judge sees is the generated text read past the block (`split_reasoning`), not the reasoning."""
    from lit_aligner.base import load_base
    from lit_aligner.evaluation.commands import Judge
    from lit_aligner.evaluation.judge import read_questions
    from lit_aligner.generation import generate
    from lit_aligner.prompts import encode_prompt
    from lit_aligner.reasoning import split_reasoning

    opens = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    ckpt = helpers.templated_checkpoint(tiny_checkpoint_dir, tmp_path / "thinking", opens)
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "turns": [f"Question {i}?"]}) + "\n" for i in range(2)))
    model, tok = load_base(ckpt, "cpu", "float32")
    questions = read_questions(prompts)
    cmd = Judge(checkpoint_dir=ckpt, prompts=prompts, a="base", b="base", max_new_tokens=6, reasoning_parser="think")
    got = cmd._answers("base", questions, model, tok)
    for q, (answer,) in zip(questions, got):
        raw = tok.decode(generate(model, [encode_prompt(tok, tok.apply_chat_template(
            [{"role": "user", "content": q.turns[0]}]))], 6, stop_ids=tok.stop_ids)[0])
        assert raw.strip() and answer == (split_reasoning(raw, inside=True)[1] or "").strip()


def test_harness_compiles_the_decoding_step_only_for_calls_long_enough_to_pay_for_it(base, aligners, monkeypatch):
    """generate_until counts its answers' decoding steps (batches x max_gen_toks) and asks `perf.should_compile`
    with them: on a GPU a task of a few rows decodes eagerly rather than compiling for ~40 s."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from lit_aligner.evaluation.harness import AlignerLM

    seen = helpers.record_compile_steps(monkeypatch)
    model, tok = base
    lm = AlignerLM(model, tok, {"steer": load_aligner_file(aligners / "steer.safetensors", model), "base": None},
                   batch_size=2, max_length=128)
    answers = lm.generate_until([Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 8}), i)
                                 for i, c in enumerate(["Say yes:", "The sky is", "One, two,"])])
    # 3 contexts, 2 a batch (x the Aligner and the base, which share batches): 2 batches of up to 8 steps
    assert seen == [2 * 8] and len(answers) == 3


def test_judge_answers_compile_the_decoding_step_only_when_they_pay_for_it(base, tiny_checkpoint_dir, aligners,
                                                                          tmp_path, monkeypatch):
    """The judge's generated answers ask `perf.should_compile` with their decoding steps (turns x batches x
    --max-new-tokens): a short prompt file decodes eagerly on a GPU rather than compiling for ~40 s."""
    from lit_aligner.evaluation.commands import Judge
    from lit_aligner.evaluation.judge import read_questions

    seen = helpers.record_compile_steps(monkeypatch)
    model, tok = base
    prompts = tmp_path / "mt.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "turns": [f"Question {i}?", "And then?"]}) + "\n"
                               for i in range(5)))
    steer = str(aligners / "steer.safetensors")
    cmd = Judge(checkpoint_dir=tiny_checkpoint_dir, prompts=prompts, a=steer, max_new_tokens=6, batch_size=2,
                multi_turn=True)
    answers = cmd._answers(steer, read_questions(prompts), model, tok)
    assert seen == [2 * 3 * 6] and [len(a) for a in answers] == [2] * 5  # 2 turns x 3 batches of 2 x 6 steps
