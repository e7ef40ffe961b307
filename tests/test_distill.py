"""Context distillation into an Aligner: the divergence against TRL's GKD loss, the chunked loss against the plain one,
the teacher's prompts against what generation renders with --system, a context learned on a tiny model, and the
finetune/aligner_distill.py CLI on a tiny checkpoint."""

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
from lit_aligner.prompts import build_prompt
from lit_aligner.tokenizer import Tokenizer
from lit_aligner.training import DistillConfig, DistillRunConfig, TrainError
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


# ---------------------------------------------------------------------------------------------------------------------
# The CLI


def test_bad_options_raise_clear_errors(tmp_path):
    with pytest.raises(TrainError, match="--beta must be in"):
        DistillConfig(beta=1.5).check()
    with pytest.raises(TrainError, match="--temperature must be a positive number"):
        DistillConfig(temperature=0).check()
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


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    from lit_aligner.data import default

    path = tmp_path_factory.mktemp("distill") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in default.generate_rows(80, seed=5)))
    return path


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
    # a prepared directory is refused with one line (its prompts were rendered without the context)
    r = helpers.run_script("finetune/aligner_distill.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data",
                           tmp_path, "--system", "x", "--out-dir", tmp_path / "bad", timeout=600)
    assert r.returncode != 0 and not (tmp_path / "bad").exists()
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ") and "raw .json/.jsonl" in r.stderr
