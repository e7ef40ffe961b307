"""Serving many Aligners from one loaded base: the continuous-batching engine (`engine`), the Aligner directory
(`registry`), the OpenAI-compatible HTTP API and comparison page (`app`), and `ServeConfig` / `serve`, what
`serve/aligner.py` runs. The HTTP part needs the `serve` extra (`pip install -e .[serve]`: FastAPI and uvicorn)."""

import errno
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Literal, Optional

from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR
from lit_aligner.files import UserError
from lit_aligner.quantize import QuantizeFlag
from lit_aligner.reasoning import ReasoningParser
from lit_aligner.tokenizer import read_template_variables

API_KEY_ENV = "LIT_ALIGNER_API_KEY"


@dataclass(kw_only=True)
class ServeConfig:
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR
    """converted base model (config.json, model.safetensors, tokenizer files)."""
    aligners_dir: Path = Path("out")
    """the Aligners to serve: every .safetensors / paper .pth file in it (subfolders too), named by its path without
    the suffix; a run folder's aligner.safetensors by the folder. Files added later are served without a restart."""
    host: str = "127.0.0.1"
    """address to listen on (0.0.0.0: every interface; put an --api-key on it then)."""
    port: int = 8000
    """TCP port (0: any free one, printed at start)."""
    api_key: Optional[str] = None
    """require 'Authorization: Bearer KEY' on every /v1 request (default: the LIT_ALIGNER_API_KEY environment
    variable, which keeps the key out of the process list; none: no check)."""
    model_name: Optional[str] = None
    """the base's id in /v1/models and the `model` field (default: the checkpoint's model name)."""
    max_batch: int = 16
    """requests decoded together (rows of the continuous batch)."""
    max_queue: int = 64
    """requests waiting beyond those; past it a request gets 429."""
    max_prefill_tokens: int = 2048
    """prompt tokens (padded to the longest) of the requests admitted together that one prefill forward takes (as
    vLLM's --max-num-batched-tokens); a longer prompt is prefilled in chunks of this many tokens, one chunk per step,
    while the other rows keep decoding. Bounds the prefill's activation memory and the stall a long prompt causes."""
    prefix_cache_tokens: Optional[int] = None
    """prompt tokens whose keys and values are kept for reuse (prefix caching, as vLLM's): a prompt that starts with
    cached blocks of 16 tokens under the same Aligner (a system prompt, a chat's earlier turns) prefills only the rest
    (default: --max-seq-length, the memory of one more row; 0: off)."""
    max_loaded_aligners: int = 64
    """Aligners kept loaded (LRU); others are reloaded from their file on use."""
    max_seq_length: Optional[int] = None
    """KV-cache length per row, prompt + completion (default: the model's context, at most 2048)."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weights dtype; auto = bfloat16 on CUDA, the checkpoint's own dtype on the CPU."""
    quantize: QuantizeFlag = "none"
    default_chat_template_kwargs: Optional[str] = None
    """a JSON object of chat-template variables for every request (vLLM's --default-chat-template-kwargs), e.g.
    '{"enable_thinking": false}' for a Qwen3 base: under an Aligner's saved variables and a request's
    chat_template_kwargs, which win."""
    reasoning_parser: ReasoningParser = "none"
    """think (or vLLM's names qwen3, deepseek_r1): a chat answer's <think> ... </think> block, at its start or opened
    by the prompt, comes apart from the answer as message.reasoning and .reasoning_content (streamed the same way in
    the deltas), as vLLM's --reasoning-parser; for thinking bases (Qwen3, SmolLM3, DeepSeek-R1's distills). none:
    answers as written."""

    def template_variables(self) -> Dict[str, Any]:
        return read_template_variables(self.default_chat_template_kwargs, "--default-chat-template-kwargs", UserError)

    def check(self) -> None:
        self.template_variables()
        if self.api_key is not None and not self.api_key.strip():  # --api-key "$KEY", KEY unset: no open server
            raise UserError("--api-key is empty (an unset variable?): give the key, or leave the flag out to serve "
                            "without one")
        for name in ("max_batch", "max_queue", "max_loaded_aligners", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise UserError(f"--port must be in 0..65535 (0: any free one), got {self.port}")
        if self.prefix_cache_tokens is not None and self.prefix_cache_tokens < 0:
            raise UserError(f"--prefix-cache-tokens must be >= 0 (0: no prefix cache), got {self.prefix_cache_tokens}")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise UserError(f"--max-seq-length must be >= 2, got {self.max_seq_length}")


DEFAULT_MAX_SEQ_LENGTH = 2048  # KV cache per row; 16 rows x 2048 slots of SmolLM2 in fp32 take 1.5 GB


def build_server(cfg: ServeConfig):
    """Load the base, start the engine thread and return the `AlignerServer` (its FastAPI app is `.app`)."""
    cfg.check()
    try:
        from lit_aligner.serving.app import AlignerServer
    except ImportError as e:
        raise UserError(f"serving needs FastAPI, uvicorn and prometheus_client ({e.name} is missing): pip install -e "
                        f"'.[serve]'") from None
    from lit_aligner.base import load_base
    from lit_aligner.serving.engine import Engine
    from lit_aligner.serving.registry import AlignerRegistry

    model, tokenizer = load_base(cfg.checkpoint_dir, cfg.device, cfg.dtype, cfg.quantize)
    tokenizer.template_variables = cfg.template_variables()  # set once: every rendering's lowest layer
    name = cfg.model_name or model.config.name or Path(cfg.checkpoint_dir).name
    registry = AlignerRegistry(cfg.aligners_dir, model, name, cfg.max_loaded_aligners)
    seq = cfg.max_seq_length or min(model.config.block_size, DEFAULT_MAX_SEQ_LENGTH)
    if seq > model.config.block_size:
        raise UserError(f"--max-seq-length {seq} exceeds the model's context of {model.config.block_size} tokens")
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_seq_length=seq, max_queue=cfg.max_queue,
                    max_prefill_tokens=cfg.max_prefill_tokens,
                    prefix_cache_tokens=seq if cfg.prefix_cache_tokens is None else cfg.prefix_cache_tokens)
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return AlignerServer(engine.start(), registry, tokenizer, name, api_key, cfg.reasoning_parser != "none")


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the model loads (as vLLM binds its port first): a port in use is
    one error line at once, not a uvicorn error after minutes of loading."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # uvicorn's rule for --host
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as e:
        sock.close()
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    except OSError as e:
        sock.close()
        fix = "another server holds the port: choose another --port (0: any free one)" if e.errno == errno.EADDRINUSE \
            else "give an address of this machine (127.0.0.1, 0.0.0.0: every interface) or a port you may open"
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); {fix}") from None
    return sock


def serve(cfg: ServeConfig) -> None:
    """Run the server until Ctrl-C (what serve/aligner.py does)."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    cfg.check()  # a bad flag before the port
    sock = listen(cfg.host, cfg.port)
    try:
        server = build_server(cfg)
        n = len(server.registry.names())
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        print(f"serving {server.base_name} and {n} Aligner{'s' if n != 1 else ''} from {cfg.aligners_dir} at "
              f"http://{host}:{sock.getsockname()[1]} (OpenAI API under /v1, comparison page at /)", file=sys.stderr,
              flush=True)
        try:
            config = uvicorn.Config(server.app, log_level="info", timeout_graceful_shutdown=5)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            server.engine.stop()
    finally:
        sock.close()


__all__ = ["ServeConfig", "build_server", "serve"]
