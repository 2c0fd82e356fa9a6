"""`evaluate` wrapper around `safetypairs.compute_metrics` (load with evaluate.load("<path>/metrics/safetypairs"))."""

import datasets
import evaluate

from safetypairs.evaluate.metrics import compute_metrics, label_names

_DESCRIPTION = """Guard metrics on SafetyPairs counterfactual image pairs: per image (accuracy, balanced accuracy,
precision, recall, specificity, F1 with unsafe as the positive class, AUROC), per pair (pair accuracy, same-label
rate, flip-detection rate), per category, control images, and 95% bootstrap CIs over pairs."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per image "safe" / "unsafe" / "unknown", 0 (safe) / 1 (unsafe), booleans (True = unsafe),
        or a numpy array of these; anything else is unknown and counts as an error.
    references: per image "safe" / "unsafe", 0 / 1 (the images config's `label` ClassLabel), booleans or an array.
    pair_ids: the pair each image belongs to.
    categories (optional): policy category code per image.
    scores (optional): higher = more unsafe, per image (None where missing); enables AUROC and ROC.
    roles (optional): "original" / "edited" / "control" (or the images config's ClassLabel ints) per image;
        controls are reported apart. Pass them: without roles, controls count as unsafe originals.
    similarity (optional): {name: per-image values} correlated with pair errors.
    n_bootstrap (optional, 1000), seed (optional, 0): bootstrap settings.
Returns:
    Exactly the dict of safetypairs.compute_metrics.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SafetyPairs(evaluate.Metric):
    """SafetyPairs guard metrics."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="SafetyPairs (arXiv 2510.21120)",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Value("string"),
                "pair_ids": datasets.Value("string"),
            }),
            reference_urls=["https://arxiv.org/abs/2510.21120"],
        )

    def compute(self, *, predictions=None, references=None, pair_ids=None, **kwargs):
        """Labels as strings before `evaluate` checks them against the string features (ints, bools, arrays)."""
        return super().compute(predictions=label_names(predictions, "predictions", allow_unknown=True),
                               references=label_names(references, "references", allow_unknown=False),
                               pair_ids=[str(p) for p in pair_ids], **kwargs)

    def _compute(self, predictions, references, pair_ids, categories=None, scores=None, roles=None,
                 similarity=None, n_bootstrap=1000, seed=0):
        return compute_metrics(predictions, references, pair_ids, categories=categories, scores=scores, roles=roles,
                               similarity=similarity, n_bootstrap=n_bootstrap, seed=seed)
