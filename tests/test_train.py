"""SFT training of Aligners: the schedule and data order, gradients independent of how a batch is split, a short real
run whose validation loss falls and whose Aligner changes generation, exact resume after a signal, the base weights
untouched, the CLI's errors, and 2-process DDP and FSDP (gloo), and two one-process nodes, equal to one process with
the same global batch."""

import dataclasses
import functools
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import helpers
from lit_aligner import training as T
from lit_aligner.aligner_files import AlignerFileError, load_aligner, save_aligner
from lit_aligner.config import Config
from lit_aligner.data import DataOptions
from lit_aligner.losses import IGNORE_INDEX
from lit_aligner.model import (AlignerConfig, LLaMA, check_only_aligner_trainable, init_weights,
                               mark_only_aligner_as_trainable)
from lit_aligner.training import engine
from lit_aligner.training import run as run_module
from lit_aligner.training.objectives.sft import SFT
from lit_aligner.training.plot import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args, env=None):
    return helpers.run_script(*args, env=env, timeout=600)


def small_run(ckpt, out, **train_kw):
    kw = dict(max_steps=8, learning_rate=0.3, global_batch_size=8, micro_batch_size=4, warmup_steps=1,
              eval_interval=4, eval_iters=4, save_interval=4, seed=7)
    kw.update(train_kw)
    return T.SFTRunConfig(checkpoint_dir=ckpt, out_dir=out, n_tokens=4, start_layer=1,
                          data_options=DataOptions(max_seq_length=128), accelerator="cpu", progress=False,
                          compare=False, train=T.TrainConfig(**kw))


# ---------------------------------------------------------------------------------------------------------------------
# Schedule and data order


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    c = T.TrainConfig(max_steps=100, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [T.lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_each_epoch_visits_every_example_once_and_the_order_depends_only_on_seed_and_step():
    n, gbs = 10, 4
    seen = [i for s in range(5) for i in engine.BatchOrder(n, gbs, seed=3)(s)]  # 20 samples = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert engine.BatchOrder(n, gbs, seed=3)(3) == engine.BatchOrder(n, gbs, seed=3)(3)
    assert engine.BatchOrder(n, gbs, seed=3)(0) != engine.BatchOrder(n, gbs, seed=4)(0)


def test_a_global_batch_is_split_into_contiguous_rank_slices_and_micro_batches():
    idx = list(range(8))
    assert engine.rank_micro_batches(idx, 0, 2, 2) == [[0, 1], [2, 3]]
    assert engine.rank_micro_batches(idx, 1, 2, 2) == [[4, 5], [6, 7]]
    with pytest.raises(T.TrainError, match="global-batch-size"):
        engine.gradient_accumulation_steps(10, 4, 1)


# ---------------------------------------------------------------------------------------------------------------------
# The loss and its gradient


def _batch(vocab, B=4, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # the prompt
    labels[1, 9:] = IGNORE_INDEX  # padding
    return {"input_ids": ids, "labels": labels}


def test_sft_loss_is_the_summed_cross_entropy_of_response_tokens_only():
    torch.manual_seed(0)
    m = LLaMA(Config.from_name("tiny"), AlignerConfig(3, 1))
    init_weights(m, std=0.1)
    with torch.no_grad():
        m.aligner.gate.normal_()
    b = _batch(m.config.vocab_size)
    logits = m(b["input_ids"])[:, :-1].reshape(-1, m.config.vocab_size)
    ref = torch.nn.functional.cross_entropy(logits, b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                            reduction="sum")
    got = SFT(pad_id=0, chunk_size=5)(m, b)["loss"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    ids = b["input_ids"][0]
    assert SFT(pad_id=0).units({"prompt": ids[:5], "response": ids[5:]}) == 7  # labels at positions 5..11


def test_only_the_aligner_is_trainable_and_a_trainable_base_weight_is_refused():
    m = LLaMA(Config.from_name("tiny"), AlignerConfig(2, 1))
    mark_only_aligner_as_trainable(m)
    check_only_aligner_trainable(m)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"aligner.prefix", "aligner.gate"}
    m.layers[0].attn.wo.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="layers.0.attn.wo.weight"):
        check_only_aligner_trainable(m)


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs on a tiny real checkpoint (BPE tokenizer + random LLaMA) and the default dataset


@pytest.fixture(scope="module")
def trained(tiny_checkpoint_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    summary = T.train(small_run(tiny_checkpoint_dir, out))
    return out, summary


def test_a_short_run_lowers_validation_loss_clearly_and_writes_aligner_metrics_checkpoints(trained):
    out, summary = trained
    rows = read_metrics(out / "metrics.csv")
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 0.2, rows  # the same rows: 6.25 -> 5.83
    # --eval-iters 4 covers 16 of the split's rows: after the last step the whole split is validated too
    assert summary["val_whole_split"] and summary["val_loss"] == pytest.approx(float(rows[-1]["final_val_loss"]))
    assert summary["val"]["tokens"] > summary["first_val"]["tokens"]
    assert {"step", "train_loss", "val_loss", "lr", "tokens_per_sec", "real_tokens_per_sec"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == list(range(9))
    assert summary["train_loss"] == pytest.approx(float(rows[-1]["train_loss"]), rel=1e-6)  # the last step's
    assert (out / "state" / "step-000004.pt").is_file() and (out / "state" / "last.pt").is_file()
    assert not (out / ".lock").exists()  # released at the end of the run
    aligner, meta = load_aligner(out / "aligner.safetensors")
    assert aligner.prefix.shape == (4, 64) and aligner.gate.abs().sum() > 0
    assert meta["mode"] == "sft" and meta["template"] == "chat" and meta["base_model"] == "tiny-chat"


def test_the_trained_aligner_changes_generation_and_the_base_weights_are_untouched(trained, tiny_checkpoint_dir):
    from lit_aligner.base import load_model
    from lit_aligner.generation import generate
    from lit_aligner.tokenizer import Tokenizer
    from safetensors.torch import load_file

    out, _ = trained
    model = load_model(tiny_checkpoint_dir, "cpu", torch.float32)
    before = load_file(str(tiny_checkpoint_dir / "model.safetensors"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    aligner, _ = load_aligner(out / "aligner.safetensors")
    tok = Tokenizer(tiny_checkpoint_dir)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}]))
    base, steered = (generate(model, [prompt], 12, aligners=a)[0] for a in (False, aligner))
    assert not torch.equal(base, steered)


def test_an_interrupted_run_resumes_exactly_where_it_stopped(trained, tiny_checkpoint_dir, tmp_path, monkeypatch):
    full_out, _ = trained
    out = tmp_path / "interrupted"

    def interrupt_at_3(step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler: the step completes, a checkpoint is written

    monkeypatch.setattr(run_module, "fit", functools.partial(engine.fit, on_step=interrupt_at_3))
    first = T.train(small_run(tiny_checkpoint_dir, out))
    # the signal arrives after step 3's stop check: step 4 (in flight) completes, then the checkpoint is written
    assert first["stopped"] == "SIGINT" and first["step"] == 4 and not (out / "aligner.safetensors").exists()
    monkeypatch.undo()
    cfg = small_run(tiny_checkpoint_dir, out)
    cfg.resume = "auto"
    T.train(cfg)
    full, resumed = read_metrics(full_out / "metrics.csv"), read_metrics(out / "metrics.csv")
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]  # same curve, to the last digit
    a, _ = load_aligner(full_out / "aligner.safetensors")
    b, _ = load_aligner(out / "aligner.safetensors")
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.gate, b.gate)
    # resumed again, finished: nothing trains and nothing is rewritten (a save would drop the file's validation loss)
    files = {p: p.read_bytes() for p in (out / "aligner.safetensors", out / "metrics.csv")}
    again = T.train(cfg)
    assert again["finished"] and again["step"] == 8 and all(p.read_bytes() == data for p, data in files.items())
    (out / "aligner.safetensors").unlink()  # stopped between the last run state and the Aligner's save: saved now
    T.train(cfg)
    c, meta = load_aligner(out / "aligner.safetensors")
    assert torch.equal(a.prefix, c.prefix) and int(meta["steps"]) == 8


def test_wandb_logs_the_metrics_rows_and_a_resumed_run_continues_the_same_wandb_run(trained, tiny_checkpoint_dir,
                                                                                      tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the real wandb, writing its run files to OUT/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "logged"

    def interrupt_at_3(step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(run_module, "fit", functools.partial(engine.fit, on_step=interrupt_at_3))
    assert T.train(dataclasses.replace(small_run(tiny_checkpoint_dir, out), wandb_project="t"))["step"] == 4
    monkeypatch.setattr(run_module, "fit", engine.fit)
    T.train(dataclasses.replace(small_run(tiny_checkpoint_dir, out), wandb_project="t", resume="auto"))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # one W&B run, continued
    logged = {}
    for r in runs:
        logged.update(helpers.read_wandb_history(next(r.glob("run-*.wandb"))))
    rows = read_metrics(out / "metrics.csv")
    assert sorted(logged) == [int(r["step"]) for r in rows] == list(range(9))
    for row in rows:  # every column of every row, as metrics.csv has it
        assert logged[int(row["step"])] == pytest.approx({k: float(v) for k, v in row.items() if k != "step" and v})
    full = read_metrics(trained[0] / "metrics.csv")  # and logging changed nothing of the run
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full]


def test_wandb_without_a_login_is_one_error_line_before_the_model_loads(tiny_checkpoint_dir, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    r = run_script("finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--out-dir", tmp_path / "o",
                   "--max-steps", "1", "--wandb-project", "t", env={"HOME": str(tmp_path)})  # no ~/.netrc login
    assert r.returncode == 1 and r.stderr.startswith("error: Weights & Biases: ") and "WANDB_MODE=offline" in r.stderr
    assert "Traceback" not in r.stderr and "sft data from" not in r.stdout  # failed before the data and model loaded


def test_wandb_project_without_wandb_or_without_a_name_is_refused_before_anything_loads(tmp_path, monkeypatch):
    with pytest.raises(T.TrainError, match="needs a project name"):
        dataclasses.replace(small_run(tmp_path, tmp_path / "o"), wandb_project=" ").check()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: importing it fails
    with pytest.raises(T.TrainError, match=r"needs the wandb package: pip install wandb"):
        dataclasses.replace(small_run(tmp_path, tmp_path / "o"), wandb_project="t").check()


def test_resume_with_different_shape_flags_is_refused(trained, tiny_checkpoint_dir):
    out, _ = trained
    cfg = small_run(tiny_checkpoint_dir, out)
    cfg.resume, cfg.n_tokens = "auto", 2
    with pytest.raises(T.TrainError, match="--n-tokens 4 \\(now 2\\)"):
        T.train(cfg)


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_a_half_precision_run_trains_an_fp32_aligner_on_its_half_precision_base(tiny_checkpoint_dir, tmp_path,
                                                                                 precision):
    # In fp16 AdamW's eps (1e-8) is 0, and a fresh prefix has no gradient at the first step (zero gates): an fp16
    # Aligner's first update was 0/0, and the run stopped at step 1 on its NaN guard.
    out = tmp_path / "run"
    cfg = small_run(tiny_checkpoint_dir, out, max_steps=6, eval_interval=6, eval_iters=2, save_interval=6)
    cfg.precision, cfg.compare = precision, True  # the before/after answers: the fp32 Aligner on the half base
    summary = T.train(cfg)
    assert summary["val_loss"] < summary["first_val_loss"] - 0.1, summary
    assert summary["comparison"]  # answered greedily, base and Aligner
    from safetensors.torch import load_file

    saved = load_file(summary["aligner"])
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in saved.values()) and saved["gate"].abs().max() > 0
    state = torch.load(out / "state" / "last.pt", weights_only=True)
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}  # AdamW's state follows its parameters


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_a_half_precision_run_resumes_exactly_and_starts_from_an_init_aligner_unrounded(tiny_checkpoint_dir, tmp_path,
                                                                                          monkeypatch, precision):
    # neither the resumed state nor an --init-aligner file passes through the base's dtype on its way in
    def config(out, init=None):
        cfg = small_run(tiny_checkpoint_dir, out, max_steps=4, eval_interval=2, eval_iters=1, save_interval=2)
        cfg.precision, cfg.init_aligner = precision, init
        return cfg

    full, a, b = helpers.train_whole_and_resumed(monkeypatch, config, tmp_path / "resume")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    x, _ = load_aligner(full["aligner"])
    y, _ = load_aligner(tmp_path / "resume" / "cut" / "aligner.safetensors")
    assert torch.equal(x.prefix, y.prefix) and torch.equal(x.gate, y.gate)
    start = tmp_path / "start.safetensors"  # fp32 values that bf16 and fp16 round
    with torch.no_grad():
        x.prefix.add_(1e-4 * torch.randn_like(x.prefix))
    save_aligner(x, start, "tiny-chat", {"template": "chat"})
    seen = []
    monkeypatch.setattr(run_module, "fit", lambda *args, **kw: seen.append(args[3].prefix.detach().clone()) or
                        engine.fit(*args, **kw))
    T.train(config(tmp_path / "init", start))
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], x.prefix)


def test_micro_batch_size_and_activation_checkpointing_do_not_change_the_result(tiny_checkpoint_dir, tmp_path):
    a = T.train(small_run(tiny_checkpoint_dir, tmp_path / "m4", max_steps=2, eval_interval=2))
    b = T.train(small_run(tiny_checkpoint_dir, tmp_path / "m1", max_steps=2, eval_interval=2, micro_batch_size=1))
    cfg = small_run(tiny_checkpoint_dir, tmp_path / "ckpt", max_steps=2, eval_interval=2)
    cfg.activation_checkpointing = "block"
    c = T.train(cfg)
    x, _ = load_aligner(a["aligner"])
    assert x.gate.abs().sum() > 0
    for other in (b, c):
        y, _ = load_aligner(other["aligner"])
        torch.testing.assert_close(x.prefix, y.prefix, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x.gate, y.gate, rtol=1e-4, atol=1e-5)


def test_gate_lr_ratio_scales_the_gates_step_only(tiny_checkpoint_dir, tmp_path):
    # one AdamW step at the peak rate: the update is lr * ratio * sign(grad) for the gates (they start at zero, so
    # weight decay adds nothing); the prefix gets no gradient through zero gates and stays where it started
    runs = {r: T.train(small_run(tiny_checkpoint_dir, tmp_path / str(r), max_steps=1, eval_iters=0, learning_rate=1e-2,
                                 gate_lr_ratio=r)) for r in (1.0, 4.0)}
    (a, _), (b, _) = (load_aligner(runs[r]["aligner"]) for r in (1.0, 4.0))
    assert a.gate.abs().max() > 0.009
    torch.testing.assert_close(b.gate, 4 * a.gate, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.prefix, b.prefix)
    rows = read_metrics(tmp_path / "4.0" / "metrics.csv")
    assert float(rows[-1]["lr"]) == pytest.approx(1e-2)  # the logged rate is the prefix's (the schedule's)


def test_grad_norm_is_the_whole_gradient_norm_before_clipping_and_max_norm_bounds_the_steps(tiny_checkpoint_dir,
                                                                                          tmp_path):
    from lit_aligner.aligner_files import new_aligner
    from lit_aligner.base import load_model, load_tokenizer
    from lit_aligner.data import load_data, pad_rows

    runs = {k: small_run(tiny_checkpoint_dir, tmp_path / k, max_steps=6, eval_iters=0, save_interval=4, max_norm=m)
            for k, m in (("free", None), ("loose", 1e9), ("tight", 1e-3))}
    aligners = {k: load_aligner(T.train(cfg)["aligner"])[0] for k, cfg in runs.items()}
    rows = {k: read_metrics(tmp_path / k / "metrics.csv") for k in runs}
    norms = [float(r["grad_norm"]) for r in rows["free"]]
    assert len(norms) == 6 and min(norms) > 1e-2  # so the tight bound clips every step
    # a bound above every norm leaves the run as it is, to the bit; a tight one changes Adam's steps (their relative
    # sizes from step to step), so the Aligner ends elsewhere; the logged norm is the one before clipping
    assert torch.equal(aligners["free"].prefix, aligners["loose"].prefix)
    assert not torch.allclose(aligners["free"].prefix, aligners["tight"].prefix, atol=1e-4)
    assert float(rows["tight"][0]["grad_norm"]) == pytest.approx(norms[0], rel=1e-5)

    # independently: the norm of d(mean response-token loss)/d(prefix, gates) on step 5's batch, from the state the
    # run saved after step 4, with the model's plain logits and cross_entropy (not the engine, Fabric or the chunked
    # loss); both trainable tensors count (the gates are no longer zero, so the prefix has a gradient too)
    cfg = runs["free"]
    state = torch.load(tmp_path / "free" / "state" / "step-000004.pt", weights_only=True)
    model = load_model(tiny_checkpoint_dir, "cpu", torch.float32)
    new_aligner(model, cfg.n_tokens, cfg.start_layer)
    with torch.no_grad():
        model.aligner.prefix.copy_(state["aligner"]["prefix"])
        model.aligner.gate.copy_(state["aligner"]["gate"])
    tokenizer = load_tokenizer(tiny_checkpoint_dir)
    train, _, _ = load_data("sft", None, tokenizer, state["template"], cfg.data_options, cfg.train.seed)
    idx = engine.BatchOrder(len(train), cfg.train.global_batch_size, cfg.train.seed, train.lengths())(4)
    batch = pad_rows([(train[i]["prompt"], train[i]["response"]) for i in idx], tokenizer.pad_id)
    logits = model(batch["input_ids"])[:, :-1]
    labels = batch["labels"][:, 1:]
    summed = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="sum")
    loss = summed / (labels != IGNORE_INDEX).sum()
    grads = torch.autograd.grad(loss, [model.aligner.prefix, model.aligner.gate])
    assert grads[0].abs().sum() > 0
    expected = torch.cat([g.flatten() for g in grads]).norm()
    assert norms[4] == pytest.approx(float(expected), rel=1e-3)


def test_training_on_every_answer_of_conversations_averages_over_the_answers_alone(tiny_checkpoint_dir, tmp_path):
    """--turns all: one sequence per conversation; the step's loss is the mean over exactly the answers' tokens, as
    one row per answer (each with the conversation before it) gives it: here the first step, whose batch is every
    conversation and whose Aligner is still the base (zero gates), against the model's plain logits."""
    from lit_aligner.base import load_model, load_tokenizer
    from lit_aligner.data import load_data

    convs = [sum(([{"role": "user", "content": f"Add {i} and {k}."}, {"role": "assistant", "content": f"{i + k}."}]
                  for k in range(1 + i % 3)), []) for i in range(8)]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = dataclasses.replace(small_run(tiny_checkpoint_dir, tmp_path / "run", max_steps=2, eval_iters=0),
                              data=f, template="chat",
                              data_options=DataOptions(turns="all", val_fraction=0.0, max_seq_length=256))
    summary = T.train(cfg)
    meta = load_aligner(summary["aligner"])[1]
    assert json.loads(meta["data"])["answers"] == 15 and json.loads(meta["data"])["train"] == 8
    model, tok = load_model(tiny_checkpoint_dir, "cpu", torch.float32), load_tokenizer(tiny_checkpoint_dir)
    one_per_answer = [{"messages": c[:2 * k + 2]} for c in convs for k in range(len(c) // 2)]
    rows = load_data("sft", one_per_answer, tok, "chat", DataOptions(val_fraction=0.0))[0]
    total, count = 0.0, 0
    for it in rows:
        ids = torch.cat([it["prompt"], it["response"]])[None]
        with torch.no_grad():
            logits = model(ids)[0, len(it["prompt"]) - 1:-1]
        total += float(torch.nn.functional.cross_entropy(logits, it["response"], reduction="sum"))
        count += len(it["response"])
    first = read_metrics(tmp_path / "run" / "metrics.csv")[0]
    assert float(first["train_loss"]) == pytest.approx(total / count, rel=1e-4)


def test_epochs_set_the_steps_from_the_training_rows(tiny_checkpoint_dir, tmp_path):
    """--epochs E: ceil(E x training rows / global batch) steps (the rows the loader kept), and the schedule ends there;
    with --max-steps too, or not positive, it is refused."""
    summary = T.train(dataclasses.replace(small_run(tiny_checkpoint_dir, tmp_path / "e", eval_iters=0, max_steps=60),
                                          train=T.TrainConfig(epochs=0.01, global_batch_size=8, micro_batch_size=4,
                                                              warmup_steps=1, eval_iters=0, seed=7)))
    rows = summary["data"]["train"]
    assert summary["step"] == -(-rows // 800) and 1 < summary["step"] < 60  # 0.01 x rows / 8 steps, rounded up
    schedule = T.TrainConfig(max_steps=summary["step"], warmup_steps=1)  # the cosine spans those steps, not 60
    assert [float(r["lr"]) for r in read_metrics(tmp_path / "e" / "metrics.csv")] == \
        pytest.approx([T.lr_at(s, schedule) for s in range(summary["step"])])
    for bad, message in [(dict(epochs=0.0), "--epochs must be a positive number"),
                         (dict(epochs=1.0, max_steps=100), "drop --max-steps 100")]:
        with pytest.raises(T.TrainError, match=message):
            T.SFTRunConfig(train=T.TrainConfig(**bad)).check()


def test_max_norm_must_be_positive_and_joins_the_run_identity(tiny_checkpoint_dir, tmp_path):
    with pytest.raises(T.TrainError, match="--max-norm must be a positive number"):
        T.TrainConfig(max_norm=0.0).check()
    # the other numeric flags that only a check stops: each named alone (numpy's own words for a seed said no flag)
    for bad, says in [(dict(seed=-1), r"--seed must be in 0\.\.4294967295, got -1"),
                      (dict(warmup_steps=-1), "--warmup-steps must be >= 0, got -1")]:
        with pytest.raises(T.TrainError, match=says):
            T.TrainConfig(**bad).check()
    assert small_run(tiny_checkpoint_dir, tmp_path, max_norm=1.0).identity()["max_norm"] == 1.0


def test_adam_betas_reach_the_optimizer_and_a_resumed_run_refuses_other_ones(tiny_checkpoint_dir, tmp_path):
    for bad, says in [(dict(adam_beta1=1.0), "--adam-beta1 must be in \\[0, 1\\)"),
                      (dict(adam_beta2=-0.1), "--adam-beta2 must be in"),
                      (dict(weight_decay=-1.0), "--weight-decay must be a number >= 0")]:
        with pytest.raises(T.TrainError, match=says):
            T.TrainConfig(**bad).check()
    short = dict(max_steps=4, eval_iters=0)
    a = load_aligner(T.train(small_run(tiny_checkpoint_dir, tmp_path / "a", **short))["aligner"])[0]
    b = load_aligner(T.train(small_run(tiny_checkpoint_dir, tmp_path / "b", adam_beta1=0.5, adam_beta2=0.99,
                                       **short))["aligner"])[0]
    # the optimizer the run saved is AdamW with the flags' betas (and they change where training goes)
    state = torch.load(tmp_path / "b" / "state" / "step-000004.pt", weights_only=True)
    assert {tuple(g["betas"]) for g in state["optimizer"]["param_groups"]} == {(0.5, 0.99)}
    assert not torch.allclose(a.prefix, b.prefix, atol=1e-4)
    # a resumed run would get the saved betas back from the optimizer's state whatever the flag said: refused instead
    for flag, says in [(dict(adam_beta1=0.9), "--adam-beta1 0.5 \\(now 0.9\\)"),
                       (dict(adam_beta1=0.5, adam_beta2=0.99, weight_decay=0.1), "--weight-decay 0.02 \\(now 0.1\\)")]:
        cfg = small_run(tiny_checkpoint_dir, tmp_path / "b", **{**short, "max_steps": 6, **flag})
        cfg.resume = "auto"
        with pytest.raises(T.TrainError, match=says):
            T.train(cfg)


def test_chat_template_kwargs_shape_the_rows_trained_on_and_travel_with_the_aligner(tiny_checkpoint_dir, tmp_path):
    """--chat-template-kwargs '{"enable_thinking": false}' under Qwen3's template (TRL's): the rows are rendered with
    the thinking block closed in the prompt (without the flag it is part of the answer learned), the Aligner keeps
    the variables, and its prompts are rendered with them in generate, the server and evaluate (a user's own win);
    prepared data keeps them too. A named template or a malformed value is refused."""
    trl = pytest.importorskip("trl")
    from importlib import resources
    from types import SimpleNamespace

    from lit_aligner.base import load_tokenizer
    from lit_aligner.data import DataError, load_data
    from lit_aligner.data.prepare import PrepareConfig, run_prepare
    from lit_aligner.evaluation.commands import Loss
    from lit_aligner.generation import AlignerEntry, PromptItem
    from lit_aligner.generation.answers import request_prompt
    from lit_aligner.serving.app import AlignerServer

    ckpt = helpers.templated_checkpoint(tiny_checkpoint_dir, tmp_path / "qwen3-tiny",
                                        (resources.files(trl) / "chat_templates" / "qwen3.jinja").read_text())
    closed, rows = "<think>\n\n</think>\n\n", tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Add {i} and 2."},
                                                     {"role": "assistant", "content": f"{i + 2}."}]}) + "\n"
                            for i in range(8)))
    flag = '{"enable_thinking": false}'
    cfg = dataclasses.replace(small_run(ckpt, tmp_path / "run", max_steps=1, eval_iters=0), data=rows,
                              chat_template_kwargs=flag, data_options=DataOptions(val_fraction=0.0))
    summary = T.train(cfg)
    assert summary["data"]["template_variables"] == {"enable_thinking": False}
    meta = load_aligner(summary["aligner"])[1]
    assert json.loads(meta["template_variables"]) == {"enable_thinking": False}

    tok = load_tokenizer(ckpt)
    row = [json.loads(rows.read_text().splitlines()[0])]
    plain = load_data("sft", row, tok, "chat", DataOptions(val_fraction=0.0))[0][0]
    tok.template_variables = {"enable_thinking": False}
    trained_on = load_data("sft", row, tok, "chat", DataOptions(val_fraction=0.0))[0][0]
    assert tok.decode(trained_on["prompt"]).endswith(closed) and not tok.decode(plain["prompt"]).endswith(closed)
    assert tok.decode(plain["response"]).startswith(closed) and "think" not in tok.decode(trained_on["response"])

    tok.template_variables = {}
    ask, aligned, base = PromptItem("Add 3 and 2."), AlignerEntry("a", object(), meta), AlignerEntry("base")
    assert request_prompt(tok, ask, aligned).endswith(closed) and not request_prompt(tok, ask, base).endswith(closed)
    tok.template_variables = {"enable_thinking": True}  # generate's --chat-template-kwargs: the user's win
    assert not request_prompt(tok, ask, aligned).endswith(closed)
    assert tok.template_variables == {"enable_thinking": True}  # restored
    server, q = AlignerServer(None, None, tok, "base"), [{"role": "user", "content": "Add 3 and 2."}]
    tok.template_variables = {}
    assert server.chat_prompt(SimpleNamespace(metadata=meta), q).endswith(closed)
    assert not server.chat_prompt(SimpleNamespace(metadata=meta), q, None, {"enable_thinking": True}).endswith(closed)
    assert not server.chat_prompt(None, q).endswith(closed)

    result = Loss(checkpoint_dir=ckpt, data=rows, aligners=[Path(summary["aligner"])], device="cpu").run()
    by_name = {r["template"]: r for r in result["results"]}
    assert set(result["data"]) == set(by_name) == {"chat", 'chat {"enable_thinking": false}'}
    assert by_name['chat {"enable_thinking": false}']["tokens"] < by_name["chat"]["tokens"]  # the closed block moved

    prepared = tmp_path / "prepared"
    run_prepare(PrepareConfig(data_file=rows, out_dir=prepared, checkpoint_dir=ckpt, chat_template_kwargs=flag))
    again = T.train(dataclasses.replace(cfg, data=prepared, chat_template_kwargs=None, out_dir=tmp_path / "again"))
    assert json.loads(load_aligner(again["aligner"])[1]["template_variables"]) == {"enable_thinking": False}
    with pytest.raises(DataError, match="the 'alpaca' template takes none"):
        T.train(dataclasses.replace(cfg, template="alpaca", out_dir=tmp_path / "named"))
    with pytest.raises(T.TrainError, match="--chat-template-kwargs is not valid JSON"):
        dataclasses.replace(cfg, chat_template_kwargs="{nope").check()
    aligner, _ = load_aligner(summary["aligner"])
    save_aligner(aligner, tmp_path / "bad.safetensors", "tiny-chat", {"template_variables": '["x"]'})
    with pytest.raises(AlignerFileError, match="bad.safetensors: its metadata's template_variables are malformed"):
        load_aligner(tmp_path / "bad.safetensors")


def resume_an_older_state(ckpt, tmp_path, edit, trained: dict, resumed: dict):
    """Train with `trained` to the end; `edit` its step-4 run state into what an older version wrote; resume that with
    `resumed` (today's flags). Returns the two final Aligners."""
    full_out, out = tmp_path / "full", tmp_path / "old"
    T.train(small_run(ckpt, full_out, **trained))
    (out / "state").mkdir(parents=True)
    state = torch.load(full_out / "state" / "step-000004.pt", weights_only=True)
    edit(state)
    torch.save(state, out / "state" / "step-000004.pt")
    cfg = small_run(ckpt, out, **resumed)
    cfg.resume = "auto"
    T.train(cfg)
    return load_aligner(full_out / "aligner.safetensors")[0], load_aligner(out / "aligner.safetensors")[0]


def test_a_run_state_from_before_the_gate_group_resumes_with_its_gates_at_the_prefix_rate(tiny_checkpoint_dir,
                                                                                          tmp_path):
    def one_group(state):  # gates at the prefix's rate throughout, as every run before the gate group
        groups = state["optimizer"]["param_groups"]
        assert len(groups) == 2  # prefix, gates
        old = {k: v for k, v in groups[0].items() if k != "lr_ratio"}
        state["optimizer"]["param_groups"] = [dict(old, params=groups[0]["params"] + groups[1]["params"])]
        del state["identity"]["gate_lr_ratio"]

    # continues as it was trained (ratio 1), with one note, to the same end as the uninterrupted run
    a, b = resume_an_older_state(tiny_checkpoint_dir, tmp_path, one_group, {"gate_lr_ratio": 1.0},
                                 {"gate_lr_ratio": 10.0})
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.gate, b.gate)


def test_a_run_state_from_before_the_floor_joined_the_identity_resumes_with_its_recorded_floor(tiny_checkpoint_dir,
                                                                                               tmp_path):
    def no_floor_in_identity(state):  # as written before the floor was part of the identity
        assert state["train_config"]["min_lr_ratio"] == 0.1
        del state["identity"]["min_lr_ratio"]

    # continues with the floor it recorded, not today's flag, to the uninterrupted run's end
    a, b = resume_an_older_state(tiny_checkpoint_dir, tmp_path, no_floor_in_identity, {"min_lr_ratio": 0.1},
                                 {"min_lr_ratio": 0.7})
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.gate, b.gate)
    # a run state with the floor in its identity refuses another floor (unless --force)
    cfg = small_run(tiny_checkpoint_dir, tmp_path / "full", min_lr_ratio=0.7, max_steps=12)
    cfg.resume = "auto"
    with pytest.raises(T.TrainError, match="--min-lr-ratio 0.1 \\(now 0.7\\)"):
        T.train(cfg)


def test_a_run_state_from_before_the_shuffled_batch_order_resumes_in_its_own_order(tiny_checkpoint_dir, tmp_path):
    def no_shuffle_in_identity(state):  # as written when length-grouped batches ran longest to shortest
        assert state["identity"]["group_by_length"]
        del state["identity"]["shuffle_grouped_batches"]
        del state["train_config"]["shuffle_grouped_batches"]

    a, b = resume_an_older_state(tiny_checkpoint_dir, tmp_path, no_shuffle_in_identity,
                                 {"shuffle_grouped_batches": False, "global_batch_size": 4}, {"global_batch_size": 4})
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.gate, b.gate)


def test_a_run_state_from_before_the_adam_flags_resumes_with_its_betas_and_a_note(tiny_checkpoint_dir, tmp_path,
                                                                                   capsys):
    def no_betas(state):  # as written when AdamW's betas were fixed at 0.9, 0.95 and the decay not in the identity
        for name in ("adam_beta1", "adam_beta2", "weight_decay"):
            del state["identity"][name]
        for name in ("adam_beta1", "adam_beta2"):
            del state["train_config"][name]

    a, b = resume_an_older_state(tiny_checkpoint_dir, tmp_path, no_betas, {}, {"adam_beta1": 0.5})
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.gate, b.gate)
    assert "predates --adam-beta1: the run continues with 0.9" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# The command line


def test_cli_malformed_data_is_one_error_line_naming_the_file(tiny_checkpoint_dir, tmp_path):
    bad = tmp_path / "rows.jsonl"
    rows = [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": 3}]
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    r = run_script("finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", bad, "--out-dir",
                   tmp_path / "o", "--max-steps", "1")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "rows.jsonl" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_base_checkpoint_says_how_to_convert(tmp_path):
    r = run_script("finetune/aligner.py", "--checkpoint-dir", tmp_path / "nope", "--max-steps", "1")
    assert r.returncode == 1 and "error: " in r.stderr and "convert" in r.stderr and "Traceback" not in r.stderr


def test_device_flags_this_machine_cannot_run_are_one_error_line(tiny_checkpoint_dir, tmp_path):
    """Lightning's own errors (an accelerator that is missing, devices it cannot parse) and our checks of a multi-device
    run (said once, before its processes start) are one line each, naming the flags."""
    cases = [(["--precision", "bogus"], "error: --precision must be one of 32-true, "),
             (["--devices", "abc"], "error: --accelerator auto --devices abc "),
             (["--accelerator", "cpu", "--devices", "3", "--global-batch-size", "8", "--micro-batch-size", "3"],
              "error: --global-batch-size 8 is not a multiple of --micro-batch-size 3 x 3 device(s) = 9")]
    if not torch.cuda.is_available():
        cases.append((["--accelerator", "cuda"], "error: --accelerator cuda --devices 1 "))
    for flags, said in cases:
        r = run_script("finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--out-dir", tmp_path / "run",
                       "--max-steps", "1", *flags)
        assert r.returncode == 1 and r.stderr.startswith(said) and len(r.stderr.strip().splitlines()) == 1, \
            (flags, r.stderr[-2000:])
    assert not (tmp_path / "run").exists()


def test_plot_metrics_draws_a_png(trained, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = trained
    png = tmp_path / "loss.png"
    r = run_script("scripts/plot_metrics.py", out / "metrics.csv", "--out", png)
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 2 * 600  # two panels of 6 inches at 100 dpi: loss, gradient norm
    r = run_script("scripts/plot_metrics.py", out, "--out", png, "--force")  # the run directory names its metrics
    assert r.returncode == 0, r.stderr
    # a binary file is one error line naming it, before anything is said of the existing --out
    r = run_script("scripts/plot_metrics.py", out / "aligner.safetensors", "--out", png)
    assert r.returncode == 1 and r.stderr.startswith(f"error: {out / 'aligner.safetensors'} is not a metrics.csv")


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "bnb.nf4"])  # DDP over a 4-bit base: every rank quantizes alike
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tiny_checkpoint_dir, tmp_path, quantize):
    common = ["finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--accelerator", "cpu",
              "--max-steps", "3", "--global-batch-size", "8", "--micro-batch-size", "2", "--n-tokens", "4",
              "--start-layer", "1", "--max-seq-length", "128", "--learning-rate", "3e-2", "--eval-interval", "3",
              "--max-norm", "0.01", "--no-progress", "--compare", "False",  # the tiny model's norms are 0.02 to 0.03
              "--quantize", quantize]
    helpers.run_one_and_two_processes(common, tmp_path)
    helpers.assert_same_trained_aligner(tmp_path / "one", tmp_path / "two")
    # the norm is of the whole, synchronised gradient (so every step was clipped alike on both ranks)
    norms = [[float(r["grad_norm"]) for r in read_metrics(tmp_path / k / "metrics.csv") if r.get("grad_norm")]
             for k in ("one", "two")]
    assert len(norms[0]) == 3 and min(norms[0]) > 0.01 and norms[1] == pytest.approx(norms[0], rel=1e-4)


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process_and_run_states_move_between_the_strategies(tiny_checkpoint_dir, tmp_path):
    # FSDP2 on the CPU (gloo): every block's weights sharded over two processes and gathered only inside its own
    # forward, each gated block checkpointed, every step clipped; 5 validation rows (3 on rank 0, 2 on rank 1: the
    # ranks run different numbers of real forward passes) scored whole
    import shutil

    common = ["finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--accelerator", "cpu",
              "--max-steps", "4", "--global-batch-size", "8", "--micro-batch-size", "2", "--n-tokens", "4",
              "--start-layer", "1", "--max-seq-length", "128", "--learning-rate", "3e-2", "--eval-interval", "2",
              "--save-interval", "2", "--val-size", "5", "--eval-iters", "all", "--max-norm", "0.01", "--no-progress"]
    fsdp = ["--devices", "2", "--strategy", "fsdp", "--activation-checkpointing", "block"]
    env = {"OMP_NUM_THREADS": "1"}
    one = run_script(*common, "--compare", "False", "--out-dir", tmp_path / "one")
    assert one.returncode == 0, helpers.why(one)
    two = run_script(*common, *fsdp, "--out-dir", tmp_path / "two", env=env)  # the default dataset: --compare on
    assert two.returncode == 0, helpers.why(two)
    assert "no before/after comparison under --strategy fsdp" in two.stdout
    a, _ = load_aligner(tmp_path / "one" / "aligner.safetensors")
    b, _ = load_aligner(tmp_path / "two" / "aligner.safetensors")
    assert a.gate.abs().sum() > 0
    torch.testing.assert_close(b.prefix, a.prefix, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.gate, a.gate, rtol=1e-4, atol=1e-5)
    rows = {k: read_metrics(tmp_path / k / "metrics.csv") for k in ("one", "two")}
    for key in ("grad_norm", "val_loss"):
        got = [[float(r[key]) for r in rows[k] if r.get(key)] for k in ("one", "two")]
        assert len(got[0]) >= 3 and got[1] == pytest.approx(got[0], rel=1e-4), key
    # a run state of either strategy resumes under the other (FSDP saves the optimizer's state by parameter name)
    for source, flags in (("one", fsdp), ("two", [])):
        out = tmp_path / f"from-{source}"
        (out / "state").mkdir(parents=True)
        shutil.copy(tmp_path / source / "state" / "step-000002.pt", out / "state")
        shutil.copy(tmp_path / source / "metrics.csv", out)
        p = run_script(*common, *flags, "--compare", "False", "--out-dir", out, "--resume", "auto", env=env)
        assert p.returncode == 0 and "at step 2" in p.stdout, helpers.why(p)
        c, _ = load_aligner(out / "aligner.safetensors")
        torch.testing.assert_close(c.prefix, a.prefix, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c.gate, a.gate, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_nodes_train_as_one_process(tiny_checkpoint_dir, tmp_path):
    # --num-nodes 2 on one machine, one launch per node (NODE_RANK 0 and 1, one process each), as on a cluster:
    # FSDP's mesh is then (2 nodes, 1 device), so each node holds the whole model and the nodes replicate it (HSDP)
    import socket
    import subprocess
    import sys

    common = ["finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--accelerator", "cpu",
              "--max-steps", "3", "--global-batch-size", "8", "--micro-batch-size", "2", "--n-tokens", "4",
              "--start-layer", "1", "--max-seq-length", "128", "--learning-rate", "3e-2", "--eval-interval", "3",
              "--max-norm", "0.01", "--no-progress", "--compare", "False"]
    one = run_script(*common, "--out-dir", tmp_path / "one")
    assert one.returncode == 0, helpers.why(one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    nodes = [*common, "--num-nodes", "2", "--strategy", "fsdp", "--out-dir", tmp_path / "two"]
    second = subprocess.Popen([sys.executable, *map(str, nodes)], cwd=ROOT, env={**os.environ, **env, "NODE_RANK": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = run_script(*nodes, env={**env, "NODE_RANK": "0"})
        _, err = second.communicate(timeout=300)
    finally:
        second.kill()  # a node left waiting for the other would wait for its rendezvous timeout (minutes)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + err[-2000:]
    assert "2 process(es)" in first.stdout
    a, _ = load_aligner(tmp_path / "one" / "aligner.safetensors")
    b, _ = load_aligner(tmp_path / "two" / "aligner.safetensors")
    torch.testing.assert_close(b.prefix, a.prefix, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.gate, a.gate, rtol=1e-4, atol=1e-5)


SHARD_FROM_THE_FILE = '''
import copy, os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp

def rank_main(rank, world, checkpoint, store_path):
    import torch.distributed.fsdp as fsdp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from lit_aligner.aligner_files import new_aligner
    from lit_aligner.base import load_model
    from lit_aligner.training.run import shard_model

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.manual_seed(0)
    model = load_model(checkpoint, "cpu")  # the file's dtype (fp32), memory-mapped
    aligner = new_aligner(model, 4, 1)
    with torch.no_grad():
        aligner.gate.normal_()
    # the reference: every tensor and the logits of the base and Aligner converted whole (the Aligner keeps fp32)
    reference = copy.deepcopy(model).to(torch.bfloat16)
    reference.aligner = copy.deepcopy(model.aligner)
    expected_tensors = {n: t for n, t in [*reference.named_parameters(), *reference.named_buffers()]}
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = reference(idx)
    fully_shard, seen = fsdp.fully_shard, []

    def spy(module, **kwargs):  # no weight is real before every unit is sharded
        seen.append(sorted({t.device.type for t in [*model.parameters(), *model.buffers()]}))
        return fully_shard(module, **kwargs)

    fsdp.fully_shard = spy
    shard_model(model, init_device_mesh("cpu", (1, world), mesh_dim_names=("nodes", "devices")), torch.bfloat16)
    assert seen == [["meta"]] * (model.config.n_layer + 1), seen
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        dtype = torch.float32 if name.startswith("aligner.") else torch.bfloat16
        assert t.dtype == dtype and t.device.type == "cpu", (name, t.dtype, t.device)
        full = t.full_tensor() if isinstance(t, DTensor) else t  # gathered from every rank's rows
        assert torch.equal(full, expected_tensors[name]), name
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert model.aligner.prefix.requires_grad and not model.layers[0].attn.wqkv.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, rtol=0, atol=0)
    os.write(1, f"ok {rank}\\n".encode())  # one write: the ranks' lines do not interleave

if __name__ == "__main__":
    mp.spawn(rank_main, args=(int(sys.argv[3]), sys.argv[1], sys.argv[2]), nprocs=int(sys.argv[3]))
'''


def test_fsdp_ranks_copy_their_own_rows_from_the_file_and_equal_the_converted_base(tiny_checkpoint_dir, tmp_path):
    # the model is sharded on the meta device and each rank copies in only its rows of every tensor, converted to the
    # run's dtype (3 ranks: uneven rows, and a 4-row prefix leaves one rank none); gathered, every tensor equals the
    # file's converted whole, and so do the logits of base and Aligner
    script = tmp_path / "shard.py"
    script.write_text(SHARD_FROM_THE_FILE)
    p = run_script(script, tiny_checkpoint_dir, tmp_path / "store", "3", env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and all(f"ok {r}" in p.stdout for r in range(3)), helpers.why(p)


def _whole_split_loss(ckpt, aligner_file, aligner):
    """The response-token loss on every row the run held out, computed apart from the trainer: the split rebuilt from
    the Aligner's metadata (as `evaluate/aligner.py loss --split val` does), the base or the Aligner scored on it."""
    from lit_aligner.base import load_base
    from lit_aligner.evaluation import heldout_split, objective_metrics

    model, tok = load_base(ckpt, device="cpu")
    loaded, meta = load_aligner(aligner_file, model)
    val, info = heldout_split("sft", None, tok, meta["template"], meta, "val")
    return objective_metrics(model, SFT(tok.pad_id, 0), val, loaded if aligner else False)["loss"], len(val)


def test_the_before_after_comparison_scores_base_and_aligner_on_the_whole_split_also_after_a_resume(
        tiny_checkpoint_dir, tmp_path, capsys, monkeypatch):
    steps = helpers.record_compile_steps(monkeypatch)  # a few short answers: they decode eagerly also on a GPU
    out = tmp_path / "cmp"
    cfg = small_run(tiny_checkpoint_dir, out, max_steps=1, eval_interval=1, eval_iters=1)
    cfg.compare, cfg.compare_prompts, cfg.compare_max_new_tokens = None, 3, 4  # None: on for the default dataset
    summary = T.train(cfg)
    report = summary["comparison"]
    assert report["n_prompts"] == 3 and len(report["answers_after"]) == 3
    assert steps == [2 * 4]  # before and after, one batch each of up to 4 steps
    base, rows = _whole_split_loss(tiny_checkpoint_dir, summary["aligner"], False)
    after, _ = _whole_split_loss(tiny_checkpoint_dir, summary["aligner"], True)
    assert report["val_rows"] == rows > 4  # --eval-iters 1 scored 4 of them
    assert report["val_loss_before"] == pytest.approx(base, rel=1e-5)
    assert report["val_loss_after"] == pytest.approx(after, rel=1e-5) == summary["val_loss"]
    assert summary["first_val_loss"] != pytest.approx(base, rel=1e-4)  # step 0 saw a quarter of the rows
    out_text = capsys.readouterr().out
    assert "=== before / after" in out_text and "format rate:" in out_text
    assert f"(all {rows} held-out rows)" in out_text and f"validation (all {rows} held-out rows" in out_text
    # resumed to a second step: the first validation of that call scores a trained Aligner, yet "base" stays the base
    cfg = small_run(tiny_checkpoint_dir, out, max_steps=2, eval_interval=1, eval_iters=1)
    cfg.compare, cfg.compare_prompts, cfg.compare_max_new_tokens, cfg.resume = None, 3, 4, "auto"
    resumed = T.train(cfg)
    assert resumed["comparison"]["val_loss_before"] == pytest.approx(base, rel=1e-5)
    assert resumed["val_loss"] < resumed["comparison"]["val_loss_before"]
    # continued from that Aligner (--init-aligner): the report shows it between the base and the trained one
    cfg = small_run(tiny_checkpoint_dir, tmp_path / "more", max_steps=1, eval_interval=1, eval_iters=1)
    cfg.compare, cfg.compare_prompts, cfg.compare_max_new_tokens = None, 3, 4
    cfg.init_aligner = Path(resumed["aligner"])
    capsys.readouterr()
    more = T.train(cfg)["comparison"]
    start, _ = _whole_split_loss(tiny_checkpoint_dir, resumed["aligner"], True)
    assert more["val_loss_init"] == pytest.approx(start, rel=1e-5) == resumed["val_loss"]
    assert more["val_loss_before"] == pytest.approx(base, rel=1e-5) and more["val_loss_after"] != more["val_loss_init"]
    assert more["answers_init"] == resumed["comparison"]["answers_after"]  # the same Aligner's greedy answers
    assert all(set(s) >= {"before", "init", "after"} for s in more["samples"])
    text = capsys.readouterr().out
    assert "validation loss:  base" in text and "->  init Aligner" in text and "  init Aligner:" in text
    assert "init" not in json.dumps(summary["comparison"])  # (a run from a fresh Aligner: no such column)


def test_final_validation_off_reports_the_last_eval_iters_batches(tiny_checkpoint_dir, tmp_path, capsys):
    summary = T.train(small_run(tiny_checkpoint_dir, tmp_path / "off", max_steps=2, eval_iters=1,
                                final_validation=False))
    rows = read_metrics(tmp_path / "off" / "metrics.csv")
    assert not summary["val_whole_split"] and "final_val_loss" not in rows[-1]
    assert summary["val_loss"] == pytest.approx(float(rows[-1]["val_loss"]))
    assert "validation (1 micro-batches of the" in capsys.readouterr().out
    _, meta = load_aligner(summary["aligner"])
    assert float(meta["val_loss"]) == pytest.approx(summary["val_loss"])


# ---------------------------------------------------------------------------------------------------------------------
# Validation: a held-out file, the whole split, or none; the prefix initialisation


def _val_columns(out):
    return [r for r in read_metrics(out / "metrics.csv") if r.get("val_loss")]


def test_val_data_validates_on_every_row_of_that_file_and_does_not_split_the_training_file(tiny_checkpoint_dir,
                                                                                            tmp_path):
    from lit_aligner.data import default as default_data

    rows = default_data.generate_rows(60, seed=11)
    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train_file.write_text("\n".join(json.dumps(r) for r in rows[:50]) + "\n")
    val_file.write_text("\n".join(json.dumps(r) for r in rows[50:]) + "\n")
    cfg = small_run(tiny_checkpoint_dir, tmp_path / "run", max_steps=2, eval_iters="all", eval_interval=1)
    cfg.data, cfg.val_data = train_file, val_file
    summary = T.train(cfg)
    assert summary["data"]["train"] == 50 and summary["data"]["val"] == 10
    assert summary["data"]["val_source"] == str(val_file)
    # the validation loss is the whole held-out file's, independently computed with the saved Aligner
    from lit_aligner.base import load_base, load_tokenizer
    from lit_aligner.data import load_data
    from lit_aligner.evaluation import objective_metrics

    model, tok = load_base(tiny_checkpoint_dir, device="cpu")
    aligner, _ = load_aligner(summary["aligner"], model)
    val, _, _ = load_data("sft", val_file, load_tokenizer(tiny_checkpoint_dir), summary["template"],
                          DataOptions(max_seq_length=128, val_fraction=0.0), 7)
    expect = objective_metrics(model, SFT(tok.pad_id, 0), val, aligner)["loss"]
    assert summary["val_loss"] == pytest.approx(expect, rel=1e-4)
    assert len(_val_columns(tmp_path / "run")) == 3  # steps 0, 1, 2


def test_validation_rows_that_are_also_training_rows_are_counted_in_a_note(tiny_checkpoint_dir, tmp_path, capsys):
    from lit_aligner.data import default as default_data

    rows = default_data.generate_rows(40, seed=12)
    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train_file.write_text("\n".join(json.dumps(r) for r in rows[:30]) + "\n")
    val_file.write_text("\n".join(json.dumps(r) for r in rows[27:]) + "\n")  # 3 training rows + 10 new ones
    for name, val, expect in (("some", val_file, "note: 3 of --val-data 13 rows are also training rows"),
                              ("same", train_file, "note: 30 of --val-data 30 rows are also training rows"),
                              ("none", None, None)):
        cfg = small_run(tiny_checkpoint_dir, tmp_path / name, max_steps=1, eval_iters=1)
        cfg.data, cfg.val_data = train_file, val
        T.train(cfg)
        out = capsys.readouterr().out
        assert (expect in out) if expect else "are also training rows" not in out, out
        assert ("is --val-data the training file?" in out) == (name == "same")


def test_eval_iters_zero_switches_validation_off_and_all_means_the_whole_split(tiny_checkpoint_dir, tmp_path):
    off = T.train(small_run(tiny_checkpoint_dir, tmp_path / "off", max_steps=2, eval_iters=0, eval_interval=1))
    assert off["val"] == {} and off["val_loss"] is None and not _val_columns(tmp_path / "off")
    cfgs = [small_run(tiny_checkpoint_dir, tmp_path / name, max_steps=1, eval_iters=iters, final_validation=False)
            for name, iters in (("one", 1), ("all", "all"))]
    for cfg in cfgs:
        cfg.data_options = DataOptions(max_seq_length=128, val_size=24)
    one, every = map(T.train, cfgs)
    assert one["val"]["tokens"] < every["val"]["tokens"]
    with pytest.raises(T.TrainError, match="eval-iters"):
        small_run(tiny_checkpoint_dir, tmp_path / "bad", eval_iters=-1).check()
    p = run_script("finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--out-dir", tmp_path / "cli",
                   "--max-steps", "1", "--eval-iters", "0", "--max-seq-length", "128", "--accelerator", "cpu",
                   "--no-progress", "--global-batch-size", "4", "--micro-batch-size", "4", "--compare", "False")
    assert p.returncode == 0, p.stderr
    assert "validation is off (--eval-iters 0)" in p.stdout + p.stderr


@pytest.mark.parametrize("how", ["normal", "hidden", "embedding"])
def test_prefix_init_sets_the_scale_and_keeps_the_base_at_zero_gates(tiny_checkpoint_dir, how):
    from lit_aligner.aligner_files import new_aligner
    from lit_aligner.base import load_base

    from lit_aligner.model import DEFAULT_PREFIX_INIT_SCALE

    model, _ = load_base(tiny_checkpoint_dir, device="cpu")
    norm_rms = float(torch.stack([b.attention_norm.weight.pow(2).mean().sqrt() for b in model.layers[1:]]).mean())
    for scale in (DEFAULT_PREFIX_INIT_SCALE, 2.0):
        torch.manual_seed(0)
        a = new_aligner(model, 10, 1, how, scale)
        rms = float(a.prefix.detach().pow(2).mean().sqrt())
        if how == "normal":  # the paper's N(0, 1), whatever the scale
            assert 0.8 < rms < 1.2
        else:
            assert rms == pytest.approx(scale * norm_rms, rel=0.25)
    if how == "embedding":  # real token directions: each row is parallel to some embedding row
        e = torch.nn.functional.normalize(model.tok_embeddings.weight, dim=-1)
        cos = torch.nn.functional.normalize(a.prefix, dim=-1) @ e.T
        assert (cos.max(-1).values > 0.999).all()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids, aligner=a), model(ids, aligner=False))
    # SFT's measured scale; DPO keeps the scale its own defaults were measured at
    assert T.SFTRunConfig().prefix_init_scale == DEFAULT_PREFIX_INIT_SCALE and T.DPORunConfig().prefix_init_scale == 1
    for bad in (0.0, float("nan")):
        with pytest.raises(T.TrainError, match="--prefix-init-scale must be a positive number"):
            T.SFTRunConfig(prefix_init_scale=bad).check()


def test_length_grouping_keeps_every_epoch_a_permutation_pads_less_and_is_a_function_of_seed_and_step():
    """(On by default, so the exact-resume tests above and test_safety's kill -9 test run with it.)"""
    assert T.TrainConfig().group_by_length and T.TrainConfig().shuffle_grouped_batches
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (1000,), generator=g)
    n, gbs = len(lengths), 16  # 1000 % 16 = 8: steps straddle the epochs
    steps = -(-3 * n // gbs)
    plain = [engine.BatchOrder(n, gbs, 3)(s) for s in range(steps)]

    def padded(batches):
        return sum(len(b) * max(int(lengths[i]) for i in b) for b in batches)

    for shuffled in (True, False):
        grouped = [engine.BatchOrder(n, gbs, 3, lengths, shuffled)(s) for s in range(steps)]
        flat = [i for b in grouped for i in b]
        assert all(sorted(flat[e * n:(e + 1) * n]) == list(range(n)) for e in range(3))
        assert grouped[40] == engine.BatchOrder(n, gbs, 3, lengths, shuffled)(40)  # resume: step decides
        assert padded(grouped) < 0.6 * padded(plain)
        assert grouped[0] != plain[0]


def test_the_kept_batch_order_builds_each_epoch_once_and_equals_the_one_step_order(monkeypatch):
    lengths = torch.randint(5, 300, (100,), generator=torch.Generator().manual_seed(0))
    n, gbs, steps = len(lengths), 16, 20  # 100 % 16 = 4: steps straddle the epochs
    expected = [engine.BatchOrder(n, gbs, 3, lengths)(s) for s in range(steps)]
    built = []
    real = engine.epoch_permutation
    monkeypatch.setattr(engine, "epoch_permutation", lambda *a: built.append(a[2]) or real(*a))
    order = engine.BatchOrder(n, gbs, 3, lengths)
    assert [order(s) for s in range(steps)] == expected
    assert built == [0, 1, 2, 3]  # (20 x 16 = 320 rows: four epochs, each sorted once)
    assert order(7) == expected[7] and built[-1] == 1  # a step out of order (a resume) builds its own epochs


def test_length_grouped_batches_go_in_a_shuffled_order_longest_first_not_longest_to_shortest():
    g = torch.Generator().manual_seed(1)
    # a small file (one run of 50 batches): 3 in 4 rows long, the rest short, as the kinds of rows of a tool-call file
    lengths = torch.where(torch.rand(384, generator=g) < 0.75, torch.randint(200, 400, (384,), generator=g),
                          torch.randint(20, 60, (384,), generator=g))
    n, gbs = len(lengths), 8

    def epoch(e, shuffled):
        return [engine.BatchOrder(n, gbs, 3, lengths, shuffled)(s) for s in range(e * 48, (e + 1) * 48)]

    for e in range(2):
        hf, ours = epoch(e, False), epoch(e, True)
        assert sorted(map(sorted, hf)) == sorted(map(sorted, ours))  # the same batches (the same padding) ...
        longest = [max(int(lengths[i]) for i in b) for b in ours]
        assert longest[0] == int(lengths.max())  # ... the one with the longest row first ...
        hf_longest = [max(int(lengths[i]) for i in b) for b in hf]
        assert hf_longest == sorted(hf_longest, reverse=True)  # (Hugging Face's order: longest to shortest)
        short = [s for s, b in enumerate(ours) if max(int(lengths[i]) for i in b) < 100]
        assert short[-1] - short[0] > 24  # ... the short rows' batches spread over the epoch, not its last steps
    assert epoch(0, True) != epoch(1, True)



def test_a_bare_resume_flag_means_auto_wherever_it_stands():
    from lit_aligner.cli import bare_resume_is_auto, run_cli

    def parse(*args):
        return run_cli(lambda cfg: cfg, T.SFTRunConfig, args=bare_resume_is_auto(args))

    assert parse("--resume", "--max-steps", "3").resume == "auto"
    assert parse("--max-steps", "3", "--resume").resume == "auto"
    assert parse("--resume", "state/step-000002.pt", "--max-steps", "3").resume == "state/step-000002.pt"
    assert parse("--max-steps", "3").resume is None
