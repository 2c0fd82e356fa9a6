"""Validation: prove each edit is local, real and label-flipping, and decide each row's fate in one place."""
