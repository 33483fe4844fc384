"""Training on keyed shards: streaming loader, models, training loop, checkpoints (keyshard.train)."""
