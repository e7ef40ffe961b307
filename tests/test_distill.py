"""Context distillation into an Aligner: the divergence against TRL's GKD loss, the chunked loss against the plain one,
the teacher's prompts against what generation renders with --system, a context learned on a tiny model, and the
finetune/aligner_distill.py CLI on a tiny checkpoint."""

import dataclasses
import json

import pytest
import torch

import helpers
from lit_aligner.aligner_files import load_aligner
from lit_aligner.config import Config
from lit_aligner.data import DataError, DataOptions, TokenizedDataset, load_data
from lit_aligner.evaluation import objective_metrics
from lit_aligner.losses import distillation_loss, generalized_jsd
from lit_aligner.model import AlignerConfig, LLaMA, init_weights, mark_only_aligner_as_trainable
from lit_aligner.data.tokenize import end_token
from lit_aligner.prompts import build_prompt, get_template
from lit_aligner.tokenizer import Tokenizer
from lit_aligner.training import DistillConfig, DistillRunConfig, DistillTrainConfig, TrainError
from lit_aligner.training.objectives.distill import Distill
from lit_aligner.training.objectives.dpo import as_reference
from lit_aligner.training.plot import read_metrics

# ---------------------------------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_trls_gkd_loss(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 40) * 3, torch.randn(2, 6, 40) * 3
    labels = torch.randint(0, 40, (2, 6))
    labels[0, :3] = -100
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature,
                                             reduction="sum")
    keep = labels != -100
    ours = generalized_jsd(student[keep], teacher[keep], beta, temperature)
    assert ours.shape == (int(keep.sum()),) and (ours >= -1e-6).all()
    torch.testing.assert_close(ours.sum(), theirs, rtol=1e-5, atol=1e-5)


def _rows(prompt_lens, response_lens, seed, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (p,), generator=g), torch.randint(0, vocab, (r,), generator=g))
            for p, r in zip(prompt_lens, response_lens)]


def test_chunked_distillation_loss_equals_the_plain_one_with_gradients():
    from lit_aligner.data import pad_rows

    torch.manual_seed(0)
    responses = [r for _, r in _rows([1, 1, 1], [5, 2, 7], seed=1)]
    student = pad_rows([(p, r) for (p, _), r in zip(_rows([3, 6, 2], [1, 1, 1], seed=2), responses)], 0)
    teacher = pad_rows([(p, r) for (p, _), r in zip(_rows([9, 4, 12], [1, 1, 1], seed=3), responses)], 0)
    hs = torch.randn(*student["input_ids"].shape, 8, requires_grad=True)
    ht = torch.randn(*teacher["input_ids"].shape, 8)
    weight = torch.randn(50, 8, requires_grad=True)
    # the plain reference: every position's logits, the labelled ones picked out on each side
    s_logits = (hs @ weight.T)[:, :-1][student["labels"][:, 1:] != -100]
    t_logits = (ht @ weight.T)[:, :-1][teacher["labels"][:, 1:] != -100]
    assert s_logits.shape[0] == sum(len(r) for r in responses)
    for beta in (0.0, 0.5):
        want = generalized_jsd(s_logits, t_logits, beta).sum()
        g_want = torch.autograd.grad(want, (hs, weight), retain_graph=True)
        for chunk in (0, 3):
            got, agree = distillation_loss(hs, ht, weight, student["labels"], teacher["labels"], beta, 1.0, chunk)
            torch.testing.assert_close(got, want)
            assert agree == (s_logits.argmax(-1) == t_logits.argmax(-1)).sum()
            for a, b in zip(torch.autograd.grad(got, (hs, weight)), g_want):
                torch.testing.assert_close(a, b)
    # rows whose responses differ are no distillation pair
    other = dict(teacher, labels=teacher["labels"].roll(1, 0))
    with pytest.raises(ValueError, match="labelled tokens differ"):
        distillation_loss(hs, ht, weight, student["labels"], other["labels"])


def test_the_same_prompt_and_zero_gates_diverge_by_nothing():
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny"), AlignerConfig(3, 1))
    init_weights(model, std=0.1)
    rows = _rows([4, 7, 5], [6, 3, 8], seed=4, vocab=300)
    same = TokenizedDataset.from_rows("distill", [(p, r, p) for p, r in rows])
    m = objective_metrics(model, Distill(0), same, None, 2)  # the policy: the model's own (zero-gate) Aligner
    assert m["loss"] == pytest.approx(0.0, abs=1e-6) and m["agreement"] == 1.0 and m["tokens"] == 17
    context = torch.randint(0, 300, (5,), generator=torch.Generator().manual_seed(5))
    shifted = TokenizedDataset.from_rows("distill", [(p, r, torch.cat([context, p])) for p, r in rows])
    assert objective_metrics(model, Distill(0), shifted, None, 2)["loss"] > 1e-3
    # a teacher with an Aligner of its own (--teacher-aligner): a student with that Aligner on the same prompts is it
    teacher = as_reference(model.aligner)
    with torch.no_grad():
        teacher.gate.normal_()
    assert objective_metrics(model, Distill(0, teacher=teacher), same, None, 2)["loss"] > 1e-3
    assert objective_metrics(model, Distill(0, teacher=teacher), same, teacher, 2)["loss"] == pytest.approx(0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The teacher's prompts


SYSTEM = "Answer like a pirate."


def test_teacher_prompts_are_what_generation_renders_with_the_system_message(smollm2_dir):
    tok = Tokenizer(smollm2_dir)
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Red."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    for template in ("chat", "alpaca", "plain"):
        train, _, info = load_data("distill", rows, tok, template, DataOptions(val_fraction=0.0),
                                   teacher_system=SYSTEM)
        sft, _, _ = load_data("sft", rows, tok, template, DataOptions(val_fraction=0.0))
        assert info["kind"] == "distill" and len(train) == 2
        ends = {int(it["response"][-1]) for it in train}  # what an on-policy sample that stops ends with
        assert ends == {end_token(get_template(template), tok)} == ({2} if template == "chat" else {tok.eos_id})
        for it, s, row in zip(train, sft, rows):
            assert torch.equal(it["prompt"], s["prompt"]) and torch.equal(it["response"], s["response"])
            teacher = build_prompt(tok, row["instruction"], template, row["input"], system=SYSTEM)
            assert tok.decode(it["teacher_prompt"]) == tok.decode(tok.encode(teacher))
            assert torch.equal(it["teacher_prompt"], tok.encode(teacher).long()), template
            assert SYSTEM in tok.decode(it["teacher_prompt"]) and SYSTEM not in tok.decode(it["prompt"])
    # a conversation's own system message stays, after the teacher's
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]}]
    train, _, _ = load_data("distill", chat, tok, "chat", DataOptions(val_fraction=0.0), teacher_system=SYSTEM)
    assert f"{SYSTEM}\n\nBe brief." in tok.decode(train[0]["teacher_prompt"])
    assert "Be brief." in tok.decode(train[0]["prompt"]) and SYSTEM not in tok.decode(train[0]["prompt"])


def test_a_row_too_long_for_the_teacher_is_fitted_on_the_teachers_length(tiny_checkpoint_dir):
    tok = Tokenizer(tiny_checkpoint_dir)
    rows = [{"instruction": "What is 2 plus 2?", "input": "", "output": "ANSWER: 4"}]
    _, _, info = load_data("sft", rows, tok, "chat", DataOptions(val_fraction=0.0))
    long_system = "word " * 200
    p = load_data("distill", rows, tok, "chat", DataOptions(val_fraction=0.0, max_seq_length=600),
                  teacher_system=long_system)[0]
    room = len(p[0]["teacher_prompt"]) + len(p[0]["response"])
    assert p.lengths().tolist() == [room]
    with pytest.raises(DataError, match="no training rows left"):
        load_data("distill", rows, tok, "chat", DataOptions(val_fraction=0.0, max_seq_length=room - 1),
                  teacher_system=long_system)


# ---------------------------------------------------------------------------------------------------------------------
# Learning a context


def test_an_aligner_learns_to_stand_in_for_the_context():
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny"), AlignerConfig(6, 0))
    init_weights(model, std=0.1)
    mark_only_aligner_as_trainable(model)
    context = torch.randint(0, 300, (6,), generator=torch.Generator().manual_seed(9))

    def split(n, seed):
        rows = _rows(torch.randint(3, 8, (n,), generator=torch.Generator().manual_seed(seed)).tolist(), [6] * n,
                     seed, vocab=300)
        return TokenizedDataset.from_rows("distill", [(p, r, torch.cat([context, p])) for p, r in rows])

    train, val = split(64, 1), split(24, 2)
    objective = Distill(0)
    before = objective_metrics(model, objective, val, None, 8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(train), (8,), generator=g).tolist()
        batch = objective.collate([train[i] for i in idx])
        sums = objective(model, batch)
        opt.zero_grad()
        (sums["loss"] / int((batch["labels"][:, 1:] != -100).sum())).backward()
        opt.step()
    after = objective_metrics(model, objective, val, None, 8)
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["agreement"] > before["agreement"]
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("aligner."))


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    from lit_aligner.data import default

    path = tmp_path_factory.mktemp("distill") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in default.generate_rows(80, seed=5)))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# On-policy steps (--lmbda): the student writes the responses


def test_a_rollout_replaces_each_response_with_the_students_own_sample():
    from lightning_fabric import Fabric

    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny"), AlignerConfig(3, 1))
    init_weights(model, std=0.1)
    with torch.no_grad():
        model.aligner.gate.normal_()  # a trained student, not the base: its samples must come from it
    rows = _rows([4, 7, 5, 60], [6, 3, 8, 4], seed=4, vocab=300)
    context = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(5))
    data = TokenizedDataset.from_rows("distill", [(p, r, torch.cat([context, p])) for p, r in rows])
    items = {i: data[i] for i in range(len(data))}
    # the stop token: one of row 0's greedy tokens that row 1 never writes, so row 0 stops early (and ends with the
    # data's end token) while row 1 runs into its room under the max length
    first, second = helpers.greedy(model, rows[0][0], 6, set())[0], helpers.greedy(model, rows[1][0], 4, set())[0]
    at = next(j for j in range(1, 6) if first[j] not in second and first[j] not in first[:j])
    stop = {first[at]}
    config = DistillTrainConfig(lmbda=1.0, max_new_tokens=6, sample_temperature=0.0)
    objective = Distill(0, config=config, max_seq_length=20, stop_ids=stop, seed=3, end_id=299)  # the template's
    out = objective.rollout(Fabric(accelerator="cpu", devices=1), model, items, step=0)
    assert model.layers[0].attn.kv_cache is None  # the sampling cache is freed for the training passes
    for i, (prompt, response) in enumerate(rows[:3]):
        room = 20 - len(prompt) - len(context)  # fitted beside the teacher's longer prompt: 7, 4, 6
        tokens, stopped = helpers.greedy(model, prompt, min(6, room), stop)
        expected = torch.tensor(tokens + ([299] if stopped else []), dtype=torch.long)[:room]
        assert torch.equal(out[i]["response"], expected), i
        assert torch.equal(out[i]["prompt"], items[i]["prompt"])
        assert torch.equal(out[i]["teacher_prompt"], items[i]["teacher_prompt"])
    assert len(out[0]["response"]) == at + 1 and int(out[0]["response"][-1]) == 299  # stopped
    assert len(out[1]["response"]) == 4  # row 1's room under the max length, not max_new_tokens
    assert out[3] is items[3]  # no room at all (a 60-token prompt): the data's response stays
    batch = objective.collate([out[i] for i in range(4)])
    assert objective.units(out[1]) == 4 and int((batch["labels"] != -100).sum()) == sum(
        objective.units(out[i]) for i in range(4))
    # off-policy objectives leave the data alone
    assert Distill(0, config=DistillTrainConfig(), max_seq_length=20).rollout(None, model, items, 0) is None
    assert Distill(0).rollout(None, model, items, 0) is None


def test_prompt_only_held_out_rows_get_the_teachers_greedy_answers():
    from types import SimpleNamespace

    from lightning_fabric import Fabric

    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny"), AlignerConfig(3, 1))
    init_weights(model, std=0.1)
    with torch.no_grad():
        model.aligner.gate.normal_()  # the student has moved: the teacher (the bare base + context) must not see it
    end = 7
    prompts = _rows([4, 9, 5, 6, 3], [1] * 5, seed=8, vocab=300)
    context = torch.randint(0, 300, (5,), generator=torch.Generator().manual_seed(9))
    rows = [(p, torch.tensor([end]), torch.cat([context, p])) for p, _ in prompts]  # as a prompt-only file loads
    run = SimpleNamespace(info={"format": "prompt_only"}, val=TokenizedDataset.from_rows("distill", rows),
                          train=TokenizedDataset.from_rows("distill", rows[:1]),
                          cfg=SimpleNamespace(train=SimpleNamespace(micro_batch_size=2)),
                          fabric=Fabric(accelerator="cpu", devices=1), model=model)
    # the stop token: one that row 0's teacher writes, so that row stops with the end token and others run on
    first = helpers.greedy(model, rows[0][2], 8, set(), aligner=False)[0]
    stop = {first[3]} - set(first[:3]) or {first[0]}
    objective = Distill(0, config=DistillTrainConfig(lmbda=1.0, max_new_tokens=8), max_seq_length=17,
                        stop_ids=stop, seed=3)
    objective.prepare(run)
    assert len(run.val) == 5 and run.info["val_responses"] == "the teacher's greedy answers"
    ends = []
    for i, (prompt, _, teacher_prompt) in enumerate(rows):
        room = 17 - len(teacher_prompt)
        tokens, stopped = helpers.greedy(model, teacher_prompt, min(8, room), stop, aligner=False)
        ends.append("stopped" if stopped else "room" if room < 8 else "max_new_tokens")
        expected = torch.tensor(tokens + ([end] if stopped else []), dtype=torch.long)[:room]
        assert torch.equal(run.val[i]["response"], expected), i
        assert torch.equal(run.val[i]["prompt"], prompt) and torch.equal(run.val[i]["teacher_prompt"], teacher_prompt)
    assert {"stopped", "room"} <= set(ends), ends  # some answers end with the end token, some at the length limit
    # data with responses is left alone
    answered = run.val
    run.info = {"format": "alpaca"}
    objective.prepare(run)
    assert run.val is answered


def test_on_policy_steps_are_a_seeded_share_of_the_steps():
    def steps(lmbda, seed, n=400):
        objective = Distill(0, config=DistillTrainConfig(lmbda=lmbda), seed=seed)
        return [s for s in range(n) if objective.on_policy(s)]

    assert steps(0.0, 1) == [] and steps(1.0, 1) == list(range(400))
    share = steps(0.3, 1)
    assert 0.22 < len(share) / 400 < 0.38
    assert steps(0.3, 1) == share != steps(0.3, 2)  # every rank and a resumed run decide alike; another seed not


def test_an_on_policy_run_resumes_to_the_same_curve(tiny_checkpoint_dir, rows_file, tmp_path, monkeypatch):
    from lit_aligner.training import train

    def config(out):
        return DistillRunConfig(
            checkpoint_dir=tiny_checkpoint_dir, out_dir=out, data=rows_file, n_tokens=4, start_layer=1,
            data_options=DataOptions(max_seq_length=96), accelerator="cpu", progress=False, compare=False,
            distill=DistillTrainConfig(system="Reply with ANSWER: and the answer.", lmbda=0.5, max_new_tokens=12),
            train=dataclasses.replace(DistillRunConfig().train, max_steps=6, learning_rate=0.1, global_batch_size=4,
                                      micro_batch_size=2, warmup_steps=1, eval_interval=3, eval_iters=2,
                                      save_interval=3, seed=7))

    full, a, b = helpers.train_whole_and_resumed(monkeypatch, config, tmp_path)
    assert full["step"] == 6
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    objective = Distill(0, config=DistillTrainConfig(lmbda=0.5), seed=7)
    on = [s + 1 for s in range(6) if objective.on_policy(s)]  # the steps (1-based, as logged) on the student's samples
    assert 0 < len(on) < 6
    off = config(tmp_path / "off")
    off.distill.lmbda = 0.0
    # (with the teacher / base / Aligner answers, which ask perf.should_compile with their decoding steps: few, eager)
    off.compare, off.compare_prompts, off.compare_max_new_tokens = True, 2, 3
    asked = helpers.record_compile_steps(monkeypatch)
    train(off)
    assert asked == [3 * 3]  # teacher, base and Aligner: one batch each of up to 3 steps
    c = {int(r["step"]): r["train_loss"] for r in read_metrics(tmp_path / "off" / "metrics.csv") if r["train_loss"]}
    a = {int(r["step"]): r["train_loss"] for r in a if r["train_loss"]}
    assert a[on[0]] != c[on[0]] and all(a[s] == c[s] for s in range(1, on[0]))  # the same run until the first
    _, meta = load_aligner(tmp_path / "full" / "aligner.safetensors")
    assert json.loads(meta["distill"])["lmbda"] == 0.5 and json.loads(meta["distill"])["max_new_tokens"] == 12


@pytest.mark.slow
def test_two_process_on_policy_distillation_equals_one_process(tiny_checkpoint_dir, rows_file, tmp_path):
    # greedy samples, so each row's response is the same whichever process writes it; each process samples only its
    # own rows, so a step's loss is right only if the sampled tokens are counted across both (the normaliser)
    common = ["finetune/aligner_distill.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", rows_file, "--system",
              "Reply with ANSWER: and the answer.", "--accelerator", "cpu", "--max-steps", "3", "--global-batch-size",
              "8", "--micro-batch-size", "2", "--n-tokens", "4", "--start-layer", "1", "--max-seq-length", "128",
              "--learning-rate", "3e-2", "--eval-interval", "3", "--no-progress", "--compare", "False", "--lmbda", "1",
              "--sample-temperature", "0", "--max-new-tokens", "16"]
    helpers.run_one_and_two_processes(common, tmp_path)
    helpers.assert_same_trained_aligner(tmp_path / "one", tmp_path / "two")
    losses = [[float(r["train_loss"]) for r in read_metrics(tmp_path / k / "metrics.csv") if r.get("train_loss")]
              for k in ("one", "two")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# The CLI


def test_prompt_only_rows_are_read_by_an_on_policy_run_and_refused_elsewhere(tiny_checkpoint_dir, rows_file,
                                                                             tmp_path):
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()][:24]
    prompts = tmp_path / "prompts.jsonl"  # TRL's prompt-only rows, as chat turns and as text, with a field of their own
    turns = [{"prompt": [{"role": "user", "content": r["instruction"]}], "id": i} if i % 2 else
             {"prompt": r["instruction"], "id": i} for i, r in enumerate(rows)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in turns))
    common = ["--checkpoint-dir", tiny_checkpoint_dir, "--data", prompts, "--accelerator", "cpu", "--no-progress",
              "--max-steps", "2", "--global-batch-size", "4", "--micro-batch-size", "2", "--n-tokens", "4",
              "--start-layer", "1", "--val-size", "4", "--eval-interval", "2", "--eval-iters", "all"]
    distill = ["finetune/aligner_distill.py", *common, "--system", "Reply with ANSWER: and the answer.",
               "--max-new-tokens", "6", "--compare", "False"]
    r = helpers.run_script(*distill, "--lmbda", "1", "--out-dir", tmp_path / "run", "--json-summary", timeout=600)
    assert r.returncode == 0, helpers.why(r)
    assert "format prompt_only" in r.stdout and "the teacher answered the 4 held-out prompts" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["data"]["format"] == "prompt_only" and summary["data"]["train"] == 20
    evals = [row for row in read_metrics(tmp_path / "run" / "metrics.csv") if row["val_loss"]]
    assert [e["step"] for e in evals] == ["0", "2"] and float(evals[0]["val_loss"]) > 0
    # every validation scores the same answers: the first (zero gates) is the bare base's divergence on them
    assert summary["comparison"]["divergence_before"] == pytest.approx(float(evals[0]["val_loss"]), rel=1e-4)
    assert summary["comparison"]["divergence_after"] == pytest.approx(float(evals[-1]["val_loss"]), rel=1e-4)
    # the same prompts with answers that an on-policy run never reads: the same training, step for step
    answered = tmp_path / "answered.jsonl"
    answered.write_text("".join(json.dumps({"prompt": r["instruction"], "response": r["output"], "id": i}) + "\n"
                                for i, r in enumerate(rows)))
    r = helpers.run_script(*[answered if a == prompts else a for a in distill], "--lmbda", "1", "--out-dir",
                           tmp_path / "answered", timeout=600)
    assert r.returncode == 0, helpers.why(r)
    a, b = (read_metrics(tmp_path / d / "metrics.csv") for d in ("run", "answered"))
    assert [x["train_loss"] for x in a] == [x["train_loss"] for x in b] and a[-1]["train_loss"]
    (pa, _), (pb, _) = (load_aligner(tmp_path / d / "aligner.safetensors") for d in ("run", "answered"))
    assert torch.equal(pa.prefix, pb.prefix) and torch.equal(pa.gate, pb.gate) and pa.gate.abs().sum() > 0
    # evaluate/aligner.py distill on the same held-out prompts writes the same teacher answers (the trainer's limits
    # and batches): the run's two figures again
    r = helpers.run_script("evaluate/aligner.py", "distill", "--checkpoint-dir", tiny_checkpoint_dir, "--data", prompts,
                           "--split", "val", "--val-size", "4", "--batch-size", "2", "--max-new-tokens", "6",
                           "--aligners", "none", tmp_path / "run" / "aligner.safetensors", "--device", "cpu",
                           timeout=600)
    assert r.returncode == 0, helpers.why(r)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(result["data"].values())[0]["responses"] == "the teacher's greedy answers"
    base, student = result["results"]
    assert base["divergence"] == pytest.approx(summary["comparison"]["divergence_before"], rel=1e-4)
    assert student["divergence"] == pytest.approx(summary["comparison"]["divergence_after"], rel=1e-4)
    # off-policy steps and SFT need answers: one line that names the file and the way out
    for args in ([*distill, "--lmbda", "0.5"], ["finetune/aligner.py", *common]):
        r = helpers.run_script(*args, "--out-dir", tmp_path / "bad" / "x", timeout=600)
        assert r.returncode != 0 and not (tmp_path / "bad").exists(), args[0]
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "prompts.jsonl" in err[0], r.stderr
        assert "prompt-only" in err[0] and "--lmbda 1" in err[0]


def test_bad_options_raise_clear_errors(tmp_path):
    with pytest.raises(TrainError, match="--beta must be in"):
        DistillConfig(beta=1.5).check()
    with pytest.raises(TrainError, match="--temperature must be a positive number"):
        DistillConfig(temperature=0).check()
    with pytest.raises(TrainError, match="--lmbda must be in"):
        DistillTrainConfig(lmbda=-0.1).check()
    with pytest.raises(TrainError, match="--max-new-tokens must be at least 1"):
        DistillTrainConfig(max_new_tokens=0).check()
    with pytest.raises(TrainError, match="--sample-temperature must be 0"):
        DistillTrainConfig(sample_temperature=float("nan")).check()
    with pytest.raises(TrainError, match="use --strategy ddp"):
        DistillRunConfig(strategy="fsdp", distill=DistillTrainConfig(lmbda=0.5)).check()
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "Hi", "output": "Hello"}\n')
    with pytest.raises(TrainError, match="--system is required with --data"):
        DistillRunConfig(data=data).check()
    with pytest.raises(TrainError, match="--system @.*missing.txt: cannot read"):
        DistillRunConfig(data=data, distill=DistillConfig(system=f"@{tmp_path / 'missing.txt'}")).check()
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(TrainError, match="empty.txt is empty"):
        DistillRunConfig(data=data, distill=DistillConfig(system=f"@{tmp_path / 'empty.txt'}")).check()
    with pytest.raises(TrainError, match="--turns all is SFT's"):
        DistillRunConfig(data_options=DataOptions(turns="all")).check()
    with pytest.raises(TrainError, match="--teacher-aligner .*: no such file"):
        DistillRunConfig(distill=DistillConfig(teacher_aligner=tmp_path / "nope.safetensors")).check()
    (tmp_path / "ctx.txt").write_text("Be terse.\n")
    from_file = DistillConfig(system=f"@{tmp_path / 'ctx.txt'}")
    assert from_file.system_text(False) == "Be terse."
    (tmp_path / "ctx.txt").write_text("Changed meanwhile.\n")  # read once: identity, data and metadata see one text
    assert from_file.settings(False)["system"] == "Be terse."
    assert "END OF ANSWER" in DistillConfig().system_text(True)  # the default dataset's: its format, by example


def test_a_short_run_on_the_teachers_answers_learns_the_context(tiny_checkpoint_dir, rows_file, tmp_path):
    system = tmp_path / "system.txt"
    system.write_text("Reply with ANSWER: and the answer, then END OF ANSWER.\n")
    # howto/distill.md's recipe: the teacher (the base with the system prompt) writes the answers first
    answers = tmp_path / "teacher.jsonl"
    r = helpers.run_script("generate/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--no-aligner", "--system",
                           system.read_text().strip(), "--prompts-file", rows_file, "--max-new-tokens", "8", "--out",
                           answers, "--device", "cpu", timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert len(answers.read_text().splitlines()) == 80
    out = tmp_path / "run"
    r = helpers.run_script(
        "finetune/aligner_distill.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", answers, "--field-map",
        "response=output", "--system", f"@{system}", "--out-dir", out, "--n-tokens", "4", "--start-layer", "1",
        "--val-fraction", "0.2", "--max-steps", "8", "--learning-rate", "0.1", "--eval-interval", "4", "--eval-iters",
        "all", "--compare", "True", "--compare-prompts", "4", "--compare-max-new-tokens", "4", "--accelerator", "cpu",
        "--no-progress", "--json-summary", timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "distill data from" in r.stdout and "format prompt" in r.stdout and "kept=80" in r.stdout
    assert "divergence from the teacher:  base" in r.stdout
    evals = [row for row in read_metrics(out / "metrics.csv") if row["val_loss"]]
    assert evals[0]["step"] == "0" and evals[-1]["step"] == "8"
    assert float(evals[-1]["val_loss"]) < 0.9 * float(evals[0]["val_loss"])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    report = summary["comparison"]
    assert report["divergence_before"] == pytest.approx(float(evals[0]["val_loss"]), rel=1e-4)  # zero gates
    assert report["divergence_after"] == pytest.approx(float(evals[-1]["val_loss"]), rel=1e-4)
    assert len(report["answers"]["teacher"]) == 4
    _, meta = load_aligner(out / "aligner.safetensors")
    assert meta["mode"] == "distill"
    assert json.loads(meta["distill"]) == {"system": system.read_text().strip(), "teacher_aligner": "None",
                                           "beta": 0.0, "temperature": 1.0}
    # evaluate/aligner.py distill on the run's held-out rows: the same two figures, its system read from the metadata
    r = helpers.run_script("evaluate/aligner.py", "distill", "--checkpoint-dir", tiny_checkpoint_dir, "--data", answers,
                           "--field-map", "response=output", "--split", "val", "--val-fraction", "0.2", "--aligners",
                           "none", out / "aligner.safetensors", "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["system_from"] == "the Aligners' metadata" and result["system"] == system.read_text().strip()
    base, student = result["results"]
    assert base["name"] == "base" and base["divergence"] == pytest.approx(report["divergence_before"], rel=1e-4)
    assert student["divergence"] == pytest.approx(report["divergence_after"], rel=1e-4)
    assert student["agreement"] == pytest.approx(report["agreement_after"], rel=1e-4)
    assert "divergence_init" not in report
    # continued from that Aligner: its figures and answers between the base's and the new Aligner's
    r = helpers.run_script(
        "finetune/aligner_distill.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", answers, "--field-map",
        "response=output", "--system", f"@{system}", "--out-dir", tmp_path / "more", "--init-aligner",
        out / "aligner.safetensors", "--val-fraction", "0.2", "--max-steps", "2", "--learning-rate", "0.1",
        "--eval-iters", "all", "--compare", "True", "--compare-prompts", "4", "--compare-max-new-tokens", "4",
        "--accelerator", "cpu", "--no-progress", "--json-summary", timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    more = json.loads(r.stdout.strip().splitlines()[-1])["comparison"]
    for key in ("divergence", "agreement", "same_answer"):
        assert more[f"{key}_init"] == pytest.approx(report[f"{key}_after"], rel=1e-4), key
        assert more[f"{key}_before"] == pytest.approx(report[f"{key}_before"], rel=1e-4), key
    assert more["answers"]["init Aligner"] == report["answers"]["with Aligner"]
    assert "base" in r.stdout and "->  init Aligner" in r.stdout
    # a prepared directory is refused with one line (its prompts were rendered without the context)
    r = helpers.run_script("finetune/aligner_distill.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data",
                           tmp_path, "--system", "x", "--out-dir", tmp_path / "bad", timeout=600)
    assert r.returncode != 0 and not (tmp_path / "bad").exists()
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ") and "raw .json/.jsonl" in r.stderr
