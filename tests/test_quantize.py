"""A quantized base (`--quantize`, lit_aligner.quantize): bitsandbytes' real layers, run on the CPU. The reference is
independent of the quantized forward: a float model holding the weights that bitsandbytes' own dequantization gives
back."""

import dataclasses
import json
import sys

import pytest
import torch

import test_train
from helpers import run_script
from lit_aligner import training as T
from lit_aligner.aligner_files import load_aligner
from lit_aligner.base import load_model
from lit_aligner.files import UserError
from lit_aligner.model import Aligner, AlignerConfig
from lit_aligner.quantize import quantized_bytes


def dequantized_twin(qmodel, checkpoint_dir):
    """A float copy of the checkpoint whose block linears hold what bitsandbytes dequantizes `qmodel`'s to."""
    import bitsandbytes.functional as F

    model = load_model(checkpoint_dir, "cpu", torch.float32)
    qmods = dict(qmodel.layers.named_modules())
    changed = 0
    for name, m in model.layers.named_modules():
        if type(m) is torch.nn.Linear:
            w = qmods[name].weight
            assert w.dtype == torch.uint8 and w.numel() * 2 == m.weight.numel()  # two 4-bit numbers per byte
            m.weight.copy_(F.dequantize_4bit(w.data, w.quant_state).reshape(m.weight.shape))
            changed += 1
    assert changed == 5 * len(model.layers)  # wqkv, wo, w1, w2, w3 per block: every linear was quantized
    return model


def random_aligner(config, n=3, start=1, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    a = Aligner(config, AlignerConfig(n, start))
    with torch.no_grad():
        a.prefix.copy_(torch.randn(a.prefix.shape, generator=g) * scale)
        a.gate.copy_(torch.randn(a.gate.shape, generator=g))
    return a


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A random tiny base of the Qwen shape: q/k/v biases, k-norm, 8 query heads on 2 KV heads, its own LM head."""
    from lit_aligner.base import save_base
    from lit_aligner.config import Config
    from lit_aligner.model import LLaMA, init_weights

    config = Config(name="tiny-qwen", **{**Config.from_name("tiny").shape(), "attn_bias": True, "qk_norm": True,
                                         "n_head": 8, "n_query_groups": 2, "tie_embeddings": False})
    torch.manual_seed(0)
    model = LLaMA(config)
    init_weights(model, std=0.05)
    with torch.no_grad():
        for block in model.layers:
            block.attn.wqkv.bias.normal_(std=0.5)  # biases that matter (init_weights zeroes them)
    return save_base(tmp_path_factory.mktemp("qwen") / "tiny-qwen", config, model.state_dict())


@pytest.mark.parametrize("mode,base", [("bnb.nf4", "llama"), ("bnb.fp4-dq", "llama"), ("bnb.nf4", "qwen")])
def test_a_4bit_base_with_an_aligner_equals_the_float_model_of_its_dequantized_weights(tiny_checkpoint_dir, qwen_dir,
                                                                                        mode, base):
    checkpoint = tiny_checkpoint_dir if base == "llama" else qwen_dir
    q = load_model(checkpoint, "cpu", torch.float32, quantize=mode)
    assert q.quantize == mode and not any(p.requires_grad for p in q.parameters())
    f = dequantized_twin(q, checkpoint)
    orig = load_model(checkpoint, "cpu", torch.float32)
    if base == "qwen":  # the bias rides along unquantized; the LM head stays in full precision
        torch.testing.assert_close(q.layers[0].attn.wqkv.bias, orig.layers[0].attn.wqkv.bias, rtol=0, atol=0)
        assert type(q.output) is torch.nn.Linear and torch.equal(q.output.weight, orig.output.weight)
    w, w0 = f.layers[0].feed_forward.w1.weight, orig.layers[0].feed_forward.w1.weight
    assert 0.01 < ((w - w0).norm() / w0.norm()).item() < 0.3  # really quantized, and to 4 bits, not to noise
    idx = torch.randint(0, q.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (q, f):
        a = random_aligner(model.config)
        a.requires_grad_(True)
        logits = model(idx, aligner=a)  # the prefix through each gated layer's quantized K/V projection
        logits.logsumexp(-1).mean().backward()
        grads.append((logits.detach(), a.prefix.grad, a.gate.grad))
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert grads[0][1].abs().sum() > 0  # the gradient reaches the prefix through the quantized layers
    # zero gates: exactly the quantized base
    zero = random_aligner(q.config)
    with torch.no_grad():
        zero.gate.zero_()
        torch.testing.assert_close(q(idx, aligner=zero), q(idx, aligner=False), rtol=0, atol=0)


def test_greedy_decoding_on_a_quantized_base_gives_the_tokens_of_its_float_twin(tiny_checkpoint_dir):
    from lit_aligner.generation import generate

    q = load_model(tiny_checkpoint_dir, "cpu", torch.float32, quantize="bnb.nf4").eval()
    f = dequantized_twin(q, tiny_checkpoint_dir).eval()
    prompts = [torch.tensor([5, 17, 42, 9]), torch.tensor([3, 8])]
    # one row with an Aligner (projected once for decoding), one bare
    outs = [generate(m, prompts, 12, aligners=[random_aligner(m.config, seed=2), None]) for m in (q, f)]
    assert [t.tolist() for t in outs[0]] == [t.tolist() for t in outs[1]]


def test_int8_base_is_close_to_the_float_base_and_passes_gradients(tiny_checkpoint_dir):
    q = load_model(tiny_checkpoint_dir, "cpu", torch.float32, quantize="bnb.int8")
    f = load_model(tiny_checkpoint_dir, "cpu", torch.float32)
    assert q.layers[0].attn.wqkv.weight.dtype == torch.int8
    idx = torch.randint(0, q.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    a = random_aligner(q.config)
    a.requires_grad_(True)
    out = q(idx, aligner=a)
    with torch.no_grad():
        ref = f(idx, aligner=a)
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.02  # LLM.int8: rows to 8 bits, computed in fp16
    out.logsumexp(-1).mean().backward()
    assert a.prefix.grad.abs().sum() > 0 and a.gate.grad.abs().sum() > 0


def test_quantized_bytes_are_what_each_format_stores(tiny_checkpoint_dir):
    f = load_model(tiny_checkpoint_dir, "cpu", torch.float32)
    linears = [m for m in f.layers.modules() if type(m) is torch.nn.Linear]
    numel = sum(m.weight.numel() for m in linears)
    rows = sum(m.weight.shape[0] for m in linears)
    nf4 = quantized_bytes(load_model(tiny_checkpoint_dir, "cpu", torch.float32, quantize="bnb.nf4"))
    code = 16 * 4 * len(linears)  # each layer's 16 fp32 NF4 levels
    assert nf4 == numel // 2 + (numel // 64) * 4 + code  # 4 bits a number + one fp32 absmax per block of 64
    dq = quantized_bytes(load_model(tiny_checkpoint_dir, "cpu", torch.float32, quantize="bnb.nf4-dq"))
    # the absmaxes in 8 bits, with per layer their own fp32 absmax per 256, offset and 256-entry code book: 1 KiB a
    # layer, which pays off above ~22k numbers a layer (SmolLM2's have 221k to 885k), not on this tiny model
    nested = sum(-(-(m.weight.numel() // 64) // 256) * 4 + 256 * 4 + 4 for m in linears)
    assert dq == numel // 2 + numel // 64 + code + nested
    int8 = quantized_bytes(load_model(tiny_checkpoint_dir, "cpu", torch.float32, quantize="bnb.int8"))
    assert int8 == numel + rows * 4  # a byte a number + one fp32 scale per row
    assert quantized_bytes(f) == 0


def test_an_eval_pass_without_grad_does_not_stop_the_prefix_gradient(tiny_checkpoint_dir):
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first eval-mode no-grad call and then
    # computes it without autograd; a validation pass must not do that to training (lit_aligner.quantize turns the
    # repack off). On other CPUs this passes either way.
    q = load_model(tiny_checkpoint_dir, "cpu", torch.float32, quantize="bnb.nf4").eval()
    idx = torch.randint(0, q.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    a = random_aligner(q.config)
    a.requires_grad_(True)
    q(idx, aligner=a).logsumexp(-1).mean().backward()
    before = a.prefix.grad.clone()
    with torch.no_grad():
        q(idx, aligner=a)
    a.prefix.grad = None
    q(idx, aligner=a).logsumexp(-1).mean().backward()
    assert a.prefix.grad is not None
    torch.testing.assert_close(a.prefix.grad, before)


def test_training_on_a_4bit_base_learns_and_its_aligner_runs_on_the_float_base(tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "q"
    summary = T.train(dataclasses.replace(test_train.small_run(tiny_checkpoint_dir, out), quantize="bnb.nf4-dq"))
    assert summary["val_loss"] < summary["first_val_loss"] - 0.2, summary
    a, meta = load_aligner(out / "aligner.safetensors")
    assert a.gate.abs().sum() > 0 and torch.isfinite(a.prefix).all()
    assert json.loads(meta["training_args"])["quantize"] == "bnb.nf4-dq"
    f = load_model(tiny_checkpoint_dir, "cpu", torch.float32)  # same shapes: the file loads on the unquantized base
    load_aligner(out / "aligner.safetensors", f)
    # resuming under another --quantize trains another model: refused like any changed flag
    with pytest.raises(UserError, match="quantize"):
        T.train(dataclasses.replace(test_train.small_run(tiny_checkpoint_dir, out, max_steps=10), resume="auto"))


def test_bad_quantize_combinations_are_one_error_before_anything_loads(tiny_checkpoint_dir, tmp_path, monkeypatch):
    run = test_train.small_run(tiny_checkpoint_dir, tmp_path / "o")
    with pytest.raises(UserError, match="--strategy fsdp"):
        dataclasses.replace(run, quantize="bnb.nf4", strategy="fsdp").check()
    with pytest.raises(UserError, match="--precision bf16-mixed"):
        dataclasses.replace(run, quantize="bnb.nf4", precision="bf16-mixed").check()
    with pytest.raises(UserError, match="must be one of none, bnb.nf4"):
        load_model(tiny_checkpoint_dir, "cpu", quantize="nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install -e '\.\[quantize\]'"):
        dataclasses.replace(run, quantize="bnb.nf4").check()
    r = run_script("generate/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--no-aligner", "--prompt", "hi",
                   "--quantize", "nf4")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "bnb.nf4" in r.stderr, r.stderr


def test_the_clis_and_the_server_take_quantize(tiny_checkpoint_dir, tmp_path):
    import openai

    from lit_aligner.aligner_files import save_aligner
    from lit_aligner.serving.process import ServerProcess

    (tmp_path / "served").mkdir()
    aligner = tmp_path / "served" / "a.safetensors"
    save_aligner(random_aligner(load_model(tiny_checkpoint_dir).config, scale=3.0), aligner, "tiny-chat")
    answers = tmp_path / "answers.jsonl"
    r = run_script("generate/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--aligner", aligner,
                   "--no-aligner", "--prompt", "What is 2 and 2?", "--max-new-tokens", "6", "--quantize", "bnb.nf4",
                   "--out", answers)
    assert r.returncode == 0, r.stderr
    rows = {row["aligner"]: row["output"] for row in map(json.loads, answers.read_text().splitlines())}
    assert len(rows) == 2 and rows[str(aligner)] != rows[None]  # the Aligner changes the answer
    # the server on the same 4-bit base gives the same greedy answer
    args = ["--checkpoint-dir", str(tiny_checkpoint_dir), "--aligners-dir", str(tmp_path / "served"),
            "--quantize", "bnb.nf4"]
    with ServerProcess(args) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "What is 2 and 2?"}],
                                               max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == rows[str(aligner)]
    losses = {}
    for mode in ("none", "bnb.nf4"):
        r = run_script("evaluate/aligner.py", "loss", "--checkpoint-dir", tiny_checkpoint_dir, "--n", "16",
                       "--quantize", mode)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["quantize"] == mode
        losses[mode] = result["results"][0]["loss"]
    assert losses["none"] != losses["bnb.nf4"] and losses["bnb.nf4"] == pytest.approx(losses["none"], rel=0.1)
