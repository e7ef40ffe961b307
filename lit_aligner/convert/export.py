"""Exporting a converted base model as a Hugging Face model directory (`scripts/export_hf.py`), so that any HF tool
(transformers, PEFT, lm-evaluation-harness, vLLM) can load the very weights an Aligner was trained on. The inverse of
`convert_hf`: our names and fused q/k/v back to HF's (`lit_to_hf`), streamed tensor by tensor through the same writer,
the tokenizer files copied, and config.json written last."""

import shutil
from pathlib import Path
from typing import List, Optional, Union

import torch

from lit_aligner.base import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, load_config, weight_files
from lit_aligner.convert import ConvertError, ConvertResult, _prepare_out_dir, _refuse_existing
from lit_aligner.convert.mapping import lit_to_hf
from lit_aligner.convert.sources import TensorSource, _safetensors_infos
from lit_aligner.convert.writer import DEFAULT_MAX_SHARD_BYTES, OnTensor, TensorSpec, write_weights
from lit_aligner.files import atomic_write_json

PathLike = Union[str, Path]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _our_source(checkpoint_dir: Path) -> TensorSource:
    infos, handles = {}, {}
    for f in weight_files(checkpoint_dir):
        handle, file_infos = _safetensors_infos(f)
        infos.update(file_infos)
        handles.update({name: handle for name in file_infos})
    return TensorSource(infos, lambda name: handles[name].get_tensor(name), str(checkpoint_dir),
                        list(handles.values()))


def export_hf(checkpoint_dir: PathLike, out_dir: PathLike, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, on_tensor: Optional[OnTensor] = None,
              force: bool = False) -> ConvertResult:
    """Write the converted model in `checkpoint_dir` as a Hugging Face model directory `out_dir`: config.json
    (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or SmolLM3ForCausalLM, with the tokenizer's token ids),
    model.safetensors (sharded with an index past `max_shard_bytes`) in `dtype` (None: as stored), and the tokenizer
    files. Refuses an existing model in `out_dir`
    unless `force`, and `out_dir` == `checkpoint_dir`."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    config = load_config(checkpoint_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ConvertError(f"--out-dir {out_dir} is the checkpoint itself; exporting in place would overwrite its "
                           f"weights. Choose another --out-dir.")
    _refuse_existing(out_dir, force)
    source = _our_source(checkpoint_dir)
    stand_ins = ((n, torch.empty(source.infos[n][0], dtype=dtype or source.infos[n][1], device="meta"))
                 for n in source.order())
    try:
        specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in lit_to_hf(stand_ins, config)]
    except KeyError as e:
        raise ConvertError(f"{checkpoint_dir}: unexpected tensor {e.args[0]!r}; not a lit-aligner checkpoint of a "
                           f"supported family") from None
    _prepare_out_dir(out_dir)
    copied: List[str] = []
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            shutil.copyfile(checkpoint_dir / name, out_dir / name)
            copied.append(name)

    def tensors():
        for name in source.order():
            t = source.read(name)
            yield name, t if dtype is None else t.to(dtype)

    files = write_weights(out_dir, specs, lit_to_hf(tensors(), config), max_shard_bytes, on_tensor)
    stored = dtype or next(iter(source.infos.values()))[1]
    has_tokenizer = "tokenizer.json" in copied or "tokenizer.model" in copied
    atomic_write_json(out_dir / CONFIG_NAME, {**config.to_hf_config(_DTYPE_NAMES.get(stored, "float32")),
                                              **_special_ids(checkpoint_dir if has_tokenizer else None)})
    warnings = [] if has_tokenizer else \
        [f"{checkpoint_dir} has no tokenizer files; the export has weights and config only"]
    return ConvertResult(out_dir, config, files, warnings)


def _special_ids(checkpoint_dir: Optional[Path]) -> dict:
    """config.json's token ids, the tokenizer's (transformers' generate stops at eos_token_id); without a tokenizer,
    no pad id, so that a family's default one (SmolLM3's 128004) never points past a smaller vocabulary."""
    if checkpoint_dir is None:
        return {"pad_token_id": None}
    from lit_aligner.base import load_tokenizer

    tok = load_tokenizer(checkpoint_dir)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


__all__ = ["INDEX_NAME", "TOKENIZER_FILES", "WEIGHTS_NAME", "export_hf"]
