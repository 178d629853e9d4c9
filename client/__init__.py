"""The hospital node (Flower ClientApp)."""
