"""DPO with one base copy: the loss against an independent formula, learning a synthetic preference, the reference
path never trained, precomputed == on-the-fly reference, one base for policy and reference, paper checkpoints as
init/reference, and the finetune/aligner_dpo.py CLI on a tiny checkpoint."""

import json
import math
from pathlib import Path

import pytest
import torch

import helpers
from lit_aligner.aligner_files import load_aligner
from lit_aligner.config import Config
from lit_aligner.data import TokenizedDataset
from lit_aligner.evaluation import objective_metrics
from lit_aligner.losses import dpo_loss
from lit_aligner.model import Aligner, AlignerConfig, LLaMA, init_weights, mark_only_aligner_as_trainable
from lit_aligner.training import DPOLossConfig as DPOConfig
from lit_aligner.training import TrainError
from lit_aligner.training.objectives.dpo import (DPO, WithReference, as_reference, precompute_reference,
                                                 reference_logprobs, resolve_reference)
from lit_aligner.training.plot import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT.parent / "shared" / "data" / "aligner-paper-weights"
VOCAB = 320


def dpo_step_loss(model, batch, reference, cfg):
    """(mean loss over the batch's pairs, metric sums) of the DPO objective."""
    sums = DPO(0, reference=reference, config=cfg)(model, batch)
    return sums["loss"] / (batch["input_ids"].shape[0] // 2), sums


def collate_dpo(items, pad_id=0):
    return DPO(pad_id).collate(items)


def evaluate_dpo(model, dataset, reference, cfg, batch_size):
    return objective_metrics(model, DPO(0, reference=reference, config=cfg), dataset, None, batch_size)


def tiny_model(seed=0, n_tokens=2, start_layer=1):
    torch.manual_seed(seed)
    m = LLaMA(Config.from_name("tiny"), AlignerConfig(n_tokens, start_layer))
    init_weights(m, std=0.1)
    mark_only_aligner_as_trainable(m)
    return m


# ---------------------------------------------------------------------------------------------------------------------
# The loss on fixed numbers, against the formula written out with `math`

PC = [-12.0, -30.5, -7.25, -3.0]
PR = [-14.5, -29.0, -9.0, -3.0]
RC = [-13.0, -31.0, -7.0, -2.5]
RR = [-13.5, -28.0, -9.5, -4.0]


def _logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_sigmoid_loss_matches_the_formula(beta, eps):
    t = [torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR)]
    losses, cr, rr = dpo_loss(*t, beta=beta, loss="sigmoid", label_smoothing=eps)
    for i in range(len(PC)):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        want = -(1 - eps) * _logsigmoid(beta * h) - eps * _logsigmoid(-beta * h)
        assert losses[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert cr[i].item() == pytest.approx(beta * (PC[i] - RC[i]))
        assert rr[i].item() == pytest.approx(beta * (PR[i] - RR[i]))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_matches_the_formula(beta):
    t = [torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR)]
    losses, _, _ = dpo_loss(*t, beta=beta, loss="ipo")
    for i in range(len(PC)):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending the loss raises log pi(chosen), lowers log pi(rejected)


def test_bad_options_raise_clear_errors():
    with pytest.raises(TrainError, match="--loss"):
        DPOConfig(loss="hinge")
    with pytest.raises(TrainError, match="--beta"):
        DPOConfig(beta=0)
    with pytest.raises(TrainError, match="sigmoid"):
        DPOConfig(loss="ipo", label_smoothing=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# A learnable synthetic preference on a tiny model

MARK = [7, 8, 9]  # chosen responses end with this pattern; rejected ones with a different random tail


def synthetic_pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    triples = []
    for _ in range(n):
        prompt = torch.randint(20, VOCAB, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g)
        body = torch.randint(20, VOCAB, (3,), generator=g)
        chosen = torch.cat([body, torch.tensor(MARK)])
        rejected = torch.cat([body, torch.randint(20, VOCAB, (3,), generator=g)])
        triples.append((prompt, chosen, rejected))
    return TokenizedDataset.from_rows("preference", triples)


def train_steps(model, data, reference, cfg, steps, lr=0.05, batch=8, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g).tolist()
        loss, _ = dpo_step_loss(model, collate_dpo([data[i] for i in idx]), reference, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_held_out_reward_accuracy_rises_above_chance():
    model = tiny_model()
    train, val = synthetic_pairs(64, seed=1), synthetic_pairs(32, seed=2)
    cfg = DPOConfig(beta=0.5)
    before = evaluate_dpo(model, val, False, cfg, batch_size=16)
    # zero gates: the policy is the bare base, so every reward (and margin) starts at exactly 0
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    train_steps(model, train, False, cfg, steps=40)
    after = evaluate_dpo(model, val, False, cfg, batch_size=16)
    assert after["reward_accuracy"] >= 0.85, after
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert after["reward_margin"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# The reference path, one base copy, precomputed reference


def test_reference_never_receives_gradients_and_base_is_untouched():
    model = tiny_model()
    with torch.no_grad():
        model.aligner.gate.normal_(0, 0.5)
    reference = as_reference(model.aligner)
    assert reference is not model.aligner and not reference.prefix.requires_grad
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("aligner.")}
    data = synthetic_pairs(8, seed=3)
    batch = collate_dpo([data[i] for i in range(4)])
    ref_lp = reference_logprobs(model, batch["input_ids"], batch["labels"], reference)
    assert not ref_lp.requires_grad and ref_lp.grad_fn is None  # computed under no_grad
    train_steps(model, data, reference, DPOConfig(), steps=3)
    assert reference.prefix.grad is None and reference.gate.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("aligner."))
    for k, v in model.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k
    # the policy moved, the reference (a private copy) did not
    assert not torch.equal(model.aligner.gate, reference.gate)


def test_policy_and_reference_share_one_base(monkeypatch):
    """Both passes go through the same LLaMA object: count forward calls and parameters."""
    model = tiny_model()
    reference = as_reference(model.aligner)
    n_params = sum(p.numel() for p in model.parameters())
    calls = []
    original = LLaMA.forward

    def spy(self, idx, *args, **kwargs):
        calls.append((id(self), kwargs.get("aligner")))
        return original(self, idx, *args, **kwargs)

    monkeypatch.setattr(LLaMA, "forward", spy)
    data = synthetic_pairs(4, seed=4)
    dpo_step_loss(model, collate_dpo([data[i] for i in range(4)]), reference, DPOConfig())
    assert [c[0] for c in calls] == [id(model), id(model)]
    assert calls[0][1] is reference and calls[1][1] is None  # reference pass, then the policy (model.aligner)
    # the reference adds an Aligner's worth of parameters, not a second base
    assert sum(p.numel() for p in reference.parameters()) == model.aligner.num_params()
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("with_reference_aligner", [False, True])
def test_precomputed_reference_equals_on_the_fly(with_reference_aligner):
    model = tiny_model()
    with torch.no_grad():
        model.aligner.gate.normal_(0, 0.5)
    reference = as_reference(model.aligner) if with_reference_aligner else False
    with torch.no_grad():  # move the policy away from the reference so the loss is not trivially log(2)
        model.aligner.gate.add_(0.3)
    data = synthetic_pairs(10, seed=5)
    rc, rr = precompute_reference(model, data, DPO(0, reference=reference), batch_size=3)
    cached = WithReference(data, rc, rr)
    cfg = DPOConfig()
    for start in (0, 4):
        items = [start + i for i in range(4)]
        loss_fly, m_fly = dpo_step_loss(model, collate_dpo([data[i] for i in items]), reference, cfg)
        batch = collate_dpo([cached[i] for i in items])
        assert "ref_logps" in batch
        loss_pre, m_pre = dpo_step_loss(model, batch, reference, cfg)
        torch.testing.assert_close(loss_pre, loss_fly, rtol=1e-5, atol=1e-5)
        for k in m_fly:
            torch.testing.assert_close(m_pre[k], m_fly[k], rtol=1e-5, atol=1e-5)
    # and the rows really differ from the bare base when the reference is an Aligner
    if with_reference_aligner:
        bare, _ = precompute_reference(model, data, DPO(0, reference=False))
        assert not torch.allclose(bare, rc)


def test_collate_preference_rows_are_chosen_then_rejected():
    data = synthetic_pairs(3, seed=6)
    batch = collate_dpo([data[i] for i in range(3)])
    for i in range(3):
        c = data[i]["chosen"]
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert torch.equal(labelled, c)


# ---------------------------------------------------------------------------------------------------------------------
# Init / reference Aligner files, including the paper's .pth


def test_resolve_reference_defaults():
    model = tiny_model()
    ref, desc = resolve_reference(None, None, model)
    assert ref is False and desc == "none"
    ref, desc = resolve_reference(None, model.aligner, model)
    assert isinstance(ref, Aligner) and desc == "init" and torch.equal(ref.prefix, model.aligner.prefix)
    ref, desc = resolve_reference("none", model.aligner, model)
    assert ref is False


def test_our_file_and_a_paper_pth_load_as_init_or_reference(tmp_path):
    from lit_aligner.aligner_files import export_paper_checkpoint, save_aligner

    model = tiny_model()
    with torch.no_grad():
        model.aligner.gate.normal_(0, 0.5)
    ours = save_aligner(model.aligner, tmp_path / "a.safetensors", "tiny", {"mode": "sft"})
    pth = export_paper_checkpoint(model.aligner, tmp_path / "a.pth")
    for path in (ours, pth):
        a, _ = load_aligner(path, model)
        torch.testing.assert_close(a.gate, model.aligner.gate)
        ref, desc = resolve_reference(str(path), None, model)
        assert desc == str(path) and not ref.gate.requires_grad


@pytest.mark.skipif(not PAPER.is_dir(), reason="../shared/data/aligner-paper-weights is not available")
def test_real_paper_checkpoint_imports_and_names_the_shape_mismatch():
    from lit_aligner.aligner_files import AlignerFileError, import_paper_checkpoint

    path = PAPER / "beaver-dpo-llama2-7b-1token.pth"
    aligner, meta = import_paper_checkpoint(path)
    assert tuple(aligner.prefix.shape) == (1, 4096) and tuple(aligner.gate.shape) == (30, 32)
    model = tiny_model()  # LLaMA-2-7B-shaped Aligner against a tiny base: one clear error
    with pytest.raises(AlignerFileError, match="does not fit"):
        load_aligner(path, model)
    with pytest.raises(AlignerFileError, match="not a checkpoint"):
        resolve_reference(str(PAPER / "published-but-not-a-checkpoint.pth"), None, model)


@pytest.mark.skipif(not PAPER.is_dir(), reason="../shared/data/aligner-paper-weights is not available")
def test_paper_checkpoint_loads_as_init_and_reference_on_a_llama2_7b_shaped_base():
    """The real beaver DPO checkpoint against a LLaMA-2-7B-shaped base built on the meta device (no 7B weights)."""
    from lit_aligner.aligner_files import import_paper_checkpoint

    path = PAPER / "beaver-dpo-llama2-7b-1token.pth"
    with torch.device("meta"):
        base = LLaMA(Config.from_name("Llama-2-7b-hf"))
    aligner, _ = load_aligner(path, base)
    assert (aligner.n_tokens, aligner.start_layer) == (1, 2)
    assert tuple(aligner.gate.shape) == (30, 32) and aligner.prefix.device.type == "meta"
    ref, desc = resolve_reference(str(path), None, base)
    assert desc == str(path) and not ref.gate.requires_grad
    # the values that would be loaded are the file's: gates and the shared prefix token
    cpu, _ = import_paper_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(cpu.prefix.float(), raw["global_value_embedding.weight"].float())
    torch.testing.assert_close(cpu.gate[5].float(), raw["transformer.h.7.attn.gating_factor"].float().flatten())


# ---------------------------------------------------------------------------------------------------------------------
# run_dpo and the finetune/aligner_dpo.py CLI on the tiny checkpoint (conftest.tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """160 of the default dataset's pairs as a {prompt, chosen, rejected} JSONL file (chosen: the FORMAT)."""
    from lit_aligner.data.default import generate_preference_rows

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"{r['prompt']}\n{r['input']}".strip(), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in generate_preference_rows(160, seed=5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_run_config(ckpt, out, **kw):
    from lit_aligner.data import DataOptions
    from lit_aligner.training import DPORunConfig, DPOTrainConfig

    train = dict(max_steps=8, learning_rate=0.1, global_batch_size=8, micro_batch_size=4, warmup_steps=1,
                 eval_interval=4, eval_iters="all", save_interval=4, seed=7)
    train.update(kw.pop("train", {}))
    base = dict(checkpoint_dir=ckpt, data=kw.pop("data"), out_dir=out, n_tokens=4, start_layer=1, accelerator="cpu",
                progress=False, data_options=DataOptions(max_seq_length=128, val_fraction=0.1),
                dpo=DPOConfig(beta=0.5))
    base.update(kw)
    return DPORunConfig(train=DPOTrainConfig(**train), **base)


def run_dpo(cfg):
    from lit_aligner.training import train

    return train(cfg)


def run_script(*args):
    return helpers.run_script(*args, timeout=600, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def short_dpo_run(tiny_checkpoint_dir, pairs_file, tmp_path_factory):
    """8 DPO steps on the default preference pairs (chosen = the FORMAT the base does not follow)."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    return run_dpo(dpo_run_config(tiny_checkpoint_dir, out, data=pairs_file)), out


def test_a_short_run_writes_the_aligner_and_metrics_and_learns_the_preference(short_dpo_run):
    summary, out = short_dpo_run
    rows = read_metrics(out / "metrics.csv")
    assert {"step", "train_loss", "val_loss", "val_reward_accuracy", "val_reward_margin",
            "train_reward_accuracy"} <= set(rows[0])
    evals = [r for r in rows if r["val_loss"]]
    assert evals[0]["step"] == "0" and evals[-1]["step"] == "8"
    assert float(evals[0]["val_reward_accuracy"]) == pytest.approx(0.5)  # policy == reference (bare base): ties
    assert float(evals[-1]["val_loss"]) < float(evals[0]["val_loss"]) - 0.05, evals
    assert float(evals[-1]["val_reward_accuracy"]) > 0.6 and float(evals[-1]["val_reward_margin"]) > 0
    aligner, meta = load_aligner(out / "aligner.safetensors")
    assert meta["mode"] == "dpo" and meta["loss"] == "sigmoid" and json.loads(meta["beta"]) == 0.5
    assert meta["reference"] == "none" and meta["template"] == "chat"
    assert aligner.gate.abs().sum() > 0  # trained away from the zero-gate start
    assert (out / "state" / "last.pt").is_file()


def test_eval_only_prints_the_metrics_as_json_on_the_last_line(short_dpo_run, tiny_checkpoint_dir,
                                                                pairs_file):
    summary, out = short_dpo_run
    r = run_script("finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--eval-only",
                   "--data", pairs_file, "--init-aligner", out / "aligner.safetensors", "--reference-aligner", "none",
                   "--max-seq-length", "128", "--val-fraction", "0.1", "--seed", "7", "--eval-iters", "all",
                   "--beta", "0.5", "--accelerator", "cpu", "--out-dir", out.parent / "eval")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    # the same Aligner, reference and validation split as the end of the run: the same metrics
    assert metrics["reward_accuracy"] == pytest.approx(summary["val"]["reward_accuracy"])
    assert metrics["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-4)
    assert metrics["pairs"] == summary["val"]["pairs"] and metrics["reference"] == "none"
    # and the trained Aligner as its own reference: every reward is zero, accuracy exactly chance
    r = run_script("finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--eval-only",
                   "--data", pairs_file, "--init-aligner", out / "aligner.safetensors", "--max-seq-length", "128",
                   "--val-fraction", "0.1", "--seed", "7", "--accelerator", "cpu", "--out-dir", out.parent / "eval2")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["reference"] == "init" and metrics["reward_accuracy"] == 0.5 and metrics["reward_margin"] == 0.0


def test_precomputing_the_reference_is_refused_under_fsdp():
    from lit_aligner.training import DPORunConfig

    with pytest.raises(TrainError, match="--precompute-reference .* --strategy fsdp"):
        DPORunConfig(precompute_reference=True, strategy="fsdp").check()
    DPORunConfig(precompute_reference=True, strategy="ddp").check()


def test_eval_only_refuses_a_wandb_project_it_would_not_log_to():
    from lit_aligner.training import DPORunConfig

    with pytest.raises(TrainError, match="--eval-only logs no run to Weights & Biases: drop --wandb-project"):
        DPORunConfig(eval_only=True, wandb_project="t").check()


@pytest.mark.slow
def test_two_process_fsdp_dpo_equals_one_process(short_dpo_run, tiny_checkpoint_dir, pairs_file, tmp_path):
    # the policy starts at a trained Aligner and the reference is its frozen copy (not sharded: it reaches each
    # layer with the batch, while the policy's prefix is FSDP's); the last step's validation too
    _, trained = short_dpo_run
    common = ["finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", pairs_file,
              "--init-aligner", trained / "aligner.safetensors", "--max-seq-length", "128", "--val-fraction", "0.1",
              "--max-steps", "3", "--global-batch-size", "8", "--micro-batch-size", "2", "--learning-rate", "0.1",
              "--beta", "0.5", "--eval-interval", "3", "--eval-iters", "all", "--accelerator", "cpu", "--no-progress"]
    outs = [tmp_path / "one", tmp_path / "two"]
    for out, flags in zip(outs, ([], ["--devices", "2", "--strategy", "fsdp"])):
        r = run_script(*common, *flags, "--out-dir", out)
        assert r.returncode == 0, helpers.why(r)
    (a, _), (b, _) = (load_aligner(out / "aligner.safetensors") for out in outs)
    start, _ = load_aligner(trained / "aligner.safetensors")
    assert (a.prefix - start.prefix).abs().max() > 1e-3
    torch.testing.assert_close(b.prefix, a.prefix, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.gate, a.gate, rtol=1e-4, atol=1e-5)
    losses = [[float(r["val_loss"]) for r in read_metrics(out / "metrics.csv") if r.get("val_loss")]
              for out in outs]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_a_malformed_data_file_gives_one_error_line_naming_it(tiny_checkpoint_dir, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": \n')
    r = run_script("finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", bad,
                   "--accelerator", "cpu", "--max-steps", "1", "--out-dir", tmp_path / "out")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_checkpoint_dir, pairs_file, tmp_path):
    def config(out, steps, **kw):
        return dpo_run_config(tiny_checkpoint_dir, tmp_path / out, data=pairs_file,
                              train=dict(max_steps=steps, eval_interval=2, save_interval=2), **kw)

    straight = run_dpo(config("a", 4))
    run_dpo(config("b", 2))
    # a second invocation with more steps and --resume auto picks up OUT/state/last.pt at step 2
    resumed = run_dpo(config("b", 4, resume="auto"))
    assert resumed["step"] == straight["step"] == 4
    a, _ = load_aligner(tmp_path / "a" / "aligner.safetensors")
    b, _ = load_aligner(tmp_path / "b" / "aligner.safetensors")
    torch.testing.assert_close(a.gate, b.gate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.prefix, b.prefix, rtol=1e-5, atol=1e-6)


def test_precomputed_reference_run_matches_on_the_fly_and_reuses_its_cache(tiny_checkpoint_dir, pairs_file,
                                                                             tmp_path):
    from lit_aligner.training.objectives.dpo import REFERENCE_FILE

    kw = dict(data=pairs_file, train=dict(max_steps=2, eval_interval=2, save_interval=2))
    run_dpo(dpo_run_config(tiny_checkpoint_dir, tmp_path / "fly", **kw))
    run_dpo(dpo_run_config(tiny_checkpoint_dir, tmp_path / "pre", precompute_reference=True, **kw))
    cache = tmp_path / "pre" / REFERENCE_FILE
    assert cache.is_file()
    a, _ = load_aligner(tmp_path / "fly" / "aligner.safetensors")
    b, _ = load_aligner(tmp_path / "pre" / "aligner.safetensors")
    torch.testing.assert_close(a.gate, b.gate, rtol=1e-4, atol=1e-6)
    stamp = cache.stat().st_mtime_ns
    run_dpo(dpo_run_config(tiny_checkpoint_dir, tmp_path / "pre", precompute_reference=True, force=True, **kw))
    assert cache.stat().st_mtime_ns == stamp  # the second run read the cache instead of recomputing it


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_step_peak_memory_takes_one_real_step_and_reports_the_peak(mode):
    from lit_aligner.perf import step_peak_memory
    from lit_aligner.training.objectives import get_objective

    model = tiny_model()
    gate = model.aligner.gate.detach().clone()
    objective = get_objective(mode)(pad_id=0)
    r = step_peak_memory(model, objective, sequences=4, seq_len=16)
    assert r["before_bytes"] > 0 and r["step_bytes"] == r["peak_bytes"] - r["before_bytes"]
    assert not torch.equal(model.aligner.gate, gate)  # the optimizer step happened
    if mode == "dpo":
        with pytest.raises(ValueError, match="even"):
            step_peak_memory(model, objective, sequences=3, seq_len=16)


def test_dpo_keeps_its_own_training_defaults_from_python_and_the_cli():
    from lit_aligner.cli import run_cli
    from lit_aligner.training import DPORunConfig, DPOTrainConfig, SFTRunConfig, TrainConfig

    sft, dpo = TrainConfig(), DPOTrainConfig()
    assert (sft.learning_rate, sft.gate_lr_ratio, sft.min_lr_ratio) == (3e-2, 0.3, 0.3)
    assert (dpo.learning_rate, dpo.gate_lr_ratio, dpo.min_lr_ratio, dpo.global_batch_size) == (5e-3, 1.0, 0.0, 8)
    # A Python user who sets one field keeps DPO's others (a plain TrainConfig would bring SFT's floor and gates).
    one = DPORunConfig(train=DPOTrainConfig(learning_rate=1e-3)).train
    assert (one.learning_rate, one.gate_lr_ratio, one.min_lr_ratio) == (1e-3, 1.0, 0.0)
    assert DPORunConfig().train == dpo and SFTRunConfig().train == sft
    assert run_cli(lambda cfg: cfg, DPORunConfig, args=["--learning-rate", "1e-3"]).train == one
