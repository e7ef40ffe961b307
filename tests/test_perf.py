"""The speed and memory levers of lit_aligner.perf leave results unchanged, and the arithmetic behind them is right.

Every lever is checked against the plain path on the same tiny random model: compiled vs eager blocks, chunked vs plain
cross-entropy, cached vs per-call prefix K/V, each activation-checkpointing policy vs none (loss and Aligner gradients),
plus the measured activation bytes per policy, the frozen layers below start_layer, and the FLOPs formula against
torch's FlopCounterMode."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lit_aligner import perf
from lit_aligner.config import Config
from lit_aligner.losses import IGNORE_INDEX, chunked_cross_entropy, cross_entropy, sequence_logprobs
from lit_aligner.model import LLaMA, AlignerConfig, init_weights, mark_only_aligner_as_trainable


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine's cores are shared: one thread avoids OpenMP spin-waits that make tiny ops 10x slower.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_model(start_layer: int = 1, n_tokens: int = 4, dtype=torch.float32, seed: int = 0) -> LLaMA:
    """The `tiny` shape (4 layers, GQA) with random weights and non-zero gates, so the prefix path matters."""
    torch.manual_seed(seed)
    model = LLaMA(Config.from_name("tiny"), AlignerConfig(n_tokens, start_layer))
    init_weights(model)
    with torch.no_grad():
        model.aligner.gate.normal_(std=0.5)
    mark_only_aligner_as_trainable(model)
    return model.to(dtype)


def batch(model: LLaMA, B: int = 2, T: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    labels = idx.clone()
    labels[:, : T // 3] = IGNORE_INDEX  # prompt positions carry no loss
    return idx, labels


def loss_and_grads(model: LLaMA, idx, labels, chunked: bool = True):
    model.zero_grad(set_to_none=True)
    if chunked:
        loss = chunked_cross_entropy(model(idx, return_hidden=True), model.lm_head_weight, labels, chunk_size=7)
    else:
        loss = cross_entropy(model(idx), labels)
    loss.backward()
    return loss.detach(), model.aligner.prefix.grad.clone(), model.aligner.gate.grad.clone()


# ---------------------------------------------------------------------------------------------------------------------
# Chunked vs plain cross-entropy


def test_chunked_cross_entropy_equals_plain_in_value_and_aligner_gradients():
    model = tiny_model()
    idx, labels = batch(model)
    plain = loss_and_grads(model, idx, labels, chunked=False)
    chunked = loss_and_grads(model, idx, labels, chunked=True)
    for a, b in zip(plain, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert plain[1].abs().sum() > 0 and plain[2].abs().sum() > 0


def test_chunked_cross_entropy_gradient_wrt_hidden_equals_plain():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    (g_chunked,) = torch.autograd.grad(chunked_cross_entropy(hidden, weight, labels, chunk_size=3), hidden)
    (g_plain,) = torch.autograd.grad(cross_entropy(F.linear(hidden, weight), labels), hidden)
    torch.testing.assert_close(g_chunked, g_plain)


def test_wpo_weights_ride_along_the_checkpointed_chunks_without_changing_the_log_probs_or_their_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight, labels = torch.randn(50, 16), torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    out = {}
    for chunk, wpo in [(3, False), (3, True), (0, True)]:
        got = sequence_logprobs(hidden, weight, labels, chunk_size=chunk, wpo=wpo)
        lp = got[0] if wpo else got
        out[chunk, wpo] = (lp, *torch.autograd.grad(lp.sum(), hidden), *(got[1:] if wpo else ()))
    for a, b in zip(out[3, False], out[3, True]):
        torch.testing.assert_close(a, b)
    for a, b in zip(out[3, True], out[0, True]):
        torch.testing.assert_close(a, b)
    probs = torch.softmax(F.linear(hidden, weight), -1)[:, :-1].detach()  # the formula on the whole distribution
    mask = labels[:, 1:] != IGNORE_INDEX
    ratio = torch.log(probs.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] / (probs ** 2).sum(-1))
    torch.testing.assert_close(out[3, True][2], torch.exp((ratio * mask).sum(1) / mask.sum(1)))
    assert not out[3, True][2].requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# Cached vs per-call prefix K/V


def test_cached_prefix_kv_gives_the_same_logits_as_projecting_per_call():
    model = tiny_model().eval()
    idx, _ = batch(model)
    with torch.no_grad():
        per_call = model(idx, aligner=model.aligner)
        cached = model(idx, aligner=model.prefix_kv(model.aligner))
        bare = model(idx, aligner=False)
    torch.testing.assert_close(cached, per_call)
    assert (per_call - bare).abs().max() > 1e-3  # the prefix really changes the output


def test_cached_prefix_kv_equals_per_call_in_kv_cache_decoding():
    model = tiny_model().eval()
    idx, _ = batch(model, B=2, T=10)
    pkv = model.prefix_kv(model.aligner)
    with torch.no_grad():
        full = model(idx)  # no cache, prefix projected in the call
        model.setup_caches(2, 16)
        try:
            model(idx[:, :6], input_pos=torch.arange(6), aligner=pkv)
            steps = [model(idx[:, t:t + 1], input_pos=torch.tensor([t]), aligner=pkv) for t in range(6, 10)]
        finally:
            model.clear_caches()
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Activation checkpointing


@pytest.mark.parametrize("policy", ["selective", "mlp", "block"])
def test_checkpointing_policy_gives_the_same_loss_and_aligner_gradients_as_none(policy):
    model = tiny_model()
    idx, labels = batch(model)
    reference = loss_and_grads(model, idx, labels)
    wrapped = perf.apply_activation_checkpointing(model, policy)
    assert wrapped > 0 and perf.checkpointing_policy(model) == policy
    for a, b in zip(reference, loss_and_grads(model, idx, labels)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_checkpointing_none_restores_the_eager_forwards():
    model = tiny_model()
    perf.apply_activation_checkpointing(model, "block")
    perf.apply_activation_checkpointing(model, "selective")  # re-applying starts from the eager forwards
    assert perf.checkpointing_policy(model) == "selective"
    assert perf.apply_activation_checkpointing(model, "none") == 0
    assert perf.checkpointing_policy(model) == "none"
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_checkpointing_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match="checkpointing policy must be one of"):
        perf.apply_activation_checkpointing(tiny_model(), "full")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_checkpointing_policy_keeps_fewer_activation_bytes_than_the_last(dtype):
    model = tiny_model(dtype=dtype)
    measured = {p: perf.activation_bytes_per_token(model, p, seq_len=48) for p in ("none", "selective", "mlp", "block")}
    assert measured["none"] > measured["selective"] > measured["mlp"] > measured["block"] > 0, measured
    # block keeps each gated block's input only: n_embd values per token, the rest is the amortised prefix K/V.
    elem = torch.finfo(dtype).bits // 8
    assert measured["block"] < 2 * model.config.n_embd * elem
    assert perf.checkpointing_policy(model) == "none"  # the measurement restores the model's policy


def test_activation_bytes_per_token_needs_an_aligner():
    model = tiny_model()
    model.aligner = None
    with pytest.raises(ValueError, match="needs a model with an Aligner"):
        perf.activation_bytes_per_token(model)


@pytest.mark.parametrize("policy", ["none", "selective", "block"])
def test_frozen_layers_below_start_layer_keep_nothing_and_need_no_gradient(policy):
    start = 2
    model = tiny_model(start_layer=start)
    perf.apply_activation_checkpointing(model, policy)
    idx, labels = batch(model)
    kept, needs_grad, handles = {}, {}, []
    with torch.enable_grad(), perf.count_saved_bytes(model) as counter:
        for i, block in enumerate(model.layers):
            handles.append(block.register_forward_pre_hook(lambda m, a, i=i: kept.__setitem__(i, -counter.nbytes)))

            def after(m, a, out, i=i):
                kept[i] += counter.nbytes
                needs_grad[i] = out.requires_grad

            handles.append(block.register_forward_hook(after))
        loss = cross_entropy(model(idx), labels)
    for h in handles:
        h.remove()
    assert all(kept[i] == 0 and not needs_grad[i] for i in range(start)), (kept, needs_grad)
    assert all(kept[i] > 0 and needs_grad[i] for i in range(start, model.config.n_layer)), (kept, needs_grad)
    loss.backward()  # and the graph is still whole
    assert model.aligner.prefix.grad is not None


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile, and the levers under Fabric as the trainer uses them


def fabric_step(model: LLaMA, idx, labels):
    from lightning_fabric import Fabric

    from lit_aligner.training.objectives import ObjectiveModule
    from lit_aligner.training.objectives.sft import SFT

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    module = fabric.setup_module(ObjectiveModule(model, SFT(pad_id=0, chunk_size=7)))
    optimizer = fabric.setup_optimizers(torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.0))
    optimizer.zero_grad(set_to_none=True)
    loss = module({"input_ids": idx, "labels": labels})["loss"]
    fabric.backward(loss)
    return loss.detach(), model.aligner.prefix.grad.clone(), model.aligner.gate.grad.clone()


def test_fabric_wrapped_model_with_checkpointing_and_compiled_blocks_trains_like_eager():
    pytest.importorskip("lightning_fabric")
    idx, labels = batch(tiny_model())
    eager = fabric_step(tiny_model(), idx, labels)
    model = tiny_model()
    perf.apply_activation_checkpointing(model, "selective", model.aligner.start_layer)
    perf.compile_blocks(model, backend="aot_eager")  # traces the checkpointed blocks; inductor is the slow test below
    names = [n for n, _ in model.named_parameters()]
    for a, b in zip(eager, fabric_step(model, idx, labels)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert names == [n for n, _ in tiny_model().named_parameters()]  # state dicts and the Aligner filter unchanged


def test_compiled_blocks_compile_every_variant_a_training_run_meets():
    """All blocks share one compiled forward, whose variants (with / without a prefix, an input that needs grad or
    not, training and no-grad, static then dynamic batch and length) outnumber dynamo's default limit of 8 in a run
    with validation; past the limit a variant would run eager for good (here: an error instead). Where torch.compile
    takes a limit per call, the blocks get theirs and dynamo's process-wide one stays as it was (other compiled code,
    such as a benchmark's peer, keeps the default)."""
    torch._dynamo.reset()
    eager, model = tiny_model(start_layer=2), tiny_model(start_layer=2)
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        perf.compile_blocks(model, backend="aot_eager")
        if "recompile_limit" in inspect.signature(torch.compile).parameters:
            assert torch._dynamo.config.recompile_limit == 8
        for B, T in [(2, 12), (2, 17), (3, 17), (3, 9)]:  # length-grouped batches, a short last one
            idx, labels = batch(model, B, T)
            for a, b in zip(loss_and_grads(eager, idx, labels), loss_and_grads(model, idx, labels)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
            with torch.no_grad():  # validation, with the Aligner and on the bare base
                for aligner in (None, False):
                    torch.testing.assert_close(model(idx, aligner=aligner), eager(idx, aligner=aligner))


def test_compile_blocks_on_a_torch_without_a_per_call_limit_raises_dynamos_own(monkeypatch):
    """torch.compile took no recompile_limit before March 2026 (the GPU image's torch may be such): then the blocks'
    room comes from dynamo's process-wide limit, raised."""
    real = torch.compile

    def compile_without_a_limit(model=None, *, fullgraph=False, dynamic=None, backend="inductor", mode=None,
                                options=None, disable=False):
        return real(model, fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode, options=options,
                    disable=disable)

    monkeypatch.setattr(torch, "compile", compile_without_a_limit)
    model = tiny_model()
    with torch._dynamo.config.patch(recompile_limit=8):
        perf.compile_blocks(model, backend="aot_eager")
        assert torch._dynamo.config.recompile_limit == perf.BLOCK_RECOMPILE_LIMIT
    idx, _ = batch(model)
    with torch.no_grad():
        assert torch.isfinite(model(idx)).all()  # the blocks were compiled through the older signature


def test_measuring_compiled_blocks_activations_gives_the_eager_bytes_without_recompiling_per_tensor(monkeypatch):
    """The counter reads storage addresses: traced, a compiled block would guard on each and recompile for every
    tensor (80 recompiles in three measurements), past any limit; here the blocks' own limit is dynamo's default (8)."""
    torch._dynamo.reset()
    monkeypatch.setattr(perf, "BLOCK_RECOMPILE_LIMIT", 8)
    eager, model = tiny_model(), tiny_model()
    for m in (eager, model):
        perf.apply_activation_checkpointing(m, "selective", m.aligner.start_layer)
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        perf.compile_blocks(model, backend="aot_eager")
        expected = perf.activation_bytes_per_token(eager, "selective", seq_len=16)
        for _ in range(3):
            assert perf.activation_bytes_per_token(model, "selective", seq_len=16) == expected


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "block"])
def test_inductor_compiled_blocks_give_the_same_loss_and_gradients_as_eager(policy):
    torch._dynamo.reset()
    model = tiny_model()
    idx, labels = batch(model)
    eager = loss_and_grads(model, idx, labels)
    perf.apply_activation_checkpointing(model, policy)
    perf.compile_blocks(model)
    for a, b in zip(eager, loss_and_grads(model, idx, labels)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_should_compile_defaults_to_cuda_only_and_to_runs_long_enough_to_pay_for_it():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert perf.should_compile(cpu) is False
    assert perf.should_compile(cuda) is True
    assert perf.should_compile(cpu, True) is True
    pays = perf.COMPILE_PAYS_AFTER_STEPS
    assert perf.should_compile(cuda, None, pays) is True and perf.should_compile(cuda, None, pays - 1) is False
    assert perf.should_compile(cpu, None, 10 * pays) is False and perf.should_compile(cuda, True, 1) is True
    # a CLI's --compile: auto leaves the rest (a quantized base, a grammar) to generate; on/off are kept as asked
    assert perf.compile_flag("auto", cuda, pays) is None and perf.compile_flag("auto", cuda, 256) is False
    assert perf.compile_flag("on", cpu, 1) is True and perf.compile_flag("off", cuda, 10 * pays) is False
    assert perf.decode_steps_bound(17, 8, 256) == 3 * 256 and perf.decode_steps_bound(16, 8, 256) == 2 * 256


# ---------------------------------------------------------------------------------------------------------------------
# Arithmetic


@pytest.mark.parametrize("start_layer,mode", [(1, "sft"), (0, "sft"), (2, "dpo"), (1, "kto")])
def test_train_flops_formula_matches_torch_flop_counter(start_layer, mode):
    """FlopCounterMode counts every matmul with a weight (aten.mm on the CPU) that a real step runs; the formula's
    non-attention part must equal it exactly (plain loss: the chunked loss would add its recomputed LM head)."""
    model = tiny_model(start_layer=start_layer)
    B, T, N = 2, 16, model.aligner.n_tokens
    idx, labels = batch(model, B, T)
    counter = FlopCounterMode(display=False)
    with counter:
        if mode in ("dpo", "kto"):
            with torch.no_grad():
                model(idx, aligner=False)  # the reference on the matched rows
                if mode == "kto":  # and on the mismatched rows
                    model(idx, aligner=False)
        if mode == "kto":  # the policy's forward on the mismatched rows (KTO runs it without grad; nothing flows back
            model(idx)     # here either, and FlopCounterMode's module tracker fails on a no-grad pass with an Aligner)
        cross_entropy(model(idx), labels).backward()
    counted = counter.get_flop_counts()["Global"]
    mm = sum(v for op, v in counted.items() if "mm" in str(op) and "bmm" not in str(op))
    flops = perf.train_flops_per_token(model.config, T, N, start_layer, mode, batch=B)
    assert mm == pytest.approx((flops.total - flops.attention) * B * T, rel=1e-9)


def test_frozen_base_step_costs_less_than_full_finetuning():
    c = Config.from_name("Llama-2-7b-hf")
    params = 6.74e9
    f = perf.train_flops_per_token(c, 512, 10, 2, "sft")
    assert 2 * params < f.total - f.attention < 4 * params  # vs 6 x params with weight gradients
    dpo = perf.train_flops_per_token(c, 512, 10, 2, "dpo")
    assert dpo.reference == pytest.approx(f.forward, rel=1e-2)  # the forward without the prefix attention


def test_decode_bytes_per_token_counts_every_base_weight_once():
    model = tiny_model()
    base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aligner."))
    assert perf.decode_bytes_per_token(model.config, 2.0) == 2.0 * base


def test_peak_memory_is_measured_on_the_cpu():
    perf.reset_peak_memory(torch.device("cpu"))
    before = perf.peak_memory_bytes(torch.device("cpu"))
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = perf.peak_memory_bytes(torch.device("cpu"))
    del x
    assert after - before >= 48 * 2**20


def test_chunked_loss_peak_stays_flat_while_the_plain_one_grows_with_the_batch():
    c = Config.from_name("Llama-2-7b-hf")
    assert perf.loss_peak_bytes(c, 8 * 512, chunked=False) == 8 * perf.loss_peak_bytes(c, 512, chunked=False)
    assert perf.loss_peak_bytes(c, 8 * 512, chunked=True) == perf.loss_peak_bytes(c, 1024, chunked=True)
    assert perf.loss_peak_bytes(c, 8 * 512, chunked=True) < perf.loss_peak_bytes(c, 8 * 512, chunked=False)
