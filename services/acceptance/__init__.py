"""The acceptance gate: a model the eval judged against `eval.acceptance` is imported or served only if it passed."""
