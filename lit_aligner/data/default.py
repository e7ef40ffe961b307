"""The offline default dataset: simple instructions made by code (arithmetic, unit conversions, reversing and sorting
words or numbers, counting letters, ...) with correct answers, every response in one fixed FORMAT:

    ANSWER: <answer>
    END OF ANSWER

The base model does not answer like this before training, and a regex checks it (`follows_format`, `format_rate`), so
the effect of an Aligner is measurable without a judge: the format rate of its answers on the validation prompts
against the bare base model's. No text is copied from anywhere; the same seed gives the same rows.
"""

import random
import re
from typing import Callable, Dict, Iterable, List, Optional, Tuple

DEFAULT_NUM_ROWS = 3000
DEFAULT_SEED = 1234
SIGN_OFF = "END OF ANSWER"
_FORMAT_RE = re.compile(r"ANSWER: (\S(?:[^\n]*\S)?)\n" + re.escape(SIGN_OFF))


def format_response(answer: str) -> str:
    """The response FORMAT: "ANSWER: <answer>" on one line, then the fixed sign-off line."""
    answer = str(answer).strip()
    if not answer or "\n" in answer:
        raise ValueError(f"an answer must be one non-empty line, got {answer!r}")
    return f"ANSWER: {answer}\n{SIGN_OFF}"


def format_context() -> str:
    """The FORMAT shown by three worked examples (none of them a generated row): the default teacher context of
    context distillation (finetune/aligner_distill.py), a few-shot prompt as in "Learning by Distilling Context"."""
    shots = [("What is 7 plus 5?", "12"), ('Reverse the word "cat".', "tac"),
             ("How many legs does a spider have?", "8")]
    return "Every reply has exactly two lines, like these examples.\n\n" + "\n\n".join(
        f"Question: {q}\nReply:\n{format_response(a)}" for q, a in shots)


def follows_format(text: str) -> bool:
    """True iff `text` (surrounding whitespace ignored) is exactly "ANSWER: <one-line answer>\\nEND OF ANSWER"."""
    return _FORMAT_RE.fullmatch(text.strip()) is not None


def extract_answer(text: str) -> Optional[str]:
    """The answer of a response in the FORMAT, None when it does not follow it."""
    m = _FORMAT_RE.fullmatch(text.strip())
    return m.group(1) if m else None


def format_rate(texts: Iterable[str]) -> float:
    """Fraction of `texts` that follow the FORMAT (0.0 for no texts)."""
    texts = list(texts)
    return sum(map(follows_format, texts)) / len(texts) if texts else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Tasks: each takes a random.Random and returns (instruction, input, answer). Several phrasings per task, and some tasks
# put their data in the input (Alpaca-style), so the rows are diverse while every answer is computed.

_WORDS = (
    "apple river stone cloud garden window pencil orange bridge candle forest rabbit silver planet market button "
    "yellow basket summer winter doctor pocket ladder island jacket monkey rocket tunnel violin wallet anchor "
    "butter camera dragon engine finger guitar hammer kitten lemon mirror needle olive parrot puzzle quiet "
    "saddle tiger velvet walnut zebra banana cherry meadow harbor lantern marble nectar oyster pepper ribbon "
    "shadow thunder tomato valley whistle copper feather glacier honey igloo jungle kettle lizard mango "
    "noodle pillow rainbow sparrow turtle umbrella blanket castle dolphin falcon pretzel sunset teapot"
).split()
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
# (singular, plural) of the source unit, (singular, plural) of the target unit, factor
_UNITS = [
    (("kilometer", "kilometers"), ("meter", "meters"), 1000),
    (("meter", "meters"), ("centimeter", "centimeters"), 100),
    (("kilogram", "kilograms"), ("gram", "grams"), 1000),
    (("hour", "hours"), ("minute", "minutes"), 60),
    (("minute", "minutes"), ("second", "seconds"), 60),
    (("day", "days"), ("hour", "hours"), 24),
    (("week", "weeks"), ("day", "days"), 7),
    (("foot", "feet"), ("inch", "inches"), 12),
    (("yard", "yards"), ("foot", "feet"), 3),
    (("liter", "liters"), ("milliliter", "milliliters"), 1000),
    (("dollar", "dollars"), ("cent", "cents"), 100),
    (("year", "years"), ("month", "months"), 12),
]

Task = Callable[[random.Random], Tuple[str, str, str]]


def _numbers(rng: random.Random, k: int, lo: int = 1, hi: int = 99) -> List[int]:
    return rng.sample(range(lo, hi + 1), k)


def _csv(items) -> str:
    return ", ".join(map(str, items))


def _add(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    q = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.",
                    "What do you get when you add {a} to {b}?"])
    return q.format(a=a, b=b), "", str(a + b)


def _sub(rng):
    a, b = sorted((rng.randint(2, 99), rng.randint(2, 99)), reverse=True)
    q = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}.", "How much is {a} minus {b}?"])
    return q.format(a=a, b=b), "", str(a - b)


def _mul(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?"])
    return q.format(a=a, b=b), "", str(a * b)


def _div(rng):
    b, q_, r = rng.randint(2, 9), rng.randint(2, 12), rng.randint(0, 8)
    if rng.random() < 0.5:
        return f"What is {b * q_} divided by {b}?", "", str(q_)
    r %= b
    return f"What is the remainder when {b * q_ + r} is divided by {b}?", "", str(r)


def _square(rng):
    n = rng.randint(2, 20)
    return rng.choice([f"What is {n} squared?", f"Compute {n} to the power of 2."]), "", str(n * n)


def _convert(rng):
    (s1, p1), (s2, p2), f = rng.choice(_UNITS)
    v = rng.randint(1, 50)
    src = s1 if v == 1 else p1
    dst = s2 if v * f == 1 else p2
    q = rng.choice([f"Convert {v} {src} to {p2}.", f"How many {p2} are in {v} {src}?", f"Express {v} {src} in {p2}."])
    return q, "", f"{v * f} {dst}"


def _word_list_task(rng, inline: str, from_input: str, transform: Callable[[List[str]], List[str]]):
    """A few random words, in the instruction (`inline`: ...) or in the input (`from_input`), answered by
    `transform(words)`."""
    words = rng.sample(_WORDS, rng.randint(3, 6))
    if rng.random() < 0.5:
        return f"{inline}: {' '.join(words)}", "", " ".join(transform(words))
    return from_input, " ".join(words), " ".join(transform(words))


def _reverse_words(rng):
    return _word_list_task(rng, "Reverse the order of these words", "Reverse the order of the words in the input.",
                           lambda w: list(reversed(w)))


def _sort_numbers(rng):
    nums = _numbers(rng, rng.randint(4, 7))
    desc = rng.random() < 0.4
    order = "from largest to smallest" if desc else "from smallest to largest"
    answer = _csv(sorted(nums, reverse=desc))
    if rng.random() < 0.5:
        return f"Sort these numbers {order}: {_csv(nums)}", "", answer
    return f"Sort the numbers in the input {order}.", _csv(nums), answer


def _sort_words(rng):
    return _word_list_task(rng, "Put these words in alphabetical order", "Sort the words in the input alphabetically.",
                           sorted)


def _count_letter(rng):
    word = rng.choice(_WORDS)
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice([c for c in "bdfgjkmpqvwxz" if c not in word])
    return f"How many times does the letter '{letter}' appear in the word '{word}'?", "", str(word.count(letter))


def _word_length(rng):
    word = rng.choice(_WORDS)
    return rng.choice([f"How many letters are in the word '{word}'?", f"Count the letters in '{word}'."]), "", \
        str(len(word))


def _count_vowels(rng):
    word = rng.choice(_WORDS)
    return f"How many vowels (a, e, i, o, u) are in the word '{word}'?", "", str(sum(c in "aeiou" for c in word))


def _count_words(rng):
    words = rng.choices(_WORDS, k=rng.randint(3, 9))
    if rng.random() < 0.5:
        return f"How many words are in this list: {' '.join(words)}", "", str(len(words))
    return "Count the words in the input.", " ".join(words), str(len(words))


def _extreme(rng):
    nums = _numbers(rng, rng.randint(4, 7))
    big = rng.random() < 0.5
    which = "largest" if big else "smallest"
    answer = str(max(nums) if big else min(nums))
    if rng.random() < 0.5:
        return f"What is the {which} number in this list: {_csv(nums)}?", "", answer
    return f"Find the {which} number in the input.", _csv(nums), answer


def _parity(rng):
    n = rng.randint(1, 999)
    return f"Is {n} even or odd?", "", "even" if n % 2 == 0 else "odd"


def _sequence(rng):
    a, d = rng.randint(1, 30), rng.randint(2, 12)
    seq = [a + i * d for i in range(4)]
    return f"What number comes next in the sequence {_csv(seq)}?", "", str(a + 4 * d)


def _case(rng):
    words = rng.sample(_WORDS, rng.randint(2, 3))
    text = " ".join(words)
    if rng.random() < 0.5:
        return f"Write '{text}' in uppercase letters.", "", text.upper()
    return "Rewrite the input in uppercase letters.", text, text.upper()


def _backwards(rng):
    word = rng.choice(_WORDS)
    return rng.choice([f"Spell the word '{word}' backwards.", f"Write '{word}' with its letters reversed."]), "", \
        word[::-1]


def _first_last(rng):
    word = rng.choice(_WORDS)
    if rng.random() < 0.5:
        return f"What is the first letter of the word '{word}'?", "", word[0]
    return f"What is the last letter of the word '{word}'?", "", word[-1]


def _compare(rng):
    a, b = _numbers(rng, 2, 1, 999)
    if rng.random() < 0.5:
        return f"Which number is larger, {a} or {b}?", "", str(max(a, b))
    return f"Which number is smaller, {a} or {b}?", "", str(min(a, b))


def _calendar(rng):
    names, kind = (_DAYS, "day of the week") if rng.random() < 0.6 else (_MONTHS, "month")
    i = rng.randrange(len(names))
    if rng.random() < 0.5:
        return f"Which {kind} comes after {names[i]}?", "", names[(i + 1) % len(names)]
    return f"Which {kind} comes before {names[i]}?", "", names[(i - 1) % len(names)]


def _sort_letters(rng):
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 6))
    return f"Put these letters in alphabetical order: {_csv(letters)}", "", _csv(sorted(letters))


TASKS: Dict[str, Task] = {
    "add": _add, "subtract": _sub, "multiply": _mul, "divide": _div, "square": _square, "convert_units": _convert,
    "reverse_words": _reverse_words, "sort_numbers": _sort_numbers, "sort_words": _sort_words,
    "count_letter": _count_letter, "word_length": _word_length, "count_vowels": _count_vowels,
    "count_words": _count_words, "min_max": _extreme, "parity": _parity, "next_in_sequence": _sequence,
    "uppercase": _case, "spell_backwards": _backwards, "first_last_letter": _first_last, "compare": _compare,
    "calendar": _calendar, "sort_letters": _sort_letters,
}


def generate_rows(num_rows: int = DEFAULT_NUM_ROWS, seed: int = DEFAULT_SEED) -> List[Dict[str, str]]:
    """`num_rows` distinct Alpaca-style rows {"instruction", "input", "output", "task"}, every output in the FORMAT.
    Deterministic: the same (num_rows, seed) gives the same rows in the same order."""
    rng = random.Random(seed)
    names = sorted(TASKS)
    rows: List[Dict[str, str]] = []
    seen = set()
    tries = 0
    while len(rows) < num_rows:
        tries += 1
        if tries > 50 * num_rows:
            raise ValueError(f"cannot make {num_rows} distinct rows (got {len(rows)}); ask for fewer")
        name = rng.choice(names)
        instruction, input, answer = TASKS[name](rng)
        if (instruction, input) in seen:
            continue
        seen.add((instruction, input))
        rows.append({"instruction": instruction, "input": input, "output": format_response(answer), "task": name})
    return rows


_PLAIN_STYLES = ("{a}", "The answer is {a}.", "Sure! The answer is {a}.", "{a}.", "It is {a}.")


def plain_answer(answer: str, rng: random.Random) -> str:
    """The same answer in one of a few ordinary wordings (what a model says without the FORMAT)."""
    return rng.choice(_PLAIN_STYLES).format(a=answer)


def generate_preference_rows(num_rows: int = DEFAULT_NUM_ROWS, seed: int = DEFAULT_SEED) -> List[Dict[str, str]]:
    """The default rows as preference pairs {"prompt", "input", "chosen", "rejected", "task"}: chosen is the response
    in the FORMAT, rejected the same (correct) answer in plain words, so only the format separates them. Used as
    DPO pairs and as Q-A-C rows (A = rejected, C = chosen). Same prompts as `generate_rows(num_rows, seed)`."""
    rng = random.Random(seed + 1)
    out = []
    for row in generate_rows(num_rows, seed):
        answer = extract_answer(row["output"])
        out.append({"prompt": row["instruction"], "input": row["input"], "chosen": row["output"],
                    "rejected": plain_answer(answer, rng), "task": row["task"]})
    return out
