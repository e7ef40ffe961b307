"""Readers of source checkpoints (`hf_source`, `meta_source`, `gguf_source`): each opens a checkpoint lazily and
returns its `Config` and a `TensorSource` whose shapes and dtypes come from headers alone (safetensors headers, mmap'd
`torch.load`, GGUF tensor infos) and whose tensors are read one at a time."""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from lit_aligner.base import BaseModelError
from lit_aligner.config import Config, name_to_config
from lit_aligner.convert.mapping import meta_shard_dim
from lit_aligner.files import read_json_object, torch_load_failure

PathLike = Union[str, Path]
Shape = Tuple[int, ...]


class ConvertError(BaseModelError):
    """A source checkpoint that cannot be converted; the message names the file and the fix."""


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ST_TO_TORCH = {v: k for k, v in _ST_DTYPES.items()}


@dataclass
class TensorSource:
    """The tensors of one source checkpoint. `infos`: name -> (shape, dtype), known without reading any data;
    `read(name)` loads one tensor (CPU, that shape and dtype). `origin` names the files, for error messages."""

    infos: Dict[str, Tuple[Shape, torch.dtype]]
    read: Callable[[str], torch.Tensor]
    origin: str
    keep_alive: List[object] = field(default_factory=list, repr=False)  # open file handles / mmaps behind `read`
    interleaved_qk: Optional[bool] = None  # q/k rows interleave the RoPE pairs (None: as the source kind says)

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
    """A `torch.save`d state dict, memory-mapped: tensors are read from disk only when used. Never unpickles code."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zip" not in str(e).lower() and "mmap" not in str(e).lower():
                raise
            # Files from torch < 1.6 (no zip container) cannot be mmap'd: loaded whole, one file at a time.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors come in many types; all mean "not a checkpoint"
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint: {torch_load_failure(e)}. Only state dicts "
                           f"of tensors are read (no code in a file is run); use the model's .safetensors "
                           f"files.") from None
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


def hf_source(src_dir: PathLike, model_name: Optional[str] = None) -> Tuple[Config, TensorSource]:
    """A Hugging Face LLaMA-style model folder: `config.json` plus `model*.safetensors` (with
    `model.safetensors.index.json` when sharded) or `pytorch_model*.bin` (with its `.index.json`)."""
    src_dir = _require_dir(src_dir, "Hugging Face")
    cfg_path, hf = _source_config(src_dir, "config.json", "Hugging Face model", ("params.json", "Meta checkpoint",
                                                                                  "scripts/convert_meta.py"))
    if hf.get("format") == "lit-aligner":
        raise ConvertError(f"{src_dir} is already a converted lit-aligner checkpoint; load it directly.")
    try:
        config = Config.from_hf_config(hf, name=model_name or src_dir.resolve().name)
    except (KeyError, ValueError, TypeError) as e:
        raise ConvertError(f"{cfg_path}: {'missing field ' if isinstance(e, KeyError) else ''}{e}; this model cannot "
                           f"be converted (supported: Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3; howto/convert.md).") \
            from None

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


def _source_config(src_dir: Path, name: str, what: str, other: Tuple[str, str, str]) -> Tuple[Path, Dict]:
    """The config file `name` of a `what` folder as a dict; a folder holding `other`'s file instead is pointed to
    `other`'s converter."""
    path = src_dir / name
    if not path.is_file():
        hint = f" It looks like a {other[1]}: use {other[2]}." if (src_dir / other[0]).is_file() else ""
        raise ConvertError(f"{path} is missing: {src_dir} is not a {what} folder.{hint}")
    return path, read_json_object(path, f"{what} config", ConvertError)


def _indexed(index: Path) -> List[Path]:
    weight_map = read_json_object(index, "weight index", ConvertError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConvertError(f"{index}: not a valid weight index (no `weight_map`); download it again.")
    names = sorted(set(weight_map.values()))
    files = [index.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConvertError(f"{index} lists files that are missing: {missing}; download them too.")
    return files


def meta_source(src_dir: PathLike, model_name: Optional[str] = None) -> Tuple[Config, TensorSource]:
    """A Meta checkpoint folder: `params.json` and `consolidated.00.pth` (.. `consolidated.NN.pth` for model-parallel
    shards, concatenated here tensor by tensor)."""
    src_dir = _require_dir(src_dir, "Meta")
    params_path, params = _source_config(src_dir, "params.json", "Meta checkpoint", ("config.json",
                                                                                      "Hugging Face model",
                                                                                      "scripts/convert_hf.py"))
    dim = params.get("dim")
    if not isinstance(dim, int):
        raise ConvertError(f"{params_path}: not a Meta params.json (no integer `dim`).")
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


def gguf_source(path: PathLike, model_name: Optional[str] = None) -> Tuple[Config, TensorSource, "gguf.GGUFReader"]:  # noqa: F821
    """A GGUF file of the `llama`, `qwen2`, `qwen3` or `smollm3` architecture. Returns (config, source, reader):
    tensors are dequantized to float32 as they are read; `reader` (a gguf.GGUFReader) also carries the tokenizer
    metadata."""
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
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on a damaged file
        raise ConvertError(f"{path}: a damaged GGUF file: it starts as one, but cannot be read ({type(e).__name__}: "
                           f"{e}); a download cut short, most often: download it again.") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConvertError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                           f"{', '.join(GGUF_ARCHITECTURES)}: LLaMA 1-3.x, Mistral, SmolLM2, TinyLlama, Qwen2/2.5, "
                           f"Qwen3, SmolLM3).")
    if (meta.get("split.count") or 1) > 1:
        raise ConvertError(f"{path} is one part of a split GGUF; merge the parts first "
                           f"(`llama-gguf-split --merge {path} merged.gguf`).")
    if (meta.get(f"{arch}.expert_count") or 0) > 0:
        raise ConvertError(f"{path}: a mixture-of-experts model ({arch}.expert_count > 0) is not supported.")
    tensors = {t.name: t for t in reader.tensors}
    rope_scaling = _gguf_rope_scaling(path, meta, arch, tensors)

    unsupported = sorted({t.tensor_type.name for t in tensors.values() if not _can_dequantize(t.tensor_type)})
    if unsupported:
        raise ConvertError(f"{path}: tensor type(s) {', '.join(unsupported)} cannot be dequantized by gguf "
                           f"{getattr(gguf, '__version__', '')}; use a GGUF with F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants.")
    try:
        n_head = int(meta[f"{arch}.attention.head_count"])
        n_embd = int(meta[f"{arch}.embedding_length"])
        head_size = int(meta.get(f"{arch}.attention.key_length") or n_embd // n_head)
        rope_dims = int(meta.get(f"{arch}.rope.dimension_count") or head_size)
        if rope_dims != head_size:
            raise ConvertError(f"{path}: partial rotary embeddings (rope dims {rope_dims} < head size {head_size}) "
                               f"are not supported.")
        emb = tensors["token_embd.weight"]
        config = Config(
            block_size=int(meta.get(f"{arch}.context_length", 4096)),
            vocab_size=int(meta.get(f"{arch}.vocab_size") or emb.shape[-1]),
            n_layer=int(meta[f"{arch}.block_count"]),
            n_head=n_head,
            n_query_groups=int(meta.get(f"{arch}.attention.head_count_kv") or n_head),
            n_embd=n_embd,
            intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            rope_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            # stored as float32: 1e-5 reads back as 9.99999974e-06; round to the value the model was trained with
            norm_eps=float(f"{float(meta.get(f'{arch}.attention.layer_norm_rms_epsilon', 1e-5)):.6g}"),
            tie_embeddings="output.weight" not in tensors,
            head_size=head_size,
            attn_bias="blk.0.attn_q.bias" in tensors,
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            rope_scaling=rope_scaling,
            # llama.cpp's smollm3 graph leaves RoPE out of every 4th layer (a fixed step, no GGUF key)
            nope_layers=[i for i in range(int(meta[f"{arch}.block_count"])) if (i + 1) % 4 == 0]
            if arch == "smollm3" else None,
        )
    except KeyError as e:
        raise ConvertError(f"{path}: GGUF metadata or tensor {e} is missing; not a complete {arch} GGUF.") from None
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

    return config, TensorSource(infos, read, str(path), [reader], GGUF_ARCHITECTURES[arch]), reader


# llama, smollm3: q/k rows interleave the RoPE pairs (llama.cpp's "normal" RoPE); qwen2/qwen3 keep the half layout
# ("neox").
GGUF_ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False, "smollm3": True}


def _gguf_rope_scaling(path: Path, meta: Dict, arch: str, tensors: Dict) -> Optional[Dict]:
    """The rope_scaling dict of a GGUF: a Llama 3.1-style `rope_freqs.weight` tensor (per-frequency divisors, as
    llama.cpp applies them), a linear factor, or a YaRN block; anything else is refused."""
    import gguf

    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = float(meta.get(f"{arch}.rope.scaling.factor") or 1.0)
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        return {"rope_type": "freq_factors",
                "factors": [float(x) for x in gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)]}
    if kind in (None, "none") or (kind == "linear" and factor == 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(original)}
    raise ConvertError(f"{path}: RoPE scaling {kind!r} ({arch}.rope.scaling.type) is not supported.")


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
