"""Local multi-hospital simulations on one machine."""
