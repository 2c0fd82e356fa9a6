"""Safety policies as data: YAML files with categories, "should not" and "can" lists."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

_BUILTIN_PACKAGE = "safetypairs.policies"


class PolicyError(ValueError):
    """A policy file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Category:
    """One policy category (e.g. ``O1``)."""

    code: str
    name: str
    should_not: tuple[str, ...]
    can: tuple[str, ...]
    lexicon: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """A named, versioned set of categories."""

    name: str
    version: str
    description: str
    categories: dict[str, Category] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """``name@version``, recorded next to every row the policy touched."""
        return f"{self.name}@{self.version}"

    def category(self, code: str) -> Category:
        """Return a category by code.

        Raises:
            KeyError: naming the allowed codes.
        """
        if code not in self.categories:
            raise KeyError(
                f"unknown category {code!r} for policy {self.id}; allowed: {', '.join(self.categories)}"
            )
        return self.categories[code]

    def resolve(self, value: object) -> str | None:
        """The category code a label names, or ``None`` when it names none of this policy's categories.

        ``"O1"``, ``"o1"``, ``"O1: Hate, Humiliation, Harassment"`` (a code before a colon), the name
        alone and any of the category's ``aliases`` resolve to ``"O1"``; case, punctuation and spacing
        do not matter in names and aliases.
        """
        if not isinstance(value, str) or not value.strip():
            return None
        codes = {code.lower(): code for code in self.categories}
        head = value.partition(":")[0].strip().lower()
        if head in codes:
            return codes[head]
        key = _name_key(value)
        for code, cat in self.categories.items():
            if key in {_name_key(cat.name), *map(_name_key, cat.aliases)}:
                return code
        return None

    def lexicon_matches(self, text: str, code: str | None = None) -> list[str]:
        """Return the lexicon words (of one category, or of all) found in ``text``.

        A word matches a whole token, or the start or end of a longer token when it has at
        least four letters (OCR often drops the space between words: "STUPIDFACE").
        """
        tokens = set(re.findall(r"[a-z]+", text.lower()))
        cats = [self.categories[code]] if code in self.categories else self.categories.values()
        return sorted({w for cat in cats for w in cat.lexicon if any(_token_matches(t, w) for t in tokens)})


def _name_key(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


# Labels that say "no category applies" (LlavaGuard's "NA: None applying"): the row is not unsafe.
NONE_CATEGORIES = frozenset({"na", "na none applying", "none applying", "none", "n a", "safe", "no category"})


def is_none_category(value: object) -> bool:
    """Whether a category label says that no category applies (``"NA: None applying"``, ``"NA"``, ``"safe"``)."""
    return isinstance(value, str) and _name_key(value) in NONE_CATEGORIES


def _token_matches(token: str, word: str) -> bool:
    return token == word or (len(word) >= 4 and (token.startswith(word) or token.endswith(word)))


def builtin_policies() -> list[str]:
    """Names of the policies shipped with the package."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files(_BUILTIN_PACKAGE).iterdir()
        if p.name.endswith(".yaml")
    )


def _string_list(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PolicyError(f"{where} must be a list of non-empty strings, got {value!r}")
    return tuple(v.strip() for v in value)


def _parse_category(code: str, raw: object, source: str) -> Category:
    where = f"{source}: categories.{code}"
    if not isinstance(raw, dict):
        raise PolicyError(f"{where} must be a mapping with name, should_not and can")
    fields = ("name", "should_not", "can", "lexicon", "examples", "aliases")
    for key in ("name", "should_not"):
        if key not in raw:
            raise PolicyError(f"{where} is missing the field {key!r}")
    if not isinstance(raw["name"], str) or not raw["name"].strip():
        raise PolicyError(f"{where}.name must be a non-empty string")
    unknown = set(raw) - set(fields)
    if unknown:
        raise PolicyError(f"{where} has unknown fields {sorted(unknown)}; allowed: {', '.join(fields)}")
    should_not = _string_list(raw["should_not"], f"{where}.should_not")
    if not should_not:
        raise PolicyError(f"{where}.should_not must list at least one item")
    lexicon = tuple(w.lower() for w in _string_list(raw.get("lexicon"), f"{where}.lexicon"))
    return Category(code, raw["name"].strip(), should_not, _string_list(raw.get("can"), f"{where}.can"), lexicon,
                    _string_list(raw.get("examples"), f"{where}.examples"),
                    _string_list(raw.get("aliases"), f"{where}.aliases"))


def parse_policy(data: object, source: str = "<policy>") -> Policy:
    """Build a `Policy` from parsed YAML.

    Args:
        data: the mapping read from a policy file.
        source: where it came from, for error messages.

    Returns:
        The policy.

    Raises:
        PolicyError: naming the offending field.
    """
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy file must be a mapping with name, version, categories")
    for key in ("name", "version", "categories"):
        if key not in data:
            raise PolicyError(f"{source}: missing the field {key!r}")
    if not isinstance(data["name"], str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", data["name"]):
        raise PolicyError(f"{source}: field 'name' must be a word of letters, digits, '_', '.', '-'")
    cats = data["categories"]
    if not isinstance(cats, dict) or not cats:
        raise PolicyError(f"{source}: field 'categories' must be a non-empty mapping of code -> category")
    categories = {str(code): _parse_category(str(code), raw, source) for code, raw in cats.items()}
    _check_aliases(categories, source)
    return Policy(
        name=data["name"],
        version=str(data["version"]),
        description=str(data.get("description") or "").strip(),
        categories=categories,
    )


def _check_aliases(categories: dict[str, Category], source: str) -> None:
    """Refuse a name or alias that two categories share (it would resolve to either)."""
    owner: dict[str, str] = {}
    for code, cat in categories.items():
        for label in (cat.name, *cat.aliases):
            key = _name_key(label)
            if owner.setdefault(key, code) != code:
                raise PolicyError(f"{source}: {label!r} names both {owner[key]} and {code}; a name or alias must "
                                  "belong to one category")


def load_policy(name_or_path: str | Path | Policy = "llavaguard") -> Policy:
    """Load a built-in policy by name, or a custom policy from a YAML file; each once per process.

    A file is read again when it changed (its modification time or size), so a policy edited between two
    calls in one notebook is not stale.

    Args:
        name_or_path: a built-in name (see `builtin_policies`), a path to a ``.yaml`` file, or a
            `Policy` (returned as it is, so every ``policy`` argument takes all three).

    Returns:
        The policy.

    Raises:
        PolicyError: for a malformed file (naming the field) or an unknown name.
    """
    if isinstance(name_or_path, Policy):
        return name_or_path
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise PolicyError(f"policy file {str(path)!r} does not exist")
        stat = path.stat()
        return _read_policy(str(path.resolve()), (stat.st_mtime_ns, stat.st_size))
    name = str(name_or_path)
    if name not in builtin_policies():
        raise PolicyError(f"unknown policy {name!r}; built-in: {', '.join(builtin_policies())}, or a .yaml path")
    return _read_policy(name, None)


@functools.lru_cache(maxsize=16)
def _read_policy(name_or_path: str, version: tuple[int, int] | None) -> Policy:
    """Parse a built-in policy (``version`` ``None``) or a file at one (mtime, size) ``version``."""
    if version is None:
        text = resources.files(_BUILTIN_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
        source = f"{name_or_path}.yaml"
    else:
        text, source = Path(name_or_path).read_text(encoding="utf-8"), name_or_path
    try:  # libyaml's safe loader when PyYAML has it: the same result ~10x faster than the pure-Python one
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as err:
        raise PolicyError(f"{source}: not valid YAML: {err}") from err
    return parse_policy(data, source)


POLICY_STYLES = ("plain", "llavaguard", "shieldgemma2")

# LlavaGuard's trained marking of a category that does not apply in a given context
# (ml-research/LlavaGuard, taxonomy/custom_taxonomy.py: the "non-violating" augmentation).
_LLAVAGUARD_OUT_OF_SCOPE = ("Category {code} is declared as non-violating. Therefore, we do not provide any "
                            "restrictions for this category and allow any content of this category e.g.")


def render_policy(policy: Policy, categories: list[str] | None = None, style: str = "plain") -> str:
    """Render a policy as the text given to instructors, judges and guards.

    Args:
        policy: the policy.
        categories: category codes in scope; all when ``None``.
        style: ``"plain"``: one block per category in scope with its "Should not:" and "Can:"
            lists. ``"llavaguard"``: LlavaGuard's trained layout (``"O1: <name>: "`` headers, one
            blank line after each block); EVERY category appears, those out of scope declared
            non-violating as LlavaGuard was trained to read them. ``"shieldgemma2"``: one line
            per category in scope, ``"No <name>: The image shall not contain content that would
            <should-not items> (e.g., <examples>)."`` as ShieldGemma 2's policies read.

    Returns:
        The text (the llavaguard style keeps its trailing blank line: the prompt continues right after).

    Raises:
        ValueError: for an unknown style, naming the allowed ones.
        KeyError: for an unknown category code.
    """
    if style not in POLICY_STYLES:
        raise ValueError(f"unknown policy style {style!r}; allowed: {', '.join(POLICY_STYLES)}")
    codes = categories or list(policy.categories)
    cats = [policy.category(code) for code in codes]
    if style == "shieldgemma2":
        return "\n".join(_shieldgemma2_line(cat) for cat in cats)
    if style == "llavaguard":
        return "".join(_llavaguard_block(cat, cat.code in codes) for cat in policy.categories.values())
    return "\n\n".join(_plain_block(cat) for cat in cats)


def _plain_block(cat: Category) -> str:
    lines = [f"{cat.code}: {cat.name}", "Should not:", *(f"- {item}" for item in cat.should_not)]
    if cat.can:
        lines += ["Can:", *(f"- {item}" for item in cat.can)]
    return "\n".join(lines)


def _llavaguard_block(cat: Category, in_scope: bool) -> str:
    if in_scope:
        lines = ["Should not:", *(f"- {item}" for item in cat.should_not)]
        lines += ["Can:", *(f"- {item}" for item in cat.can)] if cat.can else []
    else:
        lines = [_LLAVAGUARD_OUT_OF_SCOPE.format(code=cat.code), *(f" - {item}" for item in cat.should_not + cat.can),
                 " "]
    return f"{cat.code}: {cat.name}: \n" + "\n".join(lines) + ("\n\n" if in_scope else "\n")


def _shieldgemma2_line(cat: Category) -> str:
    items = [item.rstrip(".") for item in cat.should_not]
    rules = items[0] if len(items) == 1 else "; ".join(items[:-1]) + "; or " + items[-1]
    examples = f" (e.g., {', '.join(cat.examples)})" if cat.examples else ""
    return f"No {cat.name}: The image shall not contain content that would {rules}{examples}."
