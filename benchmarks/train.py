"""Training-step throughput of an Aligner on a frozen base: tokens/s, peak memory and model FLOPs utilisation.

Random base weights (speed does not depend on them) of a named config, built on the target device in the target dtype;
random token batches of --batch rows x --seq-len tokens, the first quarter of each row is prompt (no loss). One row of
the results table per (mode, checkpointing policy). Warm-up steps are excluded; the median timed step is reported.
Then, in the same run, the peer a user would pick instead: for SFT, PEFT LoRA r=8 (q, v) and PEFT prefix tuning (10
virtual tokens) on a transformers model of the same shape and dtype, the same rows; for DPO, the same LoRA trained by
TRL's DPOTrainer on the same pairs; for SimPO (our DPO objective under `--loss simpo`: no reference pass), the same
LoRA trained by TRL's CPOTrainer with its SimPO loss; for KTO, on-policy distillation and GRPO, the same LoRA under
TRL's KTOTrainer, SDFTTrainer and GRPOTrainer (the sampled modes: the student writes 3/4 of each row). Each under
no checkpointing and under transformers' gradient checkpointing (the counterpart of `block`). With `--quantize` the
base's block weights are held in 4 or 8 bits (lit_aligner.quantize), and the SFT peer is then QLoRA: the same LoRA on
transformers' bitsandbytes model of the same mode, prepared by PEFT's `prepare_model_for_kbit_training` as a QLoRA user
does.

    python benchmarks/train.py --config tiny --batch 2 --seq-len 32 --steps 2     # seconds, on any CPU
    python benchmarks/train.py --config Llama-2-7b-hf --batch 8 --seq-len 512 \\
        --mode sft dpo --checkpointing none selective mlp block                   # the issue's H100 targets
    python benchmarks/train.py --mode dpo simpo --batch 8 --seq-len 256           # a reference pass against none
    python benchmarks/train.py --config SmolLM2-135M --mode grpo --batch 8 --num-generations 4 --seq-len 128
"""

import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (SIMPO_BETA, SIMPO_GAMMA, BenchmarkError, build_model, build_peer_model, check_out,  # noqa: E402
                    default_out, distill_rows, even_tokens, format_table, load_config, machine_info, median,
                    out_of_memory_hint, peer_lora_config, peer_prefix_tuning_config, peer_versions, pick_device,
                    pick_dtype, require, sync, timed, training_step, write_json, write_partial)

from lit_aligner.cli import run_cli  # noqa: E402
from lit_aligner.model import LLaMA  # noqa: E402
from lit_aligner.perf import (PEAK_MEMORY_METHOD, activation_bytes_per_token, configure_backends,  # noqa: E402
                              peak_memory_bytes, random_items, reset_peak_memory, should_compile,
                              train_flops_per_token)
from lit_aligner.quantize import (MODES as QUANTIZE_MODES, QuantizeName, import_bitsandbytes,  # noqa: E402
                                  quantize_blocks, weight_bytes)

SYSTEM = "Aligner (lit-aligner)"
LORA = "LoRA r=8 (PEFT)"  # the peer our SFT rows are compared with (`vs_lora`)
LORA_DPO = "LoRA r=8 (PEFT, TRL DPOTrainer)"  # and our DPO rows
LORA_SIMPO = "LoRA r=8 (PEFT, TRL CPOTrainer SimPO)"  # and our SimPO rows
LORA_KTO = "LoRA r=8 (PEFT, TRL KTOTrainer)"  # and our KTO rows
LORA_SDFT = "LoRA r=8 (PEFT, TRL SDFTTrainer)"  # and our on-policy distillation rows
LORA_GRPO = "LoRA r=8 (PEFT, TRL GRPOTrainer)"  # and our GRPO rows
PEERS = {  # mode -> the peer systems that train it: name -> PEFT config
    "sft": {LORA: peer_lora_config, "prefix tuning 10 (PEFT)": peer_prefix_tuning_config},
    "dpo": {LORA_DPO: peer_lora_config},
    "simpo": {LORA_SIMPO: peer_lora_config},
    "kto": {LORA_KTO: peer_lora_config},
    "distill": {LORA_SDFT: peer_lora_config},
    "grpo": {LORA_GRPO: peer_lora_config},
}
PAIRED = ("dpo", "simpo")  # modes whose rows are preference pairs (chosen + rejected)
TRL_MODES = (*PAIRED, "kto", "distill", "grpo")  # modes whose peer is a TRL trainer
SAMPLED = ("distill", "grpo")  # modes whose rows the student samples each step (mostly decoding: no FLOPs or MFU)
QLORA = "QLoRA r=8 (PEFT, bitsandbytes)"  # the peer of SFT on a quantized base: LoRA on transformers' quantized model
PEER_POLICIES = ("none", "block")  # transformers has no counterpart of selective or mlp
UNSUPPORTED = {("prefix tuning 10 (PEFT)", "block")}  # PEFT refuses prefix tuning with gradient checkpointing


def time_steps(step, warmup: int, steps: int, batch: int, seq_len: int, device: torch.device) -> Dict[str, Any]:
    """The median of `steps` timed calls of `step` after `warmup` untimed ones, and the peak memory over all."""
    times = []
    reset_peak_memory(device)
    for i in range(warmup + steps):
        with timed(device, times):
            loss = step()
    return timing_row(times, warmup, batch, seq_len, device, float(loss.detach()))


def timing_row(times, warmup: int, batch: int, seq_len: int, device: torch.device, loss: float) -> Dict[str, Any]:
    """A row's timing columns: the median step after `warmup`, tokens/s, and the peak memory since
    `reset_peak_memory`."""
    peak = peak_memory_bytes(device)
    # What nvidia-smi sees (tensors + the allocator's cache): the number to compare with a card's size.
    reserved = torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None
    step_s = median(times[warmup:])
    return {"batch": batch, "seq_len": seq_len, "step_s": step_s, "step_times_s": times, "warmup_steps": warmup,
            "tokens_per_s": batch * seq_len / step_s, "peak_memory_gb": peak / 1e9, "peak_reserved_gb": reserved,
            "loss": loss}


def run_one(model: LLaMA, config, mode: str, policy: str, batch: int, seq_len: int, n_tokens: int, start_layer: int,
            chunked: bool, warmup: int, steps: int, device: torch.device, peak_tflops: Optional[float],
            compiled: bool, num_generations: int = 4) -> Dict[str, Any]:
    """One row: the median step of `mode`'s objective on `batch` random rows, under checkpointing `policy`."""
    step = training_step(model, mode, policy, batch, seq_len, 1024 if chunked else 0, device, compiled,
                         num_generations)
    r = time_steps(step, warmup, steps, batch, seq_len, device)
    if hasattr(step, "reward"):  # GRPO: the last step's mean reward
        r["reward"] = step.reward
    # (sampled rows' steps are mostly decoding, whose cost is memory traffic: no FLOPs or MFU for them)
    flops = train_flops_per_token(config, seq_len, n_tokens, start_layer, mode, batch).total \
        if mode not in SAMPLED else None
    achieved = flops * r["tokens_per_s"] if flops else None
    return {"system": SYSTEM, "mode": mode, "checkpointing": policy, "quantize": model.quantize or "none", **r,
            "weights_gb": weight_bytes(model) / 1e9, "flops_per_token": flops,
            "achieved_tflops": achieved / 1e12 if achieved else None,
            "mfu": achieved / (peak_tflops * 1e12) if peak_tflops and achieved else None,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def peer_model(config, system: str, mode: str, policy: str, device: torch.device, dtype: torch.dtype,
               compiled: bool, checkpointing: bool = True, quantize: str = "none"):
    """PEFT's `system` on a transformers model of the same shape as ours (random weights, built on the device in the
    dtype); `block` is transformers' gradient checkpointing of every decoder layer (unless the trainer turns it on
    itself: `checkpointing` False). With `compiled` (when ours is), every decoder layer is compiled in place as ours
    are (`nn.Module.compile`). `quantize`: a bitsandbytes mode, loaded as transformers does (QLoRA)."""
    import peft

    if quantize != "none":
        model = quantized_peer_model(config, device, dtype, quantize)
        # QLoRA's recipe: norms and embeddings in fp32, input gradients on, and its own gradient checkpointing
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=policy == "block" and checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = build_peer_model(config, device, dtype)
    # transformers 5.24 renamed it; the older name still works, with a warning
    if policy == "block" and checkpointing and quantize == "none":
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, (peer_lora_config if system == QLORA else PEERS[mode][system])()).train()
    if compiled:
        for layer in model.get_base_model().model.layers:
            layer.compile()
    return model


def quantized_peer_model(config, device: torch.device, dtype: torch.dtype, quantize: str):
    """The peer's random-weight model quantized by transformers' bitsandbytes integration (it quantizes while loading,
    so the model is written to a temporary folder and loaded back with a BitsAndBytesConfig of the same mode)."""
    import transformers

    kind, quant_type, double = QUANTIZE_MODES[quantize]
    q = transformers.BitsAndBytesConfig(load_in_8bit=True) if kind == "8bit" else transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        build_peer_model(config, torch.device("cpu"), dtype).save_pretrained(tmp)
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, quantization_config=q,
                                                                 device_map={"": device})


def run_peer(config, system: str, mode: str, policy: str, batch: int, seq_len: int, warmup: int, steps: int,
             device: torch.device, dtype: torch.dtype, compiled: bool, quantize: str = "none",
             num_generations: int = 4) -> Dict[str, Any]:
    """One row of the peer: `system` trained on `mode`'s objective on the same rows as ours."""
    if mode in TRL_MODES:
        return run_trl_peer(config, system, mode, policy, batch, seq_len, warmup, steps, device, dtype, compiled,
                            num_generations)
    model = peer_model(config, system, mode, policy, device, dtype, compiled, quantize=quantize)
    # An SFT step as a PEFT user runs it: the model's own loss over full logits, AdamW; the rows of `training_step`
    g = torch.Generator().manual_seed(0)
    items = random_items("sft", config.vocab_size, batch, seq_len, g)
    ids = torch.stack([torch.cat([i["prompt"], i["response"]]) for i in items]).to(device)
    labels = ids.clone()
    labels[:, :len(items[0]["prompt"])] = -100  # the prompt carries no loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    r = time_steps(step, warmup, steps, batch, seq_len, device)
    return {"system": system, "mode": "sft", "checkpointing": policy, "quantize": quantize, **r,
            "weights_gb": model.get_memory_footprint() / 1e9, "compile": compiled,
            "trainable_params": sum(p.numel() for p in params)}


def word_tokenizer(vocab_size: int):
    """A tokenizer whose text is the token ids themselves ("t17 t3 ..." -> [17, 3]), so that TRL, which tokenizes
    its own dataset, trains on exactly our random rows; the last id is its end-of-sequence token."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{vocab_size - 1}", pad_token="t0")


def run_trl_peer(config, system: str, mode: str, policy: str, batch: int, seq_len: int, warmup: int, steps: int,
                  device: torch.device, dtype: torch.dtype, compiled: bool, num_generations: int = 4
                  ) -> Dict[str, Any]:
    """The DPO peer: PEFT's LoRA trained by TRL's DPOTrainer as a TRL user runs it (its dataset preparation,
    collator, loss with beta 0.1 and training loop; the reference is the same base with the adapter disabled, as ours is
    the bare base through the same weights); the SimPO peer: the same LoRA trained by TRL's CPOTrainer with
    loss_type simpo and no NLL term (cpo_alpha 0), as TRL documents SimPO, with no reference; the KTO peer: the same
    LoRA trained by TRL's KTOTrainer (beta 0.1, its mismatched KL rows, the reference the base without the adapter);
    the on-policy distillation peer: the same LoRA trained by TRL's SDFTTrainer (experimental), the teacher the base
    without the adapter reading the context in front of the prompt, one sample per prompt from transformers'
    `generate` (temperature 1, exactly as many tokens as ours: no stop before the last), the full-vocabulary forward KL
    (`distillation_mode="full_logits"`, alpha 0, our --beta 0), on `distill_rows`; the GRPO peer: the same LoRA
    trained by TRL's GRPOTrainer, batch / num_generations prompts a step each answered num_generations times by
    transformers' `generate` (temperature 1, no top-k, exactly as many tokens as ours), rewarded by `even_tokens`,
    loss_type "grpo" (ours: each answer's mean over its tokens), beta 0 (no reference; both defaults), rewards scaled
    within each group (both defaults), one optimizer step per generation (num_iterations 1).
    Each other mode on the rows of `training_step` (batch / 2 pairs a step, or batch labelled completions for KTO, each
    completion ending in the end-of-sequence token so that TRL adds none), weights and activations in `dtype` (no
    autocast, like ours). A step is timed from the Trainer's step-begin to its step-end callback: forward, backward,
    TRL's metrics and AdamW; not data loading or logging. Compiled, it gets at least 2 warm-up steps: the reference
    pass switches PEFT's adapter off and on, which the compiled layers first see as a guard failure on the second step
    (and recompile)."""
    import datasets
    import transformers
    import trl

    if mode == "distill":
        from trl.experimental.sdft import SDFTConfig as Config, SDFTTrainer as Trainer
        q = seq_len // 4
        loss_args = dict(num_generations=1, max_completion_length=seq_len - q, max_prompt_length=None,
                         temperature=1.0, generation_kwargs={"min_new_tokens": seq_len - q},
                         teacher_model_kind="base", teacher_prompt_template="{privileged_context} {prompt}",
                         distillation_mode="full_logits", distillation_alpha=0.0)
    elif mode == "grpo":
        Config, Trainer = trl.GRPOConfig, trl.GRPOTrainer
        q = seq_len // 4
        loss_args = dict(num_generations=num_generations, max_completion_length=seq_len - q, temperature=1.0, top_k=0,
                         generation_kwargs={"min_new_tokens": seq_len - q}, loss_type="grpo", beta=0.0,
                         scale_rewards="group", num_iterations=1)
    elif mode == "simpo":
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
        loss_args = dict(loss_type="simpo", cpo_alpha=0.0, beta=SIMPO_BETA, simpo_gamma=SIMPO_GAMMA,
                         max_length=seq_len)  # (its default, 1024, would cut a longer --seq-len)
    elif mode == "kto":
        Config, Trainer, loss_args = trl.KTOConfig, trl.KTOTrainer, dict(beta=0.1, max_length=None)
    else:
        Config, Trainer, loss_args = trl.DPOConfig, trl.DPOTrainer, dict(beta=0.1, max_length=None)

    vocab = config.vocab_size
    warmup = max(warmup, 2) if compiled else warmup
    items = [] if mode in SAMPLED else random_items("unpaired" if mode == "kto" else "preference", vocab, batch,
                                                      seq_len, torch.Generator().manual_seed(0))

    def text(ids: torch.Tensor, end: bool = False) -> str:
        ids = ids.tolist()
        return " ".join(f"t{i}" for i in (ids[:-1] + [vocab - 1] if end else ids))

    if mode == "distill":
        rows = [{"prompt": text(r["prompt"]), "privileged_context": text(r["context"])}
                for r in distill_rows(vocab, batch, seq_len)]
    elif mode == "grpo":  # the prompts of `grpo_step` (TRL repeats each num_generations times)
        rows = [{"prompt": text(p)} for p in torch.randint(0, vocab, (batch // num_generations, seq_len // 4),
                                                         generator=torch.Generator().manual_seed(0))]
    elif mode == "kto":
        rows = [{"prompt": text(i["prompt"]), "completion": " " + text(i["completion"], True),
                 "label": bool(i["label"])} for i in items]
    else:
        rows = [{"prompt": text(i["prompt"]), "chosen": " " + text(i["chosen"], True),
                 "rejected": " " + text(i["rejected"], True)} for i in items]
    dataset = datasets.Dataset.from_list(rows * (warmup + steps))  # ours, in the Trainer's order (all one length)
    times = []

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            reset_peak_memory(device)

        def on_step_begin(self, *args, **kwargs):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            sync(device)
            times.append(time.perf_counter() - self.t0)

    # TRL defaults to bf16 autocast and gradient checkpointing; the run sets both. transformers 5 renamed the latter.
    names = {f.name for f in dataclasses.fields(Config)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, read by TRL and PEFT
        args = Config(
            output_dir=out_dir, per_device_train_batch_size=batch // 2 if mode in PAIRED else batch,
            max_steps=warmup + steps, learning_rate=1e-4,
            lr_scheduler_type="constant", **loss_args, bf16=False, fp16=False, seed=0,
            use_cpu=device.type == "cpu", logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
            **{ckpt: policy == "block", f"{ckpt}_kwargs": {"use_reentrant": False}})
        if mode == "distill":  # the bare model and the LoRA config, as SDFT's documentation has it (TRL wraps it)
            model, peft_args = build_peer_model(config, device, dtype), dict(peft_config=peer_lora_config())
            for layer in model.model.layers if compiled else ():
                layer.compile()
        else:
            model, peft_args = peer_model(config, system, mode, policy, device, dtype, compiled, False), {}
        if mode == "grpo":
            peft_args["reward_funcs"] = [even_tokens]
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # "new PAD/BOS/EOS tokens": the word tokenizer's, on purpose
        datasets.disable_progress_bars()
        try:
            trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=word_tokenizer(
                vocab), callbacks=[StepTimer()], **peft_args)
            model = trainer.model
            where = trainer.args.device
            if (where.type, where.index or 0) != (device.type, device.index or 0) or trainer.args.n_gpu > 1:
                raise BenchmarkError(f"TRL's Trainer runs on {where} ({trainer.args.n_gpu} GPUs), not on {device} "
                                     "alone: make it the only visible device (CUDA_VISIBLE_DEVICES) or use --no-peer")
            trainer.remove_callback(transformers.PrinterCallback)  # a line per step; the losses stay in its state
            trainer.train()
        finally:
            transformers.logging.set_verbosity(verbosity)
            datasets.enable_progress_bars()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if mode in SAMPLED and any(h["completions/min_length"] != seq_len - seq_len // 4 for h in logs):
        raise RuntimeError(f"TRL sampled completions shorter than our {seq_len - seq_len // 4} tokens")
    if logs[0].get("num_tokens", batch * seq_len) != batch * seq_len:  # tokens/s below assumes ours
        raise RuntimeError(f"TRL trained on {logs[0]['num_tokens']} tokens a step, not our {batch} x {seq_len}")
    return {"system": system, "mode": mode, "checkpointing": policy, "quantize": "none",
            **timing_row(times, warmup, batch, seq_len, device, float(logs[-1]["loss"])),
            "weights_gb": model.get_memory_footprint() / 1e9,
            "first_loss": float(logs[0]["loss"]), "compile": compiled,
            **({"reward": float(logs[-1]["reward"])} if mode == "grpo" else {}),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main(
    config: str = "tiny",
    batch: int = 2,
    seq_len: int = 64,
    n_tokens: int = 10,
    start_layer: int = 2,
    mode: Tuple[Literal["sft", "dpo", "simpo", "kto", "distill", "grpo"], ...] = ("sft",),
    num_generations: int = 4,
    checkpointing: Tuple[Literal["none", "selective", "mlp", "block"], ...] = ("none",),
    quantize: Tuple[QuantizeName, ...] = ("none",),
    loss: Literal["chunked", "plain"] = "chunked",
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: Optional[bool] = None,
    warmup: int = 1,
    steps: int = 3,
    device: str = "auto",
    peak_tflops: Optional[float] = None,
    threads: Optional[int] = None,
    n_layer: Optional[int] = None,
    peer: bool = True,
    out: Optional[Path] = None,
    force: bool = False,
) -> Dict[str, Any]:
    """Training-step throughput (tokens/s), peak memory and MFU of an Aligner on a frozen random-weight base.

    Args:
        config: named model shape (lit_aligner.config), e.g. tiny, SmolLM2-135M, Llama-2-7b-hf.
        batch: rows per step (sequences). DPO and SimPO use batch / 2 pairs (chosen + rejected rows), so `--batch 16
            --mode sft dpo` compares SFT-16 with DPO on 8 pairs.
        seq_len: tokens per row (the first quarter is prompt, without loss).
        n_tokens: Aligner prefix tokens N.
        start_layer: first gated layer.
        mode: one or more of sft, dpo (DPO: policy forward + backward and a no-grad reference forward of the bare base),
            simpo (the DPO objective under --loss simpo: no reference forward), kto (batch labelled completions:
            the policy forward + backward, and no-grad forwards of the reference on them and on as many mismatched
            rows, and of the policy on the mismatched rows; tokens counted on the completions' rows), distill
            (on-policy context distillation, `finetune/aligner_distill.py --lmbda 1`: the student samples the last
            3/4 of each row after its prompt, then a no-grad teacher pass (the bare base, a context of seq_len / 4
            more tokens in front of the prompt) and the student's forward + backward on it; tokens counted on the
            student's rows), grpo (GRPO, `finetune/aligner_grpo.py`'s objective: batch / --num-generations prompts of
            seq_len / 4 tokens, each answered --num-generations times by the student (3/4 of the row, sampled), the
            answers rewarded, then the student's forward + backward on them; beta 0, no reference pass).
        num_generations: GRPO's answers per prompt (the group); --batch must be a multiple of it.
        checkpointing: one or more activation-checkpointing policies (lit_aligner.perf.apply_activation_checkpointing).
        quantize: one or more base weight formats: none (the precision's dtype) and the bitsandbytes modes of the
            trainers' --quantize (bnb.nf4, ...); a quantized base's SFT peer is QLoRA (PEFT LoRA r=8 on transformers'
            bitsandbytes model of the same mode), its DPO rows have none.
        loss: chunked (LM head + CE a chunk at a time, lit_aligner.losses) or plain (full (B, T, vocab) logits).
        precision: 32-true, bf16-true or 16-true weights and activations (default: bf16-true on CUDA, 32-true on CPU).
        compile: torch.compile every block (default: on CUDA only).
        warmup: untimed steps first (compilation, allocator warm-up).
        steps: timed steps; the median is reported.
        device: auto (CUDA if available), cpu, cuda, cuda:1, ...
        peak_tflops: the device's dense peak for MFU (H100 SXM bf16: 989; default 989 on CUDA, none on the CPU).
        threads: torch CPU threads (default: torch's choice).
        n_layer: keep only this many layers of the config (per-layer figures such as the activation bytes of a 7B
            shape on a small machine; tokens/s and MFU then describe the truncated model).
        peer: also time the peer in the same run (transformers, PEFT and TRL: the `eval` extra) under `none` and
            `block`: for SFT, PEFT LoRA r=8 on q and v and PEFT prefix tuning (10 virtual tokens); for DPO, that LoRA
            trained by TRL's DPOTrainer; for SimPO, by TRL's CPOTrainer; for KTO, by TRL's KTOTrainer; for distill,
            by TRL's SDFTTrainer (experimental; the base without the adapter is the teacher); for grpo, by TRL's
            GRPOTrainer; its decoder layers compiled when ours are;
            --no-peer skips it.
        out: JSON results file (default:
            benchmarks/results/train-<config>[-L<n_layer>]-b<batch>-t<seq_len>-<machine>.json).
        force: replace an existing results file.
    """
    if batch < 1 or seq_len < 2 or warmup < 0 or steps < 1:
        raise BenchmarkError("--batch >= 1, --seq-len >= 2, --warmup >= 0 and --steps >= 1 are required")
    paired = [m for m in mode if m in PAIRED]
    if paired and batch % 2:
        raise BenchmarkError(f"--mode {paired[0]} needs an even --batch (chosen + rejected rows), got {batch}")
    if "kto" in mode and batch < 2:
        raise BenchmarkError(f"--mode kto needs --batch 2 or more (its KL estimate reads the other rows), got {batch}")
    if "grpo" in mode and (num_generations < 2 or batch % num_generations):
        raise BenchmarkError(f"--mode grpo needs --num-generations 2 or more and a --batch that is a multiple of it "
                             f"(batch / num_generations prompts a step), got --batch {batch} --num-generations "
                             f"{num_generations}")
    trl_modes = [m for m in mode if m in TRL_MODES]
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    dtype = pick_dtype(precision, dev)
    cfg = load_config(config)
    if n_layer is not None:
        if n_layer < 1:
            raise BenchmarkError(f"--n-layer must be >= 1, got {n_layer}")
        cfg = dataclasses.replace(cfg, n_layer=n_layer)
    if not 0 <= start_layer < cfg.n_layer:
        raise BenchmarkError(f"--start-layer must be in [0, {cfg.n_layer}) for {config}, got {start_layer}")
    if seq_len > cfg.block_size:
        raise BenchmarkError(f"--seq-len {seq_len} exceeds {config}'s context of {cfg.block_size} tokens")
    if peak_tflops is None and dev.type == "cuda":
        peak_tflops = 989.0
    peer_policies = [p for p in checkpointing if p in PEER_POLICIES] if peer else []
    if peer and not peer_policies:
        print("note: no peer rows: the peer (PEFT, TRL) runs under --checkpointing none or block", file=sys.stderr)
    if peer_policies:
        require("transformers", "peft", *(["trl"] if trl_modes else []), extra="eval", or_flag="--no-peer")
    if not quantize:
        raise BenchmarkError(f"--quantize needs at least one base format: none, {', '.join(QUANTIZE_MODES)}")
    quantized = [q for q in dict.fromkeys(quantize) if q != "none"]
    if quantized:
        import_bitsandbytes()  # (quietly: see lit_aligner.quantize)
    layers = f"-L{n_layer}" if n_layer is not None else ""
    path = check_out(out or default_out("train", f"{config}{layers}-b{batch}-t{seq_len}", dev), force)
    configure_backends(dev)
    compiled = should_compile(dev, compile)
    rows = []
    payload = {
        "benchmark": "train", "config": config, "n_layer": cfg.n_layer, "n_tokens": n_tokens,
        "start_layer": start_layer, "num_generations": num_generations if "grpo" in mode else None,
        "precision": str(dtype), "loss": loss, "compile": compiled, "peak_tflops": peak_tflops,
        "peak_memory_method": PEAK_MEMORY_METHOD[dev.type],
        "peers": ([s for m in mode for s in PEERS[m]] if "none" in quantize else [])
        + ([QLORA] if quantized and "sft" in mode else []) if peer_policies else [],
        "peer_versions": peer_versions(trl=bool(trl_modes)) if peer_policies else None,
        "complete": False,
        "activation_bytes_per_token_per_gated_layer": {}, "machine": machine_info(dev), "results": rows,
    }
    with out_of_memory_hint("lower --batch or --seq-len, or add --checkpointing selective / block"):
        for q in dict.fromkeys(quantize):
            model = None  # the previous format's model goes before the next one is built
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            model = build_model(cfg, dev, dtype, n_tokens, start_layer)
            if q != "none":
                quantize_blocks(model, q, dev, dtype)
            for m in mode:
                for policy in checkpointing:
                    r = run_one(model, cfg, m, policy, batch, seq_len, n_tokens, start_layer, loss == "chunked",
                                warmup, steps, dev, peak_tflops, compiled, num_generations)
                    rows.append(r)
                    print(f"{m} {policy} {q}: {r['tokens_per_s']:,.1f} tokens/s, step {r['step_s']:.3f} s, peak "
                          f"{r['peak_memory_gb']:.1f} GB", file=sys.stderr)
                    write_partial(path, payload)
        # What each policy trades: bytes per token and gated layer that autograd keeps (measured eagerly, batch 1).
        if cfg.n_layer - start_layer >= 2:
            payload["activation_bytes_per_token_per_gated_layer"] = {
                p: activation_bytes_per_token(model, p, seq_len=seq_len) for p in checkpointing}
    if peer_policies:
        del model  # the peer's own copy of the weights takes its place (on CUDA the peak then counts the peer's alone)
        if dev.type == "cuda":
            torch._dynamo.reset()  # compiled blocks' caches could keep the model alive
            torch.cuda.empty_cache()
        with out_of_memory_hint("lower --batch or --seq-len, or --no-peer"):
            runs = [(m, p, "none", s) for m in mode for p in peer_policies for s in PEERS[m]] if "none" in quantize \
                else []
            runs += [(m, p, q, QLORA) for q in quantized for m in mode if m == "sft" for p in peer_policies]
            for m, policy, q, system in runs:
                if (system, policy) in UNSUPPORTED:
                    continue
                try:
                    r = run_peer(cfg, system, m, policy, batch, seq_len, warmup, steps, dev, dtype, compiled,
                                 quantize=q, num_generations=num_generations)
                except Exception as e:  # the peer failing to compile must not cost the run its eager figure
                    if not compiled or isinstance(e, BenchmarkError):
                        raise
                    error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    print(f"warning: {system} did not compile ({error}); timing it eager", file=sys.stderr)
                    torch._dynamo.reset()
                    r = {**run_peer(cfg, system, m, policy, batch, seq_len, warmup, steps, dev, dtype, False,
                                    quantize=q, num_generations=num_generations),
                         "compile_error": error}
                rows.append(r)
                print(f"{system} {m} {policy} {q}: {r['tokens_per_s']:,.1f} tokens/s, step {r['step_s']:.3f} s, peak "
                      f"{r['peak_memory_gb']:.1f} GB", file=sys.stderr)
                write_partial(path, payload)
        lora = {(r["mode"], r["checkpointing"], r["quantize"]): r["tokens_per_s"] for r in rows
                if r["system"] in (LORA, LORA_DPO, LORA_SIMPO, LORA_KTO, LORA_SDFT, LORA_GRPO, QLORA)}
        for r in rows:
            key = (r["mode"], r["checkpointing"], r["quantize"])
            if r["system"] == SYSTEM and key in lora:
                r["vs_lora"] = r["tokens_per_s"] / lora[key]
    sync(dev)
    columns = ["system", "mode", "checkpointing", "quantize", "trainable_params", "tokens_per_s", "vs_lora",
               "step_s", "weights_gb", "peak_memory_gb", "achieved_tflops", "mfu"]
    print(f"{config} ({cfg.n_layer} layers): batch {batch} x seq {seq_len}, N={n_tokens}, start_layer={start_layer}, "
          f"{dtype}, loss {loss}, compile {compiled}, device {dev}")
    print(format_table(rows, columns))
    payload["complete"] = True
    print(f"wrote {write_json(path, payload)}")
    return payload


if __name__ == "__main__":
    run_cli(main)
