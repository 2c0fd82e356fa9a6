"""Policy loading, validation of malformed files and prompt rendering."""

import pytest
import yaml

from safetypairs.policy import PolicyError, builtin_policies, load_policy, render_policy


def test_builtin_llavaguard_has_nine_categories():
    policy = load_policy("llavaguard")
    assert "llavaguard" in builtin_policies()
    assert list(policy.categories) == [f"O{i}" for i in range(1, 10)]
    assert policy.id == "llavaguard@1.1"
    assert all(cat.should_not for cat in policy.categories.values())
    assert policy.category("O1").lexicon


def test_lexicon_matches_whole_words_and_glued_tokens():
    policy = load_policy()
    assert policy.lexicon_matches("You are a LOSER!") == ["loser"]
    assert policy.lexicon_matches("STUPIDFACE") == ["stupid"]
    assert policy.lexicon_matches("whatever happens") == []  # 'hate' inside a word is not a match
    assert policy.lexicon_matches("have a nice day") == []


def test_render_policy_lists_should_not_and_can():
    text = render_policy(load_policy(), ["O1", "O4"])
    assert text.startswith("O1: Hate, Humiliation, Harassment")
    assert "Should not:" in text and "Can:" in text and "O4: Nudity" in text
    assert "O2" not in text


def test_render_styles_for_the_guards():
    policy = load_policy()
    assert [c.name for c in policy.categories.values()] == [
        "Hate, Humiliation, Harassment", "Violence, Harm, or Cruelty", "Sexual Content", "Nudity Content",
        "Criminal Planning", "Weapons or Substance Abuse", "Self-Harm", "Animal Cruelty", "Disasters or Emergencies"]
    lines = render_policy(policy, ["O4", "O8"], style="shieldgemma2").split("\n")
    assert len(lines) == 2 and lines[0].startswith("No Nudity Content: The image shall not contain content that ")
    assert lines[1].endswith("; or show graphic injuries to animals (e.g., an animal being beaten, "
                             "a badly neglected animal).")
    lava = render_policy(policy, ["O4"], style="llavaguard")
    assert lava.startswith("O1: Hate, Humiliation, Harassment: \nCategory O1 is declared as non-violating.")
    assert "O4: Nudity Content: \nShould not:\n- show exposed genitals" in lava and lava.endswith("\n \n")
    with pytest.raises(ValueError, match="allowed: plain, llavaguard, shieldgemma2"):
        render_policy(policy, style="markdown")


def test_unknown_category_names_allowed_codes():
    with pytest.raises(KeyError, match="allowed: O1, O2"):
        load_policy().category("O42")


def _write(tmp_path, data):
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_custom_policy_loads(tmp_path):
    path = _write(tmp_path, {"name": "mine", "version": 2, "categories": {
        "C1": {"name": "Spiders", "should_not": ["show spiders"], "can": ["show webs"], "lexicon": ["Spider"]}}})
    policy = load_policy(path)
    assert policy.id == "mine@2" and policy.category("C1").lexicon == ("spider",)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"version": 1, "categories": {"C1": {"name": "x", "should_not": ["y"]}}}, "'name'"),
        ({"name": "p", "version": 1, "categories": {}}, "categories"),
        ({"name": "p", "version": 1, "categories": {"C1": {"should_not": ["y"]}}}, "categories.C1"),
        ({"name": "p", "version": 1, "categories": {"C1": {"name": "x", "should_not": "y"}}}, "categories.C1.should_not"),
        ({"name": "p", "version": 1, "categories": {"C1": {"name": "x", "should_not": ["y"], "cann": []}}}, "cann"),
        ({"name": "p", "version": 1, "categories": {"C1": {"name": "x", "should_not": ["y"], "examples": "z"}}},
         "categories.C1.examples"),
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "must be a mapping"),
    ],
)
def test_malformed_policy_names_the_field(tmp_path, data, field):
    with pytest.raises(PolicyError, match=field.replace(".", r"\.").replace("[", r"\[")):
        load_policy(_write(tmp_path, data))


def test_missing_file_and_unknown_name():
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy("/nonexistent/policy.yaml")
    with pytest.raises(PolicyError, match="built-in: llavaguard"):
        load_policy("llavaguardd")


def test_categories_resolve_from_codes_names_and_aliases():
    from safetypairs.policy import is_none_category

    policy = load_policy("llavaguard")
    for label in ("O1", "o1", " O1 ", "O1: Hate, Humiliation, Harassment", "Hate, Humiliation, Harassment",
                  "hate humiliation harassment", "Harassment", "O1: Hate: slurs on a sign"):  # the code before the 1st colon
        assert policy.resolve(label) == "O1", label
    assert policy.resolve("Violence, Harm or Cruelty") == "O2"  # LlavaGuard v1 punctuation
    assert policy.resolve("Self-harm") == "O7" and policy.resolve("Illegal activity") == "O5"  # UnsafeBench
    for label in ("Shocking", "O10", "", None, 3):
        assert policy.resolve(label) is None
    assert is_none_category("NA: None applying") and is_none_category("NA") and not is_none_category("O1")
    assert {c.code: c.name for c in policy.categories.values()}["O6"] == "Weapons or Substance Abuse"
    assert load_policy(policy) is policy


def test_an_alias_of_two_categories_is_refused(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: p\nversion: 1\ncategories:\n  A: {name: Apples, should_not: [x], aliases: [fruit]}\n"
                   "  B: {name: Bananas, should_not: [y], aliases: [Fruit]}\n")
    with pytest.raises(PolicyError, match="'Fruit' names both A and B"):
        load_policy(bad)


@pytest.mark.parametrize("label", [
    "Hateful memes",  # starts with the alias "Hate"
    "Sexually explicit",  # starts with the alias "Sexual"
    "Violence in films",  # starts with the alias "Violence"
    "Animal",  # the start of the name "Animal Cruelty"
    "Criminal",  # the start of the name "Criminal Planning"
    "Self",  # the start of "Self-Harm"
    "O1O2",  # a code followed by more
    "XO1",
])
def test_a_label_that_only_starts_like_a_category_resolves_to_none(label):
    """Whole names, aliases and codes only: a name prefix must not pick a category ("Hateful memes" is not O1)."""
    assert load_policy("llavaguard").resolve(label) is None
