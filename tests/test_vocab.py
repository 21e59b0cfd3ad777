"""The vocabulary store, its CLI, and custom tags' fidelity to the official open-set computation."""

from __future__ import annotations

import json

import pytest
import torch
from ckpt_factory import arch_config, make_labels_dir, make_official_checkpoint, official_state_dict
from clip_fixtures import TINY_CLIP, save_random_clip
from official_reference import official_logits

from ramcli.models import clip_text
from ramcli.errors import RamcliError
from ramcli.models.labels import read_label_dir
from ramcli.models import load_model
from ramcli.tagging.vocab import Vocabulary
from ramcli.tagging.vocab_apply import apply_to_model
from ramcli.tagging.vocab_files import parse_import_file

NUM_CLASSES = 30
SEED = 3


@pytest.fixture(scope="session")
def clip_file(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.safetensors", TINY_CLIP)


@pytest.fixture(scope="session")
def encoder(clip_file):
    return clip_text.load_text_encoder(clip_file, model_config=TINY_CLIP)


@pytest.fixture
def load_encoder(encoder):
    calls = []

    def load():
        calls.append(1)
        return encoder

    load.calls = calls
    return load


@pytest.fixture(scope="session")
def builtin(labels_dir):
    return read_label_dir(labels_dir, "ram").names


@pytest.fixture
def vocab(tmp_path, builtin):
    return Vocabulary.open(tmp_path / "vocab", builtin)


def images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------- store and versioning
def test_add_persists_and_reloads(vocab, load_encoder, builtin, encoder):
    before = vocab.version
    vocab.add("tram", load_encoder)
    vocab.add("Rack_railway", load_encoder, descriptions=["a rack railway on a hill.", "a red cog train"], threshold=0.6)
    vocab.save()
    again = Vocabulary.open(vocab.path, builtin)
    assert [t.name for t in again.custom] == ["tram", "Rack_railway"]
    assert again.custom[1].threshold == 0.6 and again.custom[1].descriptions == ["a rack railway on a hill.", "a red cog train"]
    assert again.embeddings["Rack_railway"]["descriptions"].shape == (2, 512)
    torch.testing.assert_close(again.embeddings["tram"]["template"], encoder.template_embeddings("tram"), atol=0, rtol=0)
    assert again.version == vocab.version != before
    assert len(list(vocab.path.glob("embeddings-*.safetensors"))) == 1


def test_every_output_change_bumps_the_version(vocab, load_encoder):
    vocab.add("tram", load_encoder)
    seen = {vocab.version}
    for change in (lambda: vocab.set_threshold("tram", 0.7), lambda: vocab.disable("person"),
                   lambda: vocab.set_threshold("dog", 0.9), lambda: vocab.enable("person"),
                   lambda: vocab.remove("tram")):
        change()
        assert vocab.version not in seen
        seen.add(vocab.version)
    version = vocab.version
    vocab.add_synonym("dog", "doggo")  # search-only: tagging output unchanged
    assert vocab.version == version


def test_bad_names_leave_the_vocabulary_untouched(vocab, load_encoder):
    vocab.add("tram", load_encoder)
    vocab.save()
    manifest = (vocab.path / "manifest.json").read_bytes()
    for name, message in [("", "empty"), ("   \t", "empty"), ("TRAM", "already exists"),
                          ("person", "built-in tag.*vocab enable.*vocab synonym"), ("bad\x07name", "control")]:
        with pytest.raises(RamcliError, match=message):
            vocab.add(name, load_encoder)
    with pytest.raises(RamcliError, match="between 0 and 1"):
        vocab.add("trolleybus", load_encoder, threshold=1.5)
    assert [t.name for t in vocab.custom] == ["tram"]
    assert (vocab.path / "manifest.json").read_bytes() == manifest
    assert len(load_encoder.calls) == 1  # invalid input is refused before CLIP is loaded


def test_settings_validate_names(vocab):
    with pytest.raises(RamcliError, match="unknown tag 'nosuchtag'"):
        vocab.disable("nosuchtag")
    with pytest.raises(RamcliError, match="cannot be removed"):
        vocab.remove("person")
    with pytest.raises(RamcliError, match="not disabled"):
        vocab.enable("person")
    assert vocab.disable("Person") == "person"


def test_import_export_round_trip(tmp_path, vocab, load_encoder, builtin):
    (tmp_path / "tags.txt").write_text("# trains\ntram\n\nfunicular\n", encoding="utf-8")
    (tmp_path / "tags.csv").write_text("name,threshold,description\nmonorail,0.55,a monorail train\n", encoding="utf-8")
    official = [{"velodrome": ["a velodrome.", "a cycling track", "an indoor track"]}, {"gondola lift": ["a gondola."]}]
    (tmp_path / "llm.json").write_text(json.dumps(official), encoding="utf-8")
    for name in ("tags.txt", "tags.csv", "llm.json"):
        vocab.apply_import(vocab.check_import(parse_import_file(tmp_path / name)), load_encoder)
    vocab.disable("person")
    vocab.set_threshold("dog", 0.8)
    vocab.add_synonym("tram", "streetcar")
    vocab.add("aerial tramway", load_encoder, name_zh="空中缆车")
    assert [t.name for t in vocab.custom] == ["tram", "funicular", "monorail", "velodrome", "gondola lift", "aerial tramway"]
    assert vocab.find_custom("monorail").threshold == 0.55
    assert len(vocab.embeddings["velodrome"]["descriptions"]) == 3
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(vocab.export()), encoding="utf-8")
    other = Vocabulary.open(tmp_path / "other", builtin)
    other.apply_import(other.check_import(parse_import_file(exported)), load_encoder)
    assert other.export() == vocab.export()
    assert other.version == vocab.version
    assert other.find_custom("aerial tramway").name_zh == "空中缆车"


@pytest.mark.parametrize("content, suffix, message", [
    (b"\xff\xfe\x00bad", ".txt", "not UTF-8"),
    (b"[{\"a\": ", ".json", "malformed JSON"),
    (b"{\"tags\": 1}", ".json", "expected a list"),
    (b"[{\"tram\": []}]", ".json", "non-empty list"),
    (b"tram\ntram\n", ".txt", "already exists"),
    (b"tram\nperson\n", ".txt", "built-in"),
    (b"tram,high\n", ".csv", "not a number"),
    (b"tram", ".yaml", "unknown import format"),
])
def test_bad_import_files(tmp_path, vocab, load_encoder, content, suffix, message):
    path = tmp_path / f"in{suffix}"
    path.write_bytes(content)
    with pytest.raises(RamcliError, match=message):
        vocab.check_import(parse_import_file(path))
    assert vocab.custom == [] and not load_encoder.calls


def test_damaged_manifest_is_one_line_error(vocab, load_encoder, builtin):
    vocab.add("tram", load_encoder)
    vocab.save()
    (vocab.path / "manifest.json").write_text("{nope", encoding="utf-8")
    with pytest.raises(RamcliError, match="damaged"):
        Vocabulary.open(vocab.path, builtin)


# ---------------------------------------------------------------------- the model
@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(path, labels_dir) of tiny official-layout RAM and RAM++ checkpoints."""
    root = tmp_path_factory.mktemp("models")
    labels = make_labels_dir(root, NUM_CLASSES)
    return {
        arch: make_official_checkpoint(root / f"{arch}.pth", arch, NUM_CLASSES, des_per_class=3, seed=SEED)
        for arch in ("ram_tiny", "ram_plus_tiny")
    }, labels


def official_openset_logits(arch: str, label_embed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The official open-set path on the same weights: replace label_embed and num_class."""
    sd = official_state_dict(arch, NUM_CLASSES, des_per_class=3, seed=SEED)
    sd["label_embed"] = label_embed
    cfg = arch_config(arch, NUM_CLASSES, des_per_class=3)
    cfg["num_classes"] = 1 if arch == "ram_plus_tiny" else label_embed.shape[0]
    return official_logits(sd, cfg, x)


def independent_ensemble(clip_file, name):
    from test_clip_text import official_openset_embedding, reference_model

    return official_openset_embedding(reference_model(clip_file, TINY_CLIP), name)


def test_ram_custom_tag_scores_match_official_openset(tiny_models, vocab, load_encoder, clip_file):
    paths, labels = tiny_models
    vocab.add("tram", load_encoder)
    vocab.add("Rack_railway", load_encoder, threshold=0.42)
    model = load_model(paths["ram_tiny"], labels_dir=labels)
    apply_to_model(vocab, model)
    assert len(model.labels) == NUM_CLASSES + 2 and model.labels.names[-2:] == ("tram", "Rack_railway") and model.labels.thresholds[-2:] == (0.5, 0.42)
    x = images(model.arch.image_size)
    with torch.no_grad():
        ours = model(x)[:, NUM_CLASSES:]
    reference = torch.stack([independent_ensemble(clip_file, n) for n in ("tram", "Rack_railway")])
    theirs = official_openset_logits("ram_tiny", reference, x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours[:, 0] - ours[:, 1]).abs().max() > 1e-3  # the two tags are told apart


def test_ram_plus_unequal_description_counts_match_official(tiny_models, vocab, load_encoder, encoder):
    paths, labels = tiny_models
    vocab.add("tram", load_encoder, descriptions=["a tram.", "a streetcar on rails", "a yellow tram in Lisbon"])
    vocab.add("funicular", load_encoder, descriptions=["a funicular railway."])
    vocab.add("monorail", load_encoder)  # no descriptions: the 63 prompts, reweighted per image
    model = load_model(paths["ram_plus_tiny"], labels_dir=labels)
    apply_to_model(vocab, model)
    x = images(model.arch.image_size)
    with torch.no_grad():
        ours = model(x)[:, NUM_CLASSES:]
    # The official code needs equal counts per call, so each tag is its own official call.
    rows = [encoder.description_embeddings(["a tram.", "a streetcar on rails", "a yellow tram in Lisbon"]),
            encoder.description_embeddings(["a funicular railway."]),
            encoder.encode(clip_text.prompts_for("monorail"))]
    theirs = torch.cat([official_openset_logits("ram_plus_tiny", r, x) for r in rows], dim=1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_disabled_and_thresholds_fold_into_the_model(tiny_models, vocab, load_encoder):
    paths, labels = tiny_models
    model = load_model(paths["ram_tiny"], labels_dir=labels)
    names = model.labels.names
    vocab.add("tram", load_encoder)
    vocab.disable(names[2])
    vocab.disable("tram")
    vocab.set_threshold(names[4], 0.93)
    applied = apply_to_model(vocab, model)
    assert applied.version == vocab.version and applied.skipped_custom == ()
    assert model.labels.deleted == {2, NUM_CLASSES} and model.labels.thresholds[4] == 0.93
    kept = torch.tensor([i for i in range(NUM_CLASSES + 1) if i not in model.labels.deleted])
    x = images(model.arch.image_size)
    with torch.no_grad():
        full, subset = model(x), model(x, classes=kept)
    torch.testing.assert_close(subset, full[:, kept], atol=1e-5, rtol=0)
    apply_to_model(vocab, model)  # idempotent: tram is not added twice
    assert len(model.labels) == NUM_CLASSES + 1 and model.labels.names.count("tram") == 1


def test_tag2text_skips_custom_tags(tmp_path, vocab, load_encoder):
    labels = make_labels_dir(tmp_path, NUM_CLASSES, family="tag2text")
    model = load_model(make_official_checkpoint(tmp_path / "t2t.pth", "tag2text_tiny", NUM_CLASSES), labels_dir=labels)
    vocab.add("tram", load_encoder)
    vocab.disable(model.labels.names[1])
    applied = apply_to_model(vocab, model)
    assert applied.skipped_custom == ("tram",) and len(model.labels) == NUM_CLASSES
    assert 1 in model.labels.deleted


def test_tag_reports_the_custom_tags_tag2text_drops(tmp_path, builtin, load_encoder, capsys):
    """A user who added custom tags and tags with Tag2Text is told they are not emitted."""
    from images import photo_like

    from ramcli.cli.app import main
    from ramcli.config import home

    labels = make_labels_dir(tmp_path, NUM_CLASSES, family="tag2text")
    weights = make_official_checkpoint(tmp_path / "t2t.pth", "tag2text_tiny", NUM_CLASSES)
    stored = Vocabulary.open(home().vocab, builtin)
    stored.add("tram", load_encoder)
    stored.add("funicular", load_encoder)
    stored.save()
    photo_like(96, 64).save(tmp_path / "p.jpg")
    with pytest.raises(SystemExit) as exit_:
        main(["tag", str(tmp_path / "p.jpg"), "--weights", str(weights), "--labels", str(labels), "--no-write",
              "--workers", "0", "-q", "-f", "jsonl"])
    err = capsys.readouterr().err
    assert (exit_.value.code or 0) == 0, err
    assert "tag2text has a closed vocabulary" in err and "not emitted: tram, funicular" in err


def test_commit_gives_the_index_the_vocabularys_tags_and_synonyms(tmp_path, vocab, load_encoder):
    from ramcli.library.index import Index

    vocab.add("tram", load_encoder, name_zh="电车")
    vocab.add_synonym("tram", "streetcar")
    vocab.add_synonym("dog", "doggo")
    for _ in range(2):  # idempotent
        vocab.commit(tmp_path / "index.db")
    assert Vocabulary.open(vocab.path).synonyms == {"streetcar": "tram", "doggo": "dog"}  # saved
    with Index.open(tmp_path / "index.db", readonly=True) as index:
        tags = {name: (zh, source) for name, zh, source in index.db.execute("SELECT name, name_zh, source FROM tags")}
        synonyms = dict(index.db.execute("SELECT s.alias, t.name FROM synonyms s JOIN tags t ON t.id = s.tag_id"))
    assert tags == {"tram": ("电车", "custom"), "dog": (None, "builtin")}
    assert synonyms == {"streetcar": "tram", "doggo": "dog"}


# ---------------------------------------------------------------------- the CLI
@pytest.fixture
def cli(monkeypatch, labels_dir, tmp_path, capsys):
    """Run `ramcli ...` in-process: (exit code, stdout, stderr). No HF cache, official labels."""
    import huggingface_hub.constants

    from ramcli.cli.app import main

    monkeypatch.setenv("RAMCLI_LABELS", str(labels_dir))
    monkeypatch.delenv(clip_text.CLIP_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(["vocab", *args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_settings_without_clip(cli, builtin, labels_dir):
    from ramcli.config import home
    from ramcli.library.index import Index

    assert cli("disable", "Person")[0] == 0
    code, out, _ = cli("threshold", "dog", "0.8")
    assert code == 0 and "threshold of 'dog' is now 0.8" in out
    assert cli("synonym", "dog", "doggo")[0] == 0
    code, out, _ = cli("list", "--builtin", "--search", "doggo", "-f", "tsv")
    assert out.splitlines() == ["tag\tkind\tthreshold\tstate\tsynonyms", "dog\tbuilt-in\t0.8\tenabled\tdoggo"]
    code, out, _ = cli("list", "--builtin", "--search", "doggo", "--format", "json")
    assert json.loads(out) == [{"name": "dog", "kind": "built-in", "threshold": 0.8, "enabled": True,
                                "synonyms": ["doggo"]}]
    code, out, _ = cli("list", "--search", "person", "-f", "tsv")
    person = read_label_dir(labels_dir, "ram").thresholds[builtin.index("person")]
    assert f"person\tbuilt-in\t{person:g}\tdisabled\t" in out.splitlines()
    with Index.open(readonly=True) as index:
        assert index.db.execute("SELECT alias FROM synonyms").fetchall() == [("doggo",)]
    manifest = (home().vocab / "manifest.json").read_bytes()
    for args, message in [(("threshold", "dog", "2"), "between 0 and 1"), (("disable", "nosuchtag"), "unknown tag"),
                          (("enable", "dog"), "not disabled"), (("remove", "dog"), "built-in"),
                          (("synonym", "dog", " "), "synonym is empty")]:
        code, out, err = cli(*args)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert (home().vocab / "manifest.json").read_bytes() == manifest


def test_cli_add_errors_are_one_line_and_change_nothing(cli, tmp_path):
    from ramcli.config import home

    cases = [(("add", ""), "tag name is empty"), (("add", "  "), "tag name is empty"),
             (("add", "person"), "already a built-in tag ('person'): use `ramcli vocab enable"),
             (("add", "tram"), "ramcli models pull clip-vit-b-16"),
             (("add", "tram", "--clip-weights", str(tmp_path / "none.pt")), "CLIP weights file not found"),
             (("add", "tram", "--descriptions", str(tmp_path / "none.json")), "descriptions file not found")]
    for args, message in cases:
        code, _, err = cli(*args)
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    (tmp_path / "bad.txt").write_bytes(b"tram\n\xff\n")
    code, _, err = cli("import", str(tmp_path / "bad.txt"))
    assert code == 1 and "not UTF-8" in err
    assert not (home().vocab / "manifest.json").exists()


@pytest.mark.slow
def test_cli_add_with_real_clip_architecture(cli, tmp_path):
    """`vocab add` end to end with a random-weight ViT-B-16 (QuickGELU) text tower on disk."""
    import open_clip

    weights = save_random_clip(tmp_path / "clip.safetensors", open_clip.get_model_config(clip_text.CLIP_MODEL_NAME),
                               text_only=True)
    code, out, err = cli("add", "tram", "--clip-weights", str(weights))
    assert code == 0, err
    assert "added custom tag 'tram' (threshold 0.5, 63 prompts)" in out
    code, out, err = cli("add", "funicular", "-d", "a funicular.", "-d", "a cliff railway", "--threshold", "0.6",
                         "--zh", "缆车", "--clip-weights", str(weights))
    assert code == 0 and "2 descriptions" in out
    code, out, _ = cli("list", "--custom", "-f", "tsv")
    assert out.splitlines() == ["tag\tkind\tthreshold\tstate\tsynonyms", "tram\tcustom\t0.5\tenabled\t", "funicular\tcustom\t0.6\tenabled\t"]
    code, _, err = cli("add", "Tram", "--clip-weights", str(weights))
    assert code == 1 and "already exists" in err
    vocab = Vocabulary.open()
    encoder = clip_text.load_text_encoder(weights)
    torch.testing.assert_close(vocab.embeddings["tram"]["template"], encoder.template_embeddings("tram"))
    exported = tmp_path / "export.json"
    assert cli("export", str(exported))[0] == 0
    assert json.loads(exported.read_text())["custom"][1] == {
        "name": "funicular", "threshold": 0.6, "descriptions": ["a funicular.", "a cliff railway"], "name_zh": "缆车"}
    assert [t.name_zh for t in Vocabulary.open().custom] == ["", "缆车"]
    assert cli("remove", "tram")[0] == 0
    assert [t.name for t in Vocabulary.open().custom] == ["funicular"]
