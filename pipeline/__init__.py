"""Data pipeline: VOC readers, the encryption job, manifests and verification (keyshard.pipeline)."""

# Largest image or label map (width × height, read from the file's header before anything is
# decoded) that ``encrypt`` accepts: Pillow's own default ``Image.MAX_IMAGE_PIXELS``
# (1024³ // 4 // 3, about 9500 × 9500).  ``encrypt --max-pixels`` changes it.
MAX_PIXELS = 89_478_485
