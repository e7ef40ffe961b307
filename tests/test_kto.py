"""KTO on unpaired completions: the rows (TRL's unpaired format, and preference pairs unpaired), the loss and its
mismatched KL rows against TRL's KTOTrainer on the same rows and models, a learnable synthetic preference on a tiny
model, and the finetune/aligner_kto.py CLI on a tiny checkpoint."""

import json
import math

import pytest
import torch

import helpers
from lit_aligner.aligner_files import load_aligner
from lit_aligner.config import Config
from lit_aligner.data import DataOptions, TokenizedDataset, load_data
from lit_aligner.evaluation import objective_metrics
from lit_aligner.losses import kto_loss, reference_sequence_logprobs
from lit_aligner.model import AlignerConfig, LLaMA, init_weights, mark_only_aligner_as_trainable
from lit_aligner.tokenizer import Tokenizer
from lit_aligner.training import KTOLossConfig, KTORunConfig, TrainError
from lit_aligner.training.objectives.dpo import WithReference, as_reference, precompute_reference
from lit_aligner.training.objectives.kto import KTO, WithPartners, partners
from lit_aligner.training.plot import read_metrics

VOCAB = 320
TRL_VOCAB = 64


# ---------------------------------------------------------------------------------------------------------------------
# The rows


def test_unpaired_rows_and_unpaired_pairs_become_labelled_completions(tiny_checkpoint_dir):
    tok = Tokenizer(tiny_checkpoint_dir)
    ask = {"role": "user", "content": "Yo"}
    rows = [{"prompt": "Hi", "completion": "Hello!", "label": True},
            {"prompt": [ask], "completion": [{"role": "assistant", "content": "Go away"}], "label": False}]
    train, _, info = load_data("unpaired", rows, tok, "chat", DataOptions(val_fraction=0.0))
    assert info["format"] == "unpaired" and info["desirable"] == 1 and len(train) == 2
    assert [(tok.decode(it["completion"]), it["label"].tolist()) for it in train] == [
        ("Hello!<|im_end|>", [1]), ("Go away<|im_end|>", [0])]
    # a pair is two rows, its chosen answer desirable, its rejected one not (TRL's unpair_preference_dataset); both
    # rows of a pair fall on the same side of the split
    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    train, val, info = load_data("unpaired", pairs, tok, "chat", DataOptions(val_size=2))
    assert (len(train), len(val), info["desirable"]) == (16, 4, 10)
    for split in (train, val):
        texts = [tok.decode(it["completion"]) for it in split]
        assert [it["label"].item() for it in split] == [1, 0] * (len(split) // 2)
        assert [t.split()[1] for t in texts[::2]] == [t.split()[1] for t in texts[1::2]]  # the same pair, in order
    # an unpaired row is not preference or SFT data, and a bad label is a bad row
    for kind, row, reason in [("preference", rows[0], "is KTO data"), ("sft", rows[0], "is KTO data"),
                              ("unpaired", {**rows[0], "label": "yes"}, "'label' must be true or false")]:
        with pytest.raises(Exception, match=reason):
            load_data(kind, [row], tok, "chat", DataOptions(val_fraction=0.0, strict_data=True))


# ---------------------------------------------------------------------------------------------------------------------
# The loss against TRL's KTOTrainer


@pytest.mark.filterwarnings("ignore")
def test_the_kto_loss_and_its_kl_rows_equal_trls_kto_trainer(tmp_path):
    """Two different random tiny transformers Llamas as policy and reference, 6 labelled completions in the benchmark's
    word tokenizer ("t17 t3" -> [17, 3]) so that TRL tokenizes exactly these ids, scored as one batch: our collate
    builds TRL's mismatched KL rows (row i's prompt with row i-1's completion), and our loss on our log-probs equals
    TRL's, for KTO (with a KL estimate above 0) and APO's unpaired loss."""
    trl = pytest.importorskip("trl")
    import datasets
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=TRL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    a, b = transformers.LlamaForCausalLM(cfg).eval(), transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(1, TRL_VOCAB - 1, (n,), generator=g).tolist()

    triples = [(ids(5 + i), ids(3 + 2 * i) + [TRL_VOCAB - 1], i % 3 != 1) for i in range(6)]
    rows = [{"prompt": " ".join(f"t{t}" for t in p), "completion": " " + " ".join(f"t{t}" for t in c), "label": y}
            for p, c, y in triples]
    items = [{"prompt": torch.tensor(p), "completion": torch.tensor(c), "label": torch.tensor([int(y)])}
             for p, c, y in triples]
    tokenizer = helpers.load_benchmark("train").word_tokenizer(TRL_VOCAB)
    datasets.disable_progress_bars()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    zs = []
    try:
        for policy, reference in ((a, b), (b, a)):  # one of the two orders has a KL estimate above 0
            for loss in ("kto", "apo_zero_unpaired"):
                args = trl.KTOConfig(output_dir=str(tmp_path), per_device_eval_batch_size=6, beta=0.3, use_cpu=True,
                                     report_to="none", bf16=False, desirable_weight=1.0, undesirable_weight=1.2,
                                     loss_type=loss, disable_tqdm=True)
                dataset = datasets.Dataset.from_list(rows)
                trainer = trl.KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                                         eval_dataset=dataset, processing_class=tokenizer)
                trainer.remove_callback(transformers.PrinterCallback)
                got = trainer.evaluate()
                objective = KTO(0, config=KTOLossConfig(beta=0.3, loss=loss, undesirable_weight=1.2))
                batch = objective.collate(items)
                if loss == "kto":  # the mismatched rows are TRL's
                    theirs = next(iter(trainer.get_eval_dataloader()))
                    assert [r[m.bool()].tolist() for r, m in zip(theirs["KL_input_ids"], theirs["KL_attention_mask"])] \
                        == [r[:n].tolist() for r, n in zip(batch["input_ids"][6:], batch["lengths"][6:])]
                mask = torch.arange(batch["input_ids"].shape[1])[None] < batch["lengths"][:, None]
                with torch.no_grad():
                    pol, ref = (reference_sequence_logprobs(m(input_ids=batch["input_ids"],
                                                              attention_mask=mask.long()).logits, batch["labels"])
                                for m in (policy, reference))
                kl = (pol[6:], ref[6:]) if loss == "kto" else (None, None)
                losses, rewards, z = kto_loss(pol[:6], ref[:6], *kl, batch["desirable"], beta=0.3, loss=loss,
                                              undesirable_weight=1.2)
                assert losses.mean().item() == pytest.approx(got["eval_loss"], rel=1e-5), loss
                # (rewards and z are differences of summed log-probs, which TRL computes in batches padded otherwise:
                # fp32 leaves them ~1e-6 apart whatever their size; transformers 5.25 moved them by 3e-7 and 1.3e-6)
                assert rewards[batch["desirable"]].mean().item() == pytest.approx(got["eval_rewards/chosen"], rel=1e-5,
                                                                                  abs=1e-5)
                if loss == "kto":
                    assert z.item() == pytest.approx(got["eval_kl"], abs=1e-5)
                    zs.append(z.item())
    finally:
        transformers.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()
    assert max(zs) > 0


def test_bad_options_raise_clear_errors():
    with pytest.raises(TrainError, match="--loss must be one of kto, apo_zero_unpaired"):
        KTOLossConfig(loss="sigmoid")
    with pytest.raises(TrainError, match="--undesirable-weight must be > 0"):
        KTOLossConfig(undesirable_weight=0)
    with pytest.raises(TrainError, match="--micro-batch-size must be at least 2"):
        from lit_aligner.training import DPOTrainConfig
        KTORunConfig(train=DPOTrainConfig(micro_batch_size=1)).check()
    with pytest.raises(TrainError, match="--precompute-reference scores the rows .* --strategy fsdp"):
        KTORunConfig(precompute_reference=True, strategy="fsdp").check()
    with pytest.raises(TrainError, match="would go stale: drop --precompute-reference"):
        KTORunConfig(precompute_reference=True, sync_ref_model=True, ref_model_sync_steps=4).check()


# ---------------------------------------------------------------------------------------------------------------------
# A learnable synthetic preference on a tiny model

MARK = [7, 8, 9]  # desirable completions end with this pattern; undesirable ones with a random tail


def synthetic_completions(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(20, VOCAB, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g)
        body = torch.randint(20, VOCAB, (3,), generator=g)
        good = i % 2 == 0
        tail = torch.tensor(MARK) if good else torch.randint(20, VOCAB, (3,), generator=g)
        rows.append((prompt, torch.cat([body, tail]), torch.tensor([int(good)])))
    return TokenizedDataset.from_rows("unpaired", rows)


def test_held_out_reward_accuracy_rises_and_the_reference_pass_is_the_same_base():
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny"), AlignerConfig(2, 1))
    init_weights(model, std=0.1)
    mark_only_aligner_as_trainable(model)
    train, val = synthetic_completions(64, seed=1), synthetic_completions(32, seed=2)
    objective = KTO(0, config=KTOLossConfig(beta=0.5))
    before = objective_metrics(model, objective, val, None, 16)
    assert before["reward"] == pytest.approx(0.0, abs=1e-6)  # zero gates: the policy is the bare base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(train), (8,), generator=g).tolist()
        sums = objective(model, objective.collate([train[i] for i in idx]))
        opt.zero_grad()
        (sums["loss"] / 8).backward()
        opt.step()
    after = objective_metrics(model, objective, val, None, 16)
    assert after["reward_accuracy"] >= 0.85 > before["reward_accuracy"], (before, after)
    assert after["loss"] < before["loss"] - 0.05
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("aligner."))


def test_each_row_has_a_fixed_partner_of_another_prompt_drawn_by_seed():
    """Rows of a preference file come as two adjacent rows of one prompt (TRL's rule, row i-1 of the file, would
    pair them with each other): every partner is a row of another prompt, the same for a seed, another for another
    seed, and the mismatched row is no longer than the longer of the two rows."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(12):
        prompt = torch.randint(20, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
        for label in (1, 0):
            rows.append((prompt, torch.randint(20, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),),
                                               generator=g), torch.tensor([label])))
    data = TokenizedDataset.from_rows("unpaired", rows)
    a, b = partners([data[i]["prompt"] for i in range(len(data))], 7), WithPartners(data, 7).partner
    assert torch.equal(a, b) and not torch.equal(a, partners([data[i]["prompt"] for i in range(len(data))], 8))
    assert all(not torch.equal(data[i]["prompt"], data[int(j)]["prompt"]) for i, j in enumerate(a))
    assert sorted(a.tolist()) != list(range(len(data))) or len(set(a.tolist())) > len(data) // 2
    paired = WithPartners(data, 7)
    for i in range(len(data)):
        it, other = paired[i], data[int(a[i])]
        assert torch.equal(it["kl_completion"], other["completion"][:len(it["kl_completion"])])
        assert len(it["prompt"]) + len(it["kl_completion"]) <= max(len(it["prompt"]) + len(it["completion"]),
                                                                   len(other["prompt"]) + len(other["completion"]))
    # one prompt only: its rows pair with each other (no other prompt to borrow from), never fail
    same = TokenizedDataset.from_rows("unpaired", rows[:2])
    assert sorted(partners([same[i]["prompt"] for i in range(2)], 0).tolist()) == [0, 1]


@pytest.mark.parametrize("loss", ["kto", "apo_zero_unpaired"])
def test_precomputed_reference_equals_on_the_fly(loss):
    """--precompute-reference: the cached log-probs of the matched and the mismatched rows give the loss and every
    metric of the reference pass they replace."""
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny"), AlignerConfig(2, 1))
    init_weights(model, std=0.1)
    with torch.no_grad():
        model.aligner.gate.normal_(0, 0.5)
        reference = as_reference(model.aligner)
        reference.gate.add_(0.3)  # the policy away from its reference: nonzero rewards and a KL estimate above 0
    objective = KTO(0, reference=reference, config=KTOLossConfig(beta=0.5, loss=loss))
    data = synthetic_completions(10, seed=4)
    data = WithPartners(data, 1) if loss == "kto" else data
    cached = WithReference(data, precompute_reference(model, data, objective, batch_size=3))
    assert set(cached[0]) - set(data[0]) == {f"ref_{n}" for n in objective.reference_names}
    for start in (0, 5):
        items = range(start, start + 5)
        fly = objective(model, objective.collate([data[i] for i in items]))
        batch = objective.collate([cached[i] for i in items])
        assert "ref_logps" in batch
        pre = objective(model, batch)
        for k in fly:
            torch.testing.assert_close(pre[k], fly[k], rtol=1e-5, atol=1e-5)
        assert fly["reward"].abs() > 0.01 and (loss != "kto" or fly["kl"] > 0)


# ---------------------------------------------------------------------------------------------------------------------
# finetune/aligner_kto.py on the tiny checkpoint


@pytest.fixture(scope="module")
def feedback_file(tmp_path_factory):
    """160 labelled completions from the default pairs: the chosen (format-following) answer of even pairs, the
    rejected one of odd pairs, so that every prompt has one completion, as feedback logs have."""
    from lit_aligner.data.default import generate_preference_rows

    path = tmp_path_factory.mktemp("kto") / "feedback.jsonl"
    rows = [{"prompt": f"{r['prompt']}\n{r['input']}".strip(), "completion": r["chosen" if i % 2 else "rejected"],
             "label": bool(i % 2)} for i, r in enumerate(generate_preference_rows(160, seed=5))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_short_run_learns_the_feedback_and_records_its_loss(tiny_checkpoint_dir, feedback_file, tmp_path):
    def run(out, *flags):
        return helpers.run_script(
            "finetune/aligner_kto.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", feedback_file, "--out-dir",
            out, "--n-tokens", "4", "--start-layer", "1", "--max-seq-length", "128", "--val-fraction", "0.1",
            "--max-steps", "8", "--learning-rate", "0.1", "--eval-interval", "4", "--eval-iters", "all", "--beta",
            "0.5", "--undesirable-weight", "1.1", "--accelerator", "cpu", "--no-progress", *flags, timeout=600,
            env={"OMP_NUM_THREADS": "1"})

    out = tmp_path / "run"
    r = run(out)
    assert r.returncode == 0, r.stderr
    assert "unpaired data from" in r.stdout and "desirable=80" in r.stdout
    evals = [row for row in read_metrics(out / "metrics.csv") if row["val_loss"]]
    assert evals[0]["step"] == "0" and evals[-1]["step"] == "8"
    assert float(evals[0]["val_reward_accuracy"]) == pytest.approx(0.5)  # the bare base: every reward ties at 0
    assert float(evals[-1]["val_loss"]) < float(evals[0]["val_loss"]) and float(evals[-1]["val_reward_accuracy"]) > 0.6
    aligner, meta = load_aligner(out / "aligner.safetensors")
    assert meta["mode"] == "kto" and meta["loss"] == "kto" and json.loads(meta["undesirable_weight"]) == 1.1
    assert meta["reference"] == "none" and math.isfinite(float(evals[-1]["val_kl"]))
    # --eval-only: the trained Aligner on the same split and reference, KTO's metrics as the run's last validation
    r = helpers.run_script("finetune/aligner_kto.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", feedback_file,
                           "--eval-only", "--init-aligner", out / "aligner.safetensors", "--reference-aligner", "none",
                           "--max-seq-length", "128",
                           "--val-fraction", "0.1", "--eval-iters", "all", "--beta", "0.5", "--undesirable-weight",
                           "1.1", "--accelerator", "cpu", "--out-dir", tmp_path / "eval", timeout=600)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["eval_only"] and metrics["completions"] == 16 and metrics["reference"] == "none"
    for name in ("loss", "kl", "reward_accuracy", "reward"):
        assert metrics[name] == pytest.approx(float(evals[-1][f"val_{name}"]), rel=1e-4, abs=1e-6), name
    assert not (tmp_path / "eval").exists()
    # TR-KTO: the hard update every 4 steps leaves the reference equal to the policy after step 8
    r = run(tmp_path / "tr", "--sync-ref-model", "--ref-model-mixup-alpha", "1", "--ref-model-sync-steps", "4")
    assert r.returncode == 0, r.stderr
    state = torch.load(tmp_path / "tr" / "state" / "last.pt", weights_only=True)
    assert state["step"] == 8 and state["aligner"]["gate"].abs().sum() > 0
    for name in ("prefix", "gate"):
        torch.testing.assert_close(state["objective"][f"reference_{name}"], state["aligner"][name])
    _, meta = load_aligner(tmp_path / "tr" / "aligner.safetensors")
    assert json.loads(meta["sync_ref_model"]) is True and json.loads(meta["ref_model_sync_steps"]) == 4
    # --precompute-reference (its fixed partners: other KL rows, so not the same figures; equal to the reference pass
    # on the same rows: test_precomputed_reference_equals_on_the_fly): it learns too, and the next run reuses the cache
    r = run(tmp_path / "pre", "--precompute-reference")
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "pre" / KTO.reference_file
    assert cache.is_file() and "precomputing the reference log-probs of 160 completions" in r.stdout
    pre = [row for row in read_metrics(tmp_path / "pre" / "metrics.csv") if row["val_loss"]]
    assert float(pre[0]["val_loss"]) == pytest.approx(float(evals[0]["val_loss"]), rel=1e-3)  # the bare base: z = 0
    assert float(pre[-1]["val_loss"]) < float(pre[0]["val_loss"]) and float(pre[-1]["val_reward_accuracy"]) > 0.6
    stamp = cache.stat().st_mtime_ns
    r = run(tmp_path / "pre", "--precompute-reference", "--force")
    assert r.returncode == 0 and f"reference log-probs from {cache}" in r.stdout and cache.stat().st_mtime_ns == stamp
    # a micro-batch of one row has no other completion to average KL over: one error line, nothing written
    r = helpers.run_script("finetune/aligner_kto.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", feedback_file,
                           "--micro-batch-size", "1", "--out-dir", tmp_path / "bad", timeout=600)
    assert r.returncode != 0 and not (tmp_path / "bad").exists()
    assert r.stderr.strip().splitlines() == ["error: KTO's KL estimate is a mean over the mismatched rows of a "
                                             "micro-batch, noise alone from one row: --micro-batch-size must be at "
                                             "least 2 (as TRL asks)"]


@pytest.mark.slow
def test_two_processes_average_z_over_both_as_trl(tiny_checkpoint_dir, feedback_file, tmp_path):
    # TRL averages the KL estimate z over every process's micro-batch; with each row's partner fixed
    # (--precompute-reference), one process with micro-batches of 4 and two with 2 each then train alike
    def run(out, micro, *devices):
        r = helpers.run_script(
            "finetune/aligner_kto.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", feedback_file, "--out-dir",
            out, "--n-tokens", "4", "--start-layer", "1", "--max-seq-length", "128", "--val-fraction", "0.1",
            "--max-steps", "6", "--learning-rate", "0.1", "--eval-interval", "6", "--global-batch-size", "4",
            "--micro-batch-size", str(micro), "--precompute-reference", "--accelerator", "cpu", "--no-progress",
            *devices, timeout=600, env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, helpers.why(r)
        return [row for row in read_metrics(out / "metrics.csv") if row.get("train_loss")]

    one = run(tmp_path / "one", 4)
    two = run(tmp_path / "two", 2, "--devices", "2", "--strategy", "ddp")
    for name in ("train_kl", "train_loss", "train_reward"):
        assert [float(r[name]) for r in two] == pytest.approx([float(r[name]) for r in one], abs=1e-5), name
    assert sum(float(r["train_kl"]) > 0 for r in one) >= 3  # (0 on the first step: the policy is the reference)
