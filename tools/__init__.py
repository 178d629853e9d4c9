"""Operator tools: the `fedfusion` command, run reports, predictions and their explanations, the
privacy audit. They import the core (round tables, plots and credentials live there:
`common.views`, `common.certs`); the core never imports them."""
