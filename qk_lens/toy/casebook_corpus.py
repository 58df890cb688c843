"""The casebook corpus: a deterministic grammar in which each case study's mechanism is needed.

Five cases, each a kind of *item* (a short text whose last word is the answer), mixed with
filler sentences that state the facts the cases test, so the model is not a lookup table:

* ``induction``: titled names recur; the answer is the name last seen with the final title
  ("i always loved visiting aunt sally . whenever i was feeling sad , aunt" → "sally"). Up to
  three titled names per story under distinct titles, except in one story in five where the
  last title repeats an earlier one (then recency decides); the final title asks for an older
  name in two stories in three with several names, so mostly the title, not recency, decides.
* ``antonyms``: "the opposite of small is" → "big", in three templates and after a filler
  sentence, over :data:`ANTONYMS` (both directions).
* ``multiple-choice``: "question : which country is paris in ? ( a ) spain ( b ) france ( c )
  italy answer" → "b", over :data:`CAPITALS` (the facts are stated in filler sentences).
* ``correctness``: "the color of a banana is yellow ?" → "yes" ("... red ?" → "no"), over
  :data:`COLORS`.
* ``arithmetic``: "7 + 8 = 15 ?" → "yes" / "no", operands 0–9 (numbers are tokens).

Held out (never in training, in any sentence; :func:`held_out_items` draws from them):

* ``induction``: names in :data:`HELD_OUT_NAMES` never occur in an induction story in training
  (they occur in filler sentences, after titles too, so nothing suppresses them there);
* ``antonyms``: the pairs are facts to learn, so the held-out prompts are unseen contexts: the
  filler sentence before them only ever uses held-out names;
* ``multiple-choice``: one question in ten (a city with its three options in order) is held
  out, by a hash (:func:`held_out_question`): the held-out questions ask known facts with the
  options in orders and positions never seen with that city and those distractors;
* ``correctness``: every fifth object (:func:`held_out_objects`) is never checked in training;
  its color is stated in filler ("the banana is yellow ."), as every object's is;
* ``arithmetic``: one operand pair in ten (:func:`held_out_sums`) is never checked in training;
  its sum is stated in filler ("7 + 8 = 15 ."), as every pair's is: the check has to compare
  the statement with what the model knows, as the color check does. Each held-out pair is
  a + b with a < b, and b + a is checked in training: models learn a sum check per unordered
  pair of operands, and a pair held out in both orders stayed unlearned (docs/casebook.md §4).

Held-out checks follow a held-out filler sentence seven times in ten (one that never states the
color or the sum checked), as the antonyms do: bare, the 5 held-out objects give only 40 color
checks (5 true) and the 10 pairs 100 sum checks (10 true), too few for figures over hundreds of
distinct prompts. :func:`held_out_items` gives distinct prompts, so a figure over n counts n.

Among the filler, a run of titles, names and things said twice rewards plain induction (the
second copy is predicted only by finding each word earlier and copying what followed it):
without it the induction head formed on one data stream in five (docs/casebook.md §4).

Everything is drawn with :class:`random.Random` from a seed, so a seed gives the same text on
every platform.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from qk_lens.checks import check_count

CASES = ("induction", "antonyms", "multiple-choice", "correctness", "arithmetic")

NAMES = (
    "sally mary john bob alice tom anna ben kate paul emma jack lucy sam nora leo ruth max ivy "
    "dan eve joe amy tim zoe ray meg ted ada ned rose carl jane fred lily hugo beth otto iris glen"
).split()
# never in an induction story in training (in filler, after titles too): the held-out names
HELD_OUT_NAMES = tuple(NAMES[i] for i in range(3, len(NAMES), 5))
TITLES = ("aunt", "uncle", "doctor", "coach", "captain", "professor", "grandma", "cousin")

ANTONYMS = (
    ("small", "big"), ("hot", "cold"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("wet", "dry"), ("light", "dark"), ("loud", "quiet"), ("hard", "soft"), ("long", "short"),
    ("rich", "poor"), ("early", "late"), ("open", "closed"), ("full", "empty"),
    ("thick", "thin"), ("high", "low"), ("near", "far"), ("clean", "dirty"),
    ("strong", "weak"), ("old", "new"),
)  # fmt: skip
OPPOSITE = {a: b for a, b in ANTONYMS} | {b: a for a, b in ANTONYMS}

CAPITALS = (
    ("paris", "france"), ("rome", "italy"), ("madrid", "spain"), ("berlin", "germany"),
    ("london", "england"), ("tokyo", "japan"), ("cairo", "egypt"), ("lima", "peru"),
    ("oslo", "norway"), ("dublin", "ireland"), ("athens", "greece"), ("lisbon", "portugal"),
    ("moscow", "russia"), ("delhi", "india"), ("beijing", "china"), ("ottawa", "canada"),
    ("vienna", "austria"), ("warsaw", "poland"), ("havana", "cuba"), ("nairobi", "kenya"),
    ("seoul", "korea"), ("bern", "switzerland"), ("prague", "czechia"), ("manila", "philippines"),
)  # fmt: skip
LETTERS = ("a", "b", "c")

COLORS = (
    ("banana", "yellow"), ("apple", "red"), ("grass", "green"), ("sky", "blue"),
    ("snow", "white"), ("coal", "black"), ("lemon", "yellow"), ("tomato", "red"),
    ("leaf", "green"), ("sea", "blue"), ("milk", "white"), ("crow", "black"),
    ("cherry", "red"), ("frog", "green"), ("cloud", "white"), ("bear", "brown"),
    ("pig", "pink"), ("chocolate", "brown"), ("corn", "yellow"), ("ink", "black"),
    # every color has at least two objects checked in training, so a check of a held-out object
    # can compare with its stated color (the second model, docs/casebook.md §4, had one brown
    # object in training: every true check of the held-out bear failed)
    ("blueberry", "blue"), ("coffee", "brown"), ("mud", "brown"), ("flamingo", "pink"),
    ("bubblegum", "pink"),
)  # fmt: skip
COLOR_WORDS = ("red", "yellow", "green", "blue", "white", "black", "brown", "pink")

N_LEFT, N_RIGHT = 10, 10  # arithmetic operands: 0..9 + 0..9
N_NUMBERS = N_LEFT + N_RIGHT - 1 + 3  # sums up to 18, wrong answers up to 21

# filler: plain sentences that state the facts and use every word in other roles
_VERBS = ("saw", "met", "called", "helped", "liked", "visited")
_PLACES = ("park", "market", "lake", "school", "station", "garden")
_THINGS = ("dog", "book", "car", "house", "hat", "boat", "cup", "ball")
# how often each case is drawn: induction stories (1-3 names, recency) and the sums to check
# need the most examples (a first recipe drew every case equally: induction 59%, arithmetic 86%
# held out)
_CASE_DRAWS = (*CASES, "induction", "arithmetic")
# held-out checks follow a held-out filler sentence this often (Grammar._in_context)
HELD_OUT_CONTEXT = 0.7
# held_out_items gives up after this many draws per distinct prompt asked for
HELD_OUT_DRAWS = 20
# how an induction story asks for a name again
_RECALLS = (("whenever", "i", "was", "feeling", "sad", ","), ("so", "i", "called"),
            ("the", "next", "day", ","))  # fmt: skip


# classes of words, for the automatic labels ("token class = antonym word"): a feature that fires
# on every word of a class is about the class (the paper's "antonym-related words", "names")
WORD_CLASSES: dict[str, tuple[str, ...]] = {
    "name": NAMES,
    "title": TITLES,
    "antonym word": tuple(w for pair in ANTONYMS for w in pair),
    "city": tuple(c for c, _ in CAPITALS),
    "country": tuple(c for _, c in CAPITALS),
    "object": tuple(o for o, _ in COLORS),
    "color": COLOR_WORDS,
    "number": tuple(str(n) for n in range(N_NUMBERS)),
    "place": _PLACES,
    "thing": _THINGS,
    "verb": _VERBS,
}


def held_out_objects() -> tuple[str, ...]:
    """The objects never checked in training: every fifth of :data:`COLORS`."""
    return tuple(o for i, (o, _) in enumerate(COLORS) if i % 5 == 0)


def held_out_sums() -> frozenset[tuple[int, int]]:
    """The operand pairs never checked in training: one in ten of the table, each a + b with
    a < b, so that its reverse b + a is checked in training."""
    rng = random.Random(4242)
    pairs = [(a, b) for a in range(N_LEFT) for b in range(N_RIGHT) if a < b]
    return frozenset(rng.sample(pairs, N_LEFT * N_RIGHT // 10))


def _hash(*words: str) -> int:
    """A hash of words that does not depend on Python's string hashing (the same everywhere)."""
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=4).digest(), "big")


def _held_out_antonyms() -> frozenset[tuple[str, int]]:
    """(word, template) pairs never asked in training: one in five, by hash, every word keeping
    at least one template in training."""
    out = set()
    for word in sorted(OPPOSITE):
        held = {t for t in range(3) if _hash(word, str(t)) % 5 == 0}
        out |= {(word, t) for t in (held if len(held) < 3 else held - {0})}
    return frozenset(out)


HELD_OUT_ANTONYMS = _held_out_antonyms()


def held_out_question(city: str, options: list[str]) -> bool:
    """Whether a question (its city and options in order) is held out: one in ten, by a hash that
    does not depend on Python's string hashing (so it is the same in every process)."""
    return _hash(city, *options) % 10 == 0


def vocabulary() -> tuple[str, ...]:
    """Every word the grammar writes, in a fixed order (the tokenizer's ids follow it)."""
    words: list[str] = []

    def add(*ws: str) -> None:
        for w in ws:
            if w not in words:
                words.append(w)

    add(".", ",", "?", ":", "(", ")", "+", "=", "yes", "no", "the", "a", "of", "is", "in", "i")
    add(*"always loved visiting whenever was feeling so called next day we had dinner with".split())
    add(
        *"lives near gave me book says hello to and went opposite what it say met then home".split()
    )
    add(*"question which country answer color".split())
    add(*NAMES, *TITLES, *(w for pair in ANTONYMS for w in pair))
    add(*(w for pair in CAPITALS for w in pair), *LETTERS)
    add(*(w for pair in COLORS for w in pair), *COLOR_WORDS)
    add(*_VERBS, *_PLACES, *_THINGS, *(str(n) for n in range(N_NUMBERS)))
    return tuple(words)


@dataclass(frozen=True)
class Item:
    """One case item: ``words[:-1]`` is the prompt, ``words[-1]`` the answer."""

    case: str
    words: tuple[str, ...]
    # named positions in ``words`` (e.g. "source": where the answer's evidence is)
    marks: dict[str, int] = field(default_factory=dict, compare=False)
    # the answer a wrong mechanism would give (e.g. an older name), where the case has one
    foil: str | None = None

    @property
    def prompt(self) -> str:
        return " ".join(self.words[:-1])

    def roles(self) -> list[str | None]:
        """What each word is in the case ("antonyms: the word asked about", ...; None: nothing
        special): the descriptions automatic labels may give features (``qk_lens.labels``)."""
        out: list[str | None] = [None] * len(self.words)
        c, m = self.case, self.marks
        final = len(self.words) - 2
        if c == "induction":
            for key, p in m.items():
                if key.startswith("name"):
                    out[p] = "induction: an earlier titled name"
            out[m["source"]] = "induction: the name to recall"
            out[final] = "induction: the final title"
        elif c == "antonyms":
            out[m["source"]] = "antonyms: the word asked about"
            out[final] = "antonyms: asks for the opposite"
        elif c == "multiple-choice":
            for j in range(len(LETTERS)):
                out[m[f"option{j}"]] = "multiple-choice: a wrong option"
            out[m["source"]] = "multiple-choice: the right option"
            out[m["city"]] = "multiple-choice: the city asked about"
            out[final] = "multiple-choice: asks for the letter"
        else:
            truth = self.answer == "yes"
            what = "color" if c == "correctness" else "sum"
            out[m["source"]] = f"{c}: a {'right' if truth else 'wrong'} {what}"
            out[final] = f"{c}: '?' after a {'true' if truth else 'false'} statement"
        out[-1] = f"{c}: the answer"
        return out

    @property
    def answer(self) -> str:
        return self.words[-1]


def color_check(obj: str, color: str) -> Item:
    """The color check `the color of the OBJ is COLOR ?`, answered from :data:`COLORS`."""
    true = dict(COLORS).get(obj)
    if true is None or color not in COLOR_WORDS:
        raise ValueError(
            f"no color check of {obj!r} as {color!r}: objects are {[o for o, _ in COLORS]}, "
            f"colors {list(COLOR_WORDS)}"
        )
    words = ["the", "color", "of", "the", obj, "is", color, "?"]
    return Item("correctness", (*words, "yes" if color == true else "no"),
                {"source": 6, "object": 4})  # fmt: skip


def sum_check(a: int, b: int, c: int) -> Item:
    """The sum check `A + B = C ?`, answered."""
    if not (0 <= a < N_LEFT and 0 <= b < N_RIGHT and 0 <= c < N_NUMBERS):
        raise ValueError(
            f"no sum check {a} + {b} = {c}: operands are 0..{N_LEFT - 1} and 0..{N_RIGHT - 1}, "
            f"sums 0..{N_NUMBERS - 1}"
        )
    words = [str(a), "+", str(b), "=", str(c), "?"]
    # "operand": the second operand, where the paper's sum checks attend from the sum
    return Item("arithmetic", (*words, "yes" if c == a + b else "no"),
                {"source": 4, "operand": 2})  # fmt: skip


class Grammar:
    """Draws items and filler from a seed; ``held_out=True`` draws only held-out items."""

    def __init__(self, seed: int, held_out: bool = False) -> None:
        self.rng = random.Random(seed)
        self.held_out = held_out
        held = set(HELD_OUT_NAMES)
        self.titled_names = [n for n in NAMES if (n in held) == held_out]
        self.sums_out = held_out_sums()

    # ---------------------------------------------------------------- cases
    def induction(self) -> Item:
        r = self.rng
        # more stories with several names than one: only those need the title (one name in five)
        n = r.choice((1, 2, 2, 3, 3))
        names = r.sample(self.titled_names, n)
        titles = r.sample(TITLES, n)
        if n > 1 and r.random() < 0.2:  # same title twice: only recency decides
            titles[-1] = titles[r.randrange(n - 1)]
        words: list[str] = ["i", "always", "loved", "visiting"]
        marks: dict[str, int] = {}
        intros = (
            ("i", "always", "loved", "visiting"),
            ("we", "had", "dinner", "with"),
            ("i", "called"),
            ("i", "went", "to", "the", r.choice(_PLACES), "with"),
        )
        for j, (t, name) in enumerate(zip(titles, names, strict=True)):
            if j:
                words += list(r.choice(intros))
            words += [t]
            marks[f"name{j}"] = len(words)
            words += [name]
            if r.random() < 0.5:
                words += list(r.choice((("lives", "near", "the", r.choice(_PLACES)),
                                        ("gave", "me", "a", r.choice(_THINGS)),
                                        ("says", "hello"))))  # fmt: skip
            words += ["."]
        # the final title asks for an older name two times in three: the most recent name is
        # then right in 43% of the stories with several names (the second model, trained where
        # it was right in three in four, learned recency and not the title: 0/41 on older names)
        target = r.randrange(n - 1) if n > 1 and r.random() < 2 / 3 else n - 1
        title = titles[target]
        last = max(j for j in range(n) if titles[j] == title)
        words += [*r.choice(_RECALLS), title]
        older = [names[j] for j in range(last) if titles[j] == title]
        marks["source"] = marks[f"name{last}"]
        return Item("induction", (*words, names[last]), marks, older[-1] if older else None)

    def _filler_sentence(self, names: list[str]) -> list[str]:
        r = self.rng
        # facts (capitals, colors, sums) half the time: the cases ask about them
        kind = r.choice((0, 1, 2, 2, 3, 3, 3, 4, 4, 5, 6, 7, 7))
        if kind == 7:
            # a run of titles, names and things said twice: the second copy is predicted only
            # by induction (find the current word earlier, copy what followed it)
            pool = (*TITLES, *names, *_THINGS, *_PLACES)
            run = [r.choice(pool) for _ in range(r.randrange(4, 9))]
            return [*run, ".", *run, "."]
        if kind == 0:
            # every name follows a title somewhere in training, so nothing suppresses a name
            # there; never after a story's recall phrase, which would teach that any name may
            # follow a recalled title (the first recipe did: 59% held-out induction)
            return [r.choice(TITLES), r.choice(names), r.choice(_VERBS), r.choice(names), "in",
                    "the", r.choice(_PLACES), "."]  # fmt: skip
        if kind == 1:
            a, b = r.choice(ANTONYMS)
            return ["the", r.choice((a, b)), r.choice(_THINGS), "is", "in", "the",
                    r.choice(_PLACES), "."]  # fmt: skip
        if kind == 2:
            city, country = r.choice(CAPITALS)
            return [city, "is", "in", country, "."]
        if kind == 3:
            obj, color = r.choice(COLORS)
            return r.choice((["the", obj, "is", color, "."], ["i", "saw", "a", color, obj, "."]))
        if kind == 4:
            a, b = self._pair(checked=False)
            return [str(a), "+", str(b), "=", str(a + b), "."]
        if kind == 5:
            return [r.choice(names), "went", "to", "the", r.choice(_PLACES), "with", "a",
                    r.choice(_THINGS), "."]  # fmt: skip
        # a pair of names said twice: every name is copied (by induction) somewhere in training
        a, b = r.sample(names, 2)
        return [a, "and", b, "met", ".", "then", a, "and", b, "went", "home", "."]

    def filler(self) -> list[str]:
        # held-out contexts use only held-out names; training filler uses every name
        names = list(HELD_OUT_NAMES) if self.held_out else NAMES
        return self._filler_sentence(names)

    def antonyms(self) -> Item:
        r = self.rng
        while True:
            word = r.choice(sorted(OPPOSITE))
            template = r.randrange(3)
            if ((word, template) in HELD_OUT_ANTONYMS) == self.held_out:
                break
        words = self.filler() if r.random() < 0.7 else []
        if template == 0:
            words += ["the", "opposite", "of"]
            src = len(words)
            words += [word, "is"]
        elif template == 1:
            words += ["what", "is", "the", "opposite", "of"]
            src = len(words)
            words += [word, "?", "it", "is"]
        else:
            words += ["we", "say"]
            src = len(words)
            words += [word, ",", "and", "the", "opposite", "is"]
        return Item("antonyms", (*words, OPPOSITE[word]), {"source": src})

    def multiple_choice(self) -> Item:
        r = self.rng
        while True:
            i = r.randrange(len(CAPITALS))
            city, country = CAPITALS[i]
            pos = r.randrange(3)
            others = r.sample([c for _, c in CAPITALS if c != country], 2)
            options = others[:pos] + [country] + others[pos:]
            if held_out_question(city, options) == self.held_out:
                break
        words = ["question", ":", "which", "country", "is", city, "in", "?"]
        marks = {"city": 5}
        for j, (letter, option) in enumerate(zip(LETTERS, options, strict=True)):
            words += ["(", letter, ")"]
            marks[f"option{j}"] = len(words)
            words += [option]
        marks["source"] = marks[f"option{pos}"]
        # one word between the options and the letter: the letter is found where it is said
        # (with "answer : (" the second model gathered it at "answer" and copied it on)
        words += ["answer"]
        return Item("multiple-choice", (*words, LETTERS[pos]), marks)

    def correctness(self) -> Item:
        r = self.rng
        # held-out checks are of the objects never checked in training (their colors are stated
        # in filler); half true, half false
        held = held_out_objects()
        objects = [i for i, (o, _) in enumerate(COLORS) if (o in held) == self.held_out]
        i = r.choice(objects)
        obj, true = COLORS[i]
        color = true if r.random() < 0.5 else r.choice([c for c in COLOR_WORDS if c != true])
        return self._in_context(color_check(obj, color), lambda s: obj in s)

    def _pair(self, checked: bool) -> tuple[int, int]:
        """Operands: a stated sum may be any pair; a checked one is held out or not."""
        r = self.rng
        while True:
            a, b = r.randrange(N_LEFT), r.randrange(N_RIGHT)
            if not checked or ((a, b) in self.sums_out) == self.held_out:
                return a, b

    def arithmetic(self) -> Item:
        r = self.rng
        a, b = self._pair(checked=True)
        if r.random() < 0.5:
            c = a + b
        else:
            c = a + b + r.choice((-3, -2, -1, 1, 2, 3))
            c = c if 0 <= c < N_NUMBERS else a + b + 1
        operands = {str(a), str(b)}
        return self._in_context(sum_check(a, b, c), lambda s: "+" in s and operands <= set(s))

    def _in_context(self, item: Item, gives_away: Callable[[list[str]], bool]) -> Item:
        """A held-out check after a held-out filler sentence (seven in ten, as the antonyms),
        never one that states what is checked: without context only 40 color checks and 100
        sum checks exist, and training checks follow text too. Training draws are unchanged."""
        if not self.held_out or self.rng.random() >= HELD_OUT_CONTEXT:
            return item
        while True:
            sentence = self.filler()
            if not gives_away(sentence):
                break
        n = len(sentence)
        marks = {key: p + n for key, p in item.marks.items()}
        return Item(item.case, (*sentence, *item.words), marks, item.foil)

    def item(self, case: str) -> Item:
        if case not in CASES:
            raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")
        return getattr(self, case.replace("-", "_"))()

    # ---------------------------------------------------------------- documents
    def document(self, n_ctx: int) -> Document:
        """Items and filler sentences (about one in three) until ``n_ctx - 1`` words (BOS comes first),
        the last one cut where the context ends."""
        words: list[str] = []
        answers: list[bool] = []
        roles: list[str | None] = []
        while len(words) < n_ctx - 1:
            if self.rng.random() < 0.35:
                sentence = self.filler()
                words += sentence
                answers += [False] * len(sentence)
                roles += [None] * len(sentence)
            else:
                item = self.item(self.rng.choice(_CASE_DRAWS))
                words += [*item.words, "."]
                answers += [False] * (len(item.words) - 1) + [True, False]
                roles += [*item.roles(), None]
        n = n_ctx - 1
        return Document(words[:n], answers[:n], roles[:n])


class Document(NamedTuple):
    """A training text: its words, whether each is an item's answer, and each word's role."""

    words: list[str]
    answers: list[bool]
    roles: list[str | None]


def held_out_items(case: str, n: int, seed: int = 12345) -> list[Item]:
    """``n`` held-out items of ``case`` with distinct prompts, in the grammar's order (see the
    module's docstring for what is held out): a figure over n prompts counts n different ones."""
    n = check_count("n", n)
    g = Grammar(seed, held_out=True)
    out: list[Item] = []
    seen: set[str] = set()
    draws = HELD_OUT_DRAWS * n
    for _ in range(draws):
        item = g.item(case)
        if item.prompt not in seen:
            seen.add(item.prompt)
            out.append(item)
            if len(out) == n:
                return out
    raise ValueError(
        f"the grammar drew only {len(out)} distinct held-out {case!r} prompts in {draws} draws; "
        f"ask for fewer than n={n}"
    )


def training_documents(seed: int, n_ctx: int) -> Iterator[Document]:
    """The endless stream of training documents of a seed."""
    g = Grammar(seed)
    while True:
        yield g.document(n_ctx)
