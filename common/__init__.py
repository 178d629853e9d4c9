"""FedFusion core: model, data, training, privacy and configuration (no Flower imports)."""
