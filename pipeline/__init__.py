"""Data pipeline: VOC readers, the encryption job, manifests and verification (keyshard.pipeline)."""
