"""The tokenizer of a converted checkpoint, and the export of tokenizers into checkpoint directories.

A checkpoint directory holds `tokenizer.json` (Hugging Face `tokenizers`, preferred) or `tokenizer.model`
(SentencePiece), plus optional `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json` and
`chat_template.jinja` for special tokens, the BOS policy, stop tokens and the chat template.

GGUF files carry no tokenizer files, only llama.cpp metadata; `export_gguf_tokenizer` rebuilds the files from it.
"""

import json
import re
import shutil
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Dict, Iterator, List, Optional, Sequence, Set, Type, Union

import torch
import tyro

from lit_aligner.files import UserError, read_json_object

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (TOKENIZER_JSON, SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG,
                   CHAT_TEMPLATE_FILE)

# End-of-turn / end-of-text tokens of common chat formats: generation stops on any of them that the vocabulary
# holds as a special (added / control) token, even when the configs name only one eos.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
                   "<end_of_turn>", "</s>")

# llama.cpp / SentencePiece token types (the same numbers in both).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

Ids = Union[torch.Tensor, Sequence[int]]


class TokenizerError(UserError):
    """A tokenizer file (or its chat template) that cannot be used; the message names the file and the fix."""


class ChatTemplateRefusal(ValueError):
    """The chat template itself refused one conversation (its `raise_exception`, e.g. "roles must alternate"): a
    problem of that conversation, not of the tokenizer."""


def _read_json(path: Path) -> Dict[str, Any]:
    return read_json_object(path, "tokenizer file", TokenizerError) if path.is_file() else {}


def _token_content(value: Any) -> Optional[str]:
    """A special token from a HF config: a string, or a dict (serialized AddedToken) with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> List[int]:
    """`eos_token_id` and friends of generation_config.json: an int, a list of ints, or missing."""
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


class Tokenizer:
    """Encodes and decodes text for a converted checkpoint directory (see the module docstring for its files)."""

    def __init__(self, checkpoint_dir: Union[Path, str]) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_dir = checkpoint_dir
        if (checkpoint_dir / TOKENIZER_JSON).is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "hf"
            try:
                self._hf = HFTokenizer.from_file(str(checkpoint_dir / TOKENIZER_JSON))
            except Exception as e:  # the Rust library raises its own exception type for any broken file
                raise TokenizerError(f"{checkpoint_dir / TOKENIZER_JSON} is not a readable tokenizer ("
                                     f"{str(e).splitlines()[0][:160] or type(e).__name__}); copy the model's "
                                     f"tokenizer files again, or convert the model again.") from None
            self._specials = {i: t.content for i, t in self._hf.get_added_tokens_decoder().items()}
            default_ids: Dict[str, int] = {}
            self.vocab_size: int = self._hf.get_vocab_size(with_added_tokens=True)
        elif (checkpoint_dir / SENTENCEPIECE_MODEL).is_file():
            self.backend = "sentencepiece"
            self._init_sentencepiece(checkpoint_dir / SENTENCEPIECE_MODEL)
            default_ids = {name: i for name, i in (("bos_token", self._sp.bos_id()), ("eos_token", self._sp.eos_id()),
                                                   ("pad_token", self._sp.pad_id())) if i >= 0}
            self.vocab_size = self._sp.get_piece_size()
        else:
            raise FileNotFoundError(
                f"{checkpoint_dir} has no tokenizer ({TOKENIZER_JSON} or {SENTENCEPIECE_MODEL}). Convert the model "
                f"into this directory with scripts/convert_*.py (e.g. `python scripts/convert_gguf.py --default`), "
                f"which writes the tokenizer files next to the weights.")

        # special_tokens_map.json only fills what tokenizer_config.json leaves out (older HF repos).
        config = {**_read_json(checkpoint_dir / SPECIAL_TOKENS_MAP), **_read_json(checkpoint_dir / TOKENIZER_CONFIG)}
        generation = _read_json(checkpoint_dir / GENERATION_CONFIG)
        gen_eos = _as_id_list(generation.get("eos_token_id"))

        def special_id(name: str) -> Optional[int]:
            """tokenizer_config's token, else generation_config's id, else the tokenizer model's own."""
            token_id = self.token_to_id(_token_content(config.get(name)))
            if token_id is None:
                token_id = next(iter(_as_id_list(generation.get(f"{name}_id"))), None)
            return default_ids.get(name) if token_id is None else token_id

        self.bos_id: Optional[int] = special_id("bos_token")
        self.eos_id: Optional[int] = special_id("eos_token")
        self.pad_id: int = next(i for i in (special_id("pad_token"), self.eos_id, 0) if i is not None)

        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # SentencePiece (LLaMA 1/2) models want BOS; a tokenizer.json says so through its post-processor.
            add_bos = self.backend == "sentencepiece" or self._post_processor_adds_bos()
        self.add_bos: bool = add_bos and self.bos_id is not None

        self.stop_ids: Set[int] = {i for i in [self.eos_id, *gen_eos] if i is not None}
        self.stop_ids |= {i for i, t in self._specials.items() if t in CHAT_END_TOKENS}

        template = config.get("chat_template")
        self.chat_template_file = checkpoint_dir / TOKENIZER_CONFIG
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
                raise TokenizerError(f"{self.chat_template_file}: `chat_template` is a list whose items are not "
                                     f"{{\"name\": ..., \"template\": \"...\"}}; fix or remove it.")
            named = {t.get("name"): t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if not template and (checkpoint_dir / CHAT_TEMPLATE_FILE).is_file():
            self.chat_template_file = checkpoint_dir / CHAT_TEMPLATE_FILE
            template = (checkpoint_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{self.chat_template_file}: `chat_template` must be a string (a Jinja template), "
                                 f"got {type(template).__name__}; fix or remove it.")
        self.chat_template: Optional[str] = template or None
        # more variables for every rendering of the chat template (a CLI's --chat-template-kwargs), under a call's own
        self.template_variables: Dict[str, Any] = {}

    # --- SentencePiece backend -------------------------------------------------------------------------------------

    def _init_sentencepiece(self, path: Path) -> None:
        import sentencepiece as spm

        try:  # the model's piece types (user-defined pieces) and normalizer settings are only in its protobuf
            from sentencepiece import sentencepiece_model_pb2 as sp_pb2
        except ImportError as e:
            raise ImportError(f"the SentencePiece tokenizer in {path.parent} needs `pip install protobuf`") from e

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        proto = sp_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
        # Control, unknown and user-defined pieces are matched whole in the text, as transformers does.
        self._specials = {i: p.piece for i, p in enumerate(proto.pieces)
                          if p.type in (CONTROL, UNKNOWN, USER_DEFINED) and p.piece}
        self._sp_special_ids = {p: i for i, p in sorted(self._specials.items(), reverse=True)}  # lowest id wins
        # Longest first, so that a special is not cut short by a shorter one that is its prefix.
        pieces = sorted(self._sp_special_ids, key=len, reverse=True)
        self._sp_special_re = re.compile("|".join(map(re.escape, pieces))) if pieces else None
        # The same model without the dummy prefix, for text that follows a special token: transformers gives it no
        # extra leading space (and decoding it must not strip one).
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_plain = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def _sp_encode(self, text: str) -> List[int]:
        ids: List[int] = []
        pos = 0
        matches = self._sp_special_re.finditer(text) if self._sp_special_re else ()
        for m in [*matches, None]:
            end = m.start() if m else len(text)
            if end > pos:  # only the text at the very start gets SentencePiece's dummy-prefix space
                ids += (self._sp if pos == 0 else self._sp_plain).encode(text[pos:end])
            if m:
                ids.append(self._sp_special_ids[m.group()])
                pos = m.end()
        return ids

    def _sp_decode(self, ids: List[int], skip_special: bool) -> str:
        out: List[str] = []
        run: List[int] = []
        at_start = True  # only leading BOS tokens came before: the run is the text's start (strip the dummy prefix)

        def flush() -> None:
            nonlocal at_start
            if run:
                out.append((self._sp if at_start else self._sp_plain).decode(run))
                run.clear()
                at_start = False

        for i in ids:
            if i in self._specials:
                flush()
                at_start = at_start and i == self.bos_id
                is_text = not (self._sp.is_control(i) or self._sp.is_unknown(i))  # user-defined pieces are text
                if is_text or not skip_special:
                    out.append(self._specials[i])
            else:
                run.append(i)
        flush()
        return "".join(out)

    # --- common -----------------------------------------------------------------------------------------------------

    def _post_processor_adds_bos(self) -> bool:
        with_specials = self._hf.encode("a", add_special_tokens=True).ids
        without = self._hf.encode("a", add_special_tokens=False).ids
        return self.bos_id is not None and len(with_specials) > len(without) and with_specials[0] == self.bos_id

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        """The id of one token (its vocabulary spelling), or None when the vocabulary lacks it."""
        if token is None:
            return None
        if self.backend == "hf":
            return self._hf.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> Optional[str]:
        """The vocabulary spelling of one id (e.g. "Ġthe", "▁the", "<|im_end|>")."""
        if self.backend == "hf":
            return self._hf.id_to_token(token_id)
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False, max_length: int = -1) -> torch.Tensor:
        """Token ids (1-D int64) of `text`. bos: prepend BOS (None: the tokenizer's default, `add_bos`); eos: append
        EOS; max_length > 0 keeps the first max_length ids. Special tokens written in the text (e.g. "<|im_start|>")
        become their special ids, as in transformers."""
        ids = self._hf.encode(text, add_special_tokens=False).ids if self.backend == "hf" else self._sp_encode(text)
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise ValueError(f"the tokenizer in {self.checkpoint_dir} has no BOS token; encode with bos=False")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError(f"the tokenizer in {self.checkpoint_dir} has no EOS token; encode with eos=False")
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Ids, skip_special: bool = False) -> str:
        """The text of token ids (special tokens written out unless skip_special)."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if self.backend == "hf":
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        return self._sp_decode(ids, skip_special)

    def stream_decoder(self, skip_special: bool = False) -> "IncrementalDecoder":
        """A fresh `IncrementalDecoder` for one generated sequence."""
        return IncrementalDecoder(self, skip_special=skip_special)

    @property
    def has_chat_template(self) -> bool:
        """Whether `apply_chat_template` can be used."""
        return bool(self.chat_template)

    def apply_chat_template(self, messages: List[Dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text for chat `messages` ([{"role": ..., "content": ...}]) from the model's own chat template,
        rendered like transformers does. Templates write BOS themselves where the model wants one, so encode the
        result with `bos=False` unless you know otherwise. Extra kwargs become template variables."""
        if not self.chat_template:
            raise ValueError(f"the tokenizer in {self.checkpoint_dir} has no chat template (no `chat_template` in "
                             f"{TOKENIZER_CONFIG}, no {CHAT_TEMPLATE_FILE}); format the prompt yourself or use a "
                             f"named prompt template")
        from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError

        special = {name: self.id_to_token(i) if i is not None else "" for name, i in
                   (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))}
        variables = {**special, **self.template_variables, **kwargs, "messages": messages,
                     "add_generation_prompt": add_generation_prompt}
        where = self.chat_template_file
        try:
            template = _compile_chat_template(self.chat_template)
        except TemplateSyntaxError as e:
            raise TokenizerError(f"{where}: the chat template has a syntax error (template line {e.lineno}: "
                                 f"{e.message}); fix `chat_template` there, or pick a named --template.") from None
        try:
            return template.render(**variables)
        except SecurityError as e:
            raise TokenizerError(f"{where}: the chat template tried something the sandbox forbids ({e}); it is not "
                                 f"rendered. Fix `chat_template` there, or pick a named --template.") from None
        except UndefinedError as e:
            raise TokenizerError(f"{where}: the chat template uses an undefined variable ({e.message}); fix "
                                 f"`chat_template` there, or pick a named --template.") from None
        except _RaisedByTemplate as e:
            raise ChatTemplateRefusal(f"the chat template of {where} refused this conversation: {e}") from None
        except TemplateError as e:
            raise TokenizerError(f"{where}: the chat template failed ({type(e).__name__}: {e}); fix `chat_template` "
                                 f"there, or pick a named --template.") from None
        except (TypeError, AttributeError, ValueError, KeyError, IndexError) as e:  # errors of the template's own code
            raise TokenizerError(f"{where}: the chat template failed ({type(e).__name__}: {e}); fix `chat_template` "
                                 f"there, or pick a named --template.") from None


def check_template_variables(variables: Any, what: str = "chat_template_kwargs") -> Dict[str, Any]:
    """More variables for a chat template (vLLM's `chat_template_kwargs`: Qwen3's `enable_thinking`, Llama 3.1's
    `date_string`) as a dict; ValueError naming `what` when they are not an object of names, or would replace the
    conversation, its tools or the generation prompt, which the caller gives."""
    if not isinstance(variables, dict) or not all(isinstance(k, str) for k in variables):
        raise ValueError(f"{what} must be a JSON object of template variables, e.g. {{\"enable_thinking\": false}}")
    taken = sorted(set(variables) & {"messages", "tools", "add_generation_prompt"})
    if taken:
        raise ValueError(f"{what} cannot set {', '.join(taken)}: they are the prompt's own (the conversation, its "
                         f"tools, the generation prompt)")
    return variables


def read_template_variables(text: Optional[str], what: str = "--chat-template-kwargs",
                            error: Type[Exception] = ValueError) -> Dict[str, Any]:
    """A CLI's --chat-template-kwargs JSON as template variables (`check_template_variables`; {} without it). A
    malformed one raises `error` (the caller's kind: TrainError, DataError, ...) naming `what`."""
    if text is None:
        return {}
    try:
        return check_template_variables(json.loads(text), what)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON ({e.msg}); give an object, e.g. '{{\"enable_thinking\": "
                    f"false}}'") from None
    except ValueError as e:
        raise error(str(e)) from None


# The --chat-template-kwargs flag of every command that renders prompts (one help text, one default)
ChatTemplateKwargsFlag = Annotated[Optional[str], tyro.conf.arg(help=(
    "a JSON object of more variables for the tokenizer's chat template (vLLM's chat_template_kwargs), e.g. "
    "'{\"enable_thinking\": false}' for Qwen3: every prompt the chat template renders gets them. An Aligner trained "
    "with them keeps them in its metadata, and its prompts are rendered with them everywhere, under a user's own."))]


@contextmanager
def variables_under(tokenizer, defaults: Dict[str, Any]) -> Iterator[None]:
    """Render with `defaults` (an Aligner's saved template variables) under the tokenizer's own (a user's flag wins)
    for the duration. For single-threaded callers; a server passes a request's variables to the call instead."""
    if not defaults:
        yield
        return
    own = tokenizer.template_variables
    tokenizer.template_variables = {**defaults, **own}
    try:
        yield
    finally:
        tokenizer.template_variables = own


class _RaisedByTemplate(Exception):
    """`raise_exception(...)` called by a chat template."""


@lru_cache(maxsize=8)
def _compile_chat_template(source: str):
    """A jinja2 template in the sandboxed environment transformers renders chat templates with."""
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' `{% generation %}...{% endgeneration %}`, which marks the assistant's own text for training
        masks (LFM2.5's templates, TRL's training templates): rendered as its body. (Training here takes the answer as
        what follows the prompt, which these templates, being prefix-preserving, also give.)"""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise _RaisedByTemplate(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None,
               sort_keys: bool = False) -> str:
        # Like transformers: no HTML escaping, non-ASCII kept as is.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDecoder:
    """Streams the text of ids generated one at a time: `step(id)` returns the newly completed text ("" while a
    multi-byte character is still incomplete), `flush()` whatever is left at the end. The concatenation of all
    returned pieces equals `tokenizer.decode(all_ids)`.

    Decoding single tokens would break multi-byte characters split over byte tokens and SentencePiece's leading
    spaces, so it decodes the ids since a checkpoint (`prefix`, one step back for context) and returns the growth."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: List[int] = []
        self.prefix = 0  # start of the decoded window
        self.read = 0  # ids up to here have been emitted

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def step(self, token_id: Union[int, torch.Tensor]) -> str:
        """Add one id; return the text it completes."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """The text held back at the end of generation (an incomplete character decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if not final and (len(text) <= len(done) or text.endswith("\ufffd")):
            return ""  # nothing new, or a character still waits for its last bytes
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]


# --- export into checkpoint directories -------------------------------------------------------------------------------


def export_hf_tokenizer(src_dir: Union[Path, str], out_dir: Union[Path, str]) -> None:
    """Copy the tokenizer files of a Hugging Face or Meta model directory into a checkpoint directory. A Meta
    directory has only `tokenizer.model`: it gets a tokenizer_config.json with bos <s>, eos </s> and add_bos true."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not (src_dir / TOKENIZER_JSON).is_file() and not (src_dir / SENTENCEPIECE_MODEL).is_file():
        raise FileNotFoundError(f"{src_dir} has no tokenizer ({TOKENIZER_JSON} or {SENTENCEPIECE_MODEL})")
    if not (src_dir / TOKENIZER_JSON).is_file():
        import sentencepiece as spm

        try:  # Llama 3's Meta download has a tiktoken `tokenizer.model`, which is no SentencePiece model
            spm.SentencePieceProcessor(model_file=str(src_dir / SENTENCEPIECE_MODEL))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{src_dir / SENTENCEPIECE_MODEL} is not a SentencePiece model (a tiktoken file from a "
                             f"Llama 3 Meta download?); convert the Hugging Face version of the model instead") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)
    if not (src_dir / TOKENIZER_CONFIG).is_file() and not (src_dir / TOKENIZER_JSON).is_file():
        _write_json(out_dir / TOKENIZER_CONFIG, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Pre-tokenizer splits of llama.cpp's `tokenizer.ggml.pre` kinds (src/llama-vocab.cpp, llm_tokenizer_bpe): llama.cpp
# applies the regexes one after another, each to the pieces of the previous one, keeping unmatched text as pieces;
# that is a sequence of "isolated" Splits. The byte-level alphabet mapping follows.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_SPLITS: Dict[str, List[str]] = {
    **dict.fromkeys(["gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion"], [_GPT2_SPLIT]),
    # SmolLM2's own tokenizer.json: Digits(individual_digits=True), then ByteLevel's GPT-2 regex.
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"],
                    [r"\p{N}", _GPT2_SPLIT]),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"], [_LLAMA3_SPLIT]),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], [_QWEN2_SPLIT]),
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"],
}
# llama.cpp: these kinds look whole words up in the vocabulary before merging (HF: BPE ignore_merges) and add BOS.
_LLAMA3_KINDS = {"llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"}


def _gguf_metadata(reader: Any) -> Dict[str, Any]:
    """The `tokenizer.*` metadata of a gguf.GGUFReader as Python values."""
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def _unique(tokens: List[str]) -> List[str]:
    """Vocabularies need unique entries; a repeated token (unreachable by encoding anyway) gets a placeholder."""
    seen: Set[str] = set()
    out = []
    for i, t in enumerate(tokens):
        out.append(t if t not in seen else f"<unused_duplicate_{i}>")
        seen.add(t)
    return out


def export_gguf_tokenizer(reader: Any, out_dir: Union[Path, str]) -> None:
    """Write the tokenizer a GGUF file describes (a gguf.GGUFReader) into out_dir: `tokenizer.json` for the
    byte-level BPE kind ("gpt2"), `tokenizer.model` for the SentencePiece kind ("llama"), and tokenizer_config.json
    (bos/eos/pad/unk tokens, add_bos_token, chat_template)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _gguf_metadata(reader)
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    tokens = _unique(list(meta["tokenizer.ggml.tokens"]))
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if kind == "gpt2":
        _export_bpe(tokens, types, list(meta.get("tokenizer.ggml.merges") or []), pre, out_dir)
        default_add_bos = pre in _LLAMA3_KINDS
    elif kind == "llama":
        _export_sentencepiece(meta, tokens, types, out_dir)
        default_add_bos = True
    else:
        raise ValueError(f"GGUF tokenizer kind {kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
                         f"'llama' SentencePiece)")

    config: Dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast" if kind == "gpt2" else "LlamaTokenizer"}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(out_dir / TOKENIZER_CONFIG, config)


def _export_bpe(tokens: List[str], types: List[int], merges: List[str], pre: str, out_dir: Path) -> None:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if pre not in _PRE_SPLITS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported yet (supported: {', '.join(sorted(_PRE_SPLITS))}"
                         f"); add its regexes from llama.cpp's src/llama-vocab.cpp to _PRE_SPLITS")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _LLAMA3_KINDS))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Added tokens are matched whole in the text; they are already in the vocabulary, so their ids stay.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    tok.save(str(out_dir / TOKENIZER_JSON))


def _export_sentencepiece(meta: Dict[str, Any], tokens: List[str], types: List[int], out_dir: Path) -> None:
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError as e:  # sentencepiece's generated protobuf module needs the protobuf runtime
        raise ImportError("writing a SentencePiece tokenizer.model needs `pip install protobuf`") from e

    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = [t if NORMAL <= t <= BYTE else NORMAL for t in types]  # 0 = undefined in some files
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    if UNKNOWN not in types:  # SentencePiece refuses a model without an unknown piece
        types[unk_id] = UNKNOWN
    proto = sp_pb2.ModelProto()
    for token, score, token_type in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=float(score), type=token_type)
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE  # llama.cpp's SPM tokenizer merges by score, like SentencePiece BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = BYTE in types
    trainer.unk_id, trainer.unk_piece = types.index(UNKNOWN), tokens[types.index(UNKNOWN)]
    trainer.pad_id = -1  # the pad token (often = eos or unk here) goes to tokenizer_config.json only
    for name in ("bos", "eos"):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens) and token_id != trainer.unk_id:
            setattr(trainer, f"{name}_id", token_id)
            setattr(trainer, f"{name}_piece", tokens[token_id])
        else:
            setattr(trainer, f"{name}_id", -1)
    norm = proto.normalizer_spec
    # llama.cpp does no normalization besides the optional leading space and escaping spaces as "▁".
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    if meta.get("tokenizer.ggml.precompiled_charsmap"):
        norm.precompiled_charsmap = bytes(int(b) & 0xFF for b in meta["tokenizer.ggml.precompiled_charsmap"])
    (out_dir / SENTENCEPIECE_MODEL).write_bytes(proto.SerializeToString())
