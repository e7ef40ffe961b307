from pathlib import Path

from setuptools import find_packages, setup

# torch is not pinned here on purpose: a CPU machine installs `torch==2.13.0` first (see README), and an
# unpinned `torch` in install_requires would then be satisfied instead of pulling gigabytes of CUDA wheels.
setup(
    name="lit-aligner",
    version="0.2.0",
    description=("Align LLaMA-family models with the global-token Aligner: N learnable prefix tokens shared by "
                 "every layer."),
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lit_aligner", "lit_aligner.*"]),
    package_data={"lit_aligner.serving": ["page.html"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        "lightning-fabric>=2.2",
        "sentencepiece",
        "safetensors",
        "tyro",
        "numpy",
        "tokenizers",
        "gguf>=0.17",
        "protobuf",  # SentencePiece model protos (reading piece types, rebuilding a GGUF tokenizer)
        "jinja2",
        "tqdm",
        "huggingface_hub>=0.24",  # scripts/download.py and the prepare scripts' Hub datasets
    ],
    extras_require={
        "data": ["pyarrow"],  # .parquet data files (the Hub's Alpaca)
        "plot": ["matplotlib"],
        "wandb": ["wandb"],  # --wandb-project: the metrics rows to Weights & Biases
        # --quantize: a 4/8-bit base (0.50: the first version measured here; its CPU backend runs the tests)
        "quantize": ["bitsandbytes>=0.50"],
        # serve/aligner.py (+ /metrics; llguidance: structured outputs, 1.9 the version measured here)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20", "llguidance>=1.9"],
        # evaluate/aligner.py harness (lm-evaluation-harness); the benchmarks' peers: PEFT LoRA / prefix tuning on
        # transformers, TRL's DPOTrainer (1.16: the first version measured; older ones may name its options otherwise)
        "eval": ["lm_eval[api]>=0.4.4", "peft>=0.11", "transformers>=4.40", "trl>=1.16"],
        # the server's tests query it with the real OpenAI client and drive its page in headless Chromium; ruff lints
        # (its minor version pinned: a new one can add checks to the selected families and fail CI on unchanged code)
        # pytest-xdist: scripts/test.sh runs one pytest worker per core
        "test": ["pytest", "pytest-xdist", "transformers>=4.40", "protobuf", "matplotlib", "pyarrow", "fastapi>=0.110",
                 "uvicorn>=0.29", "prometheus_client>=0.20", "llguidance>=1.9",
                 "openai>=1.40", "selenium>=4.20", "lm_eval[api]>=0.4.4", "peft>=0.11", "trl>=1.16", "wandb",
                 "bitsandbytes>=0.50",
                 "ruff>=0.17,<0.18"],
    },
)
