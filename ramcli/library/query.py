"""The query language of `ramcli search`: parsing, resolving words to tag groups, captions.

Syntax: words are ANDed (`dog beach`), `OR` joins alternatives (`dog OR cat`), `-word`, `NOT word`
or `not word` excludes, `"christmas tree"` quotes a multi-word tag, parentheses group. `OR`, `NOT`
and `AND` are operators only in capitals; lowercase `not` is one too, unless the index has a tag
(or synonym) named "not": then `not` is that tag, and `NOT`/`-` exclude. A quoted word is always a
tag: `"not"`, `"OR"`.

Each word resolves to a *tag group*: the tag of that exact name (English or Chinese), or the
tag a synonym points to, or failing both the tags whose lemma matches ('dogs' -> 'dog'), plus
every tag merged into the same group by `vocab synonym`. Unknown words are a usage error with
"did you mean" suggestions.

Captions are matched by the `photos_fts` full-text index. The user's text is rewritten into FTS5
string literals (`caption_match`), so FTS5 operators typed by a user (`OR`, `-`, `*`, `NEAR`, a
stray quote) are plain words, never syntax.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass

from ramcli.errors import UsageError
from ramcli.library.index import Index
from ramcli.library.tags import lemma

MAX_QUERY_CHARS = 1000
MAX_TERMS = 64

# --- syntax tree ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    text: str
    tag_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]


Node = Term | Not | And | Or

_TOKEN = re.compile(r'(?P<neg>-)?(?:"(?P<quoted>[^"]*)"|(?P<lp>\())|(?P<rp>\))|(?P<word>[^\s()"]+)')


def _tokens(query: str, lowercase_not: bool) -> list[tuple[str, str]]:
    if query.count('"') % 2:
        raise UsageError(f"unbalanced quote in query: {query}")
    tokens: list[tuple[str, str]] = []
    for m in _TOKEN.finditer(query):
        if m["quoted"] is not None:
            text = " ".join(m["quoted"].split())
            if not text:
                raise UsageError('empty quotes "" in query')
            if m["neg"]:
                tokens.append(("NOT", "-"))
            tokens.append(("TERM", text))
        elif m["lp"]:
            if m["neg"]:
                tokens.append(("NOT", "-"))
            tokens.append(("(", "("))
        elif m["rp"]:
            tokens.append((")", ")"))
        else:
            word = m["word"]
            if word in ("OR", "|"):
                tokens.append(("OR", word))
            elif word == "NOT" or (word == "not" and lowercase_not):
                tokens.append(("NOT", word))
            elif word == "AND":
                continue
            elif word.startswith("-") and len(word) > 1:
                tokens += [("NOT", "-"), ("TERM", word[1:])]
            else:
                tokens.append(("TERM", word))
    return tokens


def has_not_word(query: str) -> bool:
    """Whether the query holds a bare (unquoted) `not`, which excludes unless "not" is a tag."""
    return any(m["word"] == "not" for m in _TOKEN.finditer(query))


def parse(query: str, *, lowercase_not: bool = True) -> Node:
    """Parse a query into a tree; malformed queries raise UsageError (exit code 2).

    `lowercase_not`: a bare `not` excludes like `NOT`; else it is a word (the index has a tag
    named "not")."""
    if len(query) > MAX_QUERY_CHARS:
        raise UsageError(f"query too long ({len(query)} characters, at most {MAX_QUERY_CHARS})")
    tokens = _tokens(query, lowercase_not)
    if not tokens:
        raise UsageError("empty query: give at least one tag, e.g. `ramcli search dog`")
    if sum(kind == "TERM" for kind, _ in tokens) > MAX_TERMS:
        raise UsageError(f"too many terms in query (at most {MAX_TERMS})")
    pos = 0

    def peek() -> str | None:
        return tokens[pos][0] if pos < len(tokens) else None

    def take() -> tuple[str, str]:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def and_expr() -> Node:
        parts = []
        while peek() not in (None, ")"):
            parts.append(or_expr())
        if not parts:
            raise UsageError("empty group () in query")
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def or_expr() -> Node:
        parts = [unary()]
        while peek() == "OR":
            take()
            if peek() in (None, ")", "OR"):
                raise UsageError("OR needs a tag on both sides")
            parts.append(unary())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def unary() -> Node:
        kind, text = take()
        if kind == "NOT":
            if peek() in (None, ")", "OR"):
                if text == "not":
                    raise UsageError('not (or NOT, -) needs a tag after it; the tag "not" is written quoted: \'"not"\'')
                raise UsageError("NOT (or -) needs a tag after it")
            return Not(unary())
        if kind == "TERM":
            return Term(text)
        if kind == "(":
            inner = and_expr()
            if peek() != ")":
                raise UsageError("unbalanced parenthesis in query: missing ')'")
            take()
            return inner
        if kind == "OR":
            raise UsageError("OR needs a tag on both sides")
        raise UsageError("unbalanced parenthesis in query: unexpected ')'")

    tree = and_expr()
    if pos != len(tokens):
        raise UsageError("unbalanced parenthesis in query: unexpected ')'")
    return tree


# --- resolving words to tag groups ----------------------------------------------------------------


class TagResolver:
    """Maps a query word to the ids of its tag group (see the module docstring for the order)."""

    def __init__(self, index: Index):
        self.db = index.db

    def is_tag(self, word: str) -> bool:
        """Whether a tag or synonym has exactly this name (no lemma: that would load simplemma)."""
        return self.db.execute(
            "SELECT EXISTS (SELECT 1 FROM tags WHERE name = ?1 OR name_zh = ?1)"
            " OR EXISTS (SELECT 1 FROM synonyms WHERE alias = ?1 COLLATE NOCASE)",
            [word],
        ).fetchone()[0] == 1

    def groups(self, word: str) -> set[int]:
        # The lemma is computed only when the exact lookups fail: simplemma's first call loads its
        # dictionary (about half a second), which a one-shot `ramcli search dog` must not pay.
        for sql, arg in (
            ("SELECT coalesce(group_id, id) FROM tags WHERE name = ?", lambda: word),
            ("SELECT coalesce(group_id, id) FROM tags WHERE name_zh = ?", lambda: word),
            (
                "SELECT coalesce(t.group_id, t.id) FROM synonyms s JOIN tags t ON t.id = s.tag_id"
                " WHERE s.alias = ? COLLATE NOCASE",
                lambda: word,
            ),
            ("SELECT coalesce(group_id, id) FROM tags WHERE lemma = ?", lambda: lemma(word)),
        ):
            found = {g for (g,) in self.db.execute(sql, [arg()])}
            if found:
                return found
        return set()

    def resolve(self, word: str) -> frozenset[int]:
        groups = self.groups(word)
        if not groups:
            suggestions = self.did_you_mean(word)
            hint = f"; did you mean: {', '.join(suggestions)}?" if suggestions else "; `ramcli stats` lists the tags"
            raise UsageError(f"unknown tag '{word}'{hint}")
        rows = self.db.execute(
            "SELECT id FROM tags WHERE coalesce(group_id, id) IN (SELECT value FROM json_each(?))",
            [json.dumps(sorted(groups))],
        )
        return frozenset(tag_id for (tag_id,) in rows)

    def did_you_mean(self, word: str, n: int = 5) -> list[str]:
        """Nearest known tags: close spellings first (difflib), then tags containing the word (FTS)."""
        names: dict[str, str] = {}
        for name, zh, aliases in self.db.execute("SELECT name, name_zh, aliases FROM tags ORDER BY photo_count DESC"):
            names.setdefault(name.lower(), name)
            if zh:
                names.setdefault(zh, name)
            for alias in filter(None, aliases.split(" | ")):
                names.setdefault(alias.lower(), name)
        close = [names[m] for m in difflib.get_close_matches(word.lower(), list(names), n=n, cutoff=0.6)]
        phrase = '"' + word.replace('"', '""') + '"*'
        fts = [
            name
            for (name,) in self.db.execute(
                "SELECT t.name FROM tags_fts JOIN tags t ON t.rowid = tags_fts.rowid WHERE tags_fts MATCH ?"
                " ORDER BY t.photo_count DESC LIMIT ?",
                [phrase, n],
            )
        ]
        return list(dict.fromkeys(close + fts))[:n]


def resolve(tree: Node, resolver: TagResolver) -> Node:
    """The tree with every Term's tag ids filled in."""
    if isinstance(tree, Term):
        return Term(tree.text, resolver.resolve(tree.text))
    if isinstance(tree, Not):
        return Not(resolve(tree.child, resolver))
    return type(tree)(tuple(resolve(c, resolver) for c in tree.children))


def tag_ids(tree: Node) -> set[int]:
    if isinstance(tree, Term):
        return set(tree.tag_ids)
    if isinstance(tree, Not):
        return tag_ids(tree.child)
    return set().union(*(tag_ids(c) for c in tree.children))


# --- captions ------------------------------------------------------------------------------------

_CAPTION_TOKEN = re.compile(r'"(?P<phrase>[^"]*)"|(?P<word>[^\s"]+)')


def caption_match(text: str) -> str:
    """The FTS5 query for a caption search: each word and "quoted phrase" as an FTS5 string
    literal (inner quotes doubled), ANDed. A quote without its pair is ignored.

    Tokens with no letter or digit are dropped: FTS5's tokenizer would turn them into empty
    phrases, and a query of only those would silently match nothing."""
    if len(text) > MAX_QUERY_CHARS:
        raise UsageError(f"--caption text too long ({len(text)} characters, at most {MAX_QUERY_CHARS})")
    parts = [
        '"' + token.replace('"', '""') + '"'
        for m in _CAPTION_TOKEN.finditer(text)
        for token in [m["phrase"] if m["phrase"] is not None else m["word"]]
        if any(ch.isalnum() for ch in token)
    ]
    if not parts:
        raise UsageError("--caption needs at least one word, e.g. --caption 'on a beach'")
    if len(parts) > MAX_TERMS:
        raise UsageError(f"too many words in --caption (at most {MAX_TERMS})")
    return " ".join(parts)
