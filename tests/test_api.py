"""The public API (`import lit_aligner as la`) as README.md shows it: the README's Python block runs as written, on the
tiny checkpoint standing in for the embedded default."""

import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(r"## From Python\n\n```python\n(.*?)```", text, re.S).group(1)


def test_the_readme_python_example_trains_loads_and_answers(tiny_checkpoint_dir, tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "SmolLM2-135M-Instruct").symlink_to(tiny_checkpoint_dir)
    code = readme_python_block()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace = {}
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    la, model, tok = namespace["la"], namespace["model"], namespace["tokenizer"]
    summary, aligner, meta = namespace["summary"], namespace["aligner"], namespace["meta"]
    assert summary["step"] == 20 and (tmp_path / "out" / "api-example" / "aligner.safetensors").is_file()
    assert meta["mode"] == "sft" and aligner.gate.abs().sum() > 0
    steered = la.answer(model, tok, "What is 7 times 6?", aligner, meta)
    bare = la.answer(model, tok, "What is 7 times 6?")
    out = capsys.readouterr().out
    assert out.endswith(f"{steered}\n{bare}\n")  # what the block printed
    ids = tok.encode("What is 7 times 6?")[None]
    with torch.no_grad():  # the random tiny base babbles either way; the Aligner moves its distribution
        assert not torch.allclose(model(ids, aligner=aligner), model(ids, aligner=False))


def test_the_public_names_resolve_and_unknown_ones_fail():
    import lit_aligner as la

    for name in la.__all__:
        assert getattr(la, name) is not None
    try:
        la.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown attribute resolved")
