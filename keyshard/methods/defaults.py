"""Which methods keyshard uses by default, and the paper's numbers for them.

The one module outside the method modules that names methods: the demo's method, the sweep's
list and the paper's Table 1 (mIoU of FCN-ResNet50 with the correct key on PASCAL VOC2012 val,
1449 images).  Everything else asks the registry (``keyshard.methods.names()``).
"""

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
