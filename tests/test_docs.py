"""Every training and evaluation command written in README.md and howto/*.md parses with today's flags (a renamed or
mistyped flag in the docs fails here, not on a user's machine)."""

import re
import shlex
from pathlib import Path

import pytest

from lit_aligner.cli import run_cli
from lit_aligner.evaluation.commands import SUBCOMMANDS
from lit_aligner.training import DPORunConfig, SFTRunConfig

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {"finetune/aligner.py": SFTRunConfig, "finetune/aligner_dpo.py": DPORunConfig,
           "evaluate/aligner.py": SUBCOMMANDS}


def documented_commands():
    """(doc file, script, argument list) for every command line in a ```bash block that runs one of PARSERS."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "howto").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if not any(s in line for s in PARSERS):
                    continue
                words = shlex.split(re.sub(r"\s#\s.*$", "", line))
                for i, word in enumerate(words):
                    script = next((s for s in PARSERS if word.endswith(s)), None)
                    if script is None:
                        continue
                    args = []
                    for w in words[i + 1:]:
                        if w in ("&&", "||", ";", "|", ">", "2>", "&") or w.startswith(("&", ">", ")")):
                            break
                        args.append(w.rstrip(")&"))
                    found.append((doc.name, script, args))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_commands_of_every_cli():
    assert {script for _, script, _ in COMMANDS} == set(PARSERS)
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("doc,script,args", COMMANDS, ids=[f"{d}:{' '.join(a)[:60]}" for d, _, a in COMMANDS])
def test_a_documented_command_parses(doc, script, args, capsys):
    try:
        run_cli(lambda cfg: cfg, PARSERS[script], args=args)  # parse only: the "main" returns the config
    except SystemExit:
        pytest.fail(f"{doc}: `python {script} {' '.join(args)}` does not parse: {capsys.readouterr().err.strip()}")


def test_a_field_help_longer_than_one_source_line_reads_as_one_paragraph_in_help(capsys, monkeypatch):
    # tyro reads a field's docstring with its source indentation and keeps the line break before an indented line;
    # run_cli dedents first, so the help of --gate-lr-ratio (two source lines) wraps only at the terminal's width
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit):
        run_cli(lambda cfg: cfg, SFTRunConfig, args=["--help"])
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
