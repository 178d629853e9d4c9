"""Local training and evaluation loops, classification metrics, progress reporting."""
