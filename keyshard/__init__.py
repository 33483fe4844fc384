"""keyshard: block-wise secret-key encryption of segmentation datasets into WebDataset shards."""

__version__ = "0.1.0"
