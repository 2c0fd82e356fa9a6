"""Human review: the decisions store and the review app."""
