"""Workflows that combine training and evaluation: train-then-score one run, and the
``reproduce`` grid of runs (models x seeds x folds) with its Table I."""
