"""Query language, tag-group resolution, did-you-mean, and exact top-k ranking."""

from __future__ import annotations

import random
from datetime import datetime

import pytest

from ramcli.errors import UsageError
from ramcli.index import Index
from ramcli.records import PhotoResult, TagScore
from ramcli.search import And, Filters, Not, Or, Term, _score, parse, resolve, search, TagResolver


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
    ],
)
def test_parse(query, tree):
    assert parse(query) == tree


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
                    got = [h.photo_id for h in search(ix, q, limit=limit, filters=Filters(min_score=min_score), with_tags=False)]
                    assert got == expected, (q, limit, min_score)


def _group(rows):
    out: dict[int, list] = {}
    for pid, tag_id, score in rows:
        out.setdefault(pid, []).append((tag_id, score))
    return out.items()
