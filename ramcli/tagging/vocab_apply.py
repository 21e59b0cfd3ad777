"""The user's vocabulary applied to a loaded model: custom tags become label queries, and the
thresholds and disabled tags are folded into its labels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ramcli.models.clip_text import ensemble
from ramcli.tagging.tag_names import name_key
from ramcli.tagging.vocab import Vocabulary


@dataclass(frozen=True)
class AppliedVocab:
    """What `apply_to_model` did: the vocabulary version the results carry, and the custom tags a
    closed-set model (Tag2Text) cannot score, which the run reports."""

    version: str
    skipped_custom: tuple[str, ...] = ()


def apply_to_model(vocab: Vocabulary, model) -> AppliedVocab:
    """Append custom tags as label queries and fold thresholds/disabled tags into `model.labels`.

    RAM gets one query per tag: the official prompt ensemble. RAM++ gets the user's
    descriptions, or without them the 63 prompts as descriptions, reweighted per image.
    Tag2Text is closed-set: its custom tags are skipped (listed in `skipped_custom`). Disabled
    tags join `labels.deleted`, so the tagger leaves them out of the label queries.
    Idempotent: tags the model already has are not added twice.
    """
    family = model.arch.family
    present = {name_key(n) for n in model.labels.names}
    todo = [t for t in vocab.custom if name_key(t.name) not in present]
    skipped: tuple[str, ...] = ()
    if family == "tag2text":
        skipped, todo = tuple(t.name for t in todo), []
    if todo:
        if family == "ram":
            embeds = torch.stack([ensemble(vocab.embeddings[t.name]["template"]) for t in todo])
            counts = None
        else:
            rows = [vocab.embeddings[t.name].get("descriptions", vocab.embeddings[t.name]["template"]) for t in todo]
            embeds, counts = torch.cat(rows), [len(r) for r in rows]
        model.add_label_queries(embeds, [t.name for t in todo], [t.name_zh or t.name for t in todo],
                                [t.threshold for t in todo], descriptions_per_tag=counts)
    labels = model.labels
    index = {name_key(n): i for i, n in enumerate(labels.names)}
    thresholds = list(labels.thresholds)
    for tag in vocab.custom:
        if name_key(tag.name) in index:
            thresholds[index[name_key(tag.name)]] = tag.threshold
    for name, value in vocab.thresholds.items():
        if name_key(name) in index:
            thresholds[index[name_key(name)]] = value
    disabled = frozenset(index[name_key(n)] for n in vocab.disabled if name_key(n) in index)
    model.labels = replace(labels, thresholds=tuple(thresholds), deleted=labels.deleted | disabled)
    return AppliedVocab(vocab.version, skipped)
