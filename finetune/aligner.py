"""Train a global-token Aligner (N learnable prefix tokens + per-layer gates) on a frozen base model.

    python finetune/aligner.py                                   # the offline default dataset on SmolLM2-135M
    python finetune/aligner.py --data data/alpaca --checkpoint-dir checkpoints/Llama-2-7b-hf
    python finetune/aligner.py --mode correct --data ../shared/data/hh-rlhf/harmless_base_2000.jsonl --skip-bad-rows

See howto/finetune.md (every flag) and howto/correction.md (--mode correct).
"""

import json
import sys
from pathlib import Path
from typing import Literal, Optional


from lit_aligner.train import DEFAULT_CHECKPOINT, RunConfig, TrainConfig, run
from lit_aligner.cli import run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    data: Optional[Path] = None,
    template: Optional[str] = None,
    out_dir: Optional[Path] = None,
    mode: Literal["sft", "correct"] = "sft",
    warmup_copy_ratio: float = 0.2,
    n_tokens: int = 10,
    start_layer: int = 2,
    max_seq_length: int = 512,
    max_steps: int = 60,
    learning_rate: float = 9e-3,
    weight_decay: float = 0.02,
    global_batch_size: int = 16,
    micro_batch_size: int = 8,
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
    compile: bool = False,
    activation_checkpointing: Literal["none", "selective", "mlp", "block"] = "none",
    compare: Optional[bool] = None,
    compare_prompts: int = 32,
    progress: bool = True,
    json_summary: bool = False,
) -> None:
    """Train an Aligner; only the prefix tokens and the gates receive gradients. Writes OUT/aligner.safetensors,
    OUT/metrics.csv and OUT/checkpoints/.

    Args:
        checkpoint_dir: converted base model (scripts/convert_*.py); default: the embedded SmolLM2-135M-Instruct.
        data: a prepared dataset directory (scripts/prepare_*.py) or a raw JSON/JSONL file (Alpaca, PKU-SafeRLHF,
            HH-RLHF, {prompt,response}, Q-A-C or any preference file in --mode correct), prepared on the fly.
            None: the offline default dataset (a response format the base model does not follow).
        template: prompt template for raw data: alpaca, beaver, hh, chat, plain (default: chat when the tokenizer
            has a chat template, else alpaca; correction in --mode correct). Stored in the Aligner's metadata.
        out_dir: where the Aligner, metrics and checkpoints go (default out/aligner/<base>[-correct]).
        mode: sft (instruction tuning) or correct (Q-A-C correction with an identity warm-up).
        warmup_copy_ratio: --mode correct: share of the steps trained on Q-A-A (copy) before Q-A-C (paper: 0.2).
        n_tokens: number of global prefix tokens N (1..10 in the paper).
        start_layer: first layer that reads the prefix (paper: 2).
        max_seq_length: longer rows are truncated (response end) or dropped, as counted in the data report.
        max_steps: optimizer steps (each one global batch).
        learning_rate: peak learning rate (paper: 9e-3), after linear warm-up, cosine-decayed to 0.
        weight_decay: AdamW weight decay (paper: 0.02).
        global_batch_size: sequences per optimizer step over all devices (paper: 64).
        micro_batch_size: sequences per forward pass per device; gradients accumulate up to the global batch.
        warmup_steps: linear learning-rate warm-up steps.
        eval_interval: validation every this many steps (and at the first and last).
        eval_iters: validation micro-batches per evaluation (0: the whole validation split).
        save_interval: training checkpoint every this many steps (and at the end, and on SIGINT/SIGTERM).
        precision: Fabric precision (default bf16-true on a GPU, 32-true on the CPU).
        accelerator: auto, cpu, cuda/gpu.
        devices: devices (processes) per node.
        num_nodes: number of nodes.
        strategy: auto, ddp, or fsdp (shards a base model that does not fit one GPU).
        resume: a training checkpoint (.pt) or "auto" (the latest in OUT/checkpoints) to continue a stopped run.
        seed: seed of the prefix initialisation, the data order and the split.
        skip_bad_rows: skip malformed data rows (counted) instead of stopping at the first.
        compile: torch.compile each transformer block (CUDA: faster steps after a compile of a minute or so).
        activation_checkpointing: recompute activations of the gated blocks in the backward pass to save memory:
            selective (the cheap element-wise parts), mlp (the MLP), block (whole blocks; least memory). See
            howto/performance.md.
        compare: print the before/after comparison (default: only for the default dataset in sft mode).
        compare_prompts: held-out prompts generated for the comparison.
        progress: show a progress bar on stderr.
        json_summary: print the run summary as one JSON object on the last line of stdout.
    """
    train = TrainConfig(max_steps=max_steps, learning_rate=learning_rate, weight_decay=weight_decay,
                        global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                        warmup_steps=warmup_steps, eval_interval=eval_interval, eval_iters=eval_iters,
                        save_interval=save_interval, seed=seed)
    cfg = RunConfig(checkpoint_dir=checkpoint_dir, data=data, template=template, out_dir=out_dir, mode=mode,
                    warmup_copy_ratio=warmup_copy_ratio, n_tokens=n_tokens, start_layer=start_layer,
                    max_seq_length=max_seq_length, precision=precision, accelerator=accelerator, devices=devices,
                    num_nodes=num_nodes, strategy=strategy, resume=resume, skip_bad_rows=skip_bad_rows,
                    compile=compile, activation_checkpointing=activation_checkpointing, compare=compare,
                    compare_prompts=compare_prompts, progress=progress,
                    train=train)
    summary = run(cfg)
    if json_summary:
        print(json.dumps(summary, default=str))
    if summary.get("stopped"):
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
