"""Our base-model checkpoint directory: `config.json` (lit-aligner format), `model.safetensors` (or shards listed in
`model.safetensors.index.json`) and tokenizer files. Loading and (streaming) writing live here."""

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from lit_aligner.config import Config
from lit_aligner.model import LLaMA, AlignerConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be used; the message names the file and the fix."""


def load_config(checkpoint_dir: Union[str, Path]) -> Config:
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / CONFIG_NAME
    if not checkpoint_dir.is_dir():
        raise CheckpointError(
            f"{checkpoint_dir}: no such checkpoint directory. Convert a model into it first "
            f"(e.g. `python scripts/convert_gguf.py --default`; see howto/convert.md)."
        )
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {checkpoint_dir} is not a converted lit-aligner checkpoint "
                              f"(see howto/convert.md).")
    return Config.from_file(path)


def weight_files(checkpoint_dir: Path) -> List[Path]:
    index = checkpoint_dir / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint_dir / n for n in names]
    single = checkpoint_dir / WEIGHTS_NAME
    if not single.is_file():
        raise CheckpointError(f"{single} is missing: the conversion into {checkpoint_dir} did not finish; run it again.")
    return [single]


def load_state_dict(checkpoint_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd: Dict[str, torch.Tensor] = {}
    for f in weight_files(Path(checkpoint_dir)):
        try:
            sd.update(load_file(str(f), device=str(device)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}). Convert the model again.") from None
    return sd


def load_model(
    checkpoint_dir: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    aligner_config: Optional[AlignerConfig] = None,
) -> LLaMA:
    """Build the model on `device` without a random init, then load the base weights (frozen: requires_grad False).
    With `aligner_config`, a fresh Aligner (zero gates) is attached as `model.aligner`."""
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    sd = load_state_dict(checkpoint_dir, device)
    if dtype is None:
        dtype = next(iter(sd.values())).dtype if sd else torch.float32
    with torch.device("meta"):
        model = LLaMA(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs config {tuple(expected[k])}"
             for k in expected if k in sd and sd[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{checkpoint_dir}: weights do not match {CONFIG_NAME} (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shapes {wrong[:3]}). Convert the model again."
        )
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    model.reset_rope(torch.device(device))
    for p in model.parameters():
        p.requires_grad_(False)
    if aligner_config is not None:
        attach_aligner(model, aligner_config)
    return model


def attach_aligner(model: LLaMA, aligner_config: AlignerConfig):
    """Give `model` a fresh, trainable Aligner (zero gates) on the model's device and dtype."""
    from lit_aligner.model import Aligner

    p = model.tok_embeddings.weight
    model.aligner = Aligner(model.config, aligner_config).to(device=p.device, dtype=p.dtype)
    return model.aligner


def save_config_and_weights(out_dir: Union[str, Path], config: Config, tensors: Dict[str, torch.Tensor]) -> None:
    """Small, in-memory save (tests, fixtures). Large conversions use the streaming writer."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save(out_dir / CONFIG_NAME)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / WEIGHTS_NAME))


def atomic_write(path: Union[str, Path], write) -> Path:
    """`write(tmp_path)` into a temporary file next to `path`, then rename it onto `path`: a crash never leaves a half
    file under the final name. The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
