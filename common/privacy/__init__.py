"""Differential privacy at a site: accounting, DP-SGD, the site's policy and its enforcement,
the ledger and receipts on disk, re-sending an update already charged, and the receipts audit."""
