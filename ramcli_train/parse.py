"""Text semantic parsing (RAM paper §3.1): a caption becomes tag ids of the label system.

The official parser (a scene-graph parser) was never released, so this is a lexical stand-in:

1. Normalise: Unicode NFKC, accents stripped, curly quotes made straight, lower case.
2. Tokenise into words and punctuation; hyphens split words ("t-shirt" = "t shirt"), a
   possessive "'s" is dropped ("woman's" = "woman").
3. Each caption word gets *candidate keys*: the word itself, every lemma lemminflect knows
   for it and its simplemma lemma (nouns and verbs alike, because without a POS tagger
   "sitting" may be the verb "sit" or the noun "sitting"). simplemma alone misses forms such as
   "sitting" and "playing"; the two maintained lemmatisers together cover them. lemminflect's
   dictionary lemmas are tried before simplemma's, whose suffix rules can invent words. A word
   both lemmatisers take for a base noun keeps only its regular readings ("hanging" may be
   "hang"; "ground" is not "grind", "rose" is not "rise", "left" is not "leave").
4. Tag names are tokenised the same way. A tag word written in its base form (its lemma equals
   itself) matches any caption word with that key; an inflected tag word ("glasses", "shorts",
   "playing chess") matches only that exact word, so "a glass of wine" is not "glasses".
5. Matching is leftmost-longest over the word sequence, never across punctuation: "christmas
   tree" wins over "christmas" and "tree", and the words it used produce no other tag. Among
   tags matching the same words, exact spelling wins ("standing" over "stand"), then the tag
   that is a base form, then the earlier lemma candidate.
6. Synonyms (alias -> tag name) are matched like tags and emit their target's ids.
7. Negation: a cue ("no", "not", "without", "nobody", "nothing", "none", "never", "neither",
   "nor", "cannot", any "...n't") opens a scope that runs over the following words up to the
   first punctuation mark, clause word (and, but, while, which, that, ...) or preposition
   (on, in, at, with, near, ...). Tags matched inside a scope are reported as negated and not
   emitted: "a street with no cars" -> street only; "no cars or buses" negates both; "a dog
   without a collar on the grass" keeps grass.

What it cannot do (a scene-graph or LLM parser would): resolve word sense ("a man saw wood"
yields the tool "saw"), attach attributes to their objects, see through coordination after a
negation ("without a hat and gloves" keeps gloves), or understand idioms ("no parking sign").
The 4,585 RAM tags include verbs ("sit", "ride"), adjectives ("red", "sunny") and a few
function-like words ("out", "back", "up", "side"); they are all matched, as the official
parse labels contain them too.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from ramcli.errors import RamcliError
from ramcli.models.labels import LabelSet

#: The official caption cleaning (RAM `pre_caption`): these characters become spaces.
_CAPTION_STRIP = re.compile(r"[.!\"()*#:;~]")
CAPTION_MAX_WORDS = 30

#: English aliases of tags whose synonyms the 4,585-tag list merged away (its README: 6,400+
#: raw tags reduced by merging synonyms). Used only when the target is a tag of the label set
#: and the alias is not itself a tag. A vocabulary synonym map passed by the caller wins.
DEFAULT_SYNONYMS: dict[str, str] = {
    "people": "person",
    "persons": "person",
    "guy": "man",
    "gentleman": "man",
    "lady": "woman",
    "kid": "child",
    "tv": "television",
    "sofa": "couch",
    "bike": "bicycle",
    "airplane": "plane",
    "aeroplane": "plane",
    "aircraft": "plane",
    "refrigerator": "fridge",
    "doughnut": "donut",
    "toilet": "toilet bowl",
    "suitcase": "luggage",
    "cellphone": "phone",
    "cell phone": "phone",
    "mobile phone": "phone",
    "teddy bear": "teddy",
    "street": "city street",
    "sidewalk": "pavement",
    "ocean": "sea",
    "dining table": "dinning table",
    "potted plant": "houseplant",
    "fire hydrant": "hydrant",
    "hotdog": "hot dog",
    "bathtub": "bath",
    "rug": "carpet",
    "desk": "office desk",
    "railway": "railroad",
}

_NEGATION_CUES = frozenset({"no", "not", "without", "nobody", "nothing", "none", "never", "neither", "nor", "cannot"})
#: Words that end a negation scope: clause openers and prepositions (a new phrase begins).
_SCOPE_ENDS = frozenset(
    """and but yet so while whereas although though because which who whom whose that where when as then
    on in at near next by under over above below beside besides behind between inside outside into onto
    from through across along around against beneath underneath toward towards with within among amid
    past beyond for to during after before atop alongside""".split()
)
_TOKEN = re.compile(r"(?P<word>[^\W_]+(?:'[^\W_]+)*)|(?P<punct>[.,;:!?()\[\]{}\"/|])")


def clean_caption(caption: str, max_words: int = CAPTION_MAX_WORDS) -> str:
    """The language-model target, as the official pipeline makes it.

    Lower case, the characters . ! " ( ) * # : ; ~ replaced by spaces (commas, apostrophes and
    question marks are kept, as in the official code), spaces collapsed, cut to `max_words`.
    """
    text = _CAPTION_STRIP.sub(" ", caption.lower())
    words = text.split()
    return " ".join(words[:max_words])


def normalize_text(text: str) -> str:
    """NFKC, accents removed, straight quotes, lower case: one spelling per word."""
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    decomposed = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", text).lower()


@dataclass(frozen=True)
class Token:
    """A caption word (or punctuation mark, `word` None) with its character span in the input."""

    text: str
    start: int
    end: int
    is_word: bool


def tokenize(text: str) -> list[Token]:
    """Words and punctuation of normalised `text`; spans index the normalised string."""
    tokens = []
    for m in _TOKEN.finditer(text):
        if m.group("word") is not None:
            word = m.group("word")
            if word.endswith("'s"):
                word = word[:-2]
            tokens.append(Token(word, m.start(), m.end(), True))
        else:
            tokens.append(Token(m.group(), m.start(), m.end(), False))
    return tokens


@lru_cache(maxsize=200_000)
def lemma_candidates(word: str) -> tuple[str, ...]:
    """The word, then every lemma lemminflect's dictionary has for it, then simplemma's lemma.

    lemminflect goes first: it knows real inflections ("swinging" -> "swing"), where
    simplemma's suffix rules sometimes invent a word ("swinge", "playe").
    """
    import lemminflect

    found = lemminflect.getAllLemmas(word)
    simple = _simplemma_lemma(word)
    lemmas = [lemma.lower() for group in found.values() for lemma in group]
    if simple == word and word in found.get("NOUN", ()):
        # a base noun to both: keep regular readings ("hanging" -> "hang"), not irregular
        # ones ("ground" is not the past of "grind")
        lemmas = [lemma for lemma in lemmas if word.startswith(lemma[:-1])]
    return tuple(dict.fromkeys([word, *lemmas, simple]))


@lru_cache(maxsize=200_000)
def _simplemma_lemma(word: str) -> str:
    import simplemma

    return simplemma.lemmatize(word, lang="en").lower()


def _is_base(word: str) -> bool:
    """A tag word in base form (simplemma's lemma is itself) may be matched by any inflection.

    simplemma decides alone: lemminflect also lists plural nouns such as "glasses" as lemmas.
    """
    return _simplemma_lemma(word) == word


@dataclass(frozen=True)
class _Entry:
    name: str
    key: str
    words: tuple[str, ...]
    ids: tuple[int, ...]
    via_synonym: bool
    base: bool


@dataclass(frozen=True)
class TagMatch:
    """One tag found in a caption: which tag, from which words, and whether it was negated."""

    name: str
    ids: tuple[int, ...]
    words: str
    start: int
    end: int
    negated: bool
    synonym_of: str | None = None


@dataclass(frozen=True)
class ParseResult:
    caption: str
    matches: tuple[TagMatch, ...] = field(default_factory=tuple)

    @property
    def tags(self) -> list[TagMatch]:
        """Matches outside negated scopes, in caption order."""
        return [m for m in self.matches if not m.negated]

    @property
    def negated(self) -> list[TagMatch]:
        """Tags mentioned only under a negation (not also mentioned positively)."""
        positive = {m.name for m in self.tags}
        return [m for m in self.matches if m.negated and m.name not in positive]

    @property
    def tag_ids(self) -> list[int]:
        return sorted({i for m in self.tags for i in m.ids})

    @property
    def tag_names(self) -> list[str]:
        return list(dict.fromkeys(m.name for m in self.tags))


class _Node(dict):
    """A trie node: children by word key; `entries` for tags ending here."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[_Entry] = []


class TagParser:
    """Caption -> tag ids of a label system. Build once (about a second for 4,585 tags), reuse."""

    def __init__(
        self,
        labels: LabelSet | Sequence[str],
        synonyms: Mapping[str, str] | None = None,
        default_synonyms: bool = True,
    ):
        names = list(labels.names if isinstance(labels, LabelSet) else labels)
        self.names: tuple[str, ...] = tuple(names)
        ids_by_name: dict[str, list[int]] = defaultdict(list)
        for index, name in enumerate(names):
            ids_by_name[normalize_text(name).strip()].append(index)
        self._ids_by_name = {k: tuple(v) for k, v in ids_by_name.items()}
        self._root = _Node()
        for key, ids in self._ids_by_name.items():
            self._insert(key, names[ids[0]], ids, via_synonym=False)
        merged: dict[str, str] = {}
        if default_synonyms:
            merged.update(
                (alias, target)
                for alias, target in DEFAULT_SYNONYMS.items()
                if target in self._ids_by_name and alias not in self._ids_by_name
            )
        for alias, target in (synonyms or {}).items():
            key = normalize_text(target).strip()
            if key not in self._ids_by_name:
                raise RamcliError(f"synonym {alias!r} points to {target!r}, which is not a tag of the label system")
            merged[normalize_text(alias).strip()] = key
        self.synonyms: dict[str, str] = merged
        for alias, target in merged.items():
            ids = self._ids_by_name[target]
            self._insert(alias, names[ids[0]], ids, via_synonym=True)

    def _insert(self, surface: str, name: str, ids: tuple[int, ...], via_synonym: bool) -> None:
        words = tuple(t.text for t in tokenize(normalize_text(surface)) if t.is_word)
        if not words:
            return
        node = self._root
        for word in words:
            node = node.setdefault(word, _Node())
        key = normalize_text(surface).strip()
        entry = _Entry(name, key, words, ids, via_synonym, base=all(_is_base(w) for w in words))
        node.entries.append(entry)

    def _keys(self, word: str, tag_word: str) -> int | None:
        """How `word` in a caption matches `tag_word`: 0 exact, k>0 the k-th lemma candidate, None not."""
        if word == tag_word:
            return 0
        if not _is_base(tag_word):
            return None
        candidates = lemma_candidates(word)
        return candidates.index(tag_word) if tag_word in candidates else None

    def _longest_at(self, words: list[str], i: int, span: Callable[[int, int], str]) -> tuple[int, _Entry] | None:
        """The best tag starting at word i: longest span, then exact words, then exact spelling
        ("t-shirt" over "t shirt"), then base form, then lemma order; a real tag over a synonym."""
        best: tuple[tuple, int, _Entry] | None = None
        frontier = [(self._root, 0)]  # node, summed lemma rank
        length = 0
        while frontier and i + length < len(words):
            word = words[i + length]
            length += 1
            nxt = []
            for node, rank in frontier:
                for tag_word in {word, *lemma_candidates(word)}:
                    child = node.get(tag_word)
                    if child is None:
                        continue
                    how = self._keys(word, tag_word)
                    if how is None:
                        continue
                    nxt.append((child, rank + how))
            frontier = nxt
            for node, rank in frontier:
                for entry in node.entries:
                    score = (length, rank == 0, span(i, i + length) == entry.key, entry.base, -rank, not entry.via_synonym, -entry.ids[0])
                    if best is None or score > best[0]:
                        best = (score, length, entry)
        return None if best is None else (best[1], best[2])

    def parse(self, caption: str) -> ParseResult:
        """All tag mentions of `caption`, negated ones flagged."""
        text = normalize_text(caption)
        tokens = tokenize(text)
        matches: list[TagMatch] = []
        negated = _negated_words(tokens)
        # match within runs of words; punctuation splits runs
        run: list[int] = []
        for index, tok in enumerate([*tokens, None]):
            if tok is not None and tok.is_word:
                run.append(index)
                continue
            words = [tokens[j].text for j in run]
            i = 0
            while i < len(run):
                found = self._longest_at(words, i, lambda a, b: text[tokens[run[a]].start : tokens[run[b - 1]].end])
                if found is None:
                    i += 1
                    continue
                length, entry = found
                first, last = tokens[run[i]], tokens[run[i + length - 1]]
                matches.append(
                    TagMatch(
                        name=entry.name,
                        ids=entry.ids,
                        words=text[first.start : last.end],
                        start=first.start,
                        end=last.end,
                        negated=run[i] in negated,
                        synonym_of=" ".join(entry.words) if entry.via_synonym else None,
                    )
                )
                i += length
            run = []
        return ParseResult(caption, tuple(matches))

    def tag_ids(self, caption: str) -> list[int]:
        """Sorted ids of the tags `caption` mentions outside negations."""
        return self.parse(caption).tag_ids

    def ids_for_names(self, names: Sequence[str]) -> tuple[list[int], list[str]]:
        """Ids for tag names (or synonyms); also the names that are not in the label system."""
        ids: set[int] = set()
        unknown: list[str] = []
        for name in names:
            key = normalize_text(str(name)).strip()
            key = self.synonyms.get(key, key)
            if key in self._ids_by_name:
                ids.update(self._ids_by_name[key])
            else:
                unknown.append(str(name))
        return sorted(ids), unknown


def _negated_words(tokens: list[Token]) -> set[int]:
    """Indices of the words inside a negation scope (see the module docstring for the rule)."""
    out: set[int] = set()
    in_scope = False
    for index, tok in enumerate(tokens):
        if not tok.is_word:
            in_scope = False
            continue
        word = tok.text
        if word in _NEGATION_CUES or word.endswith("n't"):
            in_scope = True
            continue
        if word in _SCOPE_ENDS:
            in_scope = False
            continue
        if in_scope:
            out.add(index)
    return out
