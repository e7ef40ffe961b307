"""Model configs: one dataclass, one registry of named LLaMA-family shapes, and readers for the config files
that checkpoints carry (ours, Hugging Face `config.json` of Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3, and Meta
`params.json`). A field the model cannot honour exactly is one clear error naming it, never a silent mismatch."""

import copy
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from lit_aligner.files import UserError, read_json_object

_INT_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_query_groups", "n_embd", "intermediate_size",
               "head_size")


@dataclass
class Config:
    name: str = ""
    block_size: int = 4096  # longest sequence the model was trained for (RoPE cache length)
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_query_groups: Optional[int] = None  # key/value heads (GQA); None means n_head (plain multi-head)
    n_embd: int = 4096
    intermediate_size: int = 11008
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # output projection shares the token embedding matrix
    head_size: Optional[int] = None  # None means n_embd // n_head
    attn_bias: bool = False  # bias on the q, k, v projections (Qwen2 / Qwen2.5)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    rope_scaling: Optional[Dict[str, Any]] = None  # Hugging Face's rope_scaling dict (see model.rope_frequencies)
    nope_layers: Optional[List[int]] = None  # layers whose attention has no RoPE at all (SmolLM3: every 4th)

    def __post_init__(self):
        for name in ("n_head", "n_embd"):
            self._check_int(name)
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            self.head_size = self.n_embd // self.n_head
        for name in _INT_FIELDS:
            self._check_int(name)
        for name in ("rope_base", "norm_eps"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise ValueError(f"config field {name} must be a number, got {getattr(self, name)!r}")
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_query_groups ({self.n_query_groups})")
        if self.head_size % 2:
            raise ValueError(f"head_size must be even for RoPE, got {self.head_size}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, self.head_size)
        if self.nope_layers is not None:
            if not isinstance(self.nope_layers, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layer for i in self.nope_layers):
                raise ValueError(f"config field nope_layers must list layer indices in 0..{self.n_layer - 1}, got "
                                 f"{self.nope_layers!r}")
            self.nope_layers = sorted(set(self.nope_layers)) or None

    def _check_int(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config field {name} must be a positive integer, got {value!r}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in name_to_config:
            close = [n for n in name_to_config if name.lower() in n.lower()]
            hint = f" Did you mean {close}?" if close else f" Known: {sorted(name_to_config)}"
            raise ValueError(f"Unknown model config {name!r}.{hint}")
        return cls(**copy.deepcopy({**name_to_config[name], **overrides}))

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Config":
        """Reads our `config.json`, a Hugging Face `config.json` or a Meta `params.json`, whichever `path` is."""
        path = Path(path)
        d = read_json_object(path, "model config")
        try:
            if d.get("format") == "lit-aligner":
                known = {f.name for f in fields(cls)}
                return cls(**{k: v for k, v in d.items() if k in known})
            if "architectures" in d or "model_type" in d or "num_hidden_layers" in d:
                return cls.from_hf_config(d)
            if "dim" in d and "n_layers" in d:
                return cls.from_meta_params(d)
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise UserError(f"{path}: not a usable model config ({detail}); convert the model again.") from None
        raise UserError(f"{path}: not a lit-aligner, Hugging Face or Meta model config; convert the model again.")

    @classmethod
    def from_hf_config(cls, d: Dict[str, Any], name: str = "") -> "Config":
        """A Hugging Face `config.json` of a supported family (model_type llama, mistral, qwen2, qwen3, smollm3).
        ValueError naming the field for anything the model cannot compute exactly."""
        model_type = d.get("model_type", "llama")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(HF_MODEL_TYPES)})")
        for key in ("mlp_bias", "attention_bias"):  # (Qwen2's q/k/v bias is not a config field: always there)
            if d.get(key):
                raise ValueError(f"{key}: true (a bias on the {'MLP' if key == 'mlp_bias' else 'output projection'}) "
                                 f"is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (SwiGLU with silu only)")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial_rotary_factor {d['partial_rotary_factor']} is not supported")
        # transformers >= 5 writes `rope_parameters` (rope_type, rope_theta, factors) instead of rope_scaling /
        # rope_theta.
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        rope_base = float(d.get("rope_theta", rope.pop("rope_theta", 10000.0)))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        block_size = d.get("max_position_embeddings", 4096)
        window = d.get("sliding_window")
        if window and d.get("use_sliding_window", not model_type.startswith("qwen")) and window < block_size:
            if model_type != "mistral":
                raise ValueError(f"sliding_window {window} (use_sliding_window true) is not supported")
            # Mistral v0.1 attends over a 4096-token window; up to that length full attention is the same.
            block_size = window
        head_size = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        if rope and rope.get("rope_type", rope.get("type")) in ("yarn", "llama3"):
            rope.setdefault("original_max_position_embeddings", block_size)
        nope = None
        if model_type == "smollm3":  # no_rope_layers: 1 = RoPE, 0 = none; by default every interval-th layer has none
            n, every = d["num_hidden_layers"], d.get("no_rope_layer_interval", 4)
            flags = d.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n)]
            if len(flags) != n:
                raise ValueError(f"no_rope_layers has {len(flags)} entries for {n} layers")
            nope = [i for i, use in enumerate(flags) if not use]
            if any(t != "full_attention" for t in d.get("layer_types") or ()):
                raise ValueError(f"layer_types {sorted(set(d['layer_types']))}: sliding-window layers are not "
                                 f"supported")
        return cls(
            name=name or d.get("_name_or_path", ""),
            block_size=block_size,
            vocab_size=d["vocab_size"],
            n_layer=d["num_hidden_layers"],
            n_head=d["num_attention_heads"],
            n_query_groups=d.get("num_key_value_heads") or d["num_attention_heads"],
            n_embd=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            rope_base=rope_base,
            norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_size=head_size,
            attn_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            rope_scaling=rope or None,
            nope_layers=nope,
        )

    @classmethod
    def from_meta_params(cls, d: Dict[str, Any], name: str = "", vocab_size: Optional[int] = None) -> "Config":
        dim, n_head = d["dim"], d["n_heads"]
        # Meta's FFN width: 2/3 * 4 * dim, times an optional multiplier, rounded up to `multiple_of`.
        hidden = int(2 * 4 * dim / 3)
        if d.get("ffn_dim_multiplier") is not None:
            hidden = int(d["ffn_dim_multiplier"] * hidden)
        multiple_of = d.get("multiple_of", 256)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        vocab = d.get("vocab_size", -1)
        if vocab is None or vocab < 0:
            vocab = vocab_size or 32000
        rope_scaling = None
        if d.get("use_scaled_rope"):  # Llama 3.1+: Meta's apply_scaling, the HF "llama3" type
            rope_scaling = {"rope_type": "llama3", "factor": float(d.get("rope_scaling_factor", 8.0)),
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        return cls(
            name=name,
            rope_scaling=rope_scaling,
            block_size=d.get("max_seq_len", 4096 if d.get("n_kv_heads") or d.get("norm_eps", 1e-6) == 1e-5 else 2048),
            vocab_size=vocab,
            n_layer=d["n_layers"],
            n_head=n_head,
            n_query_groups=d.get("n_kv_heads") or n_head,
            n_embd=dim,
            intermediate_size=hidden,
            rope_base=float(d.get("rope_theta", 10000.0)),
            norm_eps=d.get("norm_eps", 1e-6),
        )

    def to_hf_config(self, torch_dtype: str = "float32") -> Dict[str, Any]:
        """The Hugging Face config.json of this model (the inverse of `from_hf_config`): qwen3 when it has q/k norms,
        qwen2 when its q/k/v projections have a bias, smollm3 when layers go without RoPE, llama otherwise (Mistral
        without a sliding window is the same computation)."""
        if self.nope_layers and (self.qk_norm or self.attn_bias):
            raise ValueError("no Hugging Face family has layers without RoPE beside q/k norms or a q/k/v bias")
        model_type = "qwen3" if self.qk_norm else "qwen2" if self.attn_bias else "smollm3" if self.nope_layers else \
            "llama"
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "smollm3": "SmolLM3ForCausalLM"}[model_type]
        d: Dict[str, Any] = {
            "architectures": [arch], "model_type": model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_query_groups, "head_dim": self.head_size,
            "max_position_embeddings": self.block_size, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_base,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "torch_dtype": torch_dtype, "_name_or_path": self.name,
        }
        if model_type != "llama":
            d.update(use_sliding_window=False, sliding_window=None)
        if model_type == "smollm3":
            d["no_rope_layers"] = [int(i not in self.nope_layers) for i in range(self.n_layer)]
        return d

    def to_dict(self) -> Dict[str, Any]:
        """What a base-model directory's config.json holds."""
        return {"format": "lit-aligner", **asdict(self)}

    def shape(self) -> Dict[str, Any]:
        """Everything but the name: two configs with the same shape run the same computation."""
        return {k: v for k, v in asdict(self).items() if k != "name"}


HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
ROPE_SCALINGS = {  # rope_type -> the fields it needs
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "freq_factors": ("factors",),
}


def check_rope_scaling(scaling: Dict[str, Any], head_size: int) -> None:
    """ValueError naming the field when a rope_scaling dict is of a type the model does not compute exactly."""
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling.rope_type {kind!r} is not supported (supported: default, "
                         f"{', '.join(ROPE_SCALINGS)})")
    missing = [k for k in ROPE_SCALINGS[kind] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} lacks {missing}")
    if kind == "freq_factors" and len(scaling["factors"]) != head_size // 2:
        raise ValueError(f"rope_scaling.factors has {len(scaling['factors'])} values, head_size / 2 = {head_size // 2} "
                         f"expected")


# One registry for every family. Shapes are those of the published checkpoints.
_llama1 = dict(vocab_size=32000, block_size=2048, norm_eps=1e-6)
_llama3 = dict(vocab_size=128256, block_size=8192, norm_eps=1e-5, rope_base=500000.0)


def _llama31(factor: float) -> Dict[str, Any]:
    return {**_llama3, "block_size": 131072, "rope_scaling": {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}


_qwen25 = dict(vocab_size=151936, block_size=32768, norm_eps=1e-6, rope_base=1000000.0, attn_bias=True)
_qwen3 = dict(vocab_size=151936, block_size=40960, norm_eps=1e-6, rope_base=1000000.0, qk_norm=True, head_size=128)
_llama2 = dict(vocab_size=32000, block_size=4096, norm_eps=1e-5)
_smollm2 = dict(vocab_size=49152, block_size=8192, norm_eps=1e-5, tie_embeddings=True)
configs = [
    dict(name="llama-7b", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, **_llama1),
    dict(name="llama-13b", n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824, **_llama1),
    dict(name="llama-30b", n_layer=60, n_head=52, n_embd=6656, intermediate_size=17920, **_llama1),
    dict(name="llama-65b", n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016, **_llama1),
    dict(name="Llama-2-7b-hf", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, **_llama2),
    dict(name="Llama-2-13b-hf", n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824, **_llama2),
    dict(name="Llama-2-70b-hf", n_layer=80, n_head=64, n_query_groups=8, n_embd=8192, intermediate_size=28672,
         **_llama2),
    dict(name="TinyLlama-1.1B", n_layer=22, n_head=32, n_query_groups=4, n_embd=2048, intermediate_size=5632,
         vocab_size=32000, block_size=2048, norm_eps=1e-5),
    dict(name="SmolLM2-135M", n_layer=30, n_head=9, n_query_groups=3, n_embd=576, intermediate_size=1536,
         rope_base=100000.0, **_smollm2),
    dict(name="SmolLM2-360M", n_layer=32, n_head=15, n_query_groups=5, n_embd=960, intermediate_size=2560,
         rope_base=100000.0, **_smollm2),
    dict(name="SmolLM2-1.7B", n_layer=24, n_head=32, n_query_groups=32, n_embd=2048, intermediate_size=8192,
         rope_base=130000.0, **_smollm2),
    # Mistral v0.1 attends over a 4096-token window; within it, full attention is the same computation.
    dict(name="Mistral-7B-v0.1", n_layer=32, n_head=32, n_query_groups=8, n_embd=4096, intermediate_size=14336,
         vocab_size=32000, block_size=4096, norm_eps=1e-5),
    dict(name="Mistral-7B-v0.3", n_layer=32, n_head=32, n_query_groups=8, n_embd=4096, intermediate_size=14336,
         vocab_size=32768, block_size=32768, norm_eps=1e-5, rope_base=1000000.0),
    # Mistral-Nemo: head_size 128 is not n_embd / n_head (160)
    dict(name="Mistral-Nemo-Base-2407", n_layer=40, n_head=32, n_query_groups=8, n_embd=5120, intermediate_size=14336,
         vocab_size=131072, block_size=131072, norm_eps=1e-5, rope_base=1000000.0, head_size=128),
    # Llama 3 / 3.1 / 3.2 / 3.3: the 128k-token BPE vocabulary; 3.1+ extend the context with "llama3" RoPE scaling
    dict(name="Llama-3-8B", n_layer=32, n_head=32, n_query_groups=8, n_embd=4096, intermediate_size=14336,
         **_llama3),
    dict(name="Llama-3-70B", n_layer=80, n_head=64, n_query_groups=8, n_embd=8192, intermediate_size=28672,
         **_llama3),
    dict(name="Llama-3.1-8B", n_layer=32, n_head=32, n_query_groups=8, n_embd=4096, intermediate_size=14336,
         **_llama31(8.0)),
    dict(name="Llama-3.1-70B", n_layer=80, n_head=64, n_query_groups=8, n_embd=8192, intermediate_size=28672,
         **_llama31(8.0)),
    dict(name="Llama-3.2-1B", n_layer=16, n_head=32, n_query_groups=8, n_embd=2048, intermediate_size=8192,
         tie_embeddings=True, head_size=64, **_llama31(32.0)),
    dict(name="Llama-3.2-3B", n_layer=28, n_head=24, n_query_groups=8, n_embd=3072, intermediate_size=8192,
         tie_embeddings=True, head_size=128, **_llama31(32.0)),
    dict(name="Llama-3.3-70B-Instruct", n_layer=80, n_head=64, n_query_groups=8, n_embd=8192, intermediate_size=28672,
         **_llama31(8.0)),
    # Qwen2.5: bias on q/k/v; the small ones tie their embeddings
    dict(name="Qwen2.5-0.5B", n_layer=24, n_head=14, n_query_groups=2, n_embd=896, intermediate_size=4864,
         tie_embeddings=True, **_qwen25),
    dict(name="Qwen2.5-1.5B", n_layer=28, n_head=12, n_query_groups=2, n_embd=1536, intermediate_size=8960,
         tie_embeddings=True, **_qwen25),
    dict(name="Qwen2.5-3B", n_layer=36, n_head=16, n_query_groups=2, n_embd=2048, intermediate_size=11008,
         tie_embeddings=True, **_qwen25),
    dict(name="Qwen2.5-7B", n_layer=28, n_head=28, n_query_groups=4, n_embd=3584, intermediate_size=18944,
         **{**_qwen25, "vocab_size": 152064}),
    dict(name="Qwen2.5-14B", n_layer=48, n_head=40, n_query_groups=8, n_embd=5120, intermediate_size=13824,
         **{**_qwen25, "vocab_size": 152064}),
    dict(name="Qwen2.5-32B", n_layer=64, n_head=40, n_query_groups=8, n_embd=5120, intermediate_size=27648,
         **{**_qwen25, "vocab_size": 152064}),
    dict(name="Qwen2.5-72B", n_layer=80, n_head=64, n_query_groups=8, n_embd=8192, intermediate_size=29568,
         **{**_qwen25, "vocab_size": 152064}),
    # Qwen3: per-head q/k RMSNorm, head_size 128 whatever n_embd / n_head
    dict(name="Qwen3-0.6B", n_layer=28, n_head=16, n_query_groups=8, n_embd=1024, intermediate_size=3072,
         tie_embeddings=True, **_qwen3),
    dict(name="Qwen3-1.7B", n_layer=28, n_head=16, n_query_groups=8, n_embd=2048, intermediate_size=6144,
         tie_embeddings=True, **_qwen3),
    dict(name="Qwen3-4B", n_layer=36, n_head=32, n_query_groups=8, n_embd=2560, intermediate_size=9728,
         tie_embeddings=True, **_qwen3),
    dict(name="Qwen3-8B", n_layer=36, n_head=32, n_query_groups=8, n_embd=4096, intermediate_size=12288, **_qwen3),
    dict(name="Mistral-7B-Instruct-v0.2", n_layer=32, n_head=32, n_query_groups=8, n_embd=4096, intermediate_size=14336,
         vocab_size=32000, block_size=32768, norm_eps=1e-5, rope_base=1000000.0),
    # For tests and CPU smoke runs: GQA, untied.
    dict(name="tiny", n_layer=4, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=176, vocab_size=320,
         block_size=256, norm_eps=1e-5),
]
# Instruct/chat variants share their base's shape.
configs += [{**c, "name": c["name"] + "-Instruct"} for c in configs if c["name"].startswith("SmolLM2")]
configs += [{**c, "name": c["name"].replace("-hf", "-chat-hf")} for c in configs if c["name"].startswith("Llama-2")]
configs += [{**c, "name": "TinyLlama-1.1B-Chat-v1.0"} for c in configs if c["name"] == "TinyLlama-1.1B"]
configs += [{**c, "name": c["name"] + "-Instruct"} for c in configs
            if c["name"].startswith(("Llama-3-", "Llama-3.1-", "Llama-3.2-", "Qwen2.5-", "Mistral-7B-v0.3"))]
name_to_config = {c["name"]: c for c in configs}
# Short aliases people type.
for _alias, _name in {"llama2-7b": "Llama-2-7b-hf", "llama2-13b": "Llama-2-13b-hf", "llama2-70b": "Llama-2-70b-hf",
                      "mistral-7b": "Mistral-7B-v0.1", "tinyllama": "TinyLlama-1.1B"}.items():
    name_to_config[_alias] = {**name_to_config[_name], "name": _name}
