"""Keyed inference on new images: :func:`load_predictor` (``keyshard.load_predictor``) and what
``keyshard predict`` runs.

A :class:`Predictor` is a checkpoint's model on a device, the key compiled into that method's
torch plan on the same device, and the pixel divisor.  Whatever the input — a photograph on disk,
an array in memory, a plain shard — the pixels reach it as ``encrypt`` would store them (decoded
by ``keyshard/images.py``, resized to the checkpoint's size with its antialiased bilinear resize,
uint8), and then, on the device, the key is applied, the pixels divided and ImageNet-normalised,
and the model run: the very steps of the key audit (``evaluate/audit.py``).  The command and the
Python API share this one path; the command adds the reading of files in DataLoader workers and
the writing of results.

What a prediction *is* depends on the task (``keyshard/tasks/``) and is chosen once, from the
shape of the task's target (``Task.target_shape``): a target per pixel gives :class:`LabelMaps`
(logits resized bilinearly to the image's original size, then argmax: a palette PNG per image),
one per image gives :class:`ClassScores` (softmax probabilities; a CSV at the end).  Nothing here
branches on a task's or a method's name.

Writing (:func:`predict_to_dir`): every image file is written atomically (temporary name +
rename), then the image's line is appended to ``predictions.jsonl`` and flushed, so a line there
means the image is done; ``resume`` skips those ids.  Unreadable inputs stop the run with one
line naming the file, or with ``skip_bad`` are listed in ``failed.jsonl`` and skipped.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from keyshard import tasks
from keyshard.errors import KeyshardError
from keyshard.images import MAX_PIXELS, BadSample, decode_rgb, stored_pixels
from keyshard.transforms import compile_plan, normalize_pixels

DEFAULT_BATCH = 16
PREDICTIONS, TABLE, FAILED = "predictions.jsonl", "predictions.csv", "failed.jsonl"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ARGMAX_BUDGET = 256 << 20  # bytes of upsampled logits held at once (a 4000×3000 photo × 21 classes is 1 GB)
OVERLAY_ALPHA = 0.5        # weight of the colour map in an overlay
TOP = 5                    # classes listed per image (classification)
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")  # a shard sample id usable as a file name


# -- what a prediction is, per task --------------------------------------------------------------

class Output:
    """How a task's logits become results, the line each result gets in ``predictions.jsonl``,
    the files written beside it, and what is written at the end.  One subclass per target shape."""

    target_rank: ClassVar[int]   # len(Task.target_shape(h, w)) of the tasks it serves
    overlay: ClassVar[bool] = False  # whether it can draw overlays
    per_image: ClassVar[str] = ""    # the files each image gets, in words ("" for none)

    def __init__(self, class_names: tuple[str, ...], ignore_index: int | None):
        self.class_names, self.ignore_index = tuple(class_names), ignore_index

    def results(self, logits: torch.Tensor, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        raise NotImplementedError

    def gather(self, results: list[np.ndarray]):
        """What ``Predictor.predict`` returns for a list of images."""
        return results

    def record(self, image_id: str, result: np.ndarray, size: tuple[int, int]) -> dict:
        raise NotImplementedError

    def file_names(self, image_id: str, overlay: bool) -> tuple[str, ...]:
        """The files an image gets beside its line (checked for collisions before any work)."""
        return ()

    def files(self, image_id: str, result: np.ndarray, image: np.ndarray | None) -> dict[str, bytes]:
        return {}

    def finish(self, out: Path, records: list[dict]) -> list[Path]:
        """Files written once every image is done (from every line, resumed runs included)."""
        return []


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int], budget: int = ARGMAX_BUDGET) -> torch.Tensor:
    """C×h×w logits → H×W class ids: bilinear resize to ``size`` (align_corners=False), then
    argmax over classes; classes are resized a group at a time so memory stays under ``budget``
    (bilinear resizing treats channels independently, so the result is the same; ties go to the
    lowest class, as ``argmax``)."""
    height, width = size
    if (height, width) == tuple(logits.shape[-2:]):
        return logits.argmax(0)  # what the resize gives at the same size (align_corners=False)
    group = max(1, budget // max(1, 4 * height * width))
    best = labels = None
    for start in range(0, logits.shape[0], group):
        up = torch.nn.functional.interpolate(logits[None, start:start + group].float(), size=(height, width),
                                             mode="bilinear", align_corners=False)[0]
        top, arg = up.max(0)
        if best is None:
            best, labels = top, arg
        else:
            better = top > best
            best, labels = torch.where(better, top, best), torch.where(better, arg + start, labels)
    return labels


class LabelMaps(Output):
    """A label map per image at its original size (uint8 class ids), a palette PNG each, and with
    overlays the image blended with the colour map."""

    target_rank, overlay, per_image = 2, True, "a label map per image (<id>.png)"

    def results(self, logits, sizes):
        return [upsampled_argmax(one, size).to("cpu", torch.uint8).numpy() for one, size in zip(logits, sizes)]

    def record(self, image_id, result, size):
        counts = np.bincount(result.ravel(), minlength=len(self.class_names))
        return {"id": image_id, "width": int(size[1]), "height": int(size[0]),
                "pixels_per_class": {self.class_names[c]: int(n) for c, n in enumerate(counts) if n}}

    def file_names(self, image_id, overlay):
        return (f"{image_id}.png", f"{image_id}.overlay.png") if overlay else (f"{image_id}.png",)

    def files(self, image_id, result, image):
        from PIL import Image

        from keyshard.figures import colorize
        from keyshard.shardformat import voc_palette

        labels = Image.frombytes("P", (result.shape[1], result.shape[0]), np.ascontiguousarray(result).tobytes())
        out = {f"{image_id}.png": _png(labels, palette=voc_palette())}
        if image is not None:
            colour = colorize(result, self.ignore_index).astype(np.float32)
            blend = np.rint((1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * colour)
            out[f"{image_id}.overlay.png"] = _png(Image.fromarray(blend.astype(np.uint8)))
        return out


class ClassScores(Output):
    """Class probabilities per image (softmax), the top classes in ``predictions.jsonl`` and a CSV
    of every image's most probable class at the end."""

    target_rank = 0

    def results(self, logits, sizes):
        return list(torch.softmax(logits.float(), dim=1).cpu().numpy())

    def gather(self, results):
        return np.stack(results) if results else np.zeros((0, len(self.class_names)), np.float32)

    def record(self, image_id, result, size):
        order = np.argsort(-result, kind="stable")[:TOP]
        best = int(order[0])
        return {"id": image_id, "class": best, "class_name": self.class_names[best],
                "probability": round(float(result[best]), 6),
                "top5": [[int(c), round(float(result[c]), 6)] for c in order]}

    def finish(self, out, records):
        from keyshard.fsutil import write_atomic

        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["id", "class", "class_name", "probability"])
        writer.writerows([r["id"], r["class"], r["class_name"], r["probability"]] for r in records)
        write_atomic(out / TABLE, text.getvalue().encode())
        return [out / TABLE]


OUTPUTS = {cls.target_rank: cls for cls in (LabelMaps, ClassScores)}


def output_for(task: tasks.Task, class_names, ignore_index) -> Output:
    """The prediction output of ``task``, from the rank of its target (a map per pixel, one value per image)."""
    rank = len(task.target_shape(1, 1))
    if rank not in OUTPUTS:
        raise KeyshardError(f"keyshard cannot predict for {task.name} models (targets of rank {rank})")
    return OUTPUTS[rank](class_names, ignore_index)


def _png(image, palette=None) -> bytes:
    buffer = io.BytesIO()
    if palette is not None:
        image.putpalette(palette)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- the predictor ------------------------------------------------------------------------------

@dataclass
class Predictor:
    """A checkpoint's model with its key, ready for images (make one with :func:`load_predictor`).

    ``predict`` takes images as arrays; ``predict_pixels`` takes pixels already at ``image_size``
    as ``encrypt`` stores them (what the command hands it).  ``fingerprint_check`` is ``match``,
    ``overridden`` (a key with another fingerprint, allowed by ``ignore_fingerprint``), or None
    without a key; ``keyed`` says whether a key is applied.
    """

    model: torch.nn.Module = field(repr=False)
    output: Output
    plan: object | None = field(repr=False)  # the key's torch plan on ``device``, or None (plain images)
    divisor: int
    image_size: int
    device: torch.device
    task: str
    data: dict = field(repr=False)  # the checkpoint's data identity (``state["data"]``)
    fingerprint_check: str | None = None
    key_fingerprint: str | None = None
    batch_size: int = DEFAULT_BATCH

    @property
    def keyed(self) -> bool:
        return self.plan is not None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.output.class_names

    def predict(self, images):
        """Label maps at each input's size (segmentation: H×W uint8 class ids) or class
        probabilities (classification: a C vector; N×C for a list), for a uint8 H×W×3 array or a
        list of them.  Each image is resized to ``image_size`` as ``encrypt`` does, keyed on the
        device and run through the model, ``batch_size`` at a time."""
        single = isinstance(images, np.ndarray) and images.ndim == 3
        arrays = [images] if single else list(images)
        results = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = [_checked(a, start + i) for i, a in enumerate(arrays[start:start + self.batch_size])]
            pixels = torch.stack([self.resize(a) for a in chunk])
            results += self.predict_pixels(pixels, [a.shape[:2] for a in chunk])
        return results[0] if single else self.output.gather(results)

    def resize(self, array: np.ndarray) -> torch.Tensor:
        """An H×W×3 uint8 array → ``image_size``² × 3, as ``encrypt`` resizes a decoded image."""
        return stored_pixels(torch.from_numpy(array).permute(2, 0, 1), self.image_size)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Stored pixels (N×S×S×3 uint8, any device) → the model's logits on the device: the key
        applied there (the method's torch plan), ÷ divisor, ImageNet-normalised, the model run."""
        x = pixels.to(self.device, non_blocking=True)
        if self.plan is not None:
            x = self.plan.encrypt(x)
        with torch.inference_mode():
            return self.model(normalize_pixels(x, self.divisor))["out"]

    def predict_pixels(self, pixels: torch.Tensor, sizes) -> list[np.ndarray]:
        """One result per image of ``pixels`` (N×S×S×3 uint8); ``sizes``: each image's (height,
        width), the size its label map is given at."""
        with torch.inference_mode():
            return self.output.results(self.logits(pixels), [tuple(int(v) for v in s) for s in sizes])


def _checked(array, index: int) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise KeyshardError(f"image {index}: expected an H×W×3 uint8 array, got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def load_predictor(checkpoint, key=None, device=None, *, plain: bool = False, ignore_fingerprint: bool = False,
                   batch_size: int = DEFAULT_BATCH) -> Predictor:
    """A :class:`Predictor` for a checkpoint from ``keyshard train`` or ``protect``.

    ``key``: the key file (or ``keyshard.load_key``'s key) the model was trained with; a key with
    another fingerprint is refused unless ``ignore_fingerprint``.  A model trained on keyed images
    needs its key, unless ``plain=True``: then plain images go in as they are — what a user
    without the key gets.  ``device``: where the model and the key run (default: the GPU when
    there is one, else the CPU).
    """
    from keyshard.evaluate.export import Trained, as_key, fingerprint_status
    from keyshard.train.checkpoint import dataset_of
    from keyshard.train.device import pick_device

    if plain and key is not None:
        raise KeyshardError("give a key or `plain=True`, not both")
    trained = Trained.load(checkpoint)
    data = trained.state["data"]
    if key is None and not data["plain"] and not plain:
        raise KeyshardError(f"{checkpoint}: was trained on keyed images; give its key (`key`), or `plain=True` "
                            "to see what a user without the key gets")
    device = torch.device(device) if device is not None else pick_device()
    task = tasks.get(trained.task)  # the model decides, as for 0.1 classifiers without a dataset record
    output = output_for(task, trained.class_names, dataset_of(trained.state)["ignore_index"])
    common = dict(model=trained.model.to(device).eval(), output=output, image_size=trained.size, device=device,
                  task=task.name, data=data, batch_size=batch_size)
    if key is None:
        return Predictor(plan=None, divisor=255 if plain or data["plain"] else trained.divisor, **common)
    loaded = as_key(key)
    status = fingerprint_status(trained, loaded, key, ignore_fingerprint)
    plan = compile_plan(loaded.material, trained.size, trained.size).to_torch(device)
    return Predictor(plan=plan, divisor=loaded.material.divisor, fingerprint_check=status,
                     key_fingerprint=loaded.fingerprint, **common)


# -- inputs -------------------------------------------------------------------------------------

@dataclass
class Item:
    """One input as the run sees it: its id (the output file stem), where it came from, its pixels
    at the model's size and original (height, width) — or why it could not be read — and the
    decoded original when an overlay is wanted."""

    id: str
    source: str
    pixels: torch.Tensor | None = None   # S×S×3 uint8
    size: tuple[int, int] = (0, 0)
    original: np.ndarray | None = None   # H×W×3 uint8
    error: str | None = None


def image_files(files=(), input_dir=None) -> list[Path]:
    """The input files: those named, or the image files directly in ``input_dir`` (by suffix, sorted)."""
    if input_dir is not None:
        folder = Path(input_dir)
        if not folder.is_dir():
            raise KeyshardError(f"{folder}: not a directory")
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [Path(f) for f in files]


def check_ids(named: list[tuple[str, str]], output: Output, overlay: bool) -> None:
    """Refuse two inputs whose outputs would share a file (the same stem), naming both."""
    taken = {name: "keyshard" for name in (PREDICTIONS, TABLE, FAILED)}
    for image_id, source in named:
        for name in output.file_names(image_id, overlay) or (image_id,):
            if name in taken:
                raise KeyshardError(f"{source} and {taken[name]}: both would be written as {name} "
                                    "(inputs need distinct file names)")
            taken[name] = source


class ImageFiles(torch.utils.data.Dataset):
    """Files read as ``encrypt`` reads them (``keyshard/images.py``: the header pixel cap, the
    decoder, the antialiased bilinear resize); a file that cannot be read is an Item with an error."""

    def __init__(self, named: list[tuple[str, Path]], size: int, max_pixels: int = MAX_PIXELS,
                 keep_original: bool = False):
        self.named, self.size, self.max_pixels, self.keep_original = named, size, max_pixels, keep_original

    def __len__(self) -> int:
        return len(self.named)

    def __getitem__(self, index: int) -> Item:
        image_id, path = self.named[index]
        try:
            decoded = decode_rgb(Path(path).read_bytes(), str(path), self.max_pixels)
        except BadSample as exc:
            return Item(image_id, str(path), error=str(exc))
        except OSError as exc:
            return Item(image_id, str(path), error=f"{path}: cannot read ({exc.strerror or type(exc).__name__})")
        height, width = decoded.shape[-2:]
        pixels = stored_pixels(decoded, self.size)
        original = decoded.permute(1, 2, 0).numpy() if self.keep_original else None
        return Item(image_id, str(path), pixels, (int(height), int(width)), original)


def _as_list(items):
    return list(items)


def file_batches(named, size: int, batch_size: int, workers: int, max_pixels: int = MAX_PIXELS,
                 keep_original: bool = False):
    """Lists of Items, ``batch_size`` at a time, decoded in ``workers`` DataLoader processes."""
    dataset = ImageFiles(named, size, max_pixels, keep_original)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_as_list)


def check_shards(manifest, source, predictor: Predictor, checkpoint) -> None:
    """Shards to predict on must be plain (the key is applied here), hold a test split, the model's
    task and classes, and images of the model's size."""
    from keyshard.evaluate.audit import check_dataset, check_image_size

    state = {"data": predictor.data}
    if not manifest.encryption.plain:
        raise KeyshardError(f"{source}: shards must be plain (written without a key); the key is applied "
                            "when predicting")
    if "test" not in manifest.splits.counts:
        raise KeyshardError(f"{source}: holds no test split")
    check_dataset(state, manifest, checkpoint, source)
    check_image_size(predictor.data, manifest, source)


def shard_batches(source, manifest, batch_size: int, workers: int, keep_original: bool = False):
    """Lists of Items from a plain shard set's test split, in manifest order; label maps are at
    the stored size (the shards hold no larger image)."""
    from keyshard.evaluate.audit import test_batches

    for pixels, _targets, ids, n_padding in test_batches(source, manifest, batch_size, workers):
        real = len(ids) - n_padding
        for image_id in ids[:real]:
            if not _SAFE_ID.fullmatch(str(image_id)):
                raise KeyshardError(f"{source}: sample id {str(image_id)[:60]!r} cannot be a file name")
        size = tuple(pixels.shape[1:3])
        yield [Item(str(image_id), f"{source}:{image_id}", pixels[j], size,
                    pixels[j].numpy() if keep_original else None) for j, image_id in enumerate(ids[:real])]


# -- writing ------------------------------------------------------------------------------------

def done_ids(out: Path) -> list[dict]:
    """The lines of an earlier run's ``predictions.jsonl`` (``resume``).  A last line cut short by
    an interruption is dropped (and cut from the file): its image is predicted again."""
    path = Path(out) / PREDICTIONS
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    records = []
    for number, line in enumerate(complete.splitlines(), 1):
        try:
            record = json.loads(line)
            str(record["id"])
        except (ValueError, KeyError, TypeError):
            raise KeyshardError(f"{path}: line {number} is not a prediction; cannot resume from it") from None
        records.append(record)
    return records


def check_out(out, resume: bool) -> Path:
    """The output directory, checked before any work (created when the first result is written):
    new or empty, or with ``resume`` an earlier run's."""
    from keyshard.fsutil import check_output

    out = check_output(out, directory=True)
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise KeyshardError(f"{out}: is not empty; give an empty directory, or `resume=True` to continue "
                            "an earlier run there")
    return out


class Writer:
    """Writes one image's files (atomically), then its line; failures go to ``failed.jsonl``."""

    def __init__(self, out: Path, output: Output, overlay: bool):
        self.out, self.output, self.overlay = out, output, overlay
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyshardError(f"{out}: cannot create it ({exc.strerror})") from None
        self.lines = open(out / PREDICTIONS, "a", encoding="utf-8")
        (out / FAILED).unlink(missing_ok=True)  # an earlier run's failures are tried again
        self.failures = None
        self.written = self.failed = 0

    def write(self, item: Item, result: np.ndarray) -> None:
        from keyshard.fsutil import write_atomic

        image = item.original if self.overlay else None
        for name, data in self.output.files(item.id, result, image).items():
            write_atomic(self.out / name, data, durable=False)
        self.lines.write(json.dumps(self.output.record(item.id, result, item.size)) + "\n")
        self.lines.flush()
        self.written += 1

    def fail(self, item: Item) -> None:
        if self.failures is None:
            self.failures = open(self.out / FAILED, "w", encoding="utf-8")
        self.failures.write(json.dumps({"id": item.id, "file": item.source, "error": item.error}) + "\n")
        self.failures.flush()
        self.failed += 1

    def close(self) -> None:
        self.lines.close()
        if self.failures is not None:
            self.failures.close()


@dataclass
class Summary:
    """What a run did: images predicted now, before (resumed), failed (skipped), files written at the end."""

    predicted: int
    resumed: int
    failed: int
    finished: list


def predict_to_dir(predictor: Predictor, batches, out, *, overlay: bool = False, skip_bad: bool = False,
                   done=(), total: int | None = None, progress: bool = True) -> Summary:
    """Predict every Item of ``batches`` (lists of Items) into ``out``: each image's files, its
    ``predictions.jsonl`` line, then the task's end-of-run files.  Items whose id is in ``done``
    are skipped; an unreadable one stops the run (KeyshardError naming it) unless ``skip_bad``."""
    from tqdm import tqdm

    out, done = Path(out), {str(r["id"]) for r in done}
    if overlay and not predictor.output.overlay:
        raise KeyshardError(f"`overlay`: not for {predictor.task} models")
    writer = Writer(out, predictor.output, overlay)
    bar = tqdm(total=total, unit="img", desc="predict", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for items in batches:
            items = [item for item in items if item.id not in done]
            good = [item for item in items if item.error is None]
            for item in items:
                if item.error is not None and not skip_bad:
                    raise KeyshardError(item.error)
                if item.error is not None:
                    writer.fail(item)
            if good:
                results = predictor.predict_pixels(torch.stack([item.pixels for item in good]),
                                                   [item.size for item in good])
                for item, result in zip(good, results):
                    writer.write(item, result)
            bar.update(len(items))
    finally:
        bar.close()
        writer.close()
    finished = predictor.output.finish(out, done_ids(out))
    return Summary(writer.written, len(done), writer.failed, finished)
