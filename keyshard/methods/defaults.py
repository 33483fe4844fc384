"""Which methods keyshard uses by default, and the paper's numbers for them.

The one module outside the method modules that names methods: the demo's method, the sweep's
list and the paper's Table 1 (mIoU of FCN-ResNet50 with the correct key on PASCAL VOC2012 val,
1449 images) and the ciphertext-only benchmark's table behind key-info's and encrypt's warnings.
Everything else asks the registry (``keyshard.methods.names()``).
"""

import json
from pathlib import Path

# NP with M=8: the paper notes that SHF and NP at *small* block sizes still work fairly well
# without the key; at M=8 the small demo network learns the toy data with the key (mIoU 0.51-0.59
# over three keys) while plain images and wrong keys stay below 0.1.
DEMO_METHOD, DEMO_BLOCK_SIZE = "np", 8

# keyshard sweep --methods: the paper's three methods, in its order.
SWEEP_METHODS = ("shf", "np", "ffx")

# Table 1 of the paper: mIoU of FCN-ResNet50 with the correct key on VOC2012 val (1449 images).
PAPER_TABLE1 = {
    "shf": {2: 0.6597, 4: 0.5941, 8: 0.4723, 16: 0.2958, 32: 0.1575, 64: 0.0693, 128: 0.0600, 256: 0.0380},
    "np": {2: 0.6216, 4: 0.5695, 8: 0.5173, 16: 0.4329, 32: 0.3880, 64: 0.3733, 128: 0.3218, 256: 0.3007},
    "ffx": {2: 0.5271, 4: 0.4944, 8: 0.4651, 16: 0.3444, 32: 0.2763, 64: 0.2628, 128: 0.2417, 256: 0.2367},
}
PAPER_BASELINE = 0.7080  # the same model trained and tested on plain images

# Ciphertext-only estimation: the (method, M) whose keys benchmarks/bench_ciphertext_only.py saw
# fall to at most 16 keyed images (>= 99 % of pixels decrypting exactly).  The benchmark writes
# this file (--write-table); tests/test_ciphertext_only.py re-runs entries to hold it true;
# key-info and encrypt warn from it.
CIPHERTEXT_ONLY_TABLE = str(Path(__file__).resolve().parent / "ciphertext_only.json")


def ciphertext_only_entry(method: str, block_size: int) -> dict | None:
    """The benchmark's entry for (method, M): the fewest keyed images that gave >= 99 % of pixels
    exactly, or None when it did not measure that or did not see it happen."""
    path = Path(CIPHERTEXT_ONLY_TABLE)
    if not path.is_file():
        return None
    for entry in json.loads(path.read_text())["entries"]:
        if (entry["method"], entry["block_size"]) == (method, block_size):
            return entry
    return None


def ciphertext_only_warning(method: str, block_size: int) -> str | None:
    """One warning line for a (method, M) the benchmark saw fall to ciphertext-only estimation."""
    entry = ciphertext_only_entry(method, block_size)
    if entry is None:
        return None
    return (f"ciphertext-only: keyed images give {method} M={block_size} keys away — from {entry['images']} keyed "
            f"image(s) the benchmark decrypted {100 * entry['pixels_exact']:.1f} % of pixel values exactly without the key; "
            "keep every keyed image (shards, queries to a model) as secret as the key")
