"""Data pipeline: VOC readers, the encryption job, manifests and verification (keyshard.pipeline)."""

from keyshard.images import MAX_PIXELS  # noqa: F401  (the largest image encrypt accepts; defined in the core)
