"""File-level conversion of base models into our checkpoint directory, streaming tensor by tensor.

Readers (`hf_source`, `meta_source`, `gguf_source`) open a source checkpoint lazily: they return its `Config` and a
`TensorSource` whose shapes and dtypes come from headers alone (safetensors headers, mmap'd `torch.load`, GGUF tensor
infos) and whose tensors are read one at a time. The name and layout mapping is `lit_aligner.convert.to_lit`.

The writer computes every safetensors header up front by running `to_lit` over meta-device stand-ins, then writes each
tensor's bytes in turn, so converting a 7B model holds about one layer's q/k/v in memory, not the model. Files are
written under temporary names and renamed at the end: a crash never leaves a half file under a final name, and
`config.json` is written last, so a directory with it is a finished conversion.

`convert_hf`, `convert_meta` and `convert_gguf` put the pieces together (the scripts in scripts/ are CLIs over them).
"""

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from lit_aligner.checkpoint import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, CheckpointError
from lit_aligner.config import Config, name_to_config
from lit_aligner.convert import meta_shard_dim, to_lit

PathLike = Union[str, Path]
Shape = Tuple[int, ...]
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size ("5GB")
# GGUF quantized weights dequantize to float32 up to this many parameters (a 3B model: 12 GB), bfloat16 above.
GGUF_FLOAT32_MAX_PARAMS = 3 * 10**9
OnTensor = Callable[[int, int, str], None]  # (index, count, our tensor name): progress of the write pass
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # config name of the embedded default (lit_aligner.default_model)
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConvertError(CheckpointError):
    """A source checkpoint that cannot be converted; the message names the file and the fix."""


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ST_TO_TORCH = {v: k for k, v in _ST_DTYPES.items()}


# --- sources ----------------------------------------------------------------------------------------------------------


@dataclass
class TensorSource:
    """The tensors of one source checkpoint. `infos`: name -> (shape, dtype), known without reading any data;
    `read(name)` loads one tensor (CPU, that shape and dtype). `origin` names the files, for error messages."""

    infos: Dict[str, Tuple[Shape, torch.dtype]]
    read: Callable[[str], torch.Tensor]
    origin: str
    keep_alive: List[object] = field(default_factory=list, repr=False)  # open file handles / mmaps behind `read`

    def order(self) -> List[str]:
        """Names in model order (embedding, layer 0, layer 1, ..., final norm, head), so that a layer's q, k and v
        arrive together even when a sharded source scatters them over files."""

        def key(name: str):
            m = re.search(r"(?:layers|blk)\.(\d+)\.", name)
            if m:
                return (1, int(m.group(1)), name)
            return (0 if re.search(r"embed|embd", name) else 2, 0, name)

        return sorted(self.infos, key=key)


def _safetensors_infos(path: Path) -> Tuple[object, Dict[str, Tuple[Shape, torch.dtype]]]:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        infos = {}
        for name in handle.keys():
            sl = handle.get_slice(name)
            infos[name] = (tuple(sl.get_shape()), _ST_TO_TORCH[sl.get_dtype()])
    except (SafetensorError, OSError, KeyError) as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({e}); download it again.") from None
    return handle, infos


def _torch_load(path: Path) -> Dict[str, torch.Tensor]:
    """A `torch.save`d state dict, memory-mapped: tensors are read from disk only when used."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zip" not in str(e).lower() and "mmap" not in str(e).lower():
                raise
            # Files from torch < 1.6 (no zip container) cannot be mmap'd: loaded whole, one file at a time.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors come in many types; all mean "not a checkpoint"
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]  # some training frameworks nest the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConvertError(f"{path}: holds no state dict of tensors.")
    return sd


def _require_dir(src_dir: PathLike, what: str) -> Path:
    src_dir = Path(src_dir)
    if not src_dir.exists():
        raise ConvertError(f"{src_dir}: no such directory; pass the folder of the {what} checkpoint.")
    if not src_dir.is_dir():
        raise ConvertError(f"{src_dir} is a file; pass the folder of the {what} checkpoint (the one holding it).")
    return src_dir


_HF_MODEL_TYPES = ("llama", "mistral")


def hf_source(src_dir: PathLike, model_name: Optional[str] = None) -> Tuple[Config, TensorSource]:
    """A Hugging Face LLaMA-style model folder: `config.json` plus `model*.safetensors` (with
    `model.safetensors.index.json` when sharded) or `pytorch_model*.bin` (with its `.index.json`)."""
    src_dir = _require_dir(src_dir, "Hugging Face")
    cfg_path = src_dir / "config.json"
    if not cfg_path.is_file():
        is_meta = (src_dir / "params.json").is_file()
        hint = " It looks like a Meta checkpoint: use scripts/convert_meta.py." if is_meta else ""
        raise ConvertError(f"{cfg_path} is missing: {src_dir} is not a Hugging Face model folder.{hint}")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{cfg_path}: not valid JSON ({e}).") from None
    if hf.get("format") == "lit-aligner":
        raise ConvertError(f"{src_dir} is already a converted lit-aligner checkpoint; load it directly.")
    if hf.get("model_type") not in _HF_MODEL_TYPES:
        raise ConvertError(f"{cfg_path}: model_type {hf.get('model_type')!r} is not a LLaMA-family model "
                           f"(supported: {', '.join(_HF_MODEL_TYPES)}).")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConvertError(f"{cfg_path}: attention/MLP biases are not supported by our LLaMA model.")
    try:
        config = Config.from_hf_config(hf, name=model_name or src_dir.resolve().name)
    except (KeyError, ValueError) as e:
        raise ConvertError(f"{cfg_path}: cannot read the model shape ({type(e).__name__}: {e}).") from None

    infos: Dict[str, Tuple[Shape, torch.dtype]] = {}
    st_index, bin_index = src_dir / "model.safetensors.index.json", src_dir / "pytorch_model.bin.index.json"
    st_files = _indexed(st_index) if st_index.is_file() else sorted(src_dir.glob("model*.safetensors"))
    if st_files:
        handles = {}
        for f in st_files:
            handle, file_infos = _safetensors_infos(f)
            for name in file_infos:
                handles[name] = handle
            infos.update(file_infos)
        source = TensorSource(infos, lambda name: handles[name].get_tensor(name), str(src_dir), list(handles.values()))
        return config, source
    bin_files = _indexed(bin_index) if bin_index.is_file() else sorted(src_dir.glob("pytorch_model*.bin"))
    if not bin_files:
        raise ConvertError(f"{src_dir} has no weights (model*.safetensors or pytorch_model*.bin); download them too.")
    tensors: Dict[str, torch.Tensor] = {}
    for f in bin_files:
        tensors.update(_torch_load(f))
    infos = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return config, TensorSource(infos, tensors.__getitem__, str(src_dir), [tensors])


def _indexed(index: Path) -> List[Path]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ConvertError(f"{index}: not a valid weight index ({type(e).__name__}: {e}).") from None
    files = [index.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConvertError(f"{index} lists files that are missing: {missing}; download them too.")
    return files


def meta_source(src_dir: PathLike, model_name: Optional[str] = None) -> Tuple[Config, TensorSource]:
    """A Meta checkpoint folder: `params.json` and `consolidated.00.pth` (.. `consolidated.NN.pth` for model-parallel
    shards, concatenated here tensor by tensor)."""
    src_dir = _require_dir(src_dir, "Meta")
    params_path = src_dir / "params.json"
    if not params_path.is_file():
        is_hf = (src_dir / "config.json").is_file()
        hint = " It looks like a Hugging Face model: use scripts/convert_hf.py." if is_hf else ""
        raise ConvertError(f"{params_path} is missing: {src_dir} is not a Meta checkpoint folder.{hint}")
    try:
        params = json.loads(params_path.read_text())
        dim = params["dim"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConvertError(f"{params_path}: not a Meta params.json ({type(e).__name__}: {e}).") from None
    files = sorted(src_dir.glob("consolidated.*.pth"))
    if not files:
        raise ConvertError(f"{src_dir} has no consolidated.*.pth weight files; download them too.")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != expected:
        raise ConvertError(f"{src_dir}: model-parallel shards must be {expected[0]}..{expected[-1]} without gaps, "
                           f"found {[f.name for f in files]}; a download is incomplete.")
    shards = [_torch_load(f) for f in files]
    names = list(shards[0])
    for f, sd in zip(files[1:], shards[1:]):
        if sorted(sd) != sorted(names):
            raise ConvertError(f"{f}: holds other tensors than {files[0].name}; the shards are not of one model.")
    n = len(shards)
    dims = {name: meta_shard_dim(name, tuple(shards[0][name].shape), dim, n) for name in names}
    infos = {}
    for name in names:
        shape, d = list(shards[0][name].shape), dims[name]
        if d is not None:
            shape[d] = sum(sd[name].shape[d] for sd in shards)
        infos[name] = (tuple(shape), shards[0][name].dtype)

    def read(name: str) -> torch.Tensor:
        d = dims[name]
        return shards[0][name] if d is None else torch.cat([sd[name] for sd in shards], dim=d)

    if "tok_embeddings.weight" not in infos:
        raise ConvertError(f"{files[0]}: no tok_embeddings.weight; not a LLaMA checkpoint.")
    try:
        config = Config.from_meta_params(params, name=model_name or src_dir.resolve().name,
                                         vocab_size=infos["tok_embeddings.weight"][0][0])
    except (KeyError, ValueError, TypeError) as e:
        raise ConvertError(f"{params_path}: cannot read the model shape ({type(e).__name__}: {e}).") from None
    if "output.weight" not in infos:
        config.tie_embeddings = True
    return config, TensorSource(infos, read, str(src_dir), [shards])


def meta_tokenizer_dir(src_dir: Path) -> Optional[Path]:
    """Meta's downloads keep `tokenizer.model` next to the model folders, not inside them."""
    for d in (src_dir, src_dir.parent):
        if (d / "tokenizer.model").is_file() or (d / "tokenizer.json").is_file():
            return d
    return None


def gguf_source(path: PathLike, model_name: Optional[str] = None) -> Tuple[Config, TensorSource, "gguf.GGUFReader"]:
    """A GGUF file of the `llama` architecture. Returns (config, source, reader): tensors are dequantized to float32
    as they are read; `reader` (a gguf.GGUFReader) also carries the tokenizer metadata."""
    import gguf
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such GGUF file." + (" It is a directory: pass the .gguf file in it."
                                                              if path.is_dir() else ""))
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConvertError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes).")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on a non-GGUF file
        raise ConvertError(f"{path}: not a GGUF file ({type(e).__name__}: {e}).") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConvertError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama': LLaMA, Mistral, "
                           f"SmolLM2, TinyLlama, ...).")
    if (meta.get("split.count") or 1) > 1:
        raise ConvertError(f"{path} is one part of a split GGUF; merge the parts first "
                           f"(`llama-gguf-split --merge {path} merged.gguf`).")
    if (meta.get("llama.expert_count") or 0) > 0:
        raise ConvertError(f"{path}: a mixture-of-experts model (llama.expert_count > 0) is not supported.")
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none") and not (scaling == "linear" and meta.get("llama.rope.scaling.factor", 1) == 1):
        raise ConvertError(f"{path}: RoPE scaling {scaling!r} is not supported.")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ConvertError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1-style scaling) are not "
                           f"supported.")

    unsupported = sorted({t.tensor_type.name for t in tensors.values() if not _can_dequantize(t.tensor_type)})
    if unsupported:
        raise ConvertError(f"{path}: tensor type(s) {', '.join(unsupported)} cannot be dequantized by gguf "
                           f"{getattr(gguf, '__version__', '')}; use a GGUF with F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants.")
    try:
        n_head = int(meta["llama.attention.head_count"])
        n_embd = int(meta["llama.embedding_length"])
        head_size = int(meta.get("llama.attention.key_length") or n_embd // n_head)
        rope_dims = int(meta.get("llama.rope.dimension_count") or head_size)
        if rope_dims != head_size:
            raise ConvertError(f"{path}: partial rotary embeddings (rope dims {rope_dims} < head size {head_size}) "
                               f"are not supported.")
        emb = tensors["token_embd.weight"]
        config = Config(
            block_size=int(meta.get("llama.context_length", 4096)),
            vocab_size=int(meta.get("llama.vocab_size") or emb.shape[-1]),
            n_layer=int(meta["llama.block_count"]),
            n_head=n_head,
            n_query_groups=int(meta.get("llama.attention.head_count_kv") or n_head),
            n_embd=n_embd,
            intermediate_size=int(meta["llama.feed_forward_length"]),
            rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
            # stored as float32: 1e-5 reads back as 9.99999974e-06; round to the value the model was trained with
            norm_eps=float(f"{float(meta.get('llama.attention.layer_norm_rms_epsilon', 1e-5)):.6g}"),
            tie_embeddings="output.weight" not in tensors,
            head_size=head_size,
        )
    except KeyError as e:
        raise ConvertError(f"{path}: GGUF metadata or tensor {e} is missing; not a complete llama GGUF.") from None
    config.name = model_name or gguf_model_name(meta, config, "tokenizer.chat_template" in reader.fields, path)

    # GGUF lists dims fastest-first (ne order): the torch shape is the reverse.
    infos = {name: (tuple(int(d) for d in reversed(t.shape.tolist())), torch.float32) for name, t in tensors.items()}

    def read(name: str) -> torch.Tensor:
        t = tensors[name]
        if t.tensor_type == gguf.GGMLQuantizationType.F64:
            arr = np.asarray(t.data, dtype=np.float32)
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.array(arr, dtype=np.float32, copy=not arr.flags.writeable or arr.dtype != np.float32)
        return torch.from_numpy(arr).reshape(infos[name][0])

    return config, TensorSource(infos, read, str(path), [reader]), reader


def _can_dequantize(qtype) -> bool:
    import gguf
    import numpy as np

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F64):
        return True
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:  # gguf implements dequantization per type in numpy; probe one zero block
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        return True
    except (NotImplementedError, ValueError, TypeError):
        return False


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def gguf_model_name(meta: Dict[str, object], config: Config, has_chat_template: bool, path: Path) -> str:
    """A config name for a GGUF model: the registry name with the same shape (the chat/Instruct variant when the file
    carries a chat template) if its name agrees with `general.basename`; else a slug of `general.name`; else the file
    stem. SmolLM2-135M-Instruct's GGUF gives "SmolLM2-135M-Instruct"."""
    shape_fields = ("block_size", "vocab_size", "n_layer", "n_head", "n_query_groups", "n_embd", "intermediate_size",
                    "rope_base", "tie_embeddings", "head_size")
    candidates = []
    for name, d in name_to_config.items():
        if d["name"] != name:  # an alias
            continue
        c = Config(**d)
        if all(getattr(c, f) == getattr(config, f) for f in shape_fields) and abs(c.norm_eps - config.norm_eps) < 1e-9:
            candidates.append(name)
    basename = meta.get("general.basename")
    if isinstance(basename, str) and basename:
        candidates = [n for n in candidates if _norm(n).startswith(_norm(basename))]
    chat = [n for n in candidates if re.search(r"instruct|chat", n, re.I)]
    candidates = (chat if has_chat_template else [n for n in candidates if n not in chat]) or candidates
    if len(candidates) == 1:
        return candidates[0]
    general = meta.get("general.name")
    if isinstance(general, str) and _norm(general):
        return re.sub(r"[^A-Za-z0-9._+-]+", "-", general.strip()).strip("-")
    return path.stem


# --- writer -----------------------------------------------------------------------------------------------------------


@dataclass
class TensorSpec:
    name: str
    shape: Shape
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def safetensors_header(specs: Sequence[TensorSpec], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The bytes before the data of a safetensors file holding `specs` back to back, in order: an 8-byte little-endian
    header length, then the JSON header padded with spaces to a multiple of 8 bytes (aligned tensor data)."""
    header: Dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        if s.dtype not in _ST_DTYPES:
            raise ValueError(f"{s.name}: dtype {s.dtype} has no safetensors code")
        header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def shard_specs(specs: Sequence[TensorSpec], max_shard_bytes: int) -> List[List[TensorSpec]]:
    """Split `specs`, in order, into runs of at most `max_shard_bytes` (a tensor larger than that gets its own)."""
    shards: List[List[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_weights(out_dir: PathLike, specs: Sequence[TensorSpec], tensors: Iterable[Tuple[str, torch.Tensor]],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, on_tensor: Optional[OnTensor] = None) -> List[Path]:
    """Stream `tensors` (name, tensor), arriving in the order of `specs`, into `model.safetensors`, or into
    `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` when they exceed `max_shard_bytes`.
    Each tensor is written as it arrives and then dropped. All files appear under their final names only once every
    byte is written; stale weight files of an earlier conversion in `out_dir` are removed. Returns the files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = shard_specs(specs, max_shard_bytes)
    n = len(shards)
    finals = [out_dir / WEIGHTS_NAME] if n == 1 else \
        [out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    temps = [_tmp_name(f) for f in finals]
    it = iter(tensors)
    done = 0
    try:
        for shard, tmp in zip(shards, temps):
            with open(tmp, "wb") as f:
                f.write(safetensors_header(shard))
                for spec in shard:
                    try:
                        name, t = next(it)
                    except StopIteration:
                        raise ValueError(f"the tensors ended before {spec.name}") from None
                    if name != spec.name or tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                        raise ValueError(f"expected {spec.name} {spec.shape} {spec.dtype}, got {name} "
                                         f"{tuple(t.shape)} {t.dtype}")
                    # Raw bytes of a contiguous tensor (little-endian, as safetensors stores them), no extra copy.
                    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
                    done += 1
                    if on_tensor is not None:
                        on_tensor(done, len(specs), name)
                    del t
        extra = next(it, None)
        if extra is not None:
            raise ValueError(f"unexpected extra tensor {extra[0]}")
        index = None
        if n > 1:
            weight_map = {s.name: final.name for shard, final in zip(shards, finals) for s in shard}
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
            temps.append(_tmp_name(out_dir / INDEX_NAME))
            temps[-1].write_text(json.dumps(index, indent=2) + "\n")
            finals.append(out_dir / INDEX_NAME)
        _remove_stale_weights(out_dir, keep=set(finals))
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return finals


def _remove_stale_weights(out_dir: Path, keep: set) -> None:
    stale = [out_dir / WEIGHTS_NAME, out_dir / INDEX_NAME, *out_dir.glob("model-*-of-*.safetensors")]
    for f in stale:
        if f not in keep and f.is_file():
            f.unlink()


# --- conversion -------------------------------------------------------------------------------------------------------


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
        specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in to_lit(stand_ins, config, kind)]
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

    return write_weights(out_dir, specs, to_lit(tensors(), config, kind), max_shard_bytes, on_tensor)


def default_out_dir(model_name: str) -> Path:
    return Path("checkpoints") / model_name


def _check_out_dir(out_dir: Path, src: Path) -> None:
    src_dir = src if src.is_dir() else src.parent
    if out_dir.resolve() == src_dir.resolve():
        raise ConvertError(f"--out-dir {out_dir} is the source folder; converting in place would overwrite its "
                           f"config.json and weights. Choose another --out-dir.")


def _finish(out_dir: Path, config: Config, files: List[Path], warnings: List[str]) -> ConvertResult:
    # Written last: a folder with our config.json is a finished conversion.
    tmp = _tmp_name(out_dir / CONFIG_NAME)
    config.save(tmp)
    os.replace(tmp, out_dir / CONFIG_NAME)
    return ConvertResult(out_dir, config, files, warnings)


def _prepare_out_dir(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier conversion's config.json would make an interrupted re-conversion look finished.
    (out_dir / CONFIG_NAME).unlink(missing_ok=True)


def convert_hf(src_dir: PathLike, out_dir: Optional[PathLike] = None, dtype: Optional[torch.dtype] = None,
               model_name: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               on_tensor: Optional[OnTensor] = None) -> ConvertResult:
    """Convert a Hugging Face LLaMA-style folder into our checkpoint folder `out_dir` (default
    checkpoints/<model_name>; the model name defaults to the folder's name). dtype None keeps the source dtype."""
    from lit_aligner.tokenizer import export_hf_tokenizer

    config, source = hf_source(src_dir, model_name)
    src_dir = Path(src_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(config.name)
    _check_out_dir(out_dir, src_dir)
    plan(source, config, "hf", dtype)  # fail on a bad checkpoint before touching out_dir
    _prepare_out_dir(out_dir)
    warnings = _export_tokenizer(lambda: export_hf_tokenizer(src_dir, out_dir), src_dir, out_dir)
    files = convert_source(source, config, "hf", out_dir, dtype, max_shard_bytes, on_tensor)
    return _finish(out_dir, config, files, warnings)


def convert_meta(src_dir: PathLike, out_dir: Optional[PathLike] = None, dtype: Optional[torch.dtype] = None,
                 model_name: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 on_tensor: Optional[OnTensor] = None) -> ConvertResult:
    """Convert a Meta folder (params.json, consolidated.NN.pth; tokenizer.model inside it or next to it)."""
    from lit_aligner.tokenizer import export_hf_tokenizer

    config, source = meta_source(src_dir, model_name)
    src_dir = Path(src_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(config.name)
    _check_out_dir(out_dir, src_dir)
    plan(source, config, "meta", dtype)
    _prepare_out_dir(out_dir)
    tok_dir = meta_tokenizer_dir(src_dir)
    if tok_dir is None:
        warnings = [f"no tokenizer.model in {src_dir} or {src_dir.parent}: copy it into {out_dir} before generating"]
    else:
        warnings = _export_tokenizer(lambda: export_hf_tokenizer(tok_dir, out_dir), tok_dir, out_dir)
    files = convert_source(source, config, "meta", out_dir, dtype, max_shard_bytes, on_tensor)
    return _finish(out_dir, config, files, warnings)


def convert_gguf(path: PathLike, out_dir: Optional[PathLike] = None, dtype: Optional[torch.dtype] = None,
                 model_name: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 on_tensor: Optional[OnTensor] = None) -> ConvertResult:
    """Convert a llama-architecture GGUF file (quantized tensors are dequantized). dtype None: float32 up to
    GGUF_FLOAT32_MAX_PARAMS parameters, bfloat16 above. The tokenizer is rebuilt from the GGUF metadata."""
    from lit_aligner.tokenizer import export_gguf_tokenizer

    config, source, reader = gguf_source(path, model_name)
    path = Path(path)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(config.name)
    _check_out_dir(out_dir, path)
    if dtype is None:
        n_params = sum(torch.Size(shape).numel() for shape, _ in source.infos.values())
        dtype = torch.float32 if n_params <= GGUF_FLOAT32_MAX_PARAMS else torch.bfloat16
    plan(source, config, "gguf", dtype)
    _prepare_out_dir(out_dir)
    if "tokenizer.ggml.tokens" in reader.fields:
        warnings = _export_tokenizer(lambda: export_gguf_tokenizer(reader, out_dir), path, out_dir)
    else:
        warnings = [f"{path} carries no tokenizer (no tokenizer.ggml.tokens); copy the model's tokenizer files into "
                    f"{out_dir} before generating"]
    files = convert_source(source, config, "gguf", out_dir, dtype, max_shard_bytes, on_tensor)
    return _finish(out_dir, config, files, warnings)


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
