"""lit-aligner: align LLaMA-family models with the global-token Aligner (N learnable prefix tokens shared by every
layer from `start_layer` on, gated per head, on a frozen base).

    import lit_aligner as la

    model, tokenizer = la.load_base("checkpoints/SmolLM2-135M-Instruct")
    aligner, meta = la.load_aligner("out/aligner/SmolLM2-135M-Instruct/aligner.safetensors", model)
    print(la.answer(model, tokenizer, "What is 7 times 6?", aligner, meta))
    summary = la.train(la.SFTRunConfig(data="alpaca.json", train=la.TrainConfig(max_steps=100)))

Where things live: `model` (the model and the Aligner, one file), `aligner_files` (Aligner files of any format),
`base` (base-model directories), `data` (data formats, tokenization, prepared data), `training` (one engine for every
objective), `generation` (decoding, many Aligners on one base), `evaluation`, `convert` (HF / Meta / GGUF import),
`tokenizer`, `prompts`, `perf`.
"""

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

# The public API, imported on first use (so that `import lit_aligner.model` stays light).
_API = {
    "Config": "lit_aligner.config",
    "LLaMA": "lit_aligner.model", "Aligner": "lit_aligner.model", "AlignerConfig": "lit_aligner.model",
    "load_base": "lit_aligner.base", "load_model": "lit_aligner.base", "load_tokenizer": "lit_aligner.base",
    "load_aligner": "lit_aligner.aligner_files", "save_aligner": "lit_aligner.aligner_files",
    "attach": "lit_aligner.aligner_files", "new_aligner": "lit_aligner.aligner_files",
    "check_compatible": "lit_aligner.aligner_files",
    "generate": "lit_aligner.generation", "answer": "lit_aligner.generation.answers",
    "answer_prompts": "lit_aligner.generation",
    "load_data": "lit_aligner.data", "DataOptions": "lit_aligner.data",
    "train": "lit_aligner.training", "TrainConfig": "lit_aligner.training", "SFTRunConfig": "lit_aligner.training",
    "DPORunConfig": "lit_aligner.training", "DPOTrainConfig": "lit_aligner.training",
    "KTORunConfig": "lit_aligner.training", "DistillRunConfig": "lit_aligner.training",
    "GRPORunConfig": "lit_aligner.training",
    "DPOLossConfig": "lit_aligner.training",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lit_aligner' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
