"""keyshard: block-wise secret-key encryption of segmentation datasets into WebDataset shards.

The public Python API is exported lazily (PEP 562): ``import keyshard`` loads no torch or
webdataset; each name imports its module on first use.

* ``read_manifest(source, trust=None)`` — manifest.json of a shard directory or URL base,
  schema-checked, as a ``keyshard.manifest.Manifest`` of frozen records (``.raw``: the JSON).
* ``open_shards(source, split, *, batch_size, ...)`` — one rank's batches
  ``(pixels, targets, ids, n_padding)``; the loader ``keyshard train`` uses.
* ``model_input(pixels, manifest, device)`` — stored pixels → normalised float NCHW on the device.
* ``load_key(path)``, ``encrypt_image(array, key)``, ``decrypt_image(array, key)``.
* ``load_predictor(checkpoint, key=None, device=None)`` — a model and its key, ready for new
  images: ``.predict(images)`` gives label maps or class probabilities (``keyshard predict``).
"""

from typing import TYPE_CHECKING

__version__ = "0.2.0"

if TYPE_CHECKING:  # the same names for type checkers and the API docs; at run time see __getattr__
    from keyshard.evaluate.predict import load_predictor
    from keyshard.keys import load as load_key
    from keyshard.manifest import read as read_manifest
    from keyshard.train.data import model_input, open_shards
    from keyshard.transforms import decrypt_image, encrypt_image

_EXPORTS = {
    "read_manifest": ("keyshard.manifest", "read"),
    "open_shards": ("keyshard.train.data", "open_shards"),
    "model_input": ("keyshard.train.data", "model_input"),
    "load_key": ("keyshard.keys", "load"),
    "encrypt_image": ("keyshard.transforms", "encrypt_image"),
    "decrypt_image": ("keyshard.transforms", "decrypt_image"),
    "load_predictor": ("keyshard.evaluate.predict", "load_predictor"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keyshard' has no attribute {name!r}")
    import importlib

    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
