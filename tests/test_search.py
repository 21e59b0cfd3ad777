"""Query language, tag-group resolution, did-you-mean, and exact top-k ranking."""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

import pytest

from ramcli.errors import UsageError
from ramcli.library.index import Index
from ramcli.library.query import And, Not, Or, TagResolver, Term, parse, resolve
from ramcli.library.search import Filters, _score, search
from ramcli.tagging.records import PhotoResult, TagScore


@pytest.mark.parametrize(
    ("query", "tree"),
    [
        ("dog", Term("dog")),
        ("dog beach", And((Term("dog"), Term("beach")))),
        ("dog AND beach", And((Term("dog"), Term("beach")))),
        ("dog OR cat", Or((Term("dog"), Term("cat")))),
        ("dog OR cat beach", And((Or((Term("dog"), Term("cat"))), Term("beach")))),
        ("dog -night", And((Term("dog"), Not(Term("night"))))),
        ("dog NOT night", And((Term("dog"), Not(Term("night"))))),
        ('"christmas tree" -"night sky"', And((Term("christmas tree"), Not(Term("night sky"))))),
        ("(dog OR cat) -(night OR dark)", And((Or((Term("dog"), Term("cat"))), Not(Or((Term("night"), Term("dark"))))))),
        ("狗 海滩", And((Term("狗"), Term("海滩")))),
        ("or", Term("or")),  # lower-case operators are words
        ("dog not night", And((Term("dog"), Not(Term("night"))))),  # but for `not`
        ('dog "not" night', And((Term("dog"), Term("not"), Term("night")))),
    ],
)
def test_parse(query, tree):
    assert parse(query) == tree


def test_lowercase_not_is_a_word_where_the_index_has_that_tag():
    assert parse("dog not night", lowercase_not=False) == And((Term("dog"), Term("not"), Term("night")))
    assert parse("dog NOT night", lowercase_not=False) == And((Term("dog"), Not(Term("night"))))


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "empty query"),
        ("   ", "empty query"),
        ('"dog', "unbalanced quote"),
        ('dog "christmas tree', "unbalanced quote"),
        ("(dog", r"missing '\)'"),
        ("dog)", r"unexpected '\)'"),
        ("OR dog", "OR needs a tag"),
        ("dog OR", "OR needs a tag"),
        ("dog NOT", r"NOT \(or -\) needs a tag"),
        ("dog not", r"""not \(or NOT, -\) needs a tag after it; the tag "not" is written quoted: '"not"'"""),
        ("()", r"empty group"),
        ('""', "empty quotes"),
        ("dog " * 400, "too long"),
        (" ".join(f"t{i}" for i in range(65)), "too many terms"),
    ],
)
def test_parse_errors(query, message):
    with pytest.raises(UsageError, match=message):
        parse(query)


@pytest.fixture
def index(tmp_path):
    with Index.open(tmp_path / "i.db") as ix:
        ix.upsert_tags(["dog", "cat", "beach", "night", "glass", "glasses", "christmas tree", "puppy"],
                       ["狗", "猫", "海滩", "夜晚", "玻璃", "眼镜", "圣诞树", "小狗"], "builtin")
        photos = {
            "a": [("dog", 0.9), ("beach", 0.7)],
            "b": [("cat", 0.8), ("night", 0.6)],
            "c": [("dog", 0.6), ("night", 0.9), ("christmas tree", 0.75)],
            "d": [("glasses", 0.95)],
            "e": [("puppy", 0.99)],
        }
        ix.record_batch([
            PhotoResult(str(tmp_path / "lib" / f"{k}.jpg"), "tagged", 1, 1, taken_at=datetime(2020 + i, 1, 2),
                        tags=[TagScore(n, "", s) for n, s in v])
            for i, (k, v) in enumerate(photos.items())
        ])
        yield ix


def names(hits):
    return [h.path.rsplit("/", 1)[-1][0] for h in hits]


def test_and_or_not_ranked_by_score(index):
    assert names(search(index, "dog")) == ["a", "c"]
    assert names(search(index, "dog night")) == ["c"]
    assert names(search(index, "dog OR cat")) == ["a", "b", "c"]
    assert names(search(index, "dog -night")) == ["a"]
    assert names(search(index, "NOT night")) == ["a", "d", "e"]
    assert search(index, "NOT night")[0].score is None  # nothing to rank by
    hit = search(index, "dog night")[0]
    assert hit.score == pytest.approx(0.6)  # AND = min
    assert [t.name for t in hit.tags] == ["night", "christmas tree", "dog"]


def test_lowercase_not_excludes_unless_not_is_a_tag(index, tmp_path):
    assert names(search(index, "dog not night")) == ["a"]
    assert names(search(index, "not night")) == ["a", "d", "e"]
    with pytest.raises(UsageError, match="unknown tag 'not'"):
        search(index, '"not"')  # quoted, it is always a tag
    index.record_batch([PhotoResult(str(tmp_path / "lib" / "f.jpg"), "tagged", 1, 1,
                                    tags=[TagScore("not", "", 0.5), TagScore("dog", "", 0.5)])])
    assert names(search(index, "dog not")) == ["f"]  # now the tag
    assert names(search(index, "not night")) == []  # both tags, and no photo has both
    assert names(search(index, "dog NOT night")) == ["a", "f"]
    assert names(search(index, "dog -not")) == ["a", "c"]


def test_plural_chinese_quoted_and_unquoted_phrases(index):
    assert names(search(index, "dogs")) == ["a", "c"]
    assert names(search(index, "DOG")) == ["a", "c"]
    assert names(search(index, "狗")) == ["a", "c"]
    assert names(search(index, '"christmas trees"')) == ["c"]
    assert names(search(index, "christmas tree")) == ["c"]  # one shell argument, the tag's name
    # the lemmatiser must not merge distinct vocabulary tags: glasses (eyewear) is not glass
    assert names(search(index, "glasses")) == ["d"]
    assert search(index, "glass") == []


def test_synonym_groups(index):
    index.add_synonym("doggo", "dog")
    assert names(search(index, "doggo")) == ["a", "c"]
    index.add_synonym("puppy", "dog")  # an existing tag: the groups merge, both ways
    assert names(search(index, "dog")) == ["e", "a", "c"]
    assert names(search(index, "puppies")) == ["e", "a", "c"]


def test_filters(index, tmp_path):
    assert names(search(index, "dog", filters=Filters(min_score=0.8))) == ["a"]
    assert names(search(index, "dog -night", filters=Filters(min_score=0.95))) == []
    assert names(search(index, "dog", filters=Filters(since="2022-01-01"))) == ["c"]
    assert names(search(index, "dog", filters=Filters(until="2020-01-02"))) == ["a"]  # a bare date = whole day
    assert names(search(index, "dog", filters=Filters(under=tmp_path / "lib"))) == ["a", "c"]
    assert names(search(index, "dog", filters=Filters(under=tmp_path / "li"))) == []  # folder, not prefix
    assert names(search(index, "dog OR cat", limit=2)) == ["a", "b"]


def test_unknown_tag_suggests_nearest(index):
    with pytest.raises(UsageError, match=r"unknown tag 'dgo'; did you mean: dog"):
        search(index, "dgo")
    with pytest.raises(UsageError, match=r"did you mean: christmas tree"):
        search(index, "christmas")
    assert "beach" in TagResolver(index).did_you_mean("beech")


def test_injection_looking_query_is_just_an_unknown_word(index):
    with pytest.raises(UsageError, match="unknown tag"):
        search(index, "'; DROP TABLE photos; --")
    assert index.db.execute("SELECT count(*) FROM photos").fetchone()[0] == 5


def test_top_k_equals_exhaustive_ranking(tmp_path):
    """The early-stopping top-k must give exactly the exhaustive order, for every query shape."""
    rng = random.Random(7)
    vocab = [f"t{i}" for i in range(12)]
    with Index.open(tmp_path / "i.db") as ix:
        ix.record_batch([
            PhotoResult(f"/p/{i:04d}.jpg", "tagged", 1, 1,
                        tags=[TagScore(n, "", round(rng.uniform(0.5, 1), 3)) for n in rng.sample(vocab, rng.randint(1, 6))])
            for i in range(600)
        ])
        tags_of = {pid: dict(rows) for pid, rows in _group(ix.db.execute("SELECT photo_id, tag_id, score FROM photo_tags"))}
        queries = ["t0", "t0 t1", "t0 t1 t2", "t0 OR t5", "t0 -t1", "(t0 OR t1) -t2 t3", "-t4", "t2 OR -t3"]
        for q in queries:
            for limit in (1, 7, 50):
                for min_score in (0.0, 0.8):
                    tree = resolve(parse(q), TagResolver(ix))
                    expected = []
                    for pid, tags in tags_of.items():
                        s = _score(tree, {t: v for t, v in tags.items() if v >= min_score})
                        if s is not None:
                            expected.append((s, -pid))
                    expected = [-p for _, p in sorted(expected, reverse=True)[:limit]]
                    got = [h.id for h in search(ix, q, limit=limit, filters=Filters(min_score=min_score), with_tags=False)]
                    assert got == expected, (q, limit, min_score)


def _group(rows):
    out: dict[int, list] = {}
    for pid, tag_id, score in rows:
        out.setdefault(pid, []).append((tag_id, score))
    return out.items()


def _exhaustive(ix, query, limit, filters):
    """The reference ranking: every photo scored by `_score`, filtered in Python, sorted."""
    tree = resolve(parse(query), TagResolver(ix))
    tags_of = {pid: dict(rows) for pid, rows in _group(ix.db.execute("SELECT photo_id, tag_id, score FROM photo_tags"))}
    photos = {pid: (path, taken) for pid, path, taken in ix.db.execute("SELECT id, path, taken_at FROM photos")}
    ranked = []
    for pid, (path, taken) in photos.items():
        if filters.since and (taken is None or taken < filters.since):
            continue
        if filters.until and (taken is None or taken[:10] > filters.until):
            continue
        if filters.under and not path.startswith(str(filters.under) + "/"):
            continue
        s = _score(tree, {t: v for t, v in tags_of.get(pid, {}).items() if v >= filters.min_score})
        if s is not None:
            ranked.append((s, -pid))
    return [-p for _, p in sorted(ranked, reverse=True)[:limit]]


def test_flat_and_general_queries_equal_exhaustive_ranking_with_filters_groups_and_ties(tmp_path):
    """Randomised: AND/NOT queries answered by one SQL statement (and the general path for groups
    and ORs) give exactly the exhaustive top-k, with coarse scores (many ties), date and folder
    filters, and a synonym group as driver."""
    rng = random.Random(11)
    vocab = [f"t{i}" for i in range(10)]
    weights = [10, 8, 6, 5, 4, 3, 2, 2, 1, 1]  # popular and rare tags, like a real library
    with Index.open(tmp_path / "i.db") as ix:
        ix.record_batch([
            PhotoResult(f"/photos/{'ab'[i % 2]}/{i:04d}.jpg", "tagged", 1, 1,
                        taken_at=datetime(2020, 1 + i % 12, 1 + i % 28) if i % 5 else None,
                        tags=[TagScore(n, "", rng.choice([0.5, 0.6, 0.7, 0.8, 0.9, 1.0]))
                              for n in set(rng.choices(vocab, weights, k=rng.randint(1, 7)))])
            for i in range(800)
        ])
        ix.add_synonym("t9", "t8")  # t8 and t9 now form one group
        queries = ["t0 t1 t2", "t1 t0 t3 t4", "t2 -t0", "t0 -t1 -t2", "t5 t0 -t3", "t8", "t8 t0", "t0 t9 -t1",
                   "t6 OR t7 t0", "(t1 -t2) OR t3"]
        filter_sets = [Filters(), Filters(min_score=0.7), Filters(since="2020-06-01", until="2020-09-30"),
                       Filters(under=Path("/photos/a"), min_score=0.6)]
        for q in queries:
            for limit in (1, 10, 60, None):
                for f in filter_sets:
                    got = [h.id for h in search(ix, q, limit=limit, filters=f, with_tags=False)]
                    assert got == _exhaustive(ix, q, limit, f), (q, limit, f)


def test_every_statement_uses_an_index_in_order(index):
    """Search never scans photo_tags or sorts it: each statement seeks an index (the query plan
    would otherwise turn milliseconds into seconds on a large library)."""
    statements = []
    index.db.conn.set_trace_callback(statements.append)
    try:
        for q in ("dog", "dog night -beach", "dog OR cat", "(dog OR cat) -night", "dog -night"):
            search(index, q, filters=Filters(since="2020-01-01"))
    finally:
        index.db.conn.set_trace_callback(None)
    plans = {sql: index.db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall() for sql in statements if "photo_tags" in sql}
    assert plans
    for sql, plan in plans.items():
        details = [row[3] for row in plan]
        assert not any(d.startswith(("SCAN d", "SCAN o", "SCAN pt", "SCAN photo_tags")) for d in details), (sql, details)
        assert "USE TEMP B-TREE FOR ORDER BY" not in details or "pt.photo_id" in sql, (sql, details)


def test_exact_tag_names_resolve_without_the_lemmatiser(index, monkeypatch):
    """Loading simplemma's dictionary costs about half a second: a one-shot `ramcli search dog`
    must not pay it when the word is a tag's exact name."""
    def no_lemma(word):
        raise AssertionError(f"lemmatised {word!r}")

    monkeypatch.setattr("ramcli.library.query.lemma", no_lemma)
    assert names(search(index, '"christmas tree" OR 狗 OR DOG')) == ["a", "c"]


# --- captions -------------------------------------------------------------------------------------


@pytest.fixture
def captioned(tmp_path):
    with Index.open(tmp_path / "c.db") as ix:
        ix.record_batch([
            PhotoResult(str(tmp_path / "lib" / f"{k}.jpg"), "tagged", 1, 1, taken_at=datetime(2020 + i, 1, 2),
                        tags=[TagScore(n, "", s) for n, s in tags], caption=caption)
            for i, (k, tags, caption) in enumerate([
                ("a", [("dog", 0.9)], "a dog running on the beach"),
                ("b", [("dog", 0.7), ("cat", 0.6)], "a dog and a cat on a sofa"),
                ("c", [("cat", 0.8)], "a cat sleeping on a well-known sofa, or a bed"),
                ("d", [("dog", 0.95)], None),
                ("e", [("dog", 0.5)], "dog dog dog: the beach dog near the sea"),
            ])
        ])
        yield ix


def cap(ix, query, caption, **kw):
    filters = Filters(caption=caption, **{k: v for k, v in kw.items() if k != "limit"})
    return names(search(ix, query, filters=filters, limit=kw.get("limit", 50)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dog beach", '"dog" "beach"'),
        ('"on the beach" dog', '"on the beach" "dog"'),
        ('dog OR cat', '"dog" "OR" "cat"'),
        ("-dog NEAR(cat) dog*", '"-dog" "NEAR(cat)" "dog*"'),
        ('dog "beach', '"dog" "beach"'),  # the unpaired quote is dropped
        ('a"b', '"a" "b"'),
        ("dog - * ^ :", '"dog"'),  # tokens without a letter or digit would be empty FTS5 phrases
    ],
)
def test_caption_match_turns_user_text_into_fts5_string_literals(text, expected):
    from ramcli.library.query import caption_match

    assert caption_match(text) == expected


@pytest.mark.parametrize("text", ["", "   ", '"', '""', "- * ^", "x" * 1001])
def test_caption_without_words_is_a_usage_error(captioned, text):
    with pytest.raises(UsageError, match="--caption"):
        search(captioned, "", filters=Filters(caption=text))


def test_caption_alone_is_ranked_by_relevance(captioned):
    assert cap(captioned, "", "dog") == ["e", "a", "b"]  # bm25: the caption saying "dog" four times first
    assert cap(captioned, None, "sofa") == ["b", "c"]  # equal relevance: by photo id
    assert cap(captioned, "", '"on the beach"') == ["a"]  # a phrase keeps its order ...
    assert cap(captioned, "", '"the beach on"') == []
    assert sorted(cap(captioned, "", "beach dog")) == ["a", "e"]  # ... words need not
    assert cap(captioned, "", "dog", limit=1) == ["e"]
    hit = search(captioned, "", filters=Filters(caption="running"))[0]
    assert (hit.score, hit.caption, [t.name for t in hit.tags]) == (None, "a dog running on the beach", ["dog"])


def test_caption_alone_with_filters(captioned, tmp_path):
    assert cap(captioned, "", "dog", since="2021-01-01") == ["e", "b"]
    assert cap(captioned, "", "dog", until="2020-01-02") == ["a"]
    assert cap(captioned, "", "sofa", under=tmp_path / "lib") == ["b", "c"]
    assert cap(captioned, "", "sofa", under=tmp_path / "elsewhere") == []
    with pytest.raises(UsageError, match="--min-score applies to tags"):
        search(captioned, "", filters=Filters(caption="dog", min_score=0.5))


def test_hostile_caption_text_is_plain_words(captioned):
    assert cap(captioned, "", "OR") == ["c"]  # the word "or" in c's caption, not an operator
    assert cap(captioned, "", "well-known") == ["c"]  # a hyphenated word, not an exclusion
    assert cap(captioned, "", "dog*") == ["e", "a", "b"]  # not a prefix query for "do*"
    assert cap(captioned, "", '(sea) NEAR "') == ["e"]  # no NEAR group, no unbalanced-quote error
    assert cap(captioned, "", "'; DROP TABLE photos; --") == []
    assert captioned.db.execute("SELECT count(*) FROM photos").fetchone()[0] == 5


def test_caption_with_tags_both_must_match_ranked_by_tag_score(captioned):
    assert cap(captioned, "dog", "beach") == ["a", "e"]  # by tag score now, not bm25
    assert cap(captioned, "dog", "sofa") == ["b"]
    assert cap(captioned, "cat", "sofa") == ["c", "b"]
    assert cap(captioned, "dog -cat", "sofa") == []
    assert cap(captioned, "dog OR cat", "sofa") == ["c", "b"]  # the general (non-flat) path
    assert cap(captioned, "dog", "beach", min_score=0.6) == ["a"]
    assert cap(captioned, "dog", "beach", since="2021-01-01") == ["e"]
    assert cap(captioned, "-cat", "beach") == ["a", "e"]
    hit = search(captioned, "dog", filters=Filters(caption="beach"))[0]
    assert (hit.score, hit.caption) == (pytest.approx(0.9), "a dog running on the beach")


def test_caption_with_tags_equals_exhaustive_ranking_filtered_by_caption(tmp_path):
    """Randomised: tag query + caption gives exactly the tag ranking of the photos whose caption
    holds every word, for flat and general queries."""
    rng = random.Random(5)
    vocab = [f"t{i}" for i in range(6)]
    words = ["dog", "beach", "sofa", "red", "car", "sea"]
    with Index.open(tmp_path / "i.db") as ix:
        ix.record_batch([
            PhotoResult(f"/p/{i:04d}.jpg", "tagged", 1, 1,
                        tags=[TagScore(n, "", rng.choice([0.5, 0.7, 0.9])) for n in rng.sample(vocab, rng.randint(1, 4))],
                        caption=" ".join(rng.choices(words, k=4)) if i % 7 else None)
            for i in range(400)
        ])
        captions = dict(ix.db.execute("SELECT id, caption FROM photos").fetchall())
        for q in ("t0", "t0 t1", "t1 -t2", "t0 OR t3", "-t4"):
            for caption in ("dog", "beach sea", "red car dog"):
                for limit in (3, None):
                    wanted = [pid for pid in _exhaustive(ix, q, None, Filters())
                              if captions[pid] and set(caption.split()) <= set(captions[pid].split())][:limit]
                    got = [h.id for h in search(ix, q, limit=limit, filters=Filters(caption=caption), with_tags=False)]
                    assert got == wanted, (q, caption, limit)


def test_caption_search_uses_indexes(captioned):
    """Caption filters keep the tag search's plans: no scan of photo_tags; caption-only search
    reads the FTS index, not every photo."""
    statements = []
    captioned.db.conn.set_trace_callback(statements.append)
    try:
        for q in ("dog", "dog -cat", "dog OR cat", ""):
            search(captioned, q, filters=Filters(caption="sofa", since="2020-01-01"))
    finally:
        captioned.db.conn.set_trace_callback(None)
    for sql in statements:
        if "photo_tags" in sql or "photos_fts MATCH" in sql:
            details = [row[3] for row in captioned.db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()]
            assert not any(d.startswith(("SCAN d", "SCAN o", "SCAN pt", "SCAN photo_tags", "SCAN p ")) for d in details), (sql, details)
