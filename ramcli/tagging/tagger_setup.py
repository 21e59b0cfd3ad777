"""How a session gets its `Tagger`: the model with the user's vocabulary applied, on the runtime
and in the arithmetic asked for, compiled when the job repays it, with Tag2Text's captioner
when captions are asked for. `TagSession.load` calls `load_tagger` once per model and vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ramcli.errors import UsageError
from ramcli.tagging.embed_cache import EmbeddingCache
from ramcli.tagging.listener import Listener
from ramcli.tagging.options import TagOptions

#: Photos from which torch.compile pays off: compiling costs a fixed time and saves a part of
#: every batch. On the CPU, where a photo takes seconds, a hundred photos repay it; on a GPU,
#: where it saves milliseconds per photo, only very large jobs do (docs/performance.md).
COMPILE_FROM = {"cpu": 100, "cuda": 50_000}


def should_compile(options: TagOptions, device, photos: int) -> bool:
    """--compile/--no-compile, or by default whether `photos` on `device` repay compiling."""
    if options.compile_model is not None:
        return options.compile_model
    return photos >= COMPILE_FROM.get(device.type, 10**9)


@dataclass
class Loaded:
    """The model side of a session: loaded on first need, kept until the vocabulary changes."""

    tagger: object  # ramcli.tagging.tagger.Tagger
    vocab_version: str  # of the vocabulary applied to the model


def load_tagger(options: TagOptions, device, precision: str, vocab, listener: Listener, photos: int,
                precision_check: dict) -> Loaded:
    """The model of `options` with `vocab` applied, and its Tagger. `photos`: the size of the
    first job (it decides on compiling); `precision_check`: the Tagger's arguments for auto's
    check on the CPU (see `TagSession.load`)."""
    from ramcli.models import load_model
    from ramcli.models.scratch import remove_abandoned
    from ramcli.tagging.decision import read_threshold_file
    from ramcli.tagging.tagger import Tagger
    from ramcli.tagging.vocab_apply import apply_to_model

    remove_abandoned()  # a killed conversion's gigabytes, whether or not this run converts
    model = load_model(options.weights, arch=options.arch, labels_dir=options.labels, device=device,
                       on_pull=lambda p: listener.warning(
                           f"downloading {p.name} ({p.size / 1e9:.1f} GB) from huggingface.co/{p.repo_id} …"))
    applied = apply_to_model(vocab, model)
    if options.runtime == "openvino":
        from ramcli.models import resolve_weights
        from ramcli.models.openvino_runtime import to_openvino

        model = to_openvino(model, resolve_weights(options.weights)[0], options.device, applied.version,
                            on_convert=lambda: listener.warning(
                                "converting the model for OpenVINO (once per model and vocabulary) …"))
    if applied.skipped_custom:
        listener.warning(f"warning: {model.arch.family} has a closed vocabulary and cannot score custom tags; "
                         f"not emitted: {', '.join(applied.skipped_custom)}")
    thresholds = read_threshold_file(options.threshold_file, len(model.labels)) if options.threshold_file else None
    cache = EmbeddingCache(model.model_id) if options.cache_embeddings else None
    captioner = load_captioner(options.weights, model) if options.caption else None
    tagger = Tagger(model, device, precision, threshold=options.threshold, thresholds=thresholds,
                    exclude=options.exclude_tags, top_k=options.top_k, cache=cache,
                    compile=should_compile(options, device, photos), captioner=captioner, **precision_check)
    return Loaded(tagger, applied.version)


def load_captioner(weights: str | None, model) -> Callable:
    """Tag2Text's caption generator, from the training parts of the original .pth."""
    from ramcli.models import get_published, resolve_weights
    from ramcli.models.checkpoint import read_official
    from ramcli.models.converted import is_converted
    from ramcli.models.registry import download

    if model.arch.family != "tag2text":
        raise UsageError("--caption needs Tag2Text weights (tag2text_swin_14m): RAM and RAM++ do not caption")
    path, name = resolve_weights(weights)
    if is_converted(path):
        if name is None:
            raise UsageError("--caption needs the original Tag2Text .pth: converted files are tag-only")
        path = download(get_published(name))  # the hub cache keeps the original after `pull`
    from ramcli.models.checkpoint import load_official_generator

    return load_official_generator(read_official(path))
