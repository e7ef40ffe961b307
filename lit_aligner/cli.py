"""The one way every script parses its flags and reports a user error.

Flags come from a function's signature or a config dataclass (tyro reads the field docstrings as help; nested groups
such as `train: TrainConfig` become flat flags, `--max-steps`, so each default exists once, in the dataclass). A user
error is one `error: <message>` line on stderr and exit status 1, no traceback (the library's errors name the file and
the fix); a command line that does not parse is one `error:` line too (tyro's message, unboxed) and exit status 2;
Ctrl-C is exit 130. Set LIT_ALIGNER_DEBUG=1 to see the traceback instead.
"""

import contextlib
import functools
import inspect
import io
import json
import os
import re
import sys
import typing
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Type, Union

import tyro

# Flags that changed: old spelling -> what to say (the flag is then dropped, so old command lines keep working).
RENAMED_FLAGS: Dict[str, str] = {
    "--skip-bad-rows": "malformed rows are now skipped and counted by default (--strict-data stops at the first)",
}
# Flags that took another spelling: old -> today's (said in a note, then read as today's).
REPLACED_FLAGS: Dict[str, List[str]] = {
    "--no-scale-rewards": ["--scale-rewards", "none"],
}


def _argv(args: Optional[Sequence[str]]) -> List[str]:
    out = []
    for a in (sys.argv[1:] if args is None else list(args)):
        if a in RENAMED_FLAGS:
            print(f"note: {a} is no longer needed: {RENAMED_FLAGS[a]}", file=sys.stderr)
            continue
        if a in REPLACED_FLAGS:
            print(f"note: {a} is now {' '.join(REPLACED_FLAGS[a])}", file=sys.stderr)
            out += REPLACED_FLAGS[a]
            continue
        out.append(a)
    return out


_LIST_ITEM = re.compile(r"([-*+]|\d+[.)])\s")  # a line that starts a list item keeps its line break


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _join_help_lines(text: str) -> str:
    """A dedented help text's source lines joined into paragraphs: blank lines, list items and code (lines indented
    by 4 or more) keep their breaks."""
    out: List[str] = []
    for line in text.split("\n"):
        if (out and out[-1].strip() and line.strip() and not _LIST_ITEM.match(line.lstrip())
                and _indent(line) < 4 and _indent(out[-1]) < 4):
            out[-1] += " " + line.strip()
        else:
            out.append(line.rstrip())
    return "\n".join(out)


def _join_arg_docs(doc: Optional[str]) -> Optional[str]:
    """A Google-style docstring with each `Args:` entry on one line: tyro passes a function argument's description to
    --help with its source line breaks (a dataclass field's goes through `_dedent_field_docstrings`)."""
    if not doc:
        return doc
    out: List[str] = []
    entry_indent = None  # indentation of the `name: text` lines while inside Args:
    for line in inspect.cleandoc(doc).split("\n"):
        indent = _indent(line)
        if line.strip() in ("Args:", "Arguments:"):
            entry_indent = -1
        elif entry_indent is not None and line.strip():
            if indent == 0:
                entry_indent = None  # the section ended
            elif entry_indent == -1 or indent <= entry_indent:
                entry_indent = indent  # an argument's first line
            elif not _LIST_ITEM.match(line.strip()):
                out[-1] += " " + line.strip()  # a continuation line
                continue
        out.append(line)
    return "\n".join(out)


def _dedent_field_docstrings() -> None:
    """tyro (1.0.17) joins a docstring's lines only where the next line starts with a letter (so a line starting with
    `--flag`, `(` or a digit broke the paragraph), and reads a dataclass field's docstring with its source
    indentation (so every line broke). Dedent and join first; a tyro without the function is left as it is."""
    from tyro import _strings

    join = getattr(_strings, "remove_single_line_breaks", None)
    if join is None or getattr(join, "dedents", False):
        return

    def dedented(text: str) -> str:
        return join(_join_help_lines(inspect.cleandoc(text)))

    dedented.dedents = True  # type: ignore[attr-defined]
    _strings.remove_single_line_breaks = dedented


def _warnings_as_lines() -> None:
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"


def _box_to_line(text: str) -> str:
    """tyro's boxed parse error -> one line: the box's first section, then its "Perhaps you meant" suggestions
    (their flag names only)."""
    inside = [ln.strip().strip("│").strip() for ln in text.splitlines() if ln.strip().startswith("│")]
    sections: List[List[str]] = [[]]
    for ln in inside:
        if ln and set(ln) <= {"─"}:
            sections.append([])
        elif ln:
            sections[-1].append(ln)
    message = " ".join(sections[0]) or text.strip()
    title = re.search(r"╭─ (.+?) ─", text)
    if title and title.group(1) == "Value error":
        # a flag's value that does not convert: "--flag: why"; a nested config's own check: its message alone (it
        # names the flag and the fix), not the config's name
        message, title = re.sub(r"^Error parsing (?:(--[\w.-]+)|[\w.-]+): ", r"\1: ", message).lstrip(": "), None
    if title and title.group(1).lower() not in message.lower():
        message = f"{title.group(1)}: {message}"
    message = message if message.endswith(".") else message + "."
    flags = [m.group(0) for sec in sections[1:] if sec and sec[0].startswith("Perhaps you meant")
             for ln in sec[1:] for m in [re.match(r"--[\w-]+", ln)] if m]
    if flags:
        message += f" Perhaps you meant {', '.join(dict.fromkeys(flags))}."
    return message


def _parse(parse: Callable[[], Any]) -> Any:
    """Run tyro's parser; a bad command line becomes one `error:` line (exit 2) instead of tyro's box, --help is
    left as it is."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse()
    except SystemExit as e:
        if e.code not in (0, None):
            print(f"error: {_box_to_line(captured.getvalue())} Every flag: python {sys.argv[0]} --help",
                  file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        if not captured.getvalue().lstrip().startswith("╭"):
            sys.stderr.write(captured.getvalue())  # anything else tyro or a warning printed


def run_cli(main: Callable[..., Any], config_cls: Union[None, Type, Dict[str, Type]] = None,
            description: Optional[str] = None, args: Optional[Sequence[str]] = None) -> Any:
    """Parse the command line into `main`'s arguments (or into a `config_cls` instance passed to `main`; a dict of
    them makes subcommands, `script.py NAME --flags`) and call it. ValueError / OSError (every library error is a
    ValueError) become one `error:` line and exit 1."""
    _warnings_as_lines()
    _dedent_field_docstrings()
    try:
        if config_cls is None:  # flags from main's signature: parse them first, call main outside the parser
            called = {}

            @functools.wraps(main)
            def record(*a, **k):
                called.update(args=a, kwargs=k)

            # tyro reads the help of a wrapper's __wrapped__: give `record` main's signature, resolved hints and a
            # docstring with one line per argument, and no __wrapped__.
            del record.__wrapped__
            record.__signature__ = inspect.signature(main)  # type: ignore[attr-defined]
            record.__annotations__ = typing.get_type_hints(main, include_extras=True)
            record.__doc__ = _join_arg_docs(main.__doc__)

            _parse(lambda: tyro.cli(record, description=description, args=_argv(args)))
            return main(*called["args"], **called["kwargs"])
        if isinstance(config_cls, dict):
            cfg = _parse(lambda: tyro.extras.subcommand_cli_from_dict(
                config_cls, description=description, args=_argv(args), config=(tyro.conf.OmitArgPrefixes,)))
        else:
            cfg = _parse(lambda: tyro.cli(config_cls, description=description, args=_argv(args),
                                          config=(tyro.conf.OmitArgPrefixes,)))
        return main(cfg)
    except BrokenPipeError:  # the reader of our output has gone (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit either
        sys.exit(141)  # 128 + SIGPIPE, a shell's status for a command that a closed pipe stopped
    except (ValueError, OSError) as e:
        if os.environ.get("LIT_ALIGNER_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def bare_resume_is_auto(args: Sequence[str]) -> List[str]:
    """A training command line with `--resume` given no value (litgpt's and Lightning's habit: the last flag, or one
    followed by another flag) continues from the newest state: `--resume auto`."""
    out: List[str] = []
    for i, a in enumerate(args):
        out.append(a)
        if a == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("--")):
            out.append("auto")
    return out


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

    run_cli(main, config_cls, description, args=bare_resume_is_auto(sys.argv[1:]))
