"""Caption parsing: 50+ hand-checked COCO-style captions, negation scopes, longest match,
synonyms, Unicode, the official caption cleaning and the `ramcli parse` command."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from ramcli.errors import RamcliError
from ramcli_train.parse import DEFAULT_SYNONYMS, TagParser, clean_caption



# (caption, expected tag names). Each expectation was checked by hand against the caption and
# against the official 4,585-tag list (the test below asserts every name is a tag of it).
CASES = [
    ("a dog sitting on a couch next to a lamp", {"dog", "sitting", "couch", "lamp"}),
    ("Two men playing tennis on a court.", {"man", "play tennis", "court"}),
    ("A woman riding a horse on the beach", {"woman", "riding", "horse", "beach"}),
    ("a cat sleeping on a bed", {"cat", "sleep", "bed"}),
    ("A plate of food with broccoli and carrots", {"plate", "food", "broccoli", "carrot"}),
    ("a pizza with cheese and tomatoes on a wooden table", {"pizza", "cheese", "tomato", "table"}),
    ("Giraffes standing in a grassy field", {"giraffe", "standing", "grassy", "field"}),
    ("an elephant walking through the water", {"elephant", "walking", "water"}),
    ("A red double decker bus driving down the street", {"red", "decker bus", "drive", "city street"}),
    ("a living room with a christmas tree and a fireplace", {"living room", "christmas tree", "fireplace"}),
    ("A traffic light hanging over an intersection", {"traffic light", "hang", "intersection"}),
    ("a man wearing glasses and a tie", {"man", "wear", "glasses", "tie"}),
    ("a glass of wine on a table", {"wine", "table"}),
    ("a street with no cars", {"city street"}),
    ("an empty room without furniture", {"room"}),
    ("a cat that is not sleeping", {"cat"}),
    ("nobody is sitting on the park bench", {"park bench"}),
    ("a dog without a collar on the grass", {"dog", "grass"}),
    ("there are no people on the beach", {"beach"}),
    ("not a dog but a cat", {"cat"}),
    ("A kitchen with no refrigerator or oven", {"kitchen"}),
    ("a man who isn't wearing a hat", {"man"}),
    ("neither cats nor dogs are allowed in the store", {"store"}),
    ("a bird that never flies, in a cage", {"bird", "cage"}),
    ("People walking down a sidewalk in the rain", {"person", "walking", "pavement", "rain"}),
    ("a guy on a bike next to a lady", {"man", "bicycle", "woman"}),
    ("A TV on a stand in a bedroom", {"television", "stand", "bedroom"}),
    ("an airplane flying in a cloudy sky", {"plane", "fly", "cloudy", "sky"}),
    ("a teddy bear on a sofa", {"teddy", "couch"}),
    ("A SNOWBOARDER JUMPING IN THE AIR", {"snowboarder", "jump"}),
    ("Children playing with a kite at the park!", {"child", "play", "kite", "park"}),
    ("Mice and geese", {"mouse", "goose"}),
    ("a woman's handbag on the floor", {"woman", "handbag", "floor"}),
    ("a man in a t-shirt and jeans", {"man", "t-shirt", "jeans"}),
    ("French fries and a hot dog", {"French fries", "hot dog"}),
    ("a close-up of a sunflower", {"close-up", "sunflower"}),
    ("a café at night", {"cafe", "night"}),
    ("A boy’s bicycle leaning against a wall", {"boy", "bicycle", "lean", "wall"}),
    ("a surfer riding a wave in the ocean", {"surfer", "riding", "wave", "sea"}),
    ("a skier going down a snowy slope", {"skier", "go", "snowy", "slope"}),
    ("A baseball player swinging a bat", {"baseball player", "swing", "bat"}),
    ("a clock on the side of a building", {"clock", "side", "building"}),
    ("a bowl of soup and a spoon", {"bowl", "soup", "spoon"}),
    ("a laptop and a cup of coffee on a desk", {"laptop", "cup", "coffee", "office desk"}),
    ("Sheep grazing in a green pasture", {"sheep", "grazing", "green", "pasture"}),
    ("a train on the tracks near a platform", {"train", "track", "platform"}),
    ("boats docked in a harbor at sunset", {"boat", "dock", "harbor", "sunset"}),
    ("a bathroom with a toilet and a sink", {"bathroom", "toilet bowl", "sink"}),
    ("an orange cat lying on a blanket", {"orange", "cat", "lie", "blanket"}),
    ("a stop sign at the corner of a road", {"stop sign", "corner", "road"}),
    ("Two zebras, a giraffe; and a tree.", {"zebra", "giraffe", "tree"}),
    ("a birthday cake with candles", {"birthday cake", "candle"}),
    ("a mother holding her baby", {"mother", "baby"}),
    ("a snowy mountain under a blue sky", {"snowy", "mountain", "blue sky"}),
    ("Zwei Hunde – two dogs 🐶 in the snow", {"dog", "snow"}),
    ("", set()),
    ("!!! ??? ...", set()),
    ("qwzx blorf", set()),
]




def test_at_least_fifty_hand_checked_captions_use_real_tags(labels):
    assert len(CASES) >= 50
    names = set(labels.names)
    for caption, expected in CASES:
        assert expected <= names, (caption, expected - names)


@pytest.mark.parametrize("caption,expected", CASES, ids=[c[:40] or "<empty>" for c, _ in CASES])
def test_hand_checked_caption(parser, labels, caption, expected):
    result = parser.parse(caption)
    assert set(result.tag_names) == expected
    assert result.tag_ids == sorted(labels.names.index(n) for n in expected)


def test_negated_tags_are_reported_not_emitted(parser):
    result = parser.parse("a street with no cars or buses, a dog without a leash on the grass")
    assert set(result.tag_names) == {"city street", "dog", "grass"}
    assert {m.name for m in result.negated} == {"car", "bus", "leash"}


def test_scope_ends_at_punctuation_clause_word_and_preposition(parser):
    assert parser.parse("no dogs. a cat").tag_names == ["cat"]
    assert parser.parse("not a dog but a cat").tag_names == ["cat"]
    assert parser.parse("no dog in the kitchen").tag_names == ["kitchen"]


def test_positive_mention_elsewhere_keeps_the_tag(parser):
    result = parser.parse("a dog next to a bowl, no other dog")
    assert "dog" in result.tag_names and not result.negated


def test_longest_match_consumes_its_words(parser):
    assert parser.parse("a christmas tree").tag_names == ["christmas tree"]
    assert parser.parse("a christmas dinner under a tree").tag_names == ["christmas dinner", "tree"]
    assert parser.parse("a traffic, light").tag_names == ["traffic", "light"]  # never across punctuation


def test_exact_spelling_wins_between_tags_with_the_same_lemma(parser):
    assert parser.parse("a man standing").tag_names == ["man", "standing"]
    assert parser.parse("a man stands").tag_names == ["man", "stand"]
    assert parser.parse("a t-shirt").tag_names == ["t-shirt"]
    assert parser.parse("a t shirt").tag_names == ["t shirt"]


def test_inflected_tag_words_need_the_exact_word(parser):
    assert "glasses" not in parser.parse("a glass of water").tag_names
    assert "glasses" in parser.parse("reading glasses").tag_names


def test_default_synonyms_point_at_real_tags(labels):
    names = {n.lower() for n in labels.names}
    assert all(target in names for target in DEFAULT_SYNONYMS.values())
    assert not any(alias in names for alias in DEFAULT_SYNONYMS)


def test_custom_synonym_maps_to_one_id(labels):
    parser = TagParser(labels, synonyms={"doggo": "dog", "pupper": "Dog"})
    result = parser.parse("a doggo and a pupper and a dog")
    assert result.tag_names == ["dog"]
    assert [m.synonym_of for m in result.tags] == ["doggo", "pupper", None]
    assert result.tag_ids == [labels.names.index("dog")]


def test_synonym_to_unknown_tag_is_an_error(labels):
    with pytest.raises(RamcliError, match="not a tag"):
        TagParser(labels, synonyms={"doggo": "wolfdog-thing"})


def test_default_synonyms_can_be_switched_off(labels):
    assert TagParser(labels, default_synonyms=False).parse("a sofa").tag_names == []


def test_plain_name_list_and_duplicate_names():
    parser = TagParser(["train", "dog", "train", "red dog"])
    assert parser.parse("trains and dogs").tag_ids == [0, 1, 2]
    assert parser.parse("a red dog").tag_ids == [3]


def test_ids_for_names(parser, labels):
    ids, unknown = parser.ids_for_names(["Dog", "people", "flurb"])
    assert ids == sorted([labels.names.index("dog"), labels.names.index("person")])
    assert unknown == ["flurb"]


def test_clean_caption_matches_the_official_rule():
    assert clean_caption('A "Dog"  (sitting): on a couch!!') == "a dog sitting on a couch"
    assert clean_caption("Hello, world? yes") == "hello, world? yes"  # commas and ? are kept officially
    assert clean_caption(" ".join(["word"] * 40)) == " ".join(["word"] * 30)


def test_cli_parse_table(labels_dir, capsys):
    assert run_cli(["parse", "a dog sitting on a couch next to a lamp", "--labels", str(labels_dir)]) == 0
    out = capsys.readouterr().out
    for name in ("dog", "sitting", "couch", "lamp", "1363"):
        assert name in out


def test_cli_parse_json(labels_dir, labels, capsys):
    assert run_cli(["parse", "A street with no cars, just people.", "--labels", str(labels_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in data["tags"]] == ["city street", "person"]
    assert data["tags"][1]["words"] == "people" and data["tags"][1]["synonym"] == "people"
    assert [t["name"] for t in data["negated"]] == ["car"]
    assert data["tag_ids"] == sorted([labels.names.index("city street"), labels.names.index("person")])
    assert data["clean_caption"] == "a street with no cars, just people"


def test_cli_parse_bad_labels_is_one_line(tmp_path, capsys):
    assert run_cli(["parse", "a dog", "--labels", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "label file not found" in err and "Traceback" not in err
