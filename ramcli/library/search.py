"""`ramcli search`: a small boolean query language over the index, ranked by tag score.

The language (`ramcli.library.query`) names tags: words ANDed, `OR`, `NOT`/`not`/`-`, quotes,
parentheses. Ranking is fuzzy logic: a term scores the best score of its group's tags on the
photo, AND takes the minimum, OR the maximum. Those rules allow an exact top-k without scoring
every hit (Fagin's threshold algorithm): photos are pulled from the most selective term's score
index, best first, and the pull stops as soon as no unseen photo can beat the current k-th best.
All SQL is parameterised; query text never becomes SQL.

Captions (`Filters.caption`, `ramcli search --caption`) are matched by the `photos_fts` full-text
index: every word must appear, "quoted phrases" in order. With tags they are one more photo filter
(ranking stays by tag score); alone they are ranked by FTS5's bm25 relevance.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ramcli.errors import UsageError
from ramcli.library.columns import PhotoColumns
from ramcli.library.index import Index, PhotoRecord, folder_range
from ramcli.library.query import (And, Node, Not, TagResolver, Term, caption_match, has_not_word, parse, resolve,
                                  tag_ids)
from ramcli.tagging.records import NOT_A_COLUMN, TagScore

# --- evaluation -----------------------------------------------------------------------------------


@dataclass
class Filters:
    """Restrictions beyond the tags: a tag counts only at `min_score` or above."""

    min_score: float = 0.0
    since: str | None = None  # ISO date(time), inclusive, on the date taken
    until: str | None = None  # ISO date(time), inclusive (a bare date means the whole day)
    under: Path | None = None
    caption: str | None = None  # user text: every word must be in the photo's caption


@dataclass
class Hit(PhotoRecord):
    """A photo that matches a query, with its score: None for pure exclusion queries (`-night`)
    and caption-only ones, which have nothing to rank by."""

    score: float | None = field(default=None, metadata=NOT_A_COLUMN)


_HIT_COLUMNS = PhotoColumns(Hit)


def _score(tree: Node, tags: dict[int, float]) -> float | None:
    """The fuzzy-logic score of one photo, or None when the photo does not match.

    A true NOT is neutral (+inf) so that it never lowers an AND's minimum."""
    if isinstance(tree, Term):
        return max((tags[i] for i in tree.tag_ids if i in tags), default=None)
    if isinstance(tree, Not):
        return math.inf if _score(tree.child, tags) is None else None
    values = [_score(c, tags) for c in tree.children]
    if isinstance(tree, And):
        return None if None in values else min(values)  # type: ignore[type-var]
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _estimate(tree: Node, counts: dict[int, int]) -> float:
    """How many photos a node can match at most (from tags.photo_count)."""
    if isinstance(tree, Term):
        return sum(counts.get(i, 0) for i in tree.tag_ids)
    if isinstance(tree, Not):
        return math.inf
    estimates = [_estimate(c, counts) for c in tree.children]
    return min(estimates) if isinstance(tree, And) else sum(estimates)


def photo_filter_sql(filters: Filters, caption_fts: str | None) -> tuple[str, list]:
    """The date, folder and caption filters as `AND ...` conditions on `photos p`, with their
    arguments; `caption_fts` is `caption_match(filters.caption)`, compiled once by the caller."""
    sql, args = "", []
    if filters.since:
        sql += " AND p.taken_at >= ?"
        args.append(filters.since)
    if filters.until:
        sql += " AND p.taken_at <= ?"
        args.append(filters.until + "\uffff" if len(filters.until) == 10 else filters.until)
    if filters.under:
        low, high = folder_range(filters.under)
        sql += " AND p.path >= ? AND p.path < ?"
        args += [low, high]
    if caption_fts is not None:
        sql += " AND p.id IN (SELECT rowid FROM photos_fts WHERE photos_fts MATCH ?)"
        args.append(caption_fts)
    return sql, args


class _Searcher:
    def __init__(self, index: Index, tree: Node, filters: Filters):
        self.db = index.db
        self.tree = tree
        self.filters = filters
        self.caption_match = None if filters.caption is None else caption_match(filters.caption)
        self.all_ids = json.dumps(sorted(tag_ids(tree)))
        self.counts = dict(
            self.db.execute(
                "SELECT id, photo_count FROM tags WHERE id IN (SELECT value FROM json_each(?))", [self.all_ids]
            ).fetchall()
        )
        self.cursors: list = []

    def _stream(self, tree: Node) -> Iterator[tuple[float, int]] | None:
        """(upper bound of score, photo id), bounds non-increasing; None if the node has no positive term."""
        if isinstance(tree, Term):
            return self._term_stream(tree, [], [])
        if isinstance(tree, Not):
            return None
        if isinstance(tree, And):
            positive = [c for c in tree.children if not isinstance(c, Not)]
            if not positive:
                return None
            driver = min(positive, key=lambda c: _estimate(c, self.counts))
            if not isinstance(driver, Term):
                return self._stream(driver)
            # Let SQLite drop non-matches early: plain sibling terms become (NOT) EXISTS checks.
            required = [c for c in positive if isinstance(c, Term) and c is not driver]
            excluded = [c.child for c in tree.children if isinstance(c, Not) and isinstance(c.child, Term)]
            return self._term_stream(driver, required, excluded)
        streams = [self._stream(c) for c in tree.children]
        if any(s is None for s in streams):
            return None
        return heapq.merge(*streams, key=lambda r: -r[0])  # type: ignore[arg-type]

    def _term_stream(self, driver: Term, required: list[Term], excluded: list[Term]) -> Iterator[tuple[float, int]]:
        """The driver's photos from its score index, best first, that have every `required` term
        and no `excluded` one."""
        checks, args = "", []
        for term, negate in [(t, False) for t in required] + [(t, True) for t in excluded]:
            ids = sorted(term.tag_ids)
            checks += (
                f" AND {'NOT ' if negate else ''}EXISTS (SELECT 1 FROM photo_tags o WHERE o.photo_id = d.photo_id"
                f" AND o.tag_id IN ({', '.join('?' * len(ids))}) AND o.score >= ?)"
            )
            args += [*ids, self.filters.min_score]
        streams = []
        for tag_id in sorted(driver.tag_ids):
            cur = self.db.execute(
                "SELECT d.score, d.photo_id FROM photo_tags d WHERE d.tag_id = ? AND d.score >= ?"
                f"{checks} ORDER BY d.score DESC",
                [tag_id, self.filters.min_score, *args],
            )
            self.cursors.append(cur)
            streams.append(cur)
        return streams[0] if len(streams) == 1 else heapq.merge(*streams, key=lambda r: -r[0])

    def _candidates(self) -> Iterator[tuple[float, int]]:
        stream = self._stream(self.tree)
        if stream is None:  # only exclusions: every tagged photo is a candidate
            cur = self.db.execute("SELECT id FROM photos WHERE status = 'tagged' ORDER BY id")
            self.cursors.append(cur)
            return ((math.inf, pid) for (pid,) in cur)
        return stream

    def _scores(self, photo_ids: list[int]) -> dict[int, float]:
        """Exact scores of the candidates that match the query and the filters."""
        ids_json = json.dumps(photo_ids)
        tags: dict[int, dict[int, float]] = {pid: {} for pid in photo_ids}
        for pid, tag_id, score in self.db.execute(
            # CROSS JOIN pins the loop order: a primary-key probe per candidate. Left to itself the
            # planner may scan every row of the query's tags instead (tens of ms on a big library).
            "SELECT o.photo_id, o.tag_id, o.score FROM json_each(?) AS c CROSS JOIN photo_tags o"
            " ON o.photo_id = c.value WHERE o.tag_id IN (SELECT value FROM json_each(?)) AND o.score >= ?",
            [ids_json, self.all_ids, self.filters.min_score],
        ):
            tags[pid][tag_id] = score
        allowed = self._filter(ids_json) if self._has_photo_filters() else set(photo_ids)
        scores = {}
        for pid in photo_ids:
            if pid in allowed:
                s = _score(self.tree, tags[pid])
                if s is not None:
                    scores[pid] = s
        return scores

    def _has_photo_filters(self) -> bool:
        f = self.filters
        return bool(f.since or f.until or f.under or self.caption_match)

    def _filter(self, ids_json: str) -> set[int]:
        checks, args = self._filter_sql()
        sql = f"SELECT id FROM photos p WHERE id IN (SELECT value FROM json_each(?)){checks}"
        return {pid for (pid,) in self.db.execute(sql, [ids_json, *args])}

    def _filter_sql(self) -> tuple[str, list]:
        """The date, folder and caption filters as `AND ...` conditions on `photos p`, with their
        arguments."""
        return photo_filter_sql(self.filters, self.caption_match)

    def _flat_plan(self) -> tuple[Term, list[Term], list[Term]] | None:
        """(driver, required, excluded) when the query is one SQL statement's worth: a term, or an
        AND of terms and excluded terms, driven by a single-tag term; None otherwise.

        Such a query (most real ones: `dog`, `dog beach sunset`, `dog -night`) is answered by one
        statement that scans the driver's score index best first, drops non-matches with (NOT)
        EXISTS probes and computes each match's exact score, so only matches reach Python."""
        children = self.tree.children if isinstance(self.tree, And) else (self.tree,)
        if not all(isinstance(c, Term) or (isinstance(c, Not) and isinstance(c.child, Term)) for c in children):
            return None
        positive = sorted((c for c in children if isinstance(c, Term)), key=lambda c: _estimate(c, self.counts))
        if not positive or len(positive[0].tag_ids) != 1:
            return None
        excluded = [c.child for c in children if isinstance(c, Not)]
        return positive[0], positive[1:], excluded  # type: ignore[return-value]

    def _top_flat(self, plan: tuple[Term, list[Term], list[Term]], limit: int | None) -> list[tuple[float, int]]:
        """`top` for a flat query (see `_flat_plan`): exact scores from SQL, threshold stop in Python."""
        driver, required, excluded = plan
        min_score = self.filters.min_score
        where, scores, args, score_args = "", [], [], []
        # Probes run in the order written: the most selective term first drops a non-match soonest.
        for term, negate in [(t, False) for t in required] + [(t, True) for t in excluded]:
            ids = sorted(term.tag_ids)
            probe = (f"FROM photo_tags o WHERE o.photo_id = d.photo_id AND o.tag_id IN ({', '.join('?' * len(ids))})"
                     " AND o.score >= ?")
            where += f" AND {'NOT ' if negate else ''}EXISTS (SELECT 1 {probe})"
            args += [*ids, min_score]
            if not negate:
                scores.append(f"(SELECT max(o.score) {probe})")
                score_args += [*ids, min_score]
        where, args = self._photo_checks(where, args)
        # One-argument min() would be SQLite's aggregate: the driver's score alone needs no min.
        score = f"min(d.score, {', '.join(scores)})" if scores else "d.score"
        cur = self.db.execute(
            f"SELECT d.score, d.photo_id, {score} FROM photo_tags d WHERE d.tag_id = ? AND d.score >= ?{where}"
            " ORDER BY d.score DESC",
            [*score_args, next(iter(driver.tag_ids)), min_score, *args],
        )
        best: list[tuple[float, int]] = []  # a min-heap when limited
        try:
            for bound, pid, s in cur:
                if limit is not None and len(best) >= limit and best[0][0] > bound:
                    # No photo from here on scores above its driver score, which is below the k-th
                    # best: strictly below, so equal scores (ranked by photo id) are never cut off.
                    break
                if limit is None or len(best) < limit:
                    heapq.heappush(best, (s, -pid))
                elif (s, -pid) > best[0]:
                    heapq.heapreplace(best, (s, -pid))
        finally:
            cur.close()
        best.sort(reverse=True)
        return [(s, -neg) for s, neg in best]

    def _photo_checks(self, where: str, args: list) -> tuple[str, list]:
        """The date and folder filters as a correlated check on `d.photo_id` (primary-key lookup)."""
        if not self._has_photo_filters():
            return where, args
        checks, extra = self._filter_sql()
        return where + f" AND EXISTS (SELECT 1 FROM photos p WHERE p.id = d.photo_id{checks})", args + extra

    def top(self, limit: int | None) -> list[tuple[float, int]]:
        """(score, photo id) of the best `limit` matches (all if None), best first."""
        plan = self._flat_plan()
        if plan is not None:
            return self._top_flat(plan, limit)
        best: list[tuple[float, int]] = []  # a min-heap when limited
        seen: set[int] = set()
        candidates = self._candidates()
        chunk = 64
        try:
            while True:
                batch = list(itertools.islice(candidates, chunk))
                if not batch:
                    break
                chunk = min(chunk * 2, 4096)
                bound = batch[-1][0]
                new = [pid for _, pid in batch if pid not in seen]
                seen.update(new)
                for pid, s in self._scores(new).items():
                    if limit is None:
                        best.append((s, -pid))
                    elif len(best) < limit:
                        heapq.heappush(best, (s, -pid))
                    elif (s, -pid) > best[0]:
                        heapq.heapreplace(best, (s, -pid))
                if limit is not None and len(best) >= limit and best[0][0] > bound:
                    # Nothing unseen can beat the k-th best. Strictly: an unseen photo scoring
                    # exactly the bound would still outrank a k-th best of equal score and higher id.
                    break
        finally:
            for cur in self.cursors:
                cur.close()
        best.sort(reverse=True)
        return [(s, -neg) for s, neg in best]


def search(index: Index, query: str | None, *, limit: int | None = 50, filters: Filters | None = None,
           with_tags: bool = True) -> list[Hit]:
    """Run a query; `limit=None` returns every hit. Raises UsageError for a bad query.

    An empty `query` with `filters.caption` searches captions alone, ranked by relevance."""
    filters = filters or Filters()
    if not 0.0 <= filters.min_score <= 1.0:
        raise UsageError(f"--min-score must be between 0 and 1, not {filters.min_score}")
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1 (0 means no limit on the command line)")
    if filters.caption is not None and not (query or "").strip():
        ranked: list[tuple[float | None, int]] = _caption_top(index, filters, limit)
    else:
        resolver = TagResolver(index)
        query = query or ""
        tree = parse(query, lowercase_not=not resolver.is_tag("not") if has_not_word(query) else True)
        if _is_plain_words(tree, query) and resolver.groups(" ".join(query.split())):
            tree = Term(" ".join(query.split()))  # `ramcli search christmas tree` means the tag, unquoted
        tree = resolve(tree, resolver)
        ranked = _Searcher(index, tree, filters).top(limit)  # type: ignore[assignment]
    if not ranked:
        return []
    ids = [pid for _, pid in ranked]
    found = {
        hit.id: hit
        for hit in map(_HIT_COLUMNS.read, index.db.execute(
            f"SELECT {_HIT_COLUMNS.select} FROM photos WHERE id IN (SELECT value FROM json_each(?))", [json.dumps(ids)]
        ))
    }
    hits = [found[pid] for _, pid in ranked]
    for (s, _), hit in zip(ranked, hits, strict=True):
        hit.score = None if s is None or math.isinf(s) else s
    if with_tags:
        tags_of = photo_tags_by_id(index, ids)
        for hit in hits:
            hit.tags = tags_of.get(hit.id, [])
    return hits


def _caption_top(index: Index, filters: Filters, limit: int | None) -> list[tuple[float | None, int]]:
    """(None, photo id) of the best caption matches, most relevant (bm25) first, ties by id.

    There is no tag score to report, so hits carry none (like exclusion-only tag queries)."""
    if filters.min_score:
        raise UsageError("--min-score applies to tags: give a tag query along with --caption")
    checks, args = photo_filter_sql(filters, None)
    rows = index.db.execute(
        "SELECT p.id FROM photos_fts JOIN photos p ON p.id = photos_fts.rowid"
        f" WHERE photos_fts MATCH ?{checks} ORDER BY photos_fts.rank, p.id LIMIT ?",
        [caption_match(filters.caption or ""), *args, -1 if limit is None else limit],
    )
    return [(None, pid) for (pid,) in rows]


def _is_plain_words(tree: Node, query: str) -> bool:
    return isinstance(tree, And) and all(isinstance(c, Term) for c in tree.children) and '"' not in query


def photo_tags_by_id(index: Index, photo_ids: list[int]) -> dict[int, list[TagScore]]:
    """Tags (best first) of many photos in one query."""
    out: dict[int, list[TagScore]] = {}
    for pid, name, zh, score in index.db.execute(
        "SELECT pt.photo_id, t.name, coalesce(t.name_zh, ''), pt.score FROM photo_tags pt JOIN tags t ON t.id = pt.tag_id"
        " WHERE pt.photo_id IN (SELECT value FROM json_each(?)) ORDER BY pt.photo_id, pt.score DESC",
        [json.dumps(photo_ids)],
    ):
        out.setdefault(pid, []).append(TagScore(name, zh, score))
    return out
