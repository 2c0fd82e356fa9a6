"""Dataset card for a release: Hub YAML metadata plus a body generated from the data."""

from __future__ import annotations

import logging
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import DatasetInfo, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, DatasetCardData
from PIL import Image, ImageDraw

from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.evaluate.caveats import approximated_editors, unchecked_flips
from safetypairs.images import ImageError, load_image

if TYPE_CHECKING:
    from safetypairs.release.assemble import Release, ReleaseConfig

logger = logging.getLogger(__name__)

TEMPLATE = "dataset_card.md.jinja"  # package data; dataset_card/README.md.jinja links here
GRID_PATH = "assets/example_grid.jpg"
GRID_CELL = 256
PAPER = "2510.21120"
GATED_PROMPT = (
    "This dataset contains images that violate content-safety policies (hate, violence, nudity and "
    "other harmful material), released for research on image-safety classifiers. By requesting access "
    "you agree to use it only for research that aims to make AI systems safer, not to redistribute the "
    "unsafe images outside your research group, and not to use them to train models that generate "
    "harmful content."
)
GATED_FIELDS = {
    "Name": "text",
    "Affiliation": "text",
    "Intended use": "text",
    "I agree to use this dataset for AI-safety research only and not to redistribute the unsafe images": "checkbox",
}
TAGS = ["safety", "content-moderation", "counterfactual", "image-editing", "not-for-all-audiences"]


def template_path() -> Path:
    """The card template shipped with the package (works from a checkout and an installed wheel)."""
    return Path(str(resources.files("safetypairs") / "templates" / TEMPLATE))


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` examples."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    return next((label for bound, label in bounds if n < bound), "1M<n<10M")


def card_data(release: Release, out_dir: Path, config: ReleaseConfig) -> DatasetCardData:
    """The card's YAML: license, tasks, size, ``configs`` with data files, ``dataset_info`` and gating fields.

    Args:
        release: the assembled configs.
        out_dir: the release folder (its parquet files give the download sizes).
        config: license and title.

    Returns:
        A `DatasetCardData` the Hub accepts.
    """
    from safetypairs.engine.datafiles import data_files
    from safetypairs.release.assemble import DEFAULT_CONFIG

    configs, infos = [], DatasetInfosDict()
    for name, splits in release.configs.items():
        entry: dict[str, Any] = {"config_name": name,
                                 "data_files": [{"split": s, "path": f"data/{name}/{s}-*"} for s in splits]}
        if name == DEFAULT_CONFIG:
            entry["default"] = True
        configs.append(entry)
        split_dict = SplitDict()
        for split, ds in splits.items():
            split_dict.add(SplitInfo(name=split, num_bytes=sum(f.stat().st_size for f in data_files(out_dir, name, split)),
                                     num_examples=len(ds)))
        infos[name] = DatasetInfo(features=next(iter(splits.values())).features, splits=split_dict,
                                  download_size=sum(s.num_bytes for s in split_dict.values()),
                                  dataset_size=sum(s.num_bytes for s in split_dict.values()))
    n_images = sum(len(ds) for ds in release["images"].values())
    data = DatasetCardData(
        license=config.license, pretty_name=config.pretty_name, task_categories=["image-classification"],
        task_ids=["multi-class-image-classification"], size_categories=[size_category(n_images)], tags=TAGS,
        configs=configs, extra_gated_prompt=GATED_PROMPT, extra_gated_fields=dict(GATED_FIELDS),
    )
    infos.to_dataset_card_data(data)
    return data


def _category_names(policies: list[str]) -> dict[str, str]:
    """Category code -> name from the release's policies (codes only when a policy is not built in)."""
    from safetypairs.policy import load_policy

    names: dict[str, str] = {}
    for pid in policies:
        try:
            policy = load_policy(pid.split("@")[0])
        except (ValueError, FileNotFoundError, KeyError) as err:
            logger.debug("policy %s not resolvable for the card: %s", pid, err)
            continue
        names.update({code: cat.name for code, cat in policy.categories.items()})
    return names


def card_stats(release: Release) -> dict[str, Any]:
    """Numbers the card body shows, read from non-image columns only.

    Args:
        release: the assembled configs.

    Returns:
        Category counts per split, role/label counts, provenance (policies, editors, instructors),
        rejection reasons and how many pairs validation composited.
    """
    pairs = release["pairs"]
    splits = list(pairs)
    per_split = {s: Counter(pairs[s][S.CATEGORY]) for s in splits}
    categories = sorted(set().union(*per_split.values()), key=str) if per_split else []  # str: null sorts too
    names = S.IMAGE_FEATURES[S.LABEL].names
    roles: Counter = Counter()
    for ds in release["images"].values():
        roles.update(zip(S.role_names(ds[S.ROLE]), (names[i] for i in ds[S.LABEL])))

    def distinct(col: str) -> list[str]:
        return sorted({v for ds in pairs.values() for v in ds[col] if v})

    policies = distinct(S.POLICY)
    rejected = release.configs.get("rejected")
    reasons = Counter(rejected["test"][S.REJECT_REASON]) if rejected else Counter()
    cat_names = _category_names(policies)
    unchecked = unchecked_flips([v for ds in pairs.values() for v in ds[S.LABEL_FLIP_CHECKED]],
                                [v for ds in pairs.values() for v in ds[S.JUDGE]])
    rows = [{"code": c, "name": cat_names.get(c, ""), "counts": [per_split[s][c] for s in splits],
             "total": sum(per_split[s][c] for s in splits)} for c in categories]
    return {
        "splits": splits, "category_rows": rows, "n_pairs": sum(len(ds) for ds in pairs.values()),
        "n_images": sum(roles.values()), "roles": sorted(roles.items()), "policies": policies,
        "editors": distinct(S.EDITOR), "approximated": approximated_editors(distinct(S.EDITOR)), "instructors": distinct(S.INSTRUCTOR), "judges": distinct(S.JUDGE),
        "unchecked_flips": unchecked, "composited": release.composited,
        "has_control": any(role == "control" for role, _ in roles), "reasons": [(r, n, ST.meaning(r)) for r, n in reasons.most_common()],
        "split_totals": [len(pairs[s]) for s in splits], "configs": list(release.configs),
    }


def render_card(
    release: Release,
    out_dir: str | Path,
    config: ReleaseConfig,
    *,
    funnel: list[dict[str, Any]] | None = None,
    grid: str | None = None,
) -> DatasetCard:
    """Render the dataset card from the template.

    Args:
        release: the assembled configs (counts come from their non-image columns).
        out_dir: the release folder (already holding ``data/``).
        config: license, title and split options.
        funnel: the pipeline's stage results (``{stage, rows_in, rows_out, statuses}`` dicts), if any.
        grid: the example grid's path relative to ``out_dir``, if one was written.

    Returns:
        A `huggingface_hub.DatasetCard` (``.save(path)`` writes README.md).
    """
    data = card_data(release, Path(out_dir), config)
    return DatasetCard.from_template(
        data, template_path=str(template_path()), stats=card_stats(release), pipeline_funnel=funnel or [],
        release_funnel=release.funnel, grid=grid, paper=PAPER, split_by=config.split_by,
        test_size=config.test_size, review=release.review,
    )


def _grid_rows(release: Release, n: int) -> list[int]:
    """Up to ``n`` row indices of the first pairs split, one category at a time (round robin)."""
    ds = next(iter(release["pairs"].values()))
    by_cat: dict[str, list[int]] = {}
    for i, cat in enumerate(ds[S.CATEGORY]):
        by_cat.setdefault(cat, []).append(i)
    queues = [by_cat[c] for c in sorted(by_cat, key=str)]  # str: a null category sorts too
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def _cell(value: Any, caption: str) -> Image.Image:
    cell = Image.new("RGB", (GRID_CELL, GRID_CELL + 20), "white")
    try:
        image = None if value is None else load_image(value)
    except ImageError as err:
        logger.warning("example grid: %s: %s", caption, err)
        image, caption = None, f"{caption} (unreadable)"
    if image is not None:
        image.thumbnail((GRID_CELL, GRID_CELL))
        cell.paste(image, ((GRID_CELL - image.width) // 2, 20 + (GRID_CELL - image.height) // 2))
    ImageDraw.Draw(cell).text((4, 4), caption, fill="black")
    return cell


def write_example_grid(release: Release, out_dir: str | Path, n: int) -> str | None:
    """Write a JPEG grid of up to ``n`` pairs (original | edited | control) for the card.

    Args:
        release: the assembled configs.
        out_dir: the release folder.
        n: how many pairs (0 writes nothing).

    Returns:
        The grid's path relative to ``out_dir`` (`GRID_PATH`), or ``None`` when no pair was shown.
    """
    pairs = next(iter(release["pairs"].values()), None)
    rows = _grid_rows(release, n) if pairs is not None and n > 0 else []
    if not rows:
        return None
    sample = pairs.select(rows)
    grid = Image.new("RGB", (3 * GRID_CELL, len(rows) * (GRID_CELL + 20)), "white")
    for r, row in enumerate(sample):
        tag = f"{row[S.CATEGORY]} {row[S.PAIR_ID]}"
        cells = [(row[S.UNSAFE_IMAGE], f"unsafe original {tag}"), (row[S.SAFE_IMAGE], "safe edit"),
                 (row[S.CONTROL_IMAGE], "unsafe control" if row[S.CONTROL_IMAGE] is not None else "no control")]
        for c, (value, caption) in enumerate(cells):
            grid.paste(_cell(value, caption), (c * GRID_CELL, r * (GRID_CELL + 20)))
    path = Path(out_dir) / GRID_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, quality=90)
    return GRID_PATH


# The card's YAML key holding the recipe that built the release (`safetypairs build --from-release` reads it).
RECIPE_KEY = "safetypairs_recipe"


def add_provenance(folder: str | Path, recipe: dict[str, Any], command: str) -> Path:
    """Put the resolved recipe into a release's card: under `RECIPE_KEY` in its YAML header (the Hub keeps keys it
    does not know) and as a Provenance section saying how to rebuild it. ``README.md`` is rewritten whole.

    Args:
        folder: a release folder (its ``README.md`` written by `render_card`).
        recipe: the resolved recipe as plain data (every default filled, versions, model revisions).
        command: the command that rebuilds the release from its card.

    Returns:
        The card's path.
    """
    import yaml

    path = Path(folder) / "README.md"
    card = DatasetCard.load(path)
    card.data[RECIPE_KEY] = recipe
    body = card.text.split("\n## Provenance\n")[0].rstrip("\n")
    text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    card.text = (f"{body}\n\n## Provenance\n\nBuilt by `safetypairs build` from this recipe (every default filled "
                 f"in; library versions and model revisions where known). Rebuild it with `{command}`.\n\n"
                 f"```yaml\n{text}```\n")
    tmp = path.with_name(".README.md.tmp")
    card.save(tmp)
    tmp.replace(path)
    return path


def recorded_recipe(card_path: str | Path) -> dict[str, Any]:
    """The recipe a release's card records under `RECIPE_KEY`.

    Raises:
        ValueError: when the card records none (a release not made by ``safetypairs build``).
    """
    data = DatasetCard.load(card_path).data.to_dict()
    if not isinstance(data.get(RECIPE_KEY), dict):
        raise ValueError(f"{card_path}: the card records no recipe ({RECIPE_KEY}); was it made by safetypairs build?")
    return data[RECIPE_KEY]
