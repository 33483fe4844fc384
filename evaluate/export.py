"""``keyshard export``: a protected model (or its key transform) as one self-contained ONNX file.

Three forms, named in each file's metadata (``form``):

* ``keyed-input`` (:func:`export_model` without a key): the model takes *keyed* pixels, N×H×W×3
  in the storage dtype (uint8; uint16 codes for FFX).  It holds no key: as secret as a checkpoint.
* ``transform-only`` (:func:`export_transform`): the key transform alone, uint8 N×H×W×3 in,
  keyed pixels out, equal to ``keyshard.encrypt_image`` bit for bit — for clients in any language.
* ``include-key`` (:func:`export_model` with ``include_key``): transform, then model; it takes
  plain uint8 images.

The last two *are* key material (whoever holds them can use or reproduce the key): they are
written with mode 0600.  No file ever holds the key's secret or FFX password; the metadata
carries the key's fingerprint.

How a file is built.  torch exports only the float model (normalised NCHW in, logits out; the
``torch.export``-based exporter, the TorchScript one where that fails), because torch handles
uint16 poorly.  The integer steps are written with ``onnx.helper``: the key transform (each
method's ``onnx_transform``, from the same compiled arrays as numpy and torch), the cast, the
pixel divisor, the ImageNet mean/std and NHWC→NCHW in front; argmax (segmentation) or softmax
(classification) behind.  ``onnx.compose.merge_models`` joins them, and the joined file is run in
onnxruntime against the torch pipeline before it is written (:func:`check`).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from keyshard import __version__, keys, methods, tasks
from keyshard.errors import KeyshardError
from keyshard.methods.onnx_graph import BATCH, INPUT, OPSET, OUTPUT
from keyshard.transforms import IMAGENET_MEAN, IMAGENET_STD, check_divisible, compile_plan

KEYED_INPUT, TRANSFORM_ONLY, INCLUDE_KEY = "keyed-input", "transform-only", "include-key"
KEY_MATERIAL_FORMS = (TRANSFORM_ONLY, INCLUDE_KEY)  # written with mode 0600
TOLERANCE = 1e-4      # largest |logit difference| allowed, as a fraction of the largest |logit|
CHECK_IMAGES = 2      # images export itself runs through onnxruntime and torch
_MODEL_IN, _MODEL_OUT = "model_input", "model_logits"
_BODY = "model/"      # prefix of the torch graph's names inside the joined file


@dataclass
class Exported:
    """What an export wrote: the ONNX model, its form and metadata, and the check's numbers
    (``max_abs_diff`` and ``max_abs_logit`` for models, ``bit_exact`` for a transform)."""

    model: object                 # onnx.ModelProto
    form: str
    metadata: dict[str, str]
    check: dict = field(default_factory=dict)
    exporter: str = ""
    path: Path | None = None

    @property
    def key_material(self) -> bool:
        return self.form in KEY_MATERIAL_FORMS


def require_onnx() -> None:
    """onnx and onnxruntime are the optional ``onnx`` extra: one line saying how to get them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise KeyshardError(f"exporting to ONNX needs the onnx extra (pip install 'keyshard[onnx]'): "
                            f"{exc.name} is not installed") from None


# -- the pieces ---------------------------------------------------------------------------------

def _model(graph, ir_version: int | None = None):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="keyshard",
                              producer_version=__version__)
    if ir_version is not None:
        model.ir_version = ir_version  # merge_models joins models of one IR version only
    return model


def transform_graph(material, size: int):
    """The key's ONNX transform (``pixels`` uint8 → ``keyed``) from its method, checked to have the
    promised input and output; a method without one is refused."""
    from onnx import TensorProto, helper

    method = methods.get(material.method)
    graph = method.onnx_transform(material, size, size)
    if graph is None:
        raise KeyshardError(f"method {method.name} has no ONNX form of its key transform; it cannot be exported")
    io_types = ([i.type.tensor_type.elem_type for i in graph.input], [o.type.tensor_type.elem_type for o in graph.output])
    if io_types != ([TensorProto.UINT8], [helper.np_dtype_to_tensor_dtype(np.dtype(method.storage_dtype))]):
        raise KeyshardError(f"method {method.name}: its ONNX transform must take uint8 pixels and give "
                            f"{np.dtype(method.storage_dtype).name} ones")
    graph.input[0].name, graph.output[0].name = INPUT, OUTPUT  # (names the protocol promises)
    return graph


def normalise_graph(size: int, dtype, divisor: int, source: str):
    """``source`` (dtype N×H×W×3) → ``model_input`` (float N×3×H×W): ÷ divisor, ImageNet mean/std,
    NHWC→NCHW — the very float operations of ``transforms.normalize_pixels``, in its order."""
    from onnx import TensorProto, helper, numpy_helper

    consts = {"ks_divisor": np.array(divisor, dtype=np.float32), "ks_mean": np.array(IMAGENET_MEAN, dtype=np.float32),
              "ks_std": np.array(IMAGENET_STD, dtype=np.float32)}
    nodes = [helper.make_node("Cast", [source], ["ks_float"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["ks_float", "ks_divisor"], ["ks_scaled"]),
             helper.make_node("Sub", ["ks_scaled", "ks_mean"], ["ks_centred"]),
             helper.make_node("Div", ["ks_centred", "ks_std"], ["ks_normalised"]),
             helper.make_node("Transpose", ["ks_normalised"], [_MODEL_IN], perm=[0, 3, 1, 2])]
    return helper.make_graph(
        nodes, "keyshard_normalise",
        [helper.make_tensor_value_info(source, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [BATCH, size, size, 3])],
        [helper.make_tensor_value_info(_MODEL_IN, TensorProto.FLOAT, [BATCH, 3, size, size])],
        [numpy_helper.from_array(v, name=k) for k, v in consts.items()])


def outputs_graph(task: str, num_classes: int, size: int):
    """``model_logits`` → ``logits`` and the task's prediction: ``labels`` (argmax over classes,
    int64) for a per-pixel task, ``probabilities`` (softmax) for one label per image."""
    from onnx import TensorProto, helper

    t = tasks.get(task)
    shape = [BATCH, num_classes, size, size] if t.per_pixel else [BATCH, num_classes]
    if t.prediction_op == "ArgMax":
        second = helper.make_node("ArgMax", ["logits"], [t.prediction], axis=1, keepdims=0)
        out = helper.make_tensor_value_info(t.prediction, TensorProto.INT64, [shape[0], *shape[2:]])
    else:
        second = helper.make_node(t.prediction_op, ["logits"], [t.prediction], axis=1)
        out = helper.make_tensor_value_info(t.prediction, TensorProto.FLOAT, shape)
    return helper.make_graph(
        [helper.make_node("Identity", [_MODEL_OUT], ["logits"]), second], "keyshard_outputs",
        [helper.make_tensor_value_info(_MODEL_OUT, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape), out])


class _Logits(torch.nn.Module):
    """A keyshard model (``{"out": logits}``) returning the logits tensor: what torch exports."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)["out"]


def torch_to_onnx(model, size: int):
    """The float model as an ONNX model (``model_input`` → ``model_logits``, dynamic batch), and
    which exporter made it: ``torch.export`` (needs onnxscript), else the TorchScript exporter."""
    wrapped = _Logits(model.cpu().eval()).eval()
    example = (torch.zeros(2, 3, size, size),)  # a batch of 2: a batch of 1 would be fixed in the graph
    common = dict(input_names=[_MODEL_IN], output_names=[_MODEL_OUT], opset_version=OPSET)
    failures = []
    with warnings.catch_warnings():  # no torch.no_grad(): under it, nn.Transformer takes a fused path
        # (aten::_transformer_encoder_layer_fwd) that the TorchScript exporter cannot write
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(wrapped, example, dynamo=True, external_data=False, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim(BATCH)},), **common)
            return program.model_proto, "torch.export"
        except Exception as exc:  # noqa: BLE001 - any failure: try the other exporter
            failures.append(f"torch.export: {_why(exc)}")
        try:
            import onnx

            buffer = io.BytesIO()
            torch.onnx.export(wrapped, example, buffer, dynamo=False,
                              dynamic_axes={_MODEL_IN: {0: BATCH}, _MODEL_OUT: {0: BATCH}}, **common)
            return onnx.load_from_string(buffer.getvalue()), "torchscript"
        except Exception as exc:  # noqa: BLE001
            failures.append(f"torchscript: {_why(exc)}")
    raise KeyshardError("the model could not be exported to ONNX (" + "; ".join(failures) + ")")


def _why(exc: Exception) -> str:
    """An exporter's failure in a few words: its type and the first line of its message."""
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def join(head, body, tail):
    """head → body → tail, one model: ``merge_models`` with the torch graph's names prefixed."""
    from onnx import compose

    body_in, body_out = body.graph.input[0].name, body.graph.output[0].name
    joined = compose.merge_models(head, body, io_map=[(_MODEL_IN, body_in)], prefix2=_BODY)
    joined = compose.merge_models(joined, tail, io_map=[(_BODY + body_out, _MODEL_OUT)])
    joined.producer_name, joined.producer_version = "keyshard", __version__
    return joined


# -- what the file is built from -------------------------------------------------------------------

@dataclass(frozen=True)
class Trained:
    """What an export needs from a checkpoint: its model (CPU, eval), task, image size, the
    divisor and dtype of the pixels it was trained on, and its dataset's class names."""

    path: str
    state: dict
    model: torch.nn.Module
    task: str
    size: int
    divisor: int
    dtype: type
    class_names: tuple[str, ...]

    @classmethod
    def load(cls, checkpoint) -> "Trained":
        from keyshard.train.checkpoint import dataset_of, load_model, model_task

        model, state = load_model(checkpoint, torch.device("cpu"))
        data = state["data"]
        dtype = np.uint8 if data["plain"] else methods.get(data["method"]).storage_dtype
        return cls(str(checkpoint), state, model, model_task(state), int(data["image_size"]),
                   int(data["pixel_divisor"]), dtype, tuple(dataset_of(state)["class_names"]))


def as_key(key) -> keys.Key:
    """A ``keys.Key`` from a key or a key file path."""
    return key if isinstance(key, keys.Key) else keys.load(key)


def fingerprint_status(trained: Trained, key: keys.Key, key_path, ignore_fingerprint: bool) -> str:
    """``match``, or ``overridden`` for a mismatch ``ignore_fingerprint`` allows; else KeyshardError
    (the same rule as ``evaluate``: ``train/checkpoint.py``)."""
    from keyshard.train.checkpoint import check_key_kind, fingerprint_overridden

    data = trained.state["data"]
    check_key_kind(data, key, trained.path, key_path)
    return "overridden" if fingerprint_overridden(data, key, trained.path, key_path, ignore_fingerprint) else "match"


def sample_pixels(size: int, dtype, high: int, n: int = CHECK_IMAGES) -> np.ndarray:
    """Fixed pseudo-random N×H×W×3 pixels in 0..high: what export checks its file on."""
    return np.random.default_rng(0).integers(0, high + 1, (n, size, size, 3)).astype(dtype)


def torch_logits(model: torch.nn.Module, keyed: np.ndarray, divisor: int) -> np.ndarray:
    """The torch pipeline the file must reproduce: normalise the keyed pixels, run the model."""
    from keyshard.transforms import normalize_pixels

    with torch.no_grad():
        return model(normalize_pixels(torch.from_numpy(keyed.astype(np.int32)), divisor))["out"].numpy()


# -- building and checking -----------------------------------------------------------------------

def build_model(checkpoint, include_key=None, ignore_fingerprint: bool = False) -> Exported:
    """The checkpoint's model as ONNX: taking keyed pixels, or with ``include_key`` (a key or a
    key file) plain uint8 images with the key transform inside.  Checked in onnxruntime."""
    require_onnx()
    trained = Trained.load(checkpoint)
    size, key, status = trained.size, None, None
    if include_key is not None:
        key = as_key(include_key)
        status = fingerprint_status(trained, key, include_key, ignore_fingerprint)
    body, exporter = torch_to_onnx(trained.model, size)
    if key is None:
        head = _model(normalise_graph(size, trained.dtype, trained.divisor, INPUT), body.ir_version)
        feed = sample_pixels(size, trained.dtype, 255 if trained.dtype == np.uint8 else trained.divisor)
        reference = torch_logits(trained.model, feed, trained.divisor)
    else:
        from onnx import compose

        material = key.material
        storage = methods.get(material.method).storage_dtype
        head = compose.merge_models(_model(transform_graph(material, size), body.ir_version),
                                    _model(normalise_graph(size, storage, material.divisor, OUTPUT), body.ir_version),
                                    io_map=[(OUTPUT, OUTPUT)])
        feed = sample_pixels(size, np.uint8, 255)
        reference = torch_logits(trained.model, compile_plan(material, size, size).encrypt(feed), material.divisor)
    tail = _model(outputs_graph(trained.task, reference.shape[1], size), body.ir_version)
    model = join(head, body, tail)
    form = KEYED_INPUT if key is None else INCLUDE_KEY
    meta = model_metadata(form, trained, key, status, exporter)
    _set_metadata(model, meta)
    return Exported(model, form, meta, check_model(model, feed, reference, trained.task), exporter)


def build_transform(key, image_size: int | None = None, checkpoint=None, ignore_fingerprint: bool = False) -> Exported:
    """The key transform alone as ONNX, for ``image_size`` (or the checkpoint's size, the key then
    checked against the checkpoint).  Checked bit for bit against the compiled numpy plan."""
    require_onnx()
    key_path, key = key, as_key(key)
    status, size = None, image_size
    if checkpoint is not None:
        trained = Trained.load(checkpoint)
        status = fingerprint_status(trained, key, key_path, ignore_fingerprint)
        if size is not None and size != trained.size:
            raise KeyshardError(f"{checkpoint}: was trained on {trained.size}px images, not {size}px")
        size = trained.size
    if size is None:
        raise KeyshardError("give the image size the transform is for (`image_size`), or a checkpoint")
    check_divisible(size, size, key.block_size)
    model = _model(transform_graph(key.material, size))
    meta = {**_key_metadata(key), "form": TRANSFORM_ONLY, "keyshard_version": __version__, "image_size": str(size),
            "input": f"{INPUT}: uint8 plain pixels, N×{size}×{size}×3",
            "outputs": f"{OUTPUT}: {np.dtype(methods.get(key.method).storage_dtype).name} keyed pixels, N×{size}×{size}×3"}
    if status is not None:
        meta["fingerprint_check"] = status
    _set_metadata(model, meta)
    feed = sample_pixels(size, np.uint8, 255)
    return Exported(model, TRANSFORM_ONLY, meta, check_transform(model, feed, compile_plan(key.material, size, size).encrypt(feed)))


def _session(model):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings about unused initializers
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_model(model, feed: np.ndarray, reference: np.ndarray, task: str) -> dict:
    """Run the file in onnxruntime on ``feed``; its logits must match torch's ``reference`` within
    ``TOLERANCE`` × max|logit|.  Returns the numbers (reported by the command)."""
    import onnx

    onnx.checker.check_model(model)
    logits = _session(model).run(["logits"], {INPUT: feed})[0]
    if logits.shape != reference.shape:
        raise KeyshardError(f"the ONNX model gives logits of shape {logits.shape}, torch {reference.shape}")
    diff, scale = float(np.abs(logits - reference).max()), float(np.abs(reference).max())
    if not diff <= TOLERANCE * max(scale, 1e-12):
        raise KeyshardError(f"the ONNX model disagrees with torch: largest logit difference {diff:.3g} "
                            f"(largest logit {scale:.3g}); nothing was written")
    return {"images": len(feed), "max_abs_diff": diff, "max_abs_logit": scale,
            "argmax_agreement": float((logits.argmax(1) == reference.argmax(1)).mean())}


def check_transform(model, feed: np.ndarray, expected: np.ndarray) -> dict:
    """The transform file's output must equal the numpy plan's bit for bit."""
    import onnx

    onnx.checker.check_model(model)
    out = _session(model).run([OUTPUT], {INPUT: feed})[0]
    if out.dtype != expected.dtype or not np.array_equal(out, expected):
        raise KeyshardError("the ONNX key transform differs from the numpy one; nothing was written")
    return {"images": len(feed), "bit_exact": True}


# -- metadata ------------------------------------------------------------------------------------

def _key_metadata(key: keys.Key) -> dict[str, str]:
    """The key's public identity: fingerprint, method, block size, derivation (never the secret)."""
    return {"key_fingerprint": key.fingerprint, "method": key.method, "block_size": str(key.block_size),
            "key_derivation": key.derivation}


def model_metadata(form: str, trained: Trained, key: keys.Key | None, status: str | None, exporter: str) -> dict:
    """The ``metadata_props`` of a model file: what it is, what it takes and gives, and the key's
    fingerprint (the included key's, else the one the model was trained with)."""
    data, size = trained.state["data"], trained.size
    meta = {"form": form, "keyshard_version": __version__, "task": trained.task,
            "model": trained.state["model_name"], "image_size": str(size),
            "class_names": json.dumps(list(trained.class_names)), "exporter": exporter}
    if key is not None:
        meta.update(_key_metadata(key), fingerprint_check=status, pixel_divisor=str(key.material.divisor))
        taken = "uint8 plain pixels"
    else:
        if not data["plain"]:
            meta.update(key_fingerprint=data["key_fingerprint"], method=data["method"],
                        block_size=str(data["block_size"]), key_derivation=str(data["key_derivation"]))
        meta["pixel_divisor"] = str(trained.divisor)
        taken = f"{np.dtype(trained.dtype).name} {'plain' if data['plain'] else 'keyed'} pixels"
    t = tasks.get(trained.task)
    dims = "N×C×H×W" if t.per_pixel else "N×C"
    second = f"{t.prediction}: " + ("int64 N×H×W" if t.prediction_op == "ArgMax" else f"float {dims}")
    meta["input"] = f"{INPUT}: {taken}, N×{size}×{size}×3"
    meta["outputs"] = f"logits: float {dims}; {second}"
    return meta


def _set_metadata(model, meta: dict) -> None:
    from onnx import helper

    del model.metadata_props[:]
    helper.set_model_props(model, meta)


# -- writing -------------------------------------------------------------------------------------

def write(exported: Exported, output, overwrite: bool = False) -> Path:
    """One self-contained file, written atomically (temporary name + rename); key material with
    mode 0600 from the start.  An existing file is refused unless ``overwrite``."""
    from keyshard.fsutil import make_parent, write_new, write_output

    path = Path(output)
    data = exported.model.SerializeToString()
    if exported.key_material:  # write_new refuses an existing file right before its rename
        make_parent(path)
        write_new(path, data, 0o600, overwrite=overwrite, what="ONNX file")
    else:
        write_output(path, data, overwrite=overwrite, durable=True)
    exported.path = path
    return path


def _check_output(output, inputs, overwrite: bool) -> None:
    """Refuse an output that cannot be written, or that is one of the inputs, before any work."""
    from keyshard.fsutil import check_output

    check_output(output, overwrite=overwrite)
    out = Path(output)
    for source in inputs:
        if source is not None and out.exists() and not isinstance(source, keys.Key) and out.samefile(source):
            raise KeyshardError(f"{out}: is an input of this export; choose another output file")


def export_model(checkpoint, output, include_key=None, ignore_fingerprint: bool = False,
                 overwrite: bool = False) -> Exported:
    """Write the checkpoint's model as ONNX (:func:`build_model`); with ``include_key`` the file is
    key material (mode 0600)."""
    _check_output(output, (checkpoint, include_key), overwrite)
    exported = build_model(checkpoint, include_key, ignore_fingerprint)
    write(exported, output, overwrite)
    return exported


def export_transform(key, output, image_size: int | None = None, checkpoint=None, ignore_fingerprint: bool = False,
                     overwrite: bool = False) -> Exported:
    """Write the key transform alone as ONNX (:func:`build_transform`): key material (mode 0600)."""
    _check_output(output, (checkpoint, key), overwrite)
    exported = build_transform(key, image_size, checkpoint, ignore_fingerprint)
    write(exported, output, overwrite)
    return exported
