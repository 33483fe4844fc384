"""keyshard export (issue 23, part 2): ONNX round trips in onnxruntime for SHF, NP and FFX.

For each method, a small model trained on keyed 32×32 toy shards is exported in the three forms
and run on the 16 plain test images: the keyed-input model agrees with torch (argmax on ≥ 99.9 %
of pixels, logits within 1e-4 × max|logit|), the transform-only file equals ``encrypt_image`` bit
for bit, and the include-key model on plain images equals the keyed-input model on
``encrypt_image(plain)``.  No secret appears in any file; key-material files have mode 0600.
A classifier is exported too; usage errors are one line each.
"""

from __future__ import annotations

import io
import json
import stat
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from keyshard import __version__, keys, methods
from keyshard.transforms import encrypt_image, normalize_pixels

from conftest import assert_user_error, fixed_secret, invoke, keyed_run

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
import onnxruntime  # noqa: E402

from keyshard.cli import _Group  # noqa: E402
from keyshard.evaluate.export_commands import export  # noqa: E402

TEST_IMAGES = 16


def run_export(*args):
    """The command object itself (keyshard/cli.py registers it), behind a group that prints a
    KeyshardError as the one ``keyshard: error:`` line, as the real root does."""
    group = _Group("keyshard")
    group.add_command(export)
    return CliRunner().invoke(group, ["export", *[str(a) for a in args]], catch_exceptions=True)


def images(shards, split: str = "test") -> np.ndarray:
    """Every ``.img.npy`` of a split's shards, in shard and member order."""
    out = []
    for path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            out += [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers() if m.name.endswith(".img.npy")]
    return np.stack(out)


def session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_logits(ckpt, keyed: np.ndarray, divisor: int) -> np.ndarray:
    from keyshard.train.checkpoint import load_model

    model, _ = load_model(ckpt, torch.device("cpu"))
    with torch.no_grad():
        return model(normalize_pixels(torch.from_numpy(keyed.astype(np.int32)), divisor))["out"].numpy()


def assert_no_secret(path, key: keys.Key):
    data = path.read_bytes()
    for secret in (key.secret.hex().encode(), key.secret.hex().upper().encode(), key.secret, key.password):
        assert secret not in data, f"{path} holds the key's secret or password"


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture(scope="module", params=keys.METHODS)
def keyed(request, tmp_path_factory):
    """A small model trained one epoch on keyed 32×32 shards of 32 toy images (16 test images)."""
    root = keyed_run(tmp_path_factory.mktemp(f"export-{request.param}"), request.param, 4, images=32, seed=3, epochs=1)
    return root


def test_three_forms_round_trip(keyed, tmp_path):
    ckpt, key_path = keyed / "run" / "best.pt", keyed / "key.json"
    key = keys.load(key_path)
    outs = {form: tmp_path / f"{form}.onnx" for form in ("model", "key", "inside")}
    for args in (("--checkpoint", ckpt, "-o", outs["model"]),
                 ("--key", key_path, "--transform-only", "--checkpoint", ckpt, "-o", outs["key"]),
                 ("--checkpoint", ckpt, "--key", key_path, "--include-key", "-o", outs["inside"])):
        res = run_export(*args)
        assert res.exit_code == 0, res.output
        assert "checked in onnxruntime" in res.output
    plain = images(keyed / "plain")
    assert plain.shape == (TEST_IMAGES, 32, 32, 3) and plain.dtype == np.uint8
    encrypted = encrypt_image(plain, key)

    # transform-only: encrypt_image bit for bit, in the storage dtype
    (transformed,) = session(outs["key"]).run(None, {"pixels": plain})
    assert transformed.dtype == methods.get(key.method).storage_dtype and np.array_equal(transformed, encrypted)

    # keyed-input model against torch on the keyed images
    logits, labels = session(outs["model"]).run(["logits", "labels"], {"pixels": encrypted})
    reference = torch_logits(ckpt, encrypted, key.material.divisor)
    assert logits.shape == reference.shape == (TEST_IMAGES, 21, 32, 32)
    assert labels.dtype == np.int64 and labels.shape == (TEST_IMAGES, 32, 32)
    assert np.array_equal(labels, logits.argmax(1))
    agreement = float((labels == reference.argmax(1)).mean())
    ratio = float(np.abs(logits - reference).max() / np.abs(reference).max())
    print(f"{key.method}: argmax agreement {agreement:.4%}, max |Δlogit| / max |logit| {ratio:.2e}")  # pytest -s
    assert agreement >= 0.999 and ratio <= 1e-4

    # include-key model on plain images = keyed-input model on encrypt_image(plain)
    inside_logits, inside_labels = session(outs["inside"]).run(["logits", "labels"], {"pixels": plain})
    assert np.array_equal(inside_logits, logits) and np.array_equal(inside_labels, labels)
    (one,) = session(outs["inside"]).run(["labels"], {"pixels": plain[:1]})  # the batch axis is dynamic
    assert one.shape == (1, 32, 32)

    for form, path in outs.items():
        assert_no_secret(path, key)
    assert stat.S_IMODE(outs["key"].stat().st_mode) == stat.S_IMODE(outs["inside"].stat().st_mode) == 0o600
    meta = {form: metadata(path) for form, path in outs.items()}
    assert [meta[f]["form"] for f in outs] == ["keyed-input", "transform-only", "include-key"]
    for m in meta.values():
        assert (m["key_fingerprint"], m["method"], m["block_size"], m["image_size"], m["keyshard_version"]) == \
            (key.fingerprint, key.method, "4", "32", __version__)
    assert json.loads(meta["model"]["class_names"])[:2] == ["background", "aeroplane"]
    assert meta["inside"]["fingerprint_check"] == "match" and meta["model"]["task"] == "segmentation"


def test_key_material_files_are_0600_and_the_model_file_is_not(keyed, tmp_path):
    """Only the forms that hold the key are written 0600; an existing file is replaced only with --force."""
    ckpt, key_path = keyed / "run" / "best.pt", keyed / "key.json"
    key_out, model_out = tmp_path / "k.onnx", tmp_path / "m.onnx"
    assert run_export("--key", key_path, "--transform-only", "--image-size", 16, "-o", key_out).exit_code == 0
    assert stat.S_IMODE(key_out.stat().st_mode) == 0o600
    assert metadata(key_out)["image_size"] == "16"
    assert_user_error(run_export("--key", key_path, "--transform-only", "-o", key_out), "already exists", "--force")
    res = run_export("--key", key_path, "--transform-only", "-o", key_out, "--force")
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(key_out.stat().st_mode) == 0o600 and metadata(key_out)["image_size"] == "256"
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left behind
    res = run_export("--checkpoint", ckpt, "-o", model_out)
    assert res.exit_code == 0 and "KEY MATERIAL" not in res.output
    assert "KEY MATERIAL" in run_export("--checkpoint", ckpt, "--key", key_path, "--include-key",
                                        "-o", tmp_path / "i.onnx").output


def test_fingerprint_mismatch_is_refused_unless_ignored(keyed, tmp_path):
    key = keys.load(keyed / "key.json")
    other = tmp_path / "other.json"
    keys.save(keys.Key(key.method, key.block_size, fixed_secret(9)), other)
    ckpt = keyed / "run" / "best.pt"
    for form in (("--include-key",), ("--transform-only", "--checkpoint", ckpt)):
        args = ("--key", other, *form, "-o", tmp_path / "x.onnx")
        if form[0] == "--include-key":
            args = ("--checkpoint", ckpt, *args)
        assert_user_error(run_export(*args), "fingerprint does not match", "--ignore-fingerprint")
        assert not (tmp_path / "x.onnx").exists()
    res = run_export("--checkpoint", ckpt, "--key", other, "--include-key", "--ignore-fingerprint", "-o", tmp_path / "x.onnx")
    assert res.exit_code == 0, res.output
    assert "overridden (--ignore-fingerprint)" in res.output
    assert metadata(tmp_path / "x.onnx")["fingerprint_check"] == "overridden"


@pytest.mark.parametrize("args, fragment", [
    (("--key", "K", "-o", "x.onnx"), "--key needs --transform-only or --include-key"),
    (("--key", "K", "--checkpoint", "C", "-o", "x.onnx"), "--key needs --transform-only or --include-key"),
    (("--checkpoint", "C", "--include-key", "-o", "x.onnx"), "--include-key needs --key"),
    (("--key", "K", "--transform-only", "--include-key", "-o", "x.onnx"), "at most one"),
    (("--key", "K", "--transform-only", "--image-size", 32, "--checkpoint", "C", "-o", "x.onnx"), "at most one"),
    (("--checkpoint", "C", "--image-size", 32, "-o", "x.onnx"), "--image-size is for --transform-only"),
    (("-o", "x.onnx"), "give --checkpoint"),
])
def test_usage_errors_are_one_line(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run_export(*args), fragment)
    assert not (tmp_path / "x.onnx").exists()


def test_a_method_without_an_onnx_form_is_refused(key_files, tmp_path, monkeypatch):
    method = methods.get("np")
    monkeypatch.setattr(type(method), "onnx_transform", lambda self, material, height, width: None)
    assert_user_error(run_export("--key", key_files["np"], "--transform-only", "--image-size", 32, "-o", tmp_path / "x.onnx"),
                      "method np has no ONNX form")
    assert_user_error(run_export("--key", key_files["shf"], "--transform-only", "--image-size", 30, "-o", tmp_path / "x.onnx"),
                      "block size 4 does not divide")




def test_classifier_exports_logits_and_probabilities(classifier, tmp_path):
    ckpt, key_path = classifier / "run" / "best.pt", classifier / "key.json"
    key = keys.load(key_path)
    for args in (("--checkpoint", ckpt, "-o", tmp_path / "m.onnx"),
                 ("--checkpoint", ckpt, "--key", key_path, "--include-key", "-o", tmp_path / "i.onnx")):
        res = run_export(*args)
        assert res.exit_code == 0, res.output
    plain = np.random.default_rng(1).integers(0, 256, (TEST_IMAGES, 32, 32, 3), dtype=np.uint8)
    encrypted = encrypt_image(plain, key)
    logits, probabilities = session(tmp_path / "m.onnx").run(["logits", "probabilities"], {"pixels": encrypted})
    reference = torch_logits(ckpt, encrypted, 255)
    assert logits.shape == probabilities.shape == (TEST_IMAGES, 3)
    assert np.abs(logits - reference).max() <= 1e-4 * np.abs(reference).max()
    np.testing.assert_allclose(probabilities, torch.softmax(torch.from_numpy(reference), 1).numpy(), atol=1e-5)
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.999
    inside_logits, _ = session(tmp_path / "i.onnx").run(None, {"pixels": plain})
    assert np.array_equal(inside_logits, logits)
    meta = metadata(tmp_path / "m.onnx")
    assert meta["task"] == "classification" and json.loads(meta["class_names"]) == [f"class_{i:03d}" for i in range(3)]
    assert stat.S_IMODE((tmp_path / "i.onnx").stat().st_mode) == 0o600
    assert_no_secret(tmp_path / "m.onnx", key)
    assert_no_secret(tmp_path / "i.onnx", key)



def test_torchscript_exporter_is_the_fallback(classifier, monkeypatch):
    """Where torch.export fails on a model, the TorchScript exporter makes the file (same checks)."""
    from keyshard.evaluate import export as ex

    original = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("torch.export cannot trace this model")
        return original(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    done = ex.build_model(classifier / "run" / "best.pt", include_key=classifier / "key.json")
    assert done.exporter == "torchscript" and done.metadata["exporter"] == "torchscript"
    assert done.check["max_abs_diff"] <= 1e-4 * done.check["max_abs_logit"]
    (out,) = done.model.graph.output[1:]
    assert out.name == "probabilities" and out.type.tensor_type.shape.dim[0].dim_param == "batch"
