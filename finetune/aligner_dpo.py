"""Train a global-token Aligner with DPO on preference pairs, with ONE copy of the base model in memory: the policy is
the base + the trainable Aligner, the reference is the same base with a frozen reference Aligner (or none).

    python finetune/aligner_dpo.py --data ../shared/data/hh-rlhf/harmless_base_2000.jsonl --skip-bad-rows
    python finetune/aligner_dpo.py --data pku.jsonl --preference safer --init-aligner out/aligner/x/aligner.safetensors
    python finetune/aligner_dpo.py --eval-only --init-aligner OUT/aligner.safetensors --data pairs.jsonl

See howto/dpo.md (every flag, LLaMA-2-7B with a paper checkpoint, measured figures).
"""

import json
import sys
from pathlib import Path
from typing import Literal, Optional

from lit_aligner.cli import run_cli
from lit_aligner.dpo import DPOConfig, DPORunConfig, run_dpo
from lit_aligner.train import DEFAULT_CHECKPOINT, TrainConfig


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    data: Optional[Path] = None,
    format: Literal["auto", "pku", "hh", "pairs", "qac"] = "auto",
    preference: Literal["safer", "better"] = "safer",
    template: Optional[str] = None,
    val_fraction: float = 0.05,
    out_dir: Optional[Path] = None,
    init_aligner: Optional[Path] = None,
    reference_aligner: Optional[str] = None,
    beta: float = 0.1,
    loss: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
    precompute_reference: bool = False,
    eval_only: bool = False,
    n_tokens: int = 10,
    start_layer: int = 2,
    max_seq_length: int = 512,
    max_steps: int = 60,
    learning_rate: float = 5e-3,
    weight_decay: float = 0.02,
    global_batch_size: int = 8,
    micro_batch_size: int = 4,
    warmup_steps: int = 5,
    eval_interval: int = 20,
    eval_iters: int = 4,
    save_interval: int = 50,
    precision: Optional[str] = None,
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    resume: Optional[str] = None,
    seed: int = 42,
    skip_bad_rows: bool = False,
    progress: bool = True,
    json_summary: bool = False,
) -> None:
    """DPO-train an Aligner (only its prefix tokens and gates get gradients), or evaluate one with --eval-only. Writes
    OUT/aligner.safetensors, OUT/metrics.csv and OUT/checkpoints/.

    Args:
        checkpoint_dir: converted base model (scripts/convert_*.py); default: the embedded SmolLM2-135M-Instruct.
        data: preference pairs: a PKU-SafeRLHF, HH-RLHF ({chosen, rejected} dialogues), {prompt, chosen, rejected} or
            Q-A-C (chosen = correction) JSON/JSONL file, or a preference directory from scripts/prepare_pku.py,
            prepare_hh.py or prepare_json.py. None: the offline default pairs.
        format: the file's format; auto detects it from the first row's fields.
        preference: PKU-SafeRLHF only: which response is "chosen": safer (safer_response_id) or better.
        template: prompt template: alpaca, beaver, hh, chat, plain (default: chat when the tokenizer has a chat
            template, else alpaca). Stored in the Aligner's metadata.
        val_fraction: share of the pairs held out for validation (reward accuracy).
        out_dir: where the Aligner, metrics and checkpoints go (default out/aligner-dpo/<base>).
        init_aligner: start the policy from this Aligner: ours (.safetensors) or a paper checkpoint (.pth). Its N and
            start layer replace --n-tokens/--start-layer.
        reference_aligner: the frozen reference: an Aligner file (.safetensors/.pth), or "none" (the bare base).
            Default: a frozen copy of --init-aligner if given, else none.
        beta: DPO temperature beta (implicit reward = beta * (log pi - log ref), nats).
        loss: sigmoid (the DPO paper) or ipo.
        label_smoothing: sigmoid only: assumed share of flipped labels (conservative DPO), in [0, 0.5).
        precompute_reference: score every pair with the reference once before training (cached next to a prepared
            --data directory, else in OUT/reference_logprobs.safetensors) instead of a reference pass every step.
        eval_only: no training: evaluate --init-aligner (default: a zero-gate Aligner, i.e. the bare base) against the
            reference on the validation split of --data; prints the metrics as one JSON object on the last line.
        n_tokens: number of global prefix tokens N of a fresh Aligner (1..10 in the paper).
        start_layer: first layer that reads the prefix of a fresh Aligner (paper: 2).
        max_seq_length: pairs whose prompt + longer response is longer are dropped (counted in the data report).
        max_steps: optimizer steps (each one global batch of pairs).
        learning_rate: peak learning rate, after linear warm-up, cosine-decayed to 0.
        weight_decay: AdamW weight decay.
        global_batch_size: preference PAIRS per optimizer step over all devices (2x as many sequences).
        micro_batch_size: pairs per forward pass per device; gradients accumulate up to the global batch.
        warmup_steps: linear learning-rate warm-up steps.
        eval_interval: validation every this many steps (and at the first and last).
        eval_iters: validation micro-batches per evaluation (0: the whole validation split; also for --eval-only).
        save_interval: training checkpoint every this many steps (and at the end, and on SIGINT/SIGTERM).
        precision: Fabric precision (default bf16-true on a GPU, 32-true on the CPU).
        accelerator: auto, cpu, cuda/gpu.
        devices: devices (processes) per node.
        num_nodes: number of nodes.
        strategy: auto, ddp, or fsdp (shards a base model that does not fit one GPU).
        resume: a training checkpoint (.pt) or "auto" (the latest in OUT/checkpoints) to continue a stopped run.
        seed: seed of the prefix initialisation, the data order and the split.
        skip_bad_rows: skip malformed data rows (counted) instead of stopping at the first.
        progress: show a progress bar on stderr.
        json_summary: print the run summary as one JSON object on the last line of stdout.
    """
    train = TrainConfig(max_steps=max_steps, learning_rate=learning_rate, weight_decay=weight_decay,
                        global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                        warmup_steps=warmup_steps, eval_interval=eval_interval, eval_iters=eval_iters,
                        save_interval=save_interval, seed=seed)
    cfg = DPORunConfig(checkpoint_dir=checkpoint_dir, data=data, template=template, format=format,
                       preference=preference, val_fraction=val_fraction, out_dir=out_dir, init_aligner=init_aligner,
                       reference_aligner=reference_aligner, precompute_reference=precompute_reference,
                       eval_only=eval_only, n_tokens=n_tokens, start_layer=start_layer, max_seq_length=max_seq_length,
                       precision=precision, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                       strategy=strategy, resume=resume, skip_bad_rows=skip_bad_rows, progress=progress,
                       dpo=DPOConfig(beta=beta, loss=loss, label_smoothing=label_smoothing), train=train)
    summary = run_dpo(cfg)
    if eval_only or json_summary:
        print(json.dumps(summary, default=str))
    if summary.get("stopped"):
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
