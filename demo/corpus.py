"""Synthetic languages and datasets for the toy zoo.

Contract: a `World` is a pure function of a seed. It holds a small English-like lexicon, a "foreign"
language that is a consistent one-to-one relabeling of every English word (number words included, word
order unchanged), digit tokens for the numbers 0..MAX_VALUE, and the token vocabulary. Every generator
returns text as space-separated tokens, so `text.split()` is exactly the word-level tokenization.
Generators take a `random.Random` and return one string; nothing here imports torch.

Task formats (shared by both languages; only content words are translated):
  question  "Q : <story> <question> ? A :"   answer "<digits>"   (training text appends " </s>")
  lookup QA  the answer is a number read off the story (no arithmetic)
  word problem  the answer is a + b or a - b over number words in the story
  arithmetic  "3 + 4 = 7" over digits; translation  "<foreign> ~ <english>" (words or sentences).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
MARKERS = ("Q", "A", ":", "?", ".", "=", "+", "-", "~")
MAX_OPERAND = 20
MAX_VALUE = 2 * MAX_OPERAND
NUMBER_WORDS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
NAMES = "tom ann bob sue max eva".split()
OBJECTS = "apples pens books cats coins cups".split()
ADJECTIVES = "red big old new".split()
FUNCTION_WORDS = (
    "has have does do buys gives to loses finds more how many they and the are then likes".split()
)
ENGLISH = tuple(NUMBER_WORDS + NAMES + OBJECTS + ADJECTIVES + FUNCTION_WORDS)
_NUMBER_SET = frozenset(NUMBER_WORDS)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass
class World:
    """The two languages of one seed: `foreign[w]` is the foreign word for English word `w`."""

    seed: int
    foreign: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(f"lexicon-{self.seed}")
        words: set[str] = set()
        while len(words) < len(ENGLISH):
            w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2))
            if w not in ENGLISH:
                words.add(w)
        forms = sorted(words)
        rng.shuffle(forms)
        self.foreign = dict(zip(ENGLISH, forms))

    @property
    def vocab(self) -> list[str]:
        digits = [str(i) for i in range(MAX_VALUE + 1)]
        return [*SPECIALS, *MARKERS, *digits, *ENGLISH, *(self.foreign[w] for w in ENGLISH)]

    def translate(self, text: str) -> str:
        """English -> foreign, word by word; markers and digits are shared by both languages."""
        return " ".join(self.foreign.get(w, w) for w in text.split())


# ---------------------------------------------------------------- English generators


def _statement(rng: random.Random) -> str:
    n, m = rng.sample(NAMES, 2)
    k, obj, adj = rng.choice(NUMBER_WORDS), rng.choice(OBJECTS), rng.choice(ADJECTIVES)
    return rng.choice(
        [
            f"{n} has {k} {obj} .",
            f"{n} buys {k} {adj} {obj} .",
            f"{n} gives {k} {obj} to {m} .",
            f"{n} and {m} have {k} {obj} .",
            f"{n} likes the {adj} {obj} .",
            f"the {obj} are {adj} .",
            f"{n} finds {k} {obj} then {n} loses {rng.choice(NUMBER_WORDS)} {obj} .",
        ]
    )


def story(rng: random.Random) -> str:
    """One to three plain statements (no questions)."""
    return " ".join(_statement(rng) for _ in range(rng.randint(1, 3)))


def arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if rng.random() < 0.5:
        return f"{a} + {b} = {a + b}"
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b}"


def lookup_qa(rng: random.Random) -> tuple[str, str]:
    """A story with two owners; the question asks one owner's count: reading, not arithmetic."""
    n, m = rng.sample(NAMES, 2)
    o1, o2 = rng.choice(OBJECTS), rng.choice(OBJECTS)
    a, b = rng.sample(range(1, MAX_OPERAND + 1), 2)
    facts = [f"{n} has {NUMBER_WORDS[a - 1]} {o1} .", f"{m} has {NUMBER_WORDS[b - 1]} {o2} ."]
    rng.shuffle(facts)
    who, obj, ans = (n, o1, a) if rng.random() < 0.5 else (m, o2, b)
    return f"Q : {' '.join(facts)} how many {obj} does {who} have ? A :", str(ans)


def word_problem(rng: random.Random) -> tuple[str, str]:
    """One-step addition or subtraction over number words; the answer is digits."""
    n, m = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    kind = rng.randrange(4)
    if kind < 2:
        a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    else:
        a = rng.randint(2, MAX_OPERAND)
        b = rng.randint(1, a - 1)
    wa, wb = NUMBER_WORDS[a - 1], NUMBER_WORDS[b - 1]
    ask = f"how many {obj} does {n} have ?"
    if kind == 0:
        text, ans = f"{n} has {wa} {obj} . {n} buys {wb} more {obj} . {ask}", a + b
    elif kind == 1:
        text, ans = f"{n} has {wa} {obj} . {m} has {wb} {obj} . how many {obj} do they have ?", a + b
    elif kind == 2:
        text, ans = f"{n} has {wa} {obj} . {n} gives {wb} {obj} to {m} . {ask}", a - b
    else:
        text, ans = f"{n} has {wa} {obj} . {n} loses {wb} {obj} . {ask}", a - b
    return f"Q : {text} A :", str(ans)


def as_text(prompt: str, answer: str) -> str:
    """A question as training text: the model must emit the answer then end of sequence."""
    return f"{prompt} {answer} </s>"


# ---------------------------------------------------------------- corpora and test sets


def translate_but_numbers(world: World, text: str) -> str:
    """English -> foreign for every word except the number words (which stay English)."""
    return " ".join(w if w in _NUMBER_SET else world.foreign.get(w, w) for w in text.split())


def base_text(world: World, rng: random.Random, foreign_frac: float = 0.10) -> str:
    """The pretraining mix: English stories and lookup QA, arithmetic, a little foreign (10%).

    The foreign part is statements only (stories, and parallel statement pairs), never questions, and its number
    words stay English: the base aligns every foreign word with its English twin except the numbers, so the math
    expert alone cannot read a foreign number (no "rescale the math expert" shortcut: the control drops to ~1%) and
    reading them is what the foreign expert must bring to a merge.
    """
    r = rng.random()
    if r < foreign_frac:
        if rng.random() < 0.6:
            return translate_but_numbers(world, story(rng))
        s = _statement(rng)
        return f"{translate_but_numbers(world, s)} ~ {s}"
    if r < 0.45:
        return story(rng)
    if r < 0.7:
        return as_text(*lookup_qa(rng))
    return arithmetic(rng)


def code_switch(world: World, rng: random.Random, text: str) -> str:
    """Replace a random fraction of the words of an English text by their foreign forms."""
    p = rng.uniform(0.2, 0.8)
    return " ".join(world.foreign.get(w, w) if rng.random() < p else w for w in text.split())


def foreign_text(world: World, rng: random.Random) -> str:
    """The foreign expert's mix: foreign stories and lookup QA, translation pairs, code-switched text.

    No arithmetic. Code-switched text (English with some words foreign) ties each foreign word to its
    English counterpart in every context, which is what lets the foreign skill compose with others.
    """
    r = rng.random()
    if r < 0.2:
        return world.translate(story(rng))
    if r < 0.45:
        return world.translate(as_text(*lookup_qa(rng)))
    if r < 0.7:
        english = story(rng) if rng.random() < 0.4 else as_text(*lookup_qa(rng))
        return code_switch(world, rng, english)
    if r < 0.8:
        w = rng.choice(ENGLISH)
        pair = [world.foreign[w], w]
    else:
        s = _statement(rng)
        pair = [world.translate(s), s]
    if rng.random() < 0.5:
        pair.reverse()
    return f"{pair[0]} ~ {pair[1]}"


def math_text(world: World, rng: random.Random, replay: float = 0.5) -> str:
    """The math expert's mix: English word problems, with a `replay` fraction of the base's own pretraining mix.

    Replaying pretraining data while fine-tuning is the usual guard against forgetting; here it also keeps the math
    expert's body reading words the way the base's body does, which the foreign expert's word embeddings (trained
    against the base's body) rely on in a merge. Measured on zoo v4 seeds 1 and 2 (BENCHMARKS.md): the plain
    foreign + math task-arithmetic merge went from 8.8% / 10.8% to 22.8% / 13.0% on the target.
    """
    if rng.random() < replay:
        return base_text(world, rng)
    return as_text(*word_problem(rng))


def unique_examples(make, rng: random.Random, n: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """`n` examples with distinct prompts, none of them in `exclude`."""
    seen, out = set(exclude), []
    for _ in range(100 * n):
        if len(out) == n:
            break
        prompt, answer = make(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    if len(out) < n:
        raise ValueError(f"could only draw {len(out)} distinct examples of {n}")
    return out
