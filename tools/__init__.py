"""Operator tools: the `fedfusion` command, run reports, plots and round tables, predictions,
deployment credentials. They import the core; the core never imports them."""
