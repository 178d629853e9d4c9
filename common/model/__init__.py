"""The fusion model: encoders, fusion modes, the trainable set, frozen-feature caching, checkpoints."""
