"""Converting base models (Hugging Face, Meta, GGUF) into our base-model directory, streaming tensor by tensor.

Readers (`hf_source`, `meta_source`, `gguf_source`) open a source checkpoint lazily: they return its `Config` and a
`TensorSource` whose shapes and dtypes come from headers alone (safetensors headers, mmap'd `torch.load`, GGUF tensor
infos) and whose tensors are read one at a time. The name and layout mapping is `lit_aligner.convert.to_lit`.

The writer computes every safetensors header up front by running `to_lit` over meta-device stand-ins, then writes each
tensor's bytes in turn, so converting a 7B model holds about one layer's q/k/v in memory, not the model. Files are
written under temporary names and renamed at the end: a crash never leaves a half file under a final name, and
`config.json` is written last, so a directory with it is a finished conversion.

`convert_hf`, `convert_meta` and `convert_gguf` put the pieces together (the scripts in scripts/ are CLIs over them).
"""

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Literal, Optional, Tuple, Union

import torch

from lit_aligner.base import CONFIG_NAME
from lit_aligner.config import Config
from lit_aligner.convert.mapping import to_lit
from lit_aligner.convert.sources import (ConvertError, TensorSource, gguf_model_name, gguf_source, hf_source,
                                         meta_source, meta_tokenizer_dir)
from lit_aligner.convert.writer import DEFAULT_MAX_SHARD_BYTES, OnTensor, TensorSpec, write_weights
from lit_aligner.files import atomic_write_json

PathLike = Union[str, Path]
# GGUF quantized weights dequantize to float32 up to this many parameters (a 3B model: 12 GB), bfloat16 above.
GGUF_FLOAT32_MAX_PARAMS = 3 * 10**9


@dataclass
class ConvertResult:
    out_dir: Path
    config: Config
    files: List[Path]  # weight files written
    warnings: List[str]


def plan(source: TensorSource, config: Config, kind: str, dtype: Optional[torch.dtype] = None) -> List[TensorSpec]:
    """Our tensors (name, shape, dtype), in write order, computed from the source's headers alone: `to_lit` runs over
    meta-device stand-ins, so fusing and permuting cost nothing. Checks the result against the model `config` builds."""
    from lit_aligner.model import LLaMA

    stand_ins = ((n, torch.empty(source.infos[n][0], dtype=dtype or source.infos[n][1], device="meta"))
                 for n in source.order())
    try:
        specs = [TensorSpec(name, tuple(t.shape), t.dtype)
                 for name, t in to_lit(stand_ins, config, kind, source.interleaved_qk)]
    except (KeyError, RuntimeError) as e:  # RuntimeError: q/k rows that do not split into the config's heads
        msg = e.args[0] if isinstance(e, KeyError) else str(e)
        raise ConvertError(f"{source.origin}: {msg}; not a LLaMA-style checkpoint of the shape its config "
                           f"describes.") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LLaMA(config).state_dict().items()}
    got = {s.name: s.shape for s in specs}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: {got[k]} vs {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or wrong:
        raise ConvertError(f"{source.origin}: the weights do not match the model config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}); is the config file of this model?")
    return specs


def convert_source(source: TensorSource, config: Config, kind: str, out_dir: PathLike,
                   dtype: Optional[torch.dtype] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   on_tensor: Optional[OnTensor] = None) -> List[Path]:
    """Write `source` (a `kind` "hf", "meta" or "gguf" checkpoint) as our weights in `out_dir`, cast to `dtype`
    (None: each tensor keeps its source dtype), one tensor at a time. config.json is left to the caller."""
    out_dir = Path(out_dir)
    specs = plan(source, config, kind, dtype)
    total = sum(s.nbytes for s in specs)
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if free < total:
        raise ConvertError(f"{out_dir}: {total / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free; free some disk space "
                           f"or choose another --out-dir.")

    def tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        for name in source.order():
            t = source.read(name)
            yield name, t if dtype is None else t.to(dtype)

    return write_weights(out_dir, specs, to_lit(tensors(), config, kind, source.interleaved_qk), max_shard_bytes,
                         on_tensor)


def default_out_dir(model_name: str) -> Path:
    return Path("checkpoints") / model_name


def _check_out_dir(out_dir: Path, src: Path) -> None:
    src_dir = src if src.is_dir() else src.parent
    if out_dir.resolve() == src_dir.resolve():
        raise ConvertError(f"--out-dir {out_dir} is the source folder; converting in place would overwrite its "
                           f"config.json and weights. Choose another --out-dir.")


def _finish(out_dir: Path, config: Config, files: List[Path], warnings: List[str]) -> ConvertResult:
    atomic_write_json(out_dir / CONFIG_NAME, config.to_dict())  # last: a folder with our config.json is finished
    return ConvertResult(out_dir, config, files, warnings)


def _refuse_existing(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"--out-dir {out_dir} is a file; give a directory.")
    if (out_dir / CONFIG_NAME).is_file() and not force:
        raise ConvertError(f"--out-dir {out_dir} already holds a converted model; pass --force to replace it, or "
                           f"choose another --out-dir.")


def _prepare_out_dir(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier conversion's config.json would make an interrupted re-conversion look finished.
    (out_dir / CONFIG_NAME).unlink(missing_ok=True)


def _convert(kind: str, src: Path, config: Config, source: TensorSource, out_dir: Optional[PathLike],
             dtype: Optional[torch.dtype], max_shard_bytes: int, on_tensor: Optional[OnTensor], force: bool,
             export_tokenizer: Callable[[Path], List[str]]) -> ConvertResult:
    """The steps every converter takes: check the output folder, plan every tensor from the headers (a bad checkpoint
    fails before out_dir is touched), export the tokenizer, stream the weights, write config.json last."""
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(config.name)
    _check_out_dir(out_dir, src)
    _refuse_existing(out_dir, force)
    plan(source, config, kind, dtype)
    _prepare_out_dir(out_dir)
    warnings = export_tokenizer(out_dir)
    files = convert_source(source, config, kind, out_dir, dtype, max_shard_bytes, on_tensor)
    return _finish(out_dir, config, files, warnings)


def convert_hf(src_dir: PathLike, out_dir: Optional[PathLike] = None, dtype: Optional[torch.dtype] = None,
               model_name: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               on_tensor: Optional[OnTensor] = None, force: bool = False) -> ConvertResult:
    """Convert a Hugging Face LLaMA-style folder into our base-model folder `out_dir` (default
    checkpoints/<model_name>; the model name defaults to the folder's name). dtype None keeps the source dtype."""
    from lit_aligner.tokenizer import export_hf_tokenizer

    src_dir = Path(src_dir)
    config, source = hf_source(src_dir, model_name)
    return _convert("hf", src_dir, config, source, out_dir, dtype, max_shard_bytes, on_tensor, force,
                    lambda out: _export_tokenizer(lambda: export_hf_tokenizer(src_dir, out), src_dir, out))


def convert_meta(src_dir: PathLike, out_dir: Optional[PathLike] = None, dtype: Optional[torch.dtype] = None,
                 model_name: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 on_tensor: Optional[OnTensor] = None, force: bool = False) -> ConvertResult:
    """Convert a Meta folder (params.json, consolidated.NN.pth; tokenizer.model inside it or next to it)."""
    from lit_aligner.tokenizer import export_hf_tokenizer

    src_dir = Path(src_dir)
    config, source = meta_source(src_dir, model_name)
    tok_dir = meta_tokenizer_dir(src_dir)

    def tokenizer(out: Path) -> List[str]:
        if tok_dir is None:
            return [f"no tokenizer.model in {src_dir} or {src_dir.parent}: copy it into {out} before generating"]
        return _export_tokenizer(lambda: export_hf_tokenizer(tok_dir, out), tok_dir, out)

    return _convert("meta", src_dir, config, source, out_dir, dtype, max_shard_bytes, on_tensor, force, tokenizer)


def convert_gguf(path: PathLike, out_dir: Optional[PathLike] = None, dtype: Optional[torch.dtype] = None,
                 model_name: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 on_tensor: Optional[OnTensor] = None, force: bool = False) -> ConvertResult:
    """Convert a GGUF file (quantized tensors are dequantized). dtype None: float32 up to GGUF_FLOAT32_MAX_PARAMS
    parameters, bfloat16 above. The tokenizer is rebuilt from the GGUF metadata."""
    from lit_aligner.tokenizer import export_gguf_tokenizer

    path = Path(path)
    config, source, reader = gguf_source(path, model_name)
    if dtype is None:
        n_params = sum(torch.Size(shape).numel() for shape, _ in source.infos.values())
        dtype = torch.float32 if n_params <= GGUF_FLOAT32_MAX_PARAMS else torch.bfloat16

    def tokenizer(out: Path) -> List[str]:
        if "tokenizer.ggml.tokens" not in reader.fields:
            return [f"{path} carries no tokenizer (no tokenizer.ggml.tokens); copy the model's tokenizer files into "
                    f"{out} before generating"]
        return _export_tokenizer(lambda: export_gguf_tokenizer(reader, out), path, out)

    return _convert("gguf", path, config, source, out_dir, dtype, max_shard_bytes, on_tensor, force, tokenizer)


def _export_tokenizer(export: Callable[[], None], src: Path, out_dir: Path) -> List[str]:
    """Run a tokenizer export; a source without tokenizer files is a warning (the weights still convert), a broken
    or unsupported tokenizer an error (before any weight is written)."""
    try:
        export()
    except FileNotFoundError as e:
        return [f"{e}: copy the model's tokenizer files into {out_dir} before generating"]
    except (ValueError, ImportError, RuntimeError) as e:
        raise ConvertError(f"{src}: its tokenizer cannot be exported ({e}).") from None
    return []


def print_progress(stream=None, every: float = 0.1) -> OnTensor:
    """An `on_tensor` callback for CLIs: a line on `stream` (stderr) per `every` (fraction) of the tensors written."""
    import sys

    stream = stream or sys.stderr
    state = {"next": 0.0}

    def on_tensor(i: int, n: int, name: str) -> None:
        if i / n >= state["next"] or i == n:
            print(f"  {i}/{n} tensors written ({name})", file=stream, flush=True)
            state["next"] = i / n + every

    return on_tensor


def summary(result: ConvertResult) -> str:
    """One line for the CLIs: where the checkpoint is, what it holds."""
    c = result.config
    size = sum(f.stat().st_size for f in result.files)
    return (f"wrote {result.out_dir}: {c.name!r}, {c.n_layer} layers, {c.n_head} heads ({c.n_query_groups} KV), "
            f"n_embd {c.n_embd}, vocab {c.vocab_size}{', tied embeddings' if c.tie_embeddings else ''}; "
            f"{len(result.files)} weight file(s), {size / 1e9:.2f} GB")


@dataclass(kw_only=True)
class ConvertConfig:
    """The flags every converter script shares (scripts/convert_hf.py, convert_meta.py, convert_gguf.py)."""

    out_dir: Optional[Path] = None
    """output folder; default checkpoints/<model name>."""
    model_name: Optional[str] = None
    """config name of the model (default: from the source)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weights dtype; auto keeps the source's dtype (GGUF: float32 up to 3B parameters, bfloat16 above)."""
    max_shard_gb: float = DEFAULT_MAX_SHARD_BYTES / 1e9
    """largest weight file, in GB (10^9 bytes); larger models get sharded with an index."""
    force: bool = False
    """replace a converted model already in --out-dir."""

    def run_conversion(self, convert_fn: Callable[..., ConvertResult], source: PathLike) -> ConvertResult:
        """Run `convert_fn` (convert_hf, convert_meta or convert_gguf) on `source` with these flags, printing the
        progress and warnings to stderr and the summary to stdout."""
        import sys

        from lit_aligner.devices import DTYPES

        print(f"converting {source}", file=sys.stderr)
        result = convert_fn(source, self.out_dir, DTYPES.get(self.dtype), self.model_name,
                            int(self.max_shard_gb * 1e9), print_progress(), force=self.force)
        for w in result.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(summary(result))
        return result


__all__ = ["ConvertConfig", "ConvertError", "ConvertResult", "TensorSource", "convert_gguf", "convert_hf",
           "convert_meta", "convert_source", "gguf_model_name", "gguf_source", "hf_source", "meta_source", "plan",
           "print_progress", "summary"]
