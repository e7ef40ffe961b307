"""Every command written in README.md, benchmarks/README.md and howto/*.md, for every CLI of the project, parses with
today's flags (a renamed or mistyped flag in the docs fails here, not on a user's machine); --help reads well."""

import contextlib
import dataclasses
import functools
import io
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import lit_aligner.cli
from lit_aligner.cli import run_cli
from lit_aligner.evaluation.commands import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "howto").glob("*.md"))]
CLI_DIRS = ("finetune", "generate", "serve", "evaluate", "scripts", "benchmarks")
# every script that parses a command line (through lit_aligner.cli)
CLIS = sorted(str(p.relative_to(ROOT)) for d in CLI_DIRS for p in (ROOT / d).glob("*.py")
              if re.search(r"\brun_(training_)?cli\(", p.read_text()))
SCRIPT = re.compile(r"(?:^|[\s(;&|])(?:[\w./-]*/)?python3?\s+((?:%s)/\w+\.py)\b" % "|".join(CLI_DIRS))
SHELL_STOP = ("&&", "||", ";", "|", "&", "<", ">", "2>", "2>&1")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def _command_lines(text: str):
    """The lines of every ```bash block (continuations joined, shell variables set in the block substituted) and
    every inline `code` span of the prose."""
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            assignment = re.match(r"^(\w+)=(.*)$", line.strip())
            if assignment:
                variables[assignment.group(1)] = " ".join(shlex.split(assignment.group(2)))
                continue
            yield re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), line)
    yield from (span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text,
                                                                                       flags=re.S)))


def documented_commands():
    """(doc file, script, argument list) for every command line in the docs that runs one of the project's CLIs."""
    found = []
    for doc in DOCS:
        for line in _command_lines(doc.read_text()):
            for m in SCRIPT.finditer(line):
                args = []
                for word in shlex.split(re.sub(r"\s#\s.*$", "", line[m.end():])):
                    if word in SHELL_STOP or word.startswith(("&", ">", ")", "|")):
                        break
                    args.append(word.rstrip(")&;"))
                if "..." not in args:  # a sketch ("--config X ..."), not a command
                    found.append((doc.name, m.group(1), args))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_commands_of_every_cli():
    assert {script for _, script, _ in COMMANDS} == set(CLIS)
    assert len(CLIS) >= 20 and len(COMMANDS) >= 100


def run_in_process(script, *args):
    """`python script *args` in this process (the script itself, its own parser); sys.argv and sys.path (the
    benchmarks put their folder on it) are restored after."""
    argv, path = sys.argv, list(sys.path)
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path


def parse_only(real_run_cli, main, config_cls=None, description=None, args=None):
    """`run_cli` with `main` replaced by one that returns what it was given: the script's own parser, nothing run."""
    if config_cls is not None:
        return real_run_cli(lambda cfg: cfg, config_cls, description, args)

    @functools.wraps(main)  # main's signature and docstring: its flags
    def parsed(*a, **k):
        return k

    return real_run_cli(parsed, None, description, args)


@pytest.mark.parametrize("doc,script,args", COMMANDS, ids=[f"{d}:{s}:{' '.join(a)[:50]}" for d, s, a in COMMANDS])
def test_a_documented_command_parses(doc, script, args, monkeypatch, capsys):
    monkeypatch.setattr(lit_aligner.cli, "run_cli", functools.partial(parse_only, lit_aligner.cli.run_cli))
    try:
        run_in_process(script, *args)
    except SystemExit as e:
        if e.code not in (0, None):
            pytest.fail(f"{doc}: `python {script} {' '.join(args)}` does not parse: {capsys.readouterr().err.strip()}")


# flags of other tools that the docs quote: pip's, llama.cpp's gguf-split, benchmarks/gpu_suite.sh's, lm_eval's,
# transformers serve's
OTHER_TOOLS_FLAGS = {"--no-deps", "--only-binary", "--platform", "--python-version", "--implementation", "--merge",
                     "--tiny", "--model", "--model_args", "--batch_size", "--cb-max-batch-tokens"}


def cli_help(script, *args):
    """What `python script *args --help` prints, from the script's own parser in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        run_in_process(script, *args, "--help")
    return out.getvalue()


def test_every_flag_the_docs_name_is_a_flag_of_a_cli(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no flag name split across lines
    helps = [cli_help(script, *sub) for script in CLIS
             for sub in ([[name] for name in SUBCOMMANDS] if script == "evaluate/aligner.py" else [[]])]
    known = {f for text in helps for f in FLAG.findall(text)}
    known |= OTHER_TOOLS_FLAGS | set(lit_aligner.cli.RENAMED_FLAGS) | set(lit_aligner.cli.REPLACED_FLAGS)
    assert "--gate-lr-ratio" in known and "--aligners-dir" in known and "--tasks" in known
    unknown = {(doc.name, flag) for doc in DOCS for flag in FLAG.findall(doc.read_text()) if flag not in known}
    assert not unknown, sorted(unknown)


def help_defaults(text):
    """flag -> the default one `--help` states for it (tyro's "(default: X)"), from one-column help text: an entry is
    its flag line and the indented lines under it."""
    found, head, body = {}, None, ""
    for line in [*text.splitlines(), ""]:
        if head is not None and line.startswith("    ") and not line.lstrip().startswith("-"):
            body += " " + line.strip()
            continue
        if head is not None and (m := re.findall(r"\(default: (.*?)\)", body)):
            found.update({f: m[-1].strip("'") for f in FLAG.findall(head)})
        head = body = None
        if re.match(r"^  --?\w", line):
            head, body = re.split(r"\s{2,}", line.strip())[0], line
    return found


# a flag-table row: `--flag` (with an upper-case metavar or {choices}) | its default | ...
TABLE_ROW = re.compile(r"^\| `(--[\w-]+)(?: (?:[A-Z][\w.|]*|\{[^}]*\}))?` \| ([^|]+) \|")


def flag_tables(text):
    """(the last heading above it, [(flag, default cell), ...]) for every flag table of a doc (fenced code skipped:
    its comments are not headings)."""
    heading, rows, tables = "", [], []
    for line in [*re.sub(r"```.*?```", "", text, flags=re.S).splitlines(), ""]:
        if m := TABLE_ROW.match(line):
            rows.append(m.groups())
        elif not line.startswith("|"):
            if rows:
                tables.append((heading, rows))
            rows, heading = [], line if line.startswith("#") else heading
    return tables


def test_the_literal_defaults_in_the_docs_flag_tables_are_the_clis(monkeypatch):
    # A table belongs to the CLIs that have every flag it lists (to the one its heading names, when that is one of
    # them); a default cell that is one literal (`x`, a number, off / on) must be what --help states for that flag
    # there. Computed defaults (None in the parser) and free text ("the run's", `<placeholders>`) are not compared.
    monkeypatch.setenv("COLUMNS", "100")  # one column: each entry's lines stay together
    helps = {" ".join([script, *sub]): cli_help(script, *sub) for script in CLIS
             for sub in ([[name] for name in SUBCOMMANDS] if script == "evaluate/aligner.py" else [[]])}
    flags = {cli: set(FLAG.findall(text)) for cli, text in helps.items()}
    defaults = {cli: help_defaults(text) for cli, text in helps.items()}
    assert defaults["scripts/convert_hf.py"]["--max-shard-gb"] == "5.0"
    assert defaults["finetune/aligner.py"]["--gate-lr-ratio"] == "0.3"

    def literal(cell):
        cell = cell.strip()
        if cell in ("off", "on"):
            return str(cell == "on")
        m = re.fullmatch(r"`([^`<]+)`|(-?\d[\d.]*(?:e-?\d+)?)", cell)
        return m and (m.group(1) or m.group(2))

    def same(a, b):
        try:
            return float(a) == float(b)
        except ValueError:
            return a == b

    checked, wrong = 0, []
    for doc in DOCS:
        for heading, rows in flag_tables(doc.read_text()):
            owners = [cli for cli in helps if {flag for flag, _ in rows} <= flags[cli]]
            owners = [cli for cli in owners if cli.split()[0] in heading] or owners
            if not owners:
                wrong.append(f"{doc.name}: no one CLI has every flag of the table under {heading!r}")
            for flag, cell in rows:
                value, stated = literal(cell), {defaults[cli].get(flag) for cli in owners} - {None}
                if value is None or not stated or "None" in stated:
                    continue
                checked += 1
                if not any(same(value, d) for d in stated):
                    wrong.append(f"{doc.name}: {flag} documented as {cell.strip()}, {' / '.join(owners)} --help "
                                 f"says {sorted(stated)}")
    assert checked >= 100 and not wrong, wrong


@dataclasses.dataclass
class _TwoLineHelp:
    gate_lr_ratio: float = 0.3
    """the gates' learning rate = learning_rate x this (the paper: 1). Slower gates let the prefix find its directions
    before they are let into the residual stream."""


def test_a_field_help_longer_than_one_source_line_reads_as_one_paragraph_in_help(capsys, monkeypatch):
    # tyro reads a field's docstring with its source indentation and keeps the line break before an indented line;
    # run_cli dedents first, so a two-line field help (as --gate-lr-ratio's) wraps only at the terminal's width (a
    # config of one group: one column of help at any width, as a real config's is not)
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit):
        run_cli(lambda cfg: cfg, _TwoLineHelp, args=["--help"])
    lines = capsys.readouterr().out.splitlines()
    # the source breaks after "directions": with tyro's own reading, "before they are let" starts a new line
    assert any("directions before they are let" in " ".join(ln.split()) for ln in lines), lines


def test_an_argument_help_longer_than_one_source_line_reads_as_one_paragraph_in_help(capsys, monkeypatch):
    # tyro reads a function's Args: from the function a wrapper wraps and keeps every source line break of it; run_cli
    # joins each argument's lines (a line starting with "--" included) and the description's, except code, and keeps
    # the signature
    def main(steps: int = 3, out: str = "x"):
        """A function-signature CLI
        whose description spans two lines.

            python cli.py --steps 1
            python cli.py --steps 2

        Args:
            steps: how many steps to run, repeated with
                --steps for several (source line two)
                and a third source line.
            out: where to write.
        """
        return steps, out

    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit):
        run_cli(main, args=["--help"])
    lines = [" ".join(ln.split()) for ln in capsys.readouterr().out.splitlines()]  # the box's padding folded
    joined = "repeated with --steps for several (source line two) and a third source line."
    assert any(joined in ln for ln in lines), lines
    assert "A function-signature CLI whose description spans two lines." in lines
    assert lines.index("python cli.py --steps 2") == lines.index("python cli.py --steps 1") + 1  # code keeps its lines
    assert run_cli(main, args=["--steps", "5"]) == (5, "x")


def test_a_reader_that_closes_the_pipe_stops_a_cli_quietly():
    """`python SCRIPT ... | head`: when the reader has gone, the script stops with the shell's SIGPIPE status and says
    nothing (it printed "error: [Errno 32] Broken pipe")."""
    proc = subprocess.Popen([sys.executable, "evaluate/aligner.py", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the script writes: its first write finds no reader
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b""
