"""Reward functions for GRPO (`finetune/aligner_grpo.py --rewards`): each scores a batch of completions, one number
each, from the prompts, the completions and the rows' reference answers, with TRL's calling convention
(`f(prompts=..., completions=..., **columns)`; ours passes `references`), so a TRL reward function runs unchanged.

Built in:
- `answer`: 1.0 when the completion gives the row's reference answer, else 0.0 (below: how it is read);
- `format`: 1.0 when the completion follows the offline default dataset's answer format ("ANSWER: ...", then
  "END OF ANSWER"; `lit_aligner.data.default`), else 0.0;
- `concise`: 1 - completion tokens / --max-new-tokens, so a shorter answer scores higher (an empty answer is the
  shortest: beside a rare right answer it teaches silence, howto/grpo.md);
- `regex:PATTERN`: 1.0 when PATTERN (Python `re`) matches anywhere in the completion.
Anything else names a function of the user's: `path/to/file.py:name` or `package.module:name`.
"""

import importlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from lit_aligner.files import UserError

BUILT_IN = ("answer", "format", "concise", "regex:PATTERN")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class RewardError(UserError):
    pass


def reference_answer(reference: str) -> str:
    """What a reference response says is the answer: the default dataset's "ANSWER: x" line, GSM8K's "#### x" tail,
    else the whole text (stripped)."""
    from lit_aligner.data.default import extract_answer

    text = reference.strip()
    answer = extract_answer(text)
    if answer is not None:
        return answer
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text


def _number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def gives_answer(completion: str, reference: str) -> bool:
    """Whether `completion` gives `reference`'s answer: for a number, the completion's last number equals it (GSM8K's
    convention: the final number is the answer); otherwise the answer appears in it as a whole phrase (no letter or
    digit joined on either side), ignoring case and runs of white space."""
    answer = reference_answer(reference)
    if not answer:
        return False
    value = _number(answer) if _NUMBER.fullmatch(answer) else None
    if value is not None:
        numbers = _NUMBER.findall(completion)
        return bool(numbers) and _number(numbers[-1]) == value
    squash = lambda s: " ".join(s.lower().split())  # noqa: E731
    return re.search(r"(?<!\w)" + re.escape(squash(answer).rstrip(".")) + r"(?!\w)", squash(completion)) is not None


def _answer(completions: Sequence[str], references: Sequence[str], **_) -> List[float]:
    return [float(gives_answer(c, r)) for c, r in zip(completions, references)]


def _format(completions: Sequence[str], **_) -> List[float]:
    from lit_aligner.data.default import follows_format

    return [float(follows_format(c)) for c in completions]


class Rewards:
    """The named reward functions of a run and their weights: `__call__` scores completions by every function
    ({name: [score per completion]}), `total` weighs them into one reward per completion."""

    def __init__(self, names: Sequence[str], weights: Optional[Sequence[float]] = None, max_new_tokens: int = 128):
        if not names:
            raise RewardError(f"--rewards needs at least one reward function: {', '.join(BUILT_IN)}, or "
                              f"FILE.py:FUNCTION / package.module:FUNCTION of your own")
        if weights is not None and len(weights) != len(names):
            raise RewardError(f"--reward-weights has {len(weights)} numbers for {len(names)} --rewards; give one per "
                              f"reward function (or leave it out: every weight 1)")
        self.specs = list(names)
        self.names = reward_names(self.specs)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(names)
        if not all(math.isfinite(w) for w in self.weights):
            raise RewardError(f"--reward-weights must be finite numbers, got {list(weights or [])}")
        self.max_new_tokens = max_new_tokens
        self.functions: Dict[str, Callable[..., Sequence[float]]] = {
            n: self._function(spec) for n, spec in zip(self.names, self.specs)}

    @property
    def needs_references(self) -> bool:
        return "answer" in self.specs

    def _function(self, name: str) -> Callable[..., Sequence[float]]:
        if name == "answer":
            return _answer
        if name == "format":
            return _format
        if name == "concise":
            return lambda completion_lengths, **_: [1.0 - n / self.max_new_tokens for n in completion_lengths]
        if name.startswith("regex:"):
            try:
                pattern = re.compile(name[len("regex:"):])
            except re.error as e:
                raise RewardError(f"--rewards {name}: not a regular expression ({e})") from None
            return lambda completions, **_: [float(pattern.search(c) is not None) for c in completions]
        return load_function(name)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str],
                 completion_lengths: Sequence[int]) -> Dict[str, List[float]]:
        """{name: one score per completion} for every function (`names`: short names, in --rewards order)."""
        out = {}
        for (name, fn), spec in zip(self.functions.items(), self.specs):
            try:
                scores = fn(prompts=list(prompts), completions=list(completions), references=list(references),
                            completion_lengths=list(completion_lengths))
            except Exception as e:
                raise RewardError(f"reward function {spec} failed: {e.__class__.__name__}: {e}") from None
            scores = list(scores) if scores is not None else []
            if len(scores) != len(completions) or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
                raise RewardError(f"reward function {spec} must return one finite number per completion "
                                  f"({len(completions)}), got {scores[:4]!r}{' ...' if len(scores) > 4 else ''}")
            out[name] = [float(s) for s in scores]
        return out

    def total(self, scores: Dict[str, List[float]]) -> List[float]:
        return [sum(w * scores[n][i] for n, w in zip(self.names, self.weights))
                for i in range(len(next(iter(scores.values()))))]


def reward_names(specs: Sequence[str]) -> List[str]:
    """Short names for metrics (reward_<name>): a built-in's own, "regex" for regex:PATTERN, a user function's name;
    repeats numbered (regex_2, ...)."""
    out: List[str] = []
    for spec in specs:
        name = "regex" if spec.startswith("regex:") else spec.rpartition(":")[2] if ":" in spec else spec
        n, k = name, 2
        while n in out:
            n, k = f"{name}_{k}", k + 1
        out.append(n)
    return out


def load_function(spec: str) -> Callable[..., Sequence[float]]:
    """`file.py:name` or `package.module:name` -> that function (the user's own code, named by the user's flag)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise RewardError(f"--rewards {spec}: not a reward function; one of {', '.join(BUILT_IN)}, or "
                          f"FILE.py:FUNCTION / package.module:FUNCTION")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise RewardError(f"--rewards {spec}: no such file {path}; check the path")
        module_spec = importlib.util.spec_from_file_location(f"lit_aligner_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"--rewards {spec}: {path} failed to import ({e.__class__.__name__}: {e})") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise RewardError(f"--rewards {spec}: cannot import {where} ({e.__class__.__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"--rewards {spec}: {where} has no function {attr!r}")
    return fn
