"""Aligner files, the one home for reading and writing them: our `.safetensors` format, the paper's `.pth` format,
and `load_aligner`, which reads either and checks it against the base it is about to steer.

Our file holds exactly two tensors, `prefix` (N, n_embd) and `gate` (n_layer - start_layer, n_head), in the dtype they
were trained in, plus string metadata in the safetensors header:

    format="lit-aligner", format_version="1", n_tokens, start_layer, n_layer, n_head, n_embd, base_model
    (+ optional: template, mode, created_by, training arguments, ...)

An Aligner is read without its base model; `check_compatible` (called by `load_aligner(path, model)`) then compares
every dimension with the base it is about to steer, and non-finite values are refused. A base of another name but the
same shape is allowed (swapping Aligners between bases is the point) with a warning naming both.

The paper's checkpoints (arXiv 2312.05503, trained with a fork of lit-llama) are `torch.save` state dicts:
`global_value_embedding.weight` (N, C), `transformer.h.{i}.attn.gating_factor` (1, n_head, 1, 1) for i >= start_layer,
and `transformer.h.{i}.attn.adapter_wte.weight`, the same (N, C) tensor again per layer (one shared module).
"""

import json
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from lit_aligner.config import Config, name_to_config
from lit_aligner.files import UserError, atomic_write, torch_load_failure
from lit_aligner.model import DEFAULT_PREFIX_INIT, DEFAULT_PREFIX_INIT_SCALE, Aligner, AlignerConfig, LLaMA
from lit_aligner.prompts import saved_variables

PathLike = Union[str, Path]
FORMAT = "lit-aligner"
FORMAT_VERSION = "1"
# The header fields every file has; everything else in the metadata is free-form (strings).
SHAPE_KEYS = ("n_tokens", "start_layer", "n_layer", "n_head", "n_embd")
REQUIRED_KEYS = ("format", "format_version", *SHAPE_KEYS, "base_model")
CONVERT_HINT = ("convert it with `python scripts/convert_aligner.py {path} --out ALIGNER.safetensors` "
                "(see howto/aligners.md)")

PAPER_PREFIX_KEY = "global_value_embedding.weight"
_PAPER_GATE = re.compile(r"^transformer\.h\.(\d+)\.attn\.gating_factor$")
_PAPER_WTE = re.compile(r"^transformer\.h\.(\d+)\.attn\.adapter_wte\.weight$")


class AlignerFileError(UserError):
    """An Aligner file that cannot be used (missing, not an Aligner, damaged, non-finite, or made for another base
    shape). The message names the file(s) and the fix."""


class AlignerBaseWarning(UserWarning):
    """An Aligner trained on one base is attached to another base of the same shape."""


# --- our format -------------------------------------------------------------------------------------------------------


def build_aligner(n_tokens: int, start_layer: int, n_layer: int, n_head: int, n_embd: int,
                  prefix: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None) -> Aligner:
    """An `Aligner` of the given shape without a base model. prefix: (n_tokens, n_embd), gate: (n_layer - start_layer,
    n_head); both kept as given (dtype, device). Without them: the usual fresh init (random prefix, zero gates)."""
    config = Config(name="", n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    if prefix is None and gate is None:
        return Aligner(config, AlignerConfig(n_tokens, start_layer))
    with torch.device("meta"):  # no random init for tensors about to be replaced
        aligner = Aligner(config, AlignerConfig(n_tokens, start_layer))
    aligner.load_state_dict({"prefix": prefix, "gate": gate}, assign=True)
    return aligner


def _metadata(aligner: Aligner, base_name: str, extra: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    # safetensors metadata is str -> str: other values are stored as JSON.
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()}
    meta.update(
        format=FORMAT, format_version=FORMAT_VERSION, n_tokens=str(aligner.n_tokens),
        start_layer=str(aligner.start_layer), n_layer=str(aligner.n_layer), n_head=str(aligner.n_head),
        n_embd=str(aligner.n_embd), base_model=str(base_name),
    )
    return meta




def save_aligner(aligner: Aligner, path: PathLike, base_name: str,
                 metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write `aligner` to `path` (.safetensors): `prefix` (N, n_embd) and `gate` (n_layer - start_layer, n_head) in
    their own dtype, and the header metadata described in the module docstring. `base_name`: the base model's config
    name (e.g. "Llama-2-7b-hf"). `metadata`: extra keys (template, mode, created_by, training args); non-string values
    are stored as JSON text. Written atomically (temporary file, then rename). Returns the path."""
    from safetensors.torch import save_file

    if aligner.prefix.dim() != 2:
        raise ValueError(f"save_aligner saves one Aligner; got a stack of {aligner.prefix.shape[0]} (prefix "
                         f"{tuple(aligner.prefix.shape)}). Save each Aligner separately.")
    path = Path(path)
    meta = _metadata(aligner, base_name, metadata)
    tensors = {"prefix": aligner.prefix.detach().cpu().contiguous(), "gate": aligner.gate.detach().cpu().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def _sniff(path: Path) -> str:
    """What a file looks like from its first bytes: "zip" (torch.save), "pickle" (legacy torch.save), "text", or
    "other" (safetensors starts with a little-endian header length)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"[") or (head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256])):
        return "text"
    return "other"


def _text_error(path: Path) -> AlignerFileError:
    with open(path, "rb") as f:
        first = f.readline(200).decode("utf-8", "replace").strip()
    kind = "JSON text" if first[:1] in "{[" else "text"
    return AlignerFileError(
        f"{path} is not a checkpoint: it is {kind} (starts with {first[:60]!r}), not tensors saved by torch.save or "
        f"safetensors. The paper's Aligner checkpoints are the .pth state dicts with `global_value_embedding.weight`; "
        f"check that you downloaded the right file."
    )


def _require_file(path: Path) -> None:
    if not path.exists():
        raise AlignerFileError(f"{path}: no such Aligner file. Train one (howto/finetune.md) or convert one of the "
                               f"paper's .pth checkpoints (howto/aligners.md).")
    if not path.is_file():
        inside = [p for p in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth"))
                  if not p.name.startswith("model")]  # a base model's weights are no Aligner
        hint = f" ({', '.join(str(p) for p in inside[:3])})" if inside else " (it holds none)"
        raise AlignerFileError(f"{path} is a directory, not an Aligner file: give the Aligner file inside it{hint}.")


def _int_field(meta: Mapping[str, str], key: str, path: Path) -> int:
    try:
        return int(meta[key])
    except (TypeError, ValueError):
        raise AlignerFileError(f"{path}: metadata field {key}={meta[key]!r} is not an integer; the file is damaged. "
                               f"Save or convert the Aligner again.") from None


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The header metadata of one of our Aligner files (str -> str), validated, without reading the tensors."""
    return _open(Path(path))[1]


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    _require_file(path)
    kind = _sniff(path)
    if kind in ("zip", "pickle"):
        raise AlignerFileError(f"{path} is a PyTorch .pth file, not a lit-aligner .safetensors file. If it is one of "
                               f"the paper's Aligner checkpoints, {CONVERT_HINT.format(path=path)}.")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        meta = dict(handle.metadata() or {})
        keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as e:
        if kind == "text":
            raise _text_error(path) from None
        raise AlignerFileError(f"{path} is not a readable safetensors file ({e}): it is damaged or truncated, or "
                               f"not an Aligner file. Save or convert the Aligner again.") from None
    if meta.get("format") != FORMAT:
        what = "model weights" if len(keys) > 2 else "tensors"
        raise AlignerFileError(f"{path} is a safetensors file of {what} ({len(keys)} tensors, e.g. {keys[:3]}) without "
                               f"lit-aligner metadata (format={meta.get('format')!r}): not a lit-aligner Aligner "
                               f"file. Aligner files hold only `prefix` and `gate` (howto/aligners.md).")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise AlignerFileError(f"{path}: metadata lacks {missing}; the file is damaged. Save or convert it again.")
    if meta["format_version"] != FORMAT_VERSION:
        raise AlignerFileError(f"{path}: format_version {meta['format_version']!r} is not supported (this lit-aligner "
                               f"reads version {FORMAT_VERSION}); upgrade lit-aligner.")
    for k in SHAPE_KEYS:
        _int_field(meta, k, path)
    if sorted(keys) != ["gate", "prefix"]:
        raise AlignerFileError(f"{path}: expected exactly the tensors ['gate', 'prefix'] in an Aligner file, found "
                               f"{sorted(keys)}. Save or convert the Aligner again.")
    try:  # read wherever its prompts are rendered: a bad value fails here, once, naming the file
        saved_variables(meta)
    except ValueError as e:
        raise AlignerFileError(f"{path}: its metadata's template_variables are malformed ({e}); the field is the "
                               f"JSON text of an object of chat-template variables. Save the Aligner again.") from None
    return handle, meta


def _read_ours(path: Path) -> Tuple[Aligner, Dict[str, str]]:
    """An Aligner file written by `save_aligner` (prefix and gate in the file's dtype) and its header metadata."""
    handle, meta = _open(path)
    n_tokens, start, n_layer, n_head, n_embd = (_int_field(meta, k, path) for k in SHAPE_KEYS)
    try:
        prefix, gate = handle.get_tensor("prefix"), handle.get_tensor("gate")
    except Exception as e:  # the header promised more bytes than the file holds
        raise AlignerFileError(f"{path}: cannot read its tensors ({e}); the file is truncated or damaged. Save or "
                               f"convert the Aligner again.") from None
    want = {"prefix": (n_tokens, n_embd), "gate": (n_layer - start, n_head)}
    got = {"prefix": tuple(prefix.shape), "gate": tuple(gate.shape)}
    if got != want or not (0 <= start < n_layer) or n_tokens < 1:
        raise AlignerFileError(
            f"{path}: tensor shapes prefix {got['prefix']}, gate {got['gate']} do not match the metadata (n_tokens "
            f"{n_tokens}, start_layer {start}, n_layer {n_layer}, n_head {n_head}, n_embd {n_embd}: prefix "
            f"{want['prefix']}, gate {want['gate']}). The file is damaged; save or convert the Aligner again.")
    for name, t in (("prefix", prefix), ("gate", gate)):
        if not t.is_floating_point():
            raise AlignerFileError(f"{path}: `{name}` has dtype {t.dtype}, not a float type. Save the Aligner again.")
    return build_aligner(n_tokens, start, n_layer, n_head, n_embd, prefix, gate), meta


PAPER_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def load_aligner(path: PathLike, model: Optional[LLaMA] = None, *, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None,
                 base_name: Optional[str] = None) -> Tuple[Aligner, Dict[str, str]]:
    """Read an Aligner file of any supported format: ours (`.safetensors`, see `save_aligner`) or one of the paper's
    `.pth` checkpoints (imported in memory; no code in it runs). Returns (aligner, metadata): prefix (N, n_embd) and
    gate (n_layer - start_layer, n_head), and the header metadata (str -> str; for a paper file, what
    `import_paper_checkpoint` derives).

    With `model`, the Aligner is checked against that base (`check_compatible`: one AlignerFileError naming both
    shapes, or an AlignerBaseWarning for a same-shape base of another name; `base_name` names the base in messages)
    and moved to the model's device and dtype (`dtype`, when given, instead: a training run's fp32 Aligner on a
    half-precision base). Otherwise it stays on `device` (default: the CPU) in `dtype` (default: the file's). Raises
    `AlignerFileError` for a missing, non-Aligner, damaged, inconsistent or non-finite file."""
    path = Path(path)
    _require_file(path)
    if path.suffix in PAPER_SUFFIXES or _sniff(path) in ("zip", "pickle"):
        aligner, meta = import_paper_checkpoint(path)
    else:
        aligner, meta = _read_ours(path)
    bad = [n for n, t in (("prefix", aligner.prefix), ("gate", aligner.gate)) if not torch.isfinite(t).all()]
    if bad:  # a diverged run's Aligner would silently generate nothing (and blank other rows of a shared batch)
        raise AlignerFileError(f"{path}: the Aligner's {' and '.join(bad)} hold NaN or infinite values (a diverged "
                               f"training run?); retrain it, e.g. with a lower --learning-rate.")
    if model is not None:
        check_compatible(aligner, model.config, path, base_name, metadata=meta)
        p = model.tok_embeddings.weight
        device, dtype = p.device, dtype or p.dtype
    return aligner.to(device=device or "cpu", dtype=dtype), meta


# --- compatibility with a base model ----------------------------------------------------------------------------------


def _dims(aligner_or_meta: Union[Aligner, Mapping[str, Any]], path: Path) -> Dict[str, int]:
    if isinstance(aligner_or_meta, Aligner):
        a = aligner_or_meta
        return dict(n_tokens=a.n_tokens, start_layer=a.start_layer, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    return {k: _int_field(aligner_or_meta, k, path) for k in SHAPE_KEYS}


def check_compatible(
    aligner: Union[Aligner, Mapping[str, Any]],
    model_config: Config,
    aligner_path: Optional[PathLike] = None,
    base_name: Optional[str] = None,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
) -> None:
    """Check that an Aligner (or the metadata of its file) fits the base `model_config`: n_embd (prefix width), n_layer
    and start_layer (number of gated layers) and n_head (gate width). On mismatch, one `AlignerFileError` naming both
    shapes, the Aligner file (`aligner_path`) and the base (`base_name`, e.g. its checkpoint directory; default
    `model_config.name`). A same-shape base of another name than the file's `base_model` (from `metadata`, or from
    `aligner` when it is metadata) gives an `AlignerBaseWarning` naming both."""
    aligner_path = Path(aligner_path or "<in-memory Aligner>")
    if metadata is None and not isinstance(aligner, Aligner):
        metadata = aligner
    d = _dims(aligner, aligner_path)
    base = base_name or model_config.name or "the base model"
    trained_on = str((metadata or {}).get("base_model", "") or "")
    fits = (d["n_embd"] == model_config.n_embd and d["n_layer"] == model_config.n_layer
            and d["n_head"] == model_config.n_head and d["start_layer"] < model_config.n_layer)
    if not fits:
        n_gated = max(model_config.n_layer - d["start_layer"], 0)
        raise AlignerFileError(
            f"the Aligner {aligner_path} does not fit the base model {base}: the Aligner has prefix "
            f"{(d['n_tokens'], d['n_embd'])} and gate {(d['n_layer'] - d['start_layer'], d['n_head'])} "
            f"(n_layer={d['n_layer']}, n_head={d['n_head']}, n_embd={d['n_embd']}, start_layer={d['start_layer']}"
            f"{', trained on ' + trained_on if trained_on else ''}), but {base} needs prefix "
            f"{(d['n_tokens'], model_config.n_embd)} and gate {(n_gated, model_config.n_head)} "
            f"(n_layer={model_config.n_layer}, n_head={model_config.n_head}, n_embd={model_config.n_embd}). "
            f"Use an Aligner trained on a base of this shape"
            f"{', or load its own base (' + trained_on + ')' if trained_on else ''}."
        )
    here = model_config.name or base
    if trained_on and here and trained_on.lower() != here.lower():
        warnings.warn(
            f"the Aligner {aligner_path} was trained on {trained_on} and is attached to {here} ({base}), a different "
            f"base of the same shape ({model_config.n_layer} layers, {model_config.n_head} heads, n_embd "
            f"{model_config.n_embd}); its effect depends on how close the two bases are.",
            AlignerBaseWarning, stacklevel=2,
        )


def attach(model: LLaMA, aligner: Union[Aligner, PathLike], dtype: Optional[torch.dtype] = None) -> Aligner:
    """Make an Aligner (or the Aligner file at that path, loaded and checked with `load_aligner`) the model's own
    (`model.aligner`, used when the forward pass gets no `aligner` argument), on the model's device and dtype (`dtype`,
    when given, instead: the forward casts the Aligner to the activations' dtype)."""
    if not isinstance(aligner, Aligner):
        aligner, _ = load_aligner(aligner, model, dtype=dtype)
    p = model.tok_embeddings.weight
    model.aligner = aligner.to(device=p.device, dtype=dtype or p.dtype)
    return model.aligner


def new_aligner(model: LLaMA, n_tokens: int = 10, start_layer: int = 2, prefix_init: str = DEFAULT_PREFIX_INIT,
                prefix_init_scale: float = DEFAULT_PREFIX_INIT_SCALE, dtype: Optional[torch.dtype] = None) -> Aligner:
    """Give `model` a fresh, trainable Aligner (random prefix drawn as `prefix_init` and `prefix_init_scale` say, see
    `lit_aligner.model.init_prefix`; zero gates: exactly the base) on its device and in its dtype (or `dtype`);
    returns it."""
    from lit_aligner.model import init_prefix

    aligner = Aligner(model.config, AlignerConfig(n_tokens, start_layer))
    init_prefix(model, aligner, prefix_init, scale=prefix_init_scale)
    return attach(model, aligner, dtype)


# --- the paper's .pth format ------------------------------------------------------------------------------------------


def guess_base(n_layer: int, n_head: int, n_embd: int) -> List[str]:
    """Registry config names of that shape, LLaMA-2 first (the paper's checkpoints were all trained on LLaMA-2)."""
    names = [n for n, c in name_to_config.items() if c["name"] == n  # skip short aliases
             and (c["n_layer"], c["n_head"], c["n_embd"]) == (n_layer, n_head, n_embd)]
    return sorted(names, key=lambda n: (not n.startswith("Llama-2"), "chat" in n or "Instruct" in n, n))


def _load_pth(path: Path) -> Dict[str, torch.Tensor]:
    _require_file(path)
    kind = _sniff(path)
    if kind == "text":
        raise _text_error(path)
    if kind not in ("zip", "pickle"):
        if path.suffix == ".safetensors":
            raise AlignerFileError(f"{path} is a .safetensors file, not the paper's .pth format: to export it to the "
                                   f"paper's layout use `python scripts/convert_aligner.py {path} --to paper "
                                   f"--out X.pth`.")
        raise AlignerFileError(f"{path} is not a checkpoint: not a torch.save file (no zip or pickle header). The "
                               f"paper's Aligner checkpoints are .pth state dicts; check that the file is complete.")
    try:
        sd = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # never retry with weights_only=False: that would run code from the file
        raise AlignerFileError(f"{path} is not a checkpoint of plain tensors: {torch_load_failure(e)}. Only state "
                               f"dicts of tensors are read; no code in a file is run.") from None
    if isinstance(sd, dict):
        for wrapper in ("state_dict", "model"):  # common training-loop envelopes
            if PAPER_PREFIX_KEY not in sd and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AlignerFileError(f"{path} is not a checkpoint state dict (it holds a {type(sd).__name__}); the paper's "
                               f"Aligner checkpoints are dicts of tensors.")
    return sd


def import_paper_checkpoint(path: PathLike, base_name: Optional[str] = None) -> Tuple[Aligner, Dict[str, str]]:
    """Read one of the paper's Aligner checkpoints (`.pth`, loaded with weights_only=True: no code runs). N, n_embd,
    n_head, start_layer (first gated layer) and n_layer (last gated layer + 1) come from the keys and shapes; the base
    name (`base_model` metadata) is `base_name` or guessed from the shape via the config registry. Returns (aligner,
    metadata) with prefix (N, n_embd) and gate (n_layer - start_layer, n_head) in the file's dtype, ready for
    `save_aligner(aligner, out, metadata["base_model"], metadata)`."""
    path = Path(path)
    sd = _load_pth(path)
    if PAPER_PREFIX_KEY not in sd:
        hint = ""
        if "prefix" in sd and "gate" in sd:
            hint = " It looks like a lit-aligner Aligner saved with torch.save; use save_aligner instead."
        raise AlignerFileError(f"{path} is not one of the paper's Aligner checkpoints: no `{PAPER_PREFIX_KEY}` among "
                               f"its {len(sd)} tensors (e.g. {sorted(sd)[:3]}).{hint}")
    prefix = sd[PAPER_PREFIX_KEY]
    if prefix.dim() != 2 or not prefix.is_floating_point():
        raise AlignerFileError(f"{path}: `{PAPER_PREFIX_KEY}` has shape {tuple(prefix.shape)} ({prefix.dtype}); "
                               f"expected a float (N, n_embd) matrix.")
    n_tokens, n_embd = prefix.shape
    gates = {int(m.group(1)): t for k, t in sd.items() if (m := _PAPER_GATE.match(k))}
    wtes = {int(m.group(1)): t for k, t in sd.items() if (m := _PAPER_WTE.match(k))}
    if not gates:
        raise AlignerFileError(f"{path}: no `transformer.h.{{i}}.attn.gating_factor` tensors: not a complete Aligner "
                               f"checkpoint.")
    start, n_layer = min(gates), max(gates) + 1
    if sorted(gates) != list(range(start, n_layer)):
        missing = sorted(set(range(start, n_layer)) - set(gates))
        raise AlignerFileError(f"{path}: gates for layers {start}..{n_layer - 1} expected, layers {missing} are "
                               f"missing.")
    shapes = {tuple(t.shape) for t in gates.values()}
    n_head = gates[start].numel()
    if len(shapes) != 1 or gates[start].dim() != 4 or gates[start].shape != (1, n_head, 1, 1):
        raise AlignerFileError(f"{path}: gating factors of shapes {sorted(shapes)}; expected (1, n_head, 1, 1) in "
                               f"every layer.")
    ignored = [k for k in sd if k != PAPER_PREFIX_KEY and not _PAPER_GATE.match(k) and not _PAPER_WTE.match(k)]
    if ignored:
        warnings.warn(f"{path}: ignored {len(ignored)} tensors that are not part of the Aligner (e.g. {ignored[:3]}).",
                      stacklevel=2)
    differ = [i for i, t in sorted(wtes.items()) if t.shape != prefix.shape or not torch.equal(t, prefix)]
    if differ:
        warnings.warn(f"{path}: `adapter_wte` of layers {differ} differs from `{PAPER_PREFIX_KEY}` (they are one "
                      f"shared module in the paper's code); the global embedding is used.", stacklevel=2)
    gate = torch.stack([gates[i].reshape(n_head) for i in range(start, n_layer)])  # (n_layer - start, n_head)
    aligner = build_aligner(n_tokens, start, n_layer, n_head, n_embd, prefix.clone(), gate)
    candidates = guess_base(n_layer, n_head, n_embd)
    meta = {
        "source": f"paper:{path.name}",
        "base_model": base_name or (candidates[0] if candidates else ""),
        "base_candidates": ",".join(candidates),
    }
    return aligner, _metadata(aligner, meta["base_model"], meta)


def paper_state_dict(aligner: Aligner) -> Dict[str, torch.Tensor]:
    """`aligner` in the paper's names and shapes. The per-layer `adapter_wte` entries are the very tensor of
    `global_value_embedding`, as in the paper's shared module, so torch.save writes its data once."""
    if aligner.prefix.dim() != 2:
        raise ValueError(f"export one Aligner at a time; got a stack of {aligner.prefix.shape[0]}")
    prefix = aligner.prefix.detach().cpu().clone()
    sd = {PAPER_PREFIX_KEY: prefix}
    for j, i in enumerate(range(aligner.start_layer, aligner.n_layer)):
        gate = aligner.gate.detach()[j].cpu().reshape(1, aligner.n_head, 1, 1)  # the paper's (1, n_head, 1, 1)
        sd[f"transformer.h.{i}.attn.gating_factor"] = gate.clone()
        sd[f"transformer.h.{i}.attn.adapter_wte.weight"] = prefix
    return sd


def export_paper_checkpoint(aligner: Aligner, path: PathLike) -> Path:
    """Write `aligner` as the paper's `.pth` state dict (see `paper_state_dict`), in the Aligner's dtype (the paper's
    files are bfloat16), atomically. Returns the path."""
    path = Path(path)
    sd = paper_state_dict(aligner)
    atomic_write(path, lambda tmp: torch.save(sd, tmp))
    return path


def describe(aligner: Aligner, metadata: Mapping[str, str]) -> str:
    """One line: N, gated layers, heads, width, dtype and base of an Aligner."""
    base = metadata.get("base_model") or "unknown base"
    return (f"N={aligner.n_tokens} token(s), gated layers {aligner.start_layer}..{aligner.n_layer - 1} of "
            f"{aligner.n_layer}, {aligner.n_head} heads, n_embd {aligner.n_embd}, {aligner.num_params():,} numbers "
            f"({str(aligner.prefix.dtype).replace('torch.', '')}), base {base}")
