"""Evaluation: guards over a release, metrics, natural images vs pairs, caveats and the report."""
