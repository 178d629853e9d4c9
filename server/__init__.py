"""The coordinator (Flower ServerApp and strategy)."""
