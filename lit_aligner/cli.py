"""The one way every script parses its flags and reports a user error.

Flags come from a function's signature or a config dataclass (tyro reads the field docstrings as help; nested groups
such as `train: TrainConfig` become flat flags, `--max-steps`, so each default exists once, in the dataclass). A user
error is one `error: <message>` line on stderr and exit status 1, no traceback (the library's errors name the file and
the fix); Ctrl-C is exit 130. Set LIT_ALIGNER_DEBUG=1 to see the traceback instead.
"""

import json
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Type, Union

import tyro

# Flags that changed: old spelling -> what to say (the flag is then dropped, so old command lines keep working).
RENAMED_FLAGS: Dict[str, str] = {
    "--skip-bad-rows": "malformed rows are now skipped and counted by default (--strict-data stops at the first)",
}


def _argv(args: Optional[Sequence[str]]) -> List[str]:
    out = []
    for a in (sys.argv[1:] if args is None else list(args)):
        if a in RENAMED_FLAGS:
            print(f"note: {a} is no longer needed: {RENAMED_FLAGS[a]}", file=sys.stderr)
            continue
        out.append(a)
    return out


def _warnings_as_lines() -> None:
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"


def run_cli(main: Callable[..., Any], config_cls: Union[None, Type, Dict[str, Type]] = None,
            description: Optional[str] = None, args: Optional[Sequence[str]] = None) -> Any:
    """Parse the command line into `main`'s arguments (or into a `config_cls` instance passed to `main`; a dict of
    them makes subcommands, `script.py NAME --flags`) and call it. ValueError / OSError (every library error is a
    ValueError) become one `error:` line and exit 1."""
    _warnings_as_lines()
    try:
        if config_cls is None:
            return tyro.cli(main, description=description, args=_argv(args))
        if isinstance(config_cls, dict):
            cfg = tyro.extras.subcommand_cli_from_dict(config_cls, description=description, args=_argv(args),
                                                       config=(tyro.conf.OmitArgPrefixes,))
        else:
            cfg = tyro.cli(config_cls, description=description, args=_argv(args),
                           config=(tyro.conf.OmitArgPrefixes,))
        return main(cfg)
    except (ValueError, OSError) as e:
        if os.environ.get("LIT_ALIGNER_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def run_training_cli(config_cls: Type, description: Optional[str] = None) -> None:
    """A training script: flags from `config_cls` (a `lit_aligner.training.RunConfig`), `training.train`, the summary
    as one JSON line on request (and always for an evaluation-only run), exit 130 when a signal stopped the run."""

    def main(cfg) -> None:
        from lit_aligner.training import train

        summary = train(cfg)
        if cfg.json_summary or summary.get("eval_only"):
            print(json.dumps(summary, default=str))
        if summary.get("stopped"):
            sys.exit(130)

    run_cli(main, config_cls, description)
