"""Recipes: one YAML file that describes a whole benchmark build, checked before anything runs, and its plan.

A recipe has one section per stage (``generate``, ``validate``, ``release``, ``evaluate``, ``sample-efficiency``);
each section's fields are the stage command's own options, by the same names (``editor_options`` is
``--editor-options``), declared once by the command line and handed here as `Field` records, so an option added to
a command is a recipe field at once. The build sets what links the stages (each stage's ``--out`` is ``DIR/<stage>``,
and its input is the stage before it's folder). Top-level ``policy``, ``device`` and ``max_pixels`` fill every
section that has the option and does not set it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The stages a build runs, in order; `REVIEW` is the gate before `release` when it requires a review.
STAGES = ("generate", "validate", "release", "evaluate", "sample-efficiency")
REVIEW = "review"
# stage -> (its option that reads the previous stage's folder, that stage): the build sets it.
LINKS = {"validate": ("input", "generate"), "release": ("input", "validate"), "evaluate": ("dataset", "release"),
         "sample-efficiency": ("pairs", "release")}
# Options every stage's folder takes from the build (``DIR/<stage>``, replaced when its settings change).
MANAGED = ("out", "overwrite")
# Top-level fields that fill each section that has the option and leaves it unset.
SHARED = ("policy", "device", "max_pixels")
# Fields that name a backend, by kind: checked against the registry (an unknown alias, a missing model id).
SPEC_KINDS = {"instructor": "instructors", "editor": "editors", "judge": "judges", "lpips": "encoders",
              "clip": "encoders", "guard": "guards", "encoder": "encoders"}
# The stages whose run is only done once reviewers decided: `REVIEW` stands before `release` when it is required.
GATE_FIELD = ("release", "require_review")
STATE_FILE = "build.json"
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # the built-in recipes (package data; the repo links recipes/ here)
KINDS = {"bool": bool, "int": int, "float": float, "str": str, "list": list}


class RecipeError(ValueError):
    """A recipe that cannot be built: one line naming the field or the file."""


@dataclass(frozen=True)
class Field:
    """One option of a stage command, as its parser declares it.

    Args:
        name: the option's name in the recipe (``editor_options``), the command's ``dest``.
        flag: the command-line flag (``--editor-options``).
        kind: ``bool`` (a switch), ``int``, ``float``, ``str`` or ``list`` (a repeatable option of strings).
        default: the command's default.
        required: the command requires it.
        choices: the allowed values, if the command restricts them.
        help: the command's help text.
    """

    name: str
    flag: str
    kind: str
    default: Any = None
    required: bool = False
    choices: tuple[Any, ...] | None = None
    help: str = ""

    def check(self, where: str, value: Any) -> Any:
        """``value`` if it has this field's type and is allowed (an int is a float too).

        Raises:
            RecipeError: naming ``where`` (``stage.field``), the type and the value.
        """
        if value is None and not self.required:
            return None
        want = KINDS[self.kind]
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if self.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if self.kind == "list" and ok:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            what = {"list": "a list of strings", "int": "an integer", "float": "a number", "bool": "true or false",
                    "str": "a string"}[self.kind]
            raise RecipeError(f"{where} must be {what} ({self.flag}), got {value!r}")
        if self.choices and value not in self.choices:
            raise RecipeError(f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        return value

    def argv(self, value: Any) -> list[str]:
        """The command-line words that give this field ``value``."""
        if value is None or (self.kind == "bool" and not value):
            return []
        if self.kind == "bool":
            return [self.flag]
        if self.kind == "list":
            return [w for v in value for w in (self.flag, v)]
        return [self.flag, str(value)]


Schema = Mapping[str, tuple[Field, ...]]


@dataclass(frozen=True)
class Recipe:
    """A checked recipe: its name, each stage's fields (as written, or every default filled by `resolve`), and the
    provenance a release recorded (library versions, model revisions), if any."""

    name: str
    stages: dict[str, dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)

    def fields(self, stage: str) -> dict[str, Any]:
        """The stage's fields (empty when the recipe has no such stage)."""
        return self.stages.get(stage, {})

    @property
    def review_required(self) -> bool:
        """The release takes only pairs reviewers accepted, so the build stops until they have decided."""
        return bool(self.fields(GATE_FIELD[0]).get(GATE_FIELD[1]))


def _hint(word: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(word, allowed, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"


def _stage_fields(schema: Schema, stage: str) -> dict[str, Field]:
    return {f.name: f for f in schema[stage] if f.name not in MANAGED and f.name != LINKS.get(stage, ("",))[0]}


def from_mapping(data: Any, schema: Schema, where: str = "recipe") -> Recipe:
    """Check a parsed recipe (unknown fields with a "did you mean", types, choices, required fields) and apply the
    top-level shared fields.

    Raises:
        RecipeError: one line naming the field (``where`` names the file).
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: a recipe is a mapping of stage sections, got {type(data).__name__}")
    known = ["name", "provenance", *SHARED, *STAGES]
    for key in data:
        if key not in known:
            raise RecipeError(f"{where}: unknown field {key!r}{_hint(str(key), known)}")
    if not any(stage in data for stage in STAGES):
        raise RecipeError(f"{where}: no stage section; a recipe has at least one of {', '.join(STAGES)}")
    shared = {k: data[k] for k in SHARED if data.get(k) is not None}
    stages = {}
    for stage in STAGES:
        if stage in data:
            stages[stage] = _check_section(stage, data[stage] or {}, schema, shared, where)
    for stage, (_, before) in LINKS.items():
        if stage in stages and before not in stages:
            raise RecipeError(f"{where}: {stage} reads the folder {before} writes; the recipe needs a {before} section")
    name = data.get("name", "recipe")
    if not isinstance(name, str):
        raise RecipeError(f"{where}: name must be a string, got {name!r}")
    provenance = data.get("provenance") or {}
    return Recipe(name=name, stages=stages, provenance=dict(provenance))


def _check_section(stage: str, section: Any, schema: Schema, shared: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(section, Mapping):
        raise RecipeError(f"{where}: {stage} must be a mapping of its options, got {section!r}")
    fields = _stage_fields(schema, stage)
    out: dict[str, Any] = {}
    for key, value in section.items():
        name = str(key).replace("-", "_")
        if name in MANAGED or name == LINKS.get(stage, ("",))[0]:
            raise RecipeError(f"{where}: {stage}.{name} is set by the build (each stage writes DIR/{stage} and "
                              "reads the stage before it)")
        if name not in fields:
            raise RecipeError(f"{where}: unknown field {stage}.{name}{_hint(name, sorted(fields))}")
        out[name] = fields[name].check(f"{where}: {stage}.{name}", value)
    for key, value in shared.items():
        if key in fields and key not in out:
            out[key] = fields[key].check(f"{where}: {key}", value)
    for name, spec in fields.items():
        if spec.required and out.get(name) is None:
            raise RecipeError(f"{where}: {stage}.{name} is required ({spec.flag}: {spec.help})")
    return out


def load(path: str | Path, schema: Schema) -> Recipe:
    """Read and check a recipe YAML file (or the name of a built-in recipe in ``recipes/``).

    Raises:
        RecipeError: for a missing file, YAML that does not parse, or a field `from_mapping` refuses.
    """
    file = Path(path)
    if not file.is_file() and (RECIPES_DIR / f"{path}.yaml").is_file():
        file = RECIPES_DIR / f"{path}.yaml"
    if not file.is_file():
        builtin = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise RecipeError(f"recipe {str(path)!r} is not a file here nor a built-in recipe ({', '.join(builtin)})")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"{file}: not valid YAML: {' '.join(str(err).split())}") from err
    return from_mapping(data, schema, where=str(file))


def builtin(name: str) -> dict[str, Any]:
    """A built-in recipe (``recipes/<name>.yaml``) as written, as plain data; `from_mapping` checks it against the
    commands' options (every shipped recipe is checked in the tests)."""
    return yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


def resolve(recipe: Recipe, schema: Schema) -> Recipe:
    """The recipe with every field of each of its stages set (the commands' defaults filled in)."""
    stages = {stage: {name: values.get(name, spec.default) for name, spec in _stage_fields(schema, stage).items()}
              for stage, values in recipe.stages.items()}
    return Recipe(name=recipe.name, stages=stages, provenance=recipe.provenance)


def to_mapping(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (`from_mapping` reads it back), stages in build order."""
    data: dict[str, Any] = {"name": recipe.name}
    data.update({stage: dict(recipe.stages[stage]) for stage in STAGES if stage in recipe.stages})
    if recipe.provenance:
        data["provenance"] = recipe.provenance
    return data


def dump(recipe: Recipe) -> str:
    """The recipe as YAML text."""
    return yaml.safe_dump(to_mapping(recipe), sort_keys=False, allow_unicode=True)


def json_schema(schema: Schema) -> dict[str, Any]:
    """The JSON schema of a recipe (draft 2020-12): each stage's options with their types, defaults and help."""
    types = {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}

    def prop(spec: Field) -> dict[str, Any]:
        entry: dict[str, Any] = ({"type": "array", "items": {"type": "string"}} if spec.kind == "list"
                                 else {"type": [types[spec.kind], "null"]})
        entry["description"] = f"{spec.flag}: {spec.help}"
        if spec.choices:
            entry["enum"] = [*spec.choices, None]
        if spec.default is not None:
            entry["default"] = spec.default
        return entry

    stages = {stage: {"type": "object", "additionalProperties": False,
                      "properties": {n: prop(f) for n, f in _stage_fields(schema, stage).items()},
                      "required": [n for n, f in _stage_fields(schema, stage).items() if f.required]}
              for stage in STAGES}
    shared = {name: prop(next(f for s in STAGES for f in schema[s] if f.name == name)) for name in SHARED}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "safetypairs recipe",
            "type": "object", "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "provenance": {"type": "object"}, **shared, **stages}}


def check_backends(recipe: Recipe) -> None:
    """Every field that names a backend names a registered one with what it needs (a model id), loading nothing.

    Raises:
        RecipeError: naming the field and the registry's reason.
    """
    from safetypairs.backends.registry import check_options

    for stage, values in recipe.stages.items():
        for name, kind in SPEC_KINDS.items():
            specs = values.get(name)
            for spec in specs if isinstance(specs, list) else [specs] if specs else []:
                options = dict(_pairs(values.get(f"{name}_options") or ""))
                try:
                    check_options(kind, spec, options)
                except (ValueError, TypeError) as err:
                    raise RecipeError(f"{stage}.{name}: {' '.join(str(err).split())}") from err


def _pairs(text: str) -> list[tuple[str, str]]:
    from safetypairs.backends.options import parse_options

    return list(parse_options(text).items())


def provenance(recipe: Recipe) -> dict[str, Any]:
    """What the recipe alone does not say: library versions and each named model's revision where known."""
    from safetypairs.backends.registry import model_info
    from safetypairs.engine.runner import library_versions

    models = {}
    for stage, values in recipe.stages.items():
        for name, kind in SPEC_KINDS.items():
            specs = values.get(name)
            for spec in specs if isinstance(specs, list) else [specs] if specs else []:
                info = model_info(kind, spec)
                if "model" in info:
                    models[f"{stage}.{name}:{spec}"] = {"model": info["model"], "revision": info["revision"]}
    return {"versions": library_versions(), "models": models}


@dataclass(frozen=True)
class Step:
    """One stage of a build's plan.

    Attributes:
        stage: the stage (or `REVIEW`, the gate).
        action: ``run``, ``reuse``, ``gate`` or ``stop`` (after ``--until``).
        reason: why, in words.
        key: the hash of the stage's settings and of every stage before it (what `STATE_FILE` records).
    """

    stage: str
    action: str
    reason: str
    key: str = ""

    def render(self) -> str:
        """One line of ``--dry-run``."""
        return f"{self.stage:<18} {self.action:<6} {self.reason}"


def stage_keys(recipe: Recipe) -> dict[str, str]:
    """Per stage, a hash of its resolved fields and of the stages it reads (so a change upstream changes it)."""
    keys: dict[str, str] = {}
    previous = ""
    for stage in STAGES:
        if stage not in recipe.stages:
            continue
        text = json.dumps([stage, recipe.stages[stage], previous], sort_keys=True, default=str)
        keys[stage] = previous = hashlib.sha256(text.encode()).hexdigest()[:16]
    return keys


def read_state(out: str | Path) -> dict[str, Any]:
    """The build folder's record of its finished stages (``{stage: {"key", "fields"}}``)."""
    path = Path(out) / STATE_FILE
    return json.loads(path.read_text()).get("stages", {}) if path.is_file() else {}


def record_stage(out: str | Path, stage: str, key: str, fields: dict[str, Any]) -> None:
    """Note in `STATE_FILE` that ``stage`` finished with ``key`` (written whole: temp file + rename)."""
    path = Path(out) / STATE_FILE
    state = read_state(out)
    state[stage] = {"key": key, "fields": fields}
    tmp = path.with_name(f".{STATE_FILE}.tmp")
    tmp.write_text(json.dumps({"stages": state}, indent=1, sort_keys=True, default=str))
    tmp.replace(path)


def plan(recipe: Recipe, out: str | Path, *, start: str | None = None, until: str | None = None) -> list[Step]:
    """Which stages run and which are reused, and why, for a resolved recipe built into ``out``.

    A stage is reused when ``out/<stage>`` holds its finished run with the same settings and every stage before it
    is reused too; stages before ``start`` are taken as they are (they must be finished); stages after ``until``
    stop. The runner's fingerprints still decide each run stage's rows (an unfinished run resumes its chunks).

    Raises:
        RecipeError: for a ``start`` / ``until`` that is not a stage of the recipe, or a stage before ``start``
            that has not finished.
    """
    order = [s for s in STAGES if s in recipe.stages]
    for flag, value in (("--from", start), ("--until", until)):
        if value is not None and value not in order:
            raise RecipeError(f"{flag} {value!r} is not a stage of this recipe ({', '.join(order)})")
    keys, state, root = stage_keys(recipe), read_state(out), Path(out)
    steps: list[Step] = []
    upstream_runs = stopped = False
    for stage in order:
        done = state.get(stage, {})
        finished = bool(done) and (root / stage).is_dir()
        if stage == "release" and recipe.review_required and not stopped:
            steps.append(Step(REVIEW, "gate", "release --require-review: reviewers decide on the validated pairs"))
        if stopped:
            steps.append(Step(stage, "stop", "after --until"))
            continue
        if start is not None and order.index(stage) < order.index(start):
            if not finished:
                raise RecipeError(f"--from {start}: {stage} has not finished in {root / stage}; build without --from")
            steps.append(Step(stage, "reuse", "before --from (taken as it is)", keys[stage]))
        elif finished and done.get("key") == keys[stage] and not upstream_runs:
            steps.append(Step(stage, "reuse", "finished with the same settings and input", keys[stage]))
        else:
            upstream_runs = True
            steps.append(Step(stage, "run", _why(stage, done, finished, recipe, root, steps), keys[stage]))
        stopped = stage == until
    return steps


def _why(stage: str, done: dict[str, Any], finished: bool, recipe: Recipe, root: Path, steps: list[Step]) -> str:
    """Why a stage runs: no run yet, an unfinished run to resume, changed settings, or a stage before it runs."""
    ran = [s.stage for s in steps if s.action == "run"]
    if ran:
        return f"its input changes ({ran[-1]} runs)"
    if not done or not finished:
        partial = root / f"{stage}.partial"
        return "resumes its unfinished run (finished chunks are kept)" if partial.is_dir() else "no finished run"
    changed = sorted(k for k in set(done.get("fields", {})) | set(recipe.stages[stage])
                     if done.get("fields", {}).get(k) != recipe.stages[stage].get(k))
    return f"settings changed: {', '.join(changed)}" if changed else "settings changed"


def review_waiting(folder: str | Path, min_reviewers: int) -> tuple[int, int]:
    """How many automatically accepted candidates of a validate folder still lack ``min_reviewers`` decisions.

    Returns:
        ``(waiting, accepted)``.
    """
    from safetypairs import schema as S
    from safetypairs.engine.datafiles import read_rows
    from safetypairs.review.store import candidate_ids, load_review, read_decisions

    rows = read_rows(folder)
    accepted = [cid for cid, ok in zip(candidate_ids(rows), rows[S.ACCEPTED]) if ok]
    if not read_decisions(folder):
        return len(accepted), len(accepted)
    majorities = load_review(folder, rows, min_reviewers).majorities
    return sum(majorities[cid].n_reviewers < min_reviewers for cid in accepted), len(accepted)
