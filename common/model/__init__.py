"""The fusion model: encoders, fusion modes, trainable set, frozen-feature caching, checkpoints."""
