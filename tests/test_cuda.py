"""The CUDA paths (marker `cuda`; they skip without a GPU, and benchmarks/gpu_suite.sh runs them with `pytest -m
cuda`): bf16-true training, compiled blocks, the flash attention kernel, CUDA-graph decoding, activation checkpointing,
the one-copy DPO step, per-row Aligners and FSDP with gradient clipping. Each has a CPU twin elsewhere in the suite;
these check the GPU kernels."""

import copy
import os

import pytest
import torch

from lit_aligner.config import Config
from lit_aligner.model import Aligner, AlignerConfig, LLaMA, init_weights, mark_only_aligner_as_trainable

# LIT_ALIGNER_REHEARSE_CUDA=1 runs them on the CPU (benchmarks/gpu_suite.sh --tiny), all but the GPU-only kernels.
REHEARSE = os.environ.get("LIT_ALIGNER_REHEARSE_CUDA") == "1" and not torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not (torch.cuda.is_available() or REHEARSE),
                                                   reason="needs a CUDA GPU (benchmarks/gpu_suite.sh)")]
DEV = torch.device("cpu" if REHEARSE else "cuda")
gpu_only = pytest.mark.skipif(REHEARSE, reason="a GPU kernel: nothing to rehearse on the CPU")


def make(dtype=torch.bfloat16, n_tokens=4, **overrides):
    torch.manual_seed(0)
    config = Config.from_name("tiny", n_layer=4, block_size=256, **overrides)
    with torch.device(DEV):
        model = LLaMA(config, AlignerConfig(n_tokens, 1))
    model.reset_rope(DEV)
    with torch.no_grad():
        init_weights(model, std=0.05)
        model.aligner.gate.normal_(0, 0.5)
    mark_only_aligner_as_trainable(model)
    return model.to(dtype)


def batch(model, B=4, T=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g).to(DEV)
    labels = ids.clone()
    labels[:, : T // 4] = -100
    return ids, labels


def sft_loss(model, ids, labels):
    from lit_aligner.losses import chunked_cross_entropy

    return chunked_cross_entropy(model(ids, return_hidden=True), model.lm_head_weight, labels, 32)


def aligner_grads(model):
    return [p.grad.detach().float().clone() for p in (model.aligner.prefix, model.aligner.gate)]


def test_bf16_true_training_step_moves_only_the_aligner():
    model = make()
    base = {k: v.clone() for k, v in model.state_dict().items() if "aligner" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = batch(model)
    loss = sft_loss(model, ids, labels)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in aligner_grads(model))
    opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())


@gpu_only
def test_training_attention_takes_the_flash_kernel():
    """No mask tensor is materialised in training: the forward runs with only the flash kernel allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = make(n_query_groups=4)  # plain multi-head: every flash build supports it
    ids, labels = batch(model)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loss = sft_loss(model, ids, labels)
        loss.backward()
    assert torch.isfinite(loss)


def test_compiled_blocks_equal_eager():
    from lit_aligner.perf import compile_blocks

    eager = make()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    ids, labels = batch(eager)
    a, b = sft_loss(eager, ids, labels), sft_loss(compiled, ids, labels)
    a.backward()
    b.backward()
    assert torch.allclose(a.float(), b.float(), rtol=2e-2)
    for x, y in zip(aligner_grads(eager), aligner_grads(compiled)):
        assert torch.allclose(x, y, rtol=5e-2, atol=5e-3)


@gpu_only
def test_cuda_graph_decoding_gives_the_eager_tokens():
    from lit_aligner.generation import generate

    model = make(dtype=torch.float32)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), device=DEV) for n in (5, 9, 13)]
    eager = generate(model, prompts, 24, aligners=model.aligner, compile=False)
    graphed = generate(model, prompts, 24, aligners=model.aligner, compile=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    # The graph reads the prefix from buffers that each call refills: another Aligner of the same shape in the same
    # graph gets its own tokens, not the first one's.
    other = copy.deepcopy(model.aligner)
    with torch.no_grad():
        other.gate.mul_(-2)
    first, eager = eager, generate(model, prompts, 24, aligners=other, compile=False)
    graphed = generate(model, prompts, 24, aligners=other, compile=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    assert any(not torch.equal(a, b) for a, b in zip(eager, first))


@pytest.mark.parametrize("policy", ["selective", "mlp", "block"])
def test_every_checkpointing_policy_gives_the_gradients_of_none(policy):
    from lit_aligner.perf import apply_activation_checkpointing

    plain = make(dtype=torch.float32)
    saved = copy.deepcopy(plain)
    apply_activation_checkpointing(saved, policy, 1)
    ids, labels = batch(plain)
    sft_loss(plain, ids, labels).backward()
    sft_loss(saved, ids, labels).backward()
    for x, y in zip(aligner_grads(plain), aligner_grads(saved)):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_dpo_step_on_one_base_copy():
    from lit_aligner.training.objectives.dpo import DPO

    model = make()
    objective = DPO(pad_id=0, chunk_size=32, reference=False)
    ids, labels = batch(model, B=8)
    out = objective(model, {"input_ids": ids, "labels": labels})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(g.abs().sum() > 0 for g in aligner_grads(model))


def test_a_batch_of_different_aligners_equals_each_alone():
    from lit_aligner.generation import generate

    model = make(dtype=torch.float32)
    aligners = []
    for s in range(3):
        torch.manual_seed(s)
        a = Aligner(model.config, AlignerConfig(4, 1)).to(DEV)
        with torch.no_grad():
            a.gate.normal_(0, 0.5)
        aligners.append(a)
    aligners.append(None)
    prompts = [torch.randint(0, model.config.vocab_size, (7 + i,), device=DEV) for i in range(4)]
    together = generate(model, prompts, 16, aligners=aligners, compile=False)
    for p, a, out in zip(prompts, aligners, together):
        alone = generate(model, [p], 16, aligners=[a], compile=False)[0]
        assert torch.equal(out, alone)


@gpu_only
def test_fsdp_on_one_gpu_trains_and_clips_as_the_plain_strategy(tiny_checkpoint_dir, tmp_path):
    # FSDP2 with NCCL on a GPU (its CPU twin, with gloo: the 2-process FSDP test in test_train.py); --max-norm clips
    # the sharded gradients, so the logged norms and the clipped steps must match the unsharded run's
    import helpers
    from lit_aligner.aligner_files import load_aligner
    from lit_aligner.training.plot import read_metrics

    common = ["finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--accelerator", "cuda", "--precision",
              "32-true", "--max-steps", "3", "--global-batch-size", "8", "--micro-batch-size", "4", "--n-tokens", "4",
              "--start-layer", "1", "--max-seq-length", "128", "--eval-iters", "0", "--max-norm", "0.01",
              "--no-progress", "--compare", "False"]
    norms, aligners = {}, {}
    for strategy in ("auto", "fsdp"):
        p = helpers.run_script(*common, "--strategy", strategy, "--out-dir", tmp_path / strategy, timeout=600,
                              fresh=True)  # a new interpreter: CUDA is never initialised in a forked child
        assert p.returncode == 0, helpers.why(p)
        rows = read_metrics(tmp_path / strategy / "metrics.csv")
        norms[strategy] = [float(r["grad_norm"]) for r in rows if r.get("grad_norm")]
        aligners[strategy] = load_aligner(tmp_path / strategy / "aligner.safetensors")[0]
    assert len(norms["auto"]) == 3 and min(norms["auto"]) > 0.01  # every step clipped
    assert norms["fsdp"] == pytest.approx(norms["auto"], rel=1e-3)
    torch.testing.assert_close(aligners["fsdp"].prefix, aligners["auto"].prefix, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(aligners["fsdp"].gate, aligners["auto"].gate, rtol=1e-3, atol=1e-4)
