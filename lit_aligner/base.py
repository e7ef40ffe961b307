"""The base-model directory (`--checkpoint-dir`): `config.json` (lit-aligner format), `model.safetensors` (or shards
listed in `model.safetensors.index.json`) and the tokenizer files. Converters write it (`lit_aligner.convert`); this
module reads it: the config, the frozen model, and model + tokenizer together (`load_base`)."""

from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from lit_aligner.config import Config
from lit_aligner.default_model import CONVERT_DEFAULT_COMMAND
from lit_aligner.files import UserError, read_json_object
from lit_aligner.model import LLaMA

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PathLike = Union[str, Path]


class BaseModelError(UserError):
    """A base-model directory or file that cannot be used; the message names it and the fix."""


def load_config(checkpoint_dir: PathLike) -> Config:
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / CONFIG_NAME
    if not checkpoint_dir.is_dir():
        raise BaseModelError(
            f"{checkpoint_dir}: no such base-model directory. Convert a model into it first "
            f"(e.g. `{CONVERT_DEFAULT_COMMAND}` for the embedded default; see howto/convert.md)."
        )
    if not path.is_file():
        raise BaseModelError(f"{path} is missing: {checkpoint_dir} is not a converted lit-aligner base model (see "
                             f"howto/convert.md).")
    return Config.from_file(path)


def is_base_dir(path: PathLike) -> bool:
    """Whether `path` holds a converted base model (config.json and weights): no run or data directory goes there."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and any((path / n).is_file() for n in (WEIGHTS_NAME, INDEX_NAME))


def weight_files(checkpoint_dir: Path) -> List[Path]:
    index = checkpoint_dir / INDEX_NAME
    if index.is_file():
        weight_map = read_json_object(index, "weight index", BaseModelError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise BaseModelError(f"{index}: no `weight_map`; convert the model again.")
        return [checkpoint_dir / n for n in sorted(set(weight_map.values()))]
    single = checkpoint_dir / WEIGHTS_NAME
    if not single.is_file():
        raise BaseModelError(f"{single} is missing: the conversion into {checkpoint_dir} did not finish; run it again.")
    return [single]


def load_state_dict(checkpoint_dir: PathLike, device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd: Dict[str, torch.Tensor] = {}
    for f in weight_files(Path(checkpoint_dir)):
        try:
            sd.update(load_file(str(f), device=str(device)))
        except (SafetensorError, OSError) as e:
            raise BaseModelError(f"{f}: not a readable safetensors file ({e}). Convert the model again.") from None
    return sd


def load_model(checkpoint_dir: PathLike, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None) -> LLaMA:
    """The frozen base model (requires_grad False everywhere) on `device` in `dtype` (None: the file's), built without
    a random init. It has no Aligner of its own: Aligners are forward arguments (`model(idx, aligner=a)`) or attached
    for training with `lit_aligner.aligner_files.new_aligner`. `quantize` (a `--quantize` mode, lit_aligner.quantize):
    each linear weight of the blocks is read from the memory-mapped file, converted and quantized onto `device` one
    layer at a time, so neither the device nor the CPU's memory ever holds the whole model in full precision."""
    from lit_aligner.quantize import check_mode, quantize_blocks

    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    quantize = check_mode(quantize)
    sd = load_state_dict(checkpoint_dir, "cpu" if quantize else device)
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
        raise BaseModelError(
            f"{checkpoint_dir}: weights do not match {CONFIG_NAME} (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shapes {wrong[:3]}). Convert the model again."
        )
    if quantize:  # the file's tensors (memory-mapped) stay as they are; each is converted as it is quantized or moved
        model.load_state_dict(sd, assign=True)
        del sd
        quantize_blocks(model, quantize, device, dtype)
    else:
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    model.reset_rope(torch.device(device))
    model.requires_grad_(False)
    return model


def load_tokenizer(checkpoint_dir: PathLike, config: Optional[Config] = None) -> "Tokenizer":  # noqa: F821
    """The base model's tokenizer, checked against its config (when the directory has one): a vocabulary larger than
    the model's embedding would produce ids the model cannot look up."""
    from lit_aligner.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint_dir)
    if config is None and (Path(checkpoint_dir) / CONFIG_NAME).is_file():
        config = load_config(checkpoint_dir)
    if config is not None and tokenizer.vocab_size > config.vocab_size:
        raise BaseModelError(f"{checkpoint_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"embedding only {config.vocab_size} ({CONFIG_NAME}); the tokenizer files belong to "
                             f"another model. Convert the model again with its own tokenizer.")
    return tokenizer


def load_base(checkpoint_dir: PathLike, device: Union[str, torch.device] = "auto",
              dtype: Union[str, torch.dtype, None] = "auto",
              quantize: Optional[str] = None) -> Tuple[LLaMA, "Tokenizer"]:  # noqa: F821
    """The frozen base model in eval mode and its tokenizer, for generation and evaluation. device/dtype/quantize as
    the `--device`/`--dtype`/`--quantize` flags (`lit_aligner.devices`, `lit_aligner.quantize`): "auto" is CUDA in
    bf16 when available, else the CPU in the checkpoint's dtype. Raises BaseModelError naming the directory and the
    conversion command."""
    from lit_aligner.devices import resolve_device, resolve_dtype

    dev = resolve_device(device)
    model = load_model(checkpoint_dir, dev, resolve_dtype(dtype, dev), quantize).eval()
    return model, load_tokenizer(checkpoint_dir, model.config)


def save_base(out_dir: PathLike, config: Config, tensors: Dict[str, torch.Tensor]) -> Path:
    """A small base-model directory written in one go (tests, fixtures); large conversions stream
    (`lit_aligner.convert`)."""
    from safetensors.torch import save_file

    from lit_aligner.files import atomic_write, atomic_write_json

    out_dir = Path(out_dir)
    atomic_write(out_dir / WEIGHTS_NAME, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
    atomic_write_json(out_dir / CONFIG_NAME, config.to_dict())
    return out_dir
