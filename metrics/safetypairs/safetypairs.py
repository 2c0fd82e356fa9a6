"""`evaluate` wrapper around `safetypairs.compute_metrics` (load with evaluate.load("<path>/metrics/safetypairs"))."""

import datasets
import evaluate

from safetypairs.metrics import compute_metrics

_DESCRIPTION = """Guard metrics on SafetyPairs counterfactual image pairs: per image (accuracy, balanced accuracy,
precision, recall, specificity, F1 with unsafe as the positive class, AUROC), per pair (pair accuracy, same-label
rate, flip-detection rate), per category, control images, and 95% bootstrap CIs over pairs."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: "safe" / "unsafe" / "unknown" (strings) per image; unknown counts as an error.
    references: "safe" / "unsafe" per image.
    pair_ids: the pair each image belongs to.
    categories (optional): policy category code per image.
    scores (optional): higher = more unsafe, per image (None where missing); enables AUROC and ROC.
    roles (optional): "original" / "edited" / "control" per image; controls are reported apart.
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

    def _compute(self, predictions, references, pair_ids, categories=None, scores=None, roles=None,
                 similarity=None, n_bootstrap=1000, seed=0):
        return compute_metrics(predictions, references, pair_ids, categories=categories, scores=scores, roles=roles,
                               similarity=similarity, n_bootstrap=n_bootstrap, seed=seed)
