"""Key files: generation, loading, the documented derivation of key material, and fingerprints.

A key file holds a 256-bit secret; the permutation (SHF), the flip mask (NP, FFX) and the FFX
password are *derived* from it, so the file stays tiny and the same file gives the same key on
every machine.  Derivation ``keyshard-shake256/1``:

* ``stream(label)`` = SHAKE-256(``b"keyshard/1|" + label + b"|" + secret``), read as consecutive
  little-endian unsigned 64-bit words.
* ``shuffle(n, label)`` = Fisher–Yates over ``[0, n)``: for ``i = n-1 .. 1`` draw words until one
  is below ``floor(2**64 / (i+1)) * (i+1)`` (rejection keeps it unbiased), take ``j = w % (i+1)``
  and swap positions ``i`` and ``j``.
* SHF permutation = ``shuffle(3M², b"shf-permutation")``.
* NP/FFX mask = the first ``3M²//2`` entries of ``shuffle(3M², b"mask-order")`` are selected.
* FFX password (when the file gives none) = hex of the first 16 bytes of ``stream(b"ffx-password")``.

``reference_seed`` keys follow the authors' public code instead (``torch.manual_seed(seed);
perm = torch.randperm(3M²)``, computed without torch, see ``reference_permutation``; masks are
``perm > 3M²/2``, one position fewer than half).  Explicit
keys carry the material itself, so their mask selects however many positions it holds
(``keyshard.methods.masked``: ``mask_size``; ``rule_mask_size`` says what each derivation
selects).  Each method's module (``keyshard/methods/``) applies these primitives to its material.

The fingerprint is HMAC-SHA256 keyed by the secret over the public parameters and the derived
material: it identifies a key without letting anyone test guesses offline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from keyshard import methods
from keyshard.errors import KeyshardError
from keyshard.fsutil import write_new

KEY_FORMAT = "keyshard-key/1"
# keyshard's own methods (tests and benchmarks loop over them); every registered one: methods.names()
METHODS = methods.builtin_names()
CHANNELS = 3
DERIVE_SECRET = "keyshard-shake256/1"
DERIVE_REFERENCE = "reference-torch-randperm/1"
DERIVE_EXPLICIT = "explicit/1"
# Key spaces below this many bits can be enumerated against a stolen model in reasonable time.
SMALL_KEYSPACE_BITS = 40

# The largest block size a key may have: the one place this bound is defined (manifests/
# key.schema.json repeats it as block_size's maximum; a test checks they agree).  Every valid key
# must load in well under a second, and the derivation is a Python Fisher-Yates over the 3M²
# block positions: ~0.4 s at M=512, ~2 s at 1024, ~90 s at 4096.  Larger blocks buy nothing (the
# paper uses M <= 16; VOC images are at most 500 px), and a block is never larger than the image
# (M must divide the image size), so this is also at most the largest supported image size.
MAX_BLOCK_SIZE = 512
MAX_BLOCK_LEN = 3 * MAX_BLOCK_SIZE * MAX_BLOCK_SIZE  # 3M² at the largest M: 786432
# reference_seed: torch.manual_seed takes 64-bit seeds; keep them non-negative int64.
MAX_REFERENCE_SEED = 2**63 - 1
MAX_FFX_PASSWORD_BYTES = 1024
# A key file is read whole, so its size is capped: the largest valid one (an explicit SHF key at
# M=512, 786432 integers as keyshard writes them) is about 11 MB.
MAX_KEY_FILE_BYTES = 16 << 20
FFX_PASSWORD_ENV = "KEYSHARD_FFX_PASSWORD"


def _stream_words(secret: bytes, label: bytes, count: int) -> np.ndarray:
    """First ``count`` 64-bit words of the SHAKE-256 stream for ``label`` (see module doc)."""
    data = hashlib.shake_256(b"keyshard/1|" + label + b"|" + secret).digest(8 * count)
    return np.frombuffer(data, dtype="<u8")


def fisher_yates(secret: bytes, label: bytes, n: int) -> np.ndarray:
    """Unbiased Fisher–Yates permutation of ``range(n)`` driven by the keyed stream.

    Exactly the algorithm of the module doc; the draws (with rejection) are computed with numpy
    a run of accepted words at a time, then the swaps are applied in order.
    """
    if n < 2:
        return np.arange(n, dtype=np.int64)
    bounds = np.arange(n, 1, -1, dtype=np.uint64)  # i + 1 for i = n-1 .. 1
    # w is accepted iff w < floor(2^64 / b) * b, i.e. w <= 2^64 - 1 - (2^64 mod b);
    # (0 - b) wraps to 2^64 - b, which is 2^64 mod b modulo b.
    highest = np.iinfo(np.uint64).max - (np.uint64(0) - bounds) % bounds
    draws = np.empty(n - 1, dtype=np.uint64)
    budget, done, pos = n + 64, 0, 0
    words = _stream_words(secret, label, budget)
    while done < n - 1:
        if pos + (n - 1 - done) > len(words):  # astronomically rare: extend the (prefix-stable) stream
            budget = max(2 * budget, pos + (n - 1 - done) + 64)
            words = _stream_words(secret, label, budget)
        run = words[pos:pos + (n - 1 - done)]
        rejected = np.flatnonzero(run > highest[done:done + len(run)])
        take = int(rejected[0]) if len(rejected) else len(run)
        draws[done:done + take] = run[:take] % bounds[done:done + take]
        done, pos = done + take, pos + take + (1 if len(rejected) else 0)  # a rejected word is skipped
    return _swapped(n, range(n - 1, 0, -1), draws.tolist())


def _swapped(n: int, positions, partners) -> np.ndarray:
    """``range(n)`` after swapping ``perm[i]`` and ``perm[j]`` for each (i, j), in order."""
    perm = list(range(n))
    for i, j in zip(positions, partners):
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


def reference_permutation(seed: int, n: int) -> np.ndarray:
    """The authors' derivation: ``torch.manual_seed(seed); torch.randperm(n)``, without torch.

    torch (CPU) seeds a 32-bit Mersenne Twister with the low 32 bits of the seed (the standard
    ``init_genrand``) and shuffles forwards: for i = 0 .. n-2, swap positions i and
    ``i + random() % (n - i)``.  numpy's MT19937 seeded the legacy way is the same generator, so
    the permutation is computed here without importing torch (~3 s and ~0.9 GB on a small
    machine); a test compares it with torch itself.  (torch's CPU randperm switches algorithm
    only for n in the hundreds of millions, far beyond any valid key: n = 3M² <= 786432.)
    """
    if n < 2:
        return np.arange(n, dtype=np.int64)
    _, state, pos, *_ = np.random.RandomState(seed & 0xFFFFFFFF).get_state(legacy=True)
    mt = np.random.MT19937()
    mt.state = {"bit_generator": "MT19937", "state": {"key": state, "pos": pos}}
    offsets = mt.random_raw(n - 1).astype(np.int64) % np.arange(n, 1, -1, dtype=np.int64)
    return _swapped(n, range(n - 1), (offsets + np.arange(n - 1, dtype=np.int64)).tolist())


def ffx_table(password: bytes) -> np.ndarray:
    """FFX lookup table: ``pyffx.Integer(password, length=3).encrypt(v)`` for v in 0..255."""
    import pyffx

    fpe = pyffx.Integer(password, length=3)
    return np.asarray([fpe.encrypt(v) for v in range(256)], dtype=np.uint16)


@dataclass(frozen=True)
class Key:
    """A loaded key file. ``material`` and ``fingerprint`` are derived lazily and cached."""

    method: str
    block_size: int
    secret: bytes
    reference_seed: int | None = None
    ffx_password: bytes | None = None  # as given in the file; None means derived from the secret
    explicit: methods.Material | None = None
    path: str | None = None

    @property
    def derivation(self) -> str:
        if self.explicit is not None:
            return DERIVE_EXPLICIT
        return DERIVE_REFERENCE if self.reference_seed is not None else DERIVE_SECRET

    @property
    def password(self) -> bytes:
        """FFX password: the file's, or the documented derivation from the secret."""
        if self.ffx_password is not None:
            return self.ffx_password
        return _stream_words(self.secret, b"ffx-password", 2).tobytes().hex().encode()

    @cached_property
    def material(self) -> "methods.Material":
        """The key material: the explicit one, else derived by the method from the secret or seed."""
        if self.explicit is not None:
            return self.explicit
        return methods.get(self.method).derive(self)

    @cached_property
    def fingerprint(self) -> str:
        """HMAC-SHA256(secret, public parameters | derived material), hex."""
        public = json.dumps(
            {"format": KEY_FORMAT, "method": self.method, "block_size": self.block_size,
             "channels": CHANNELS, "derivation": self.derivation},
            sort_keys=True, separators=(",", ":"),
        ).encode()
        msg = b"keyshard-fingerprint/1|" + public + b"|" + self.material.canonical_bytes()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint[:16]

    # -- key space ---------------------------------------------------------------------------
    def keyspace_bits(self) -> float:
        """log2 of the number of distinct keys of this kind (method, block size, mask size...).

        For FFX this counts masks only: the attacker is assumed to know the password, as in
        the paper's fixed-password setting (the worst case).
        """
        return methods.get(self.method).keyspace_bits(self.material)

    def keyspace_count(self) -> int | None:
        """Exact number of keys when it is small enough to print, else None."""
        if self.keyspace_bits() > 64:
            return None
        return methods.get(self.method).keyspace_count(self.material)

    def describe_warnings(self) -> list[str]:
        """Plain-language warnings a user should see in ``key-info``."""
        out = []
        bits = self.keyspace_bits()
        if bits < SMALL_KEYSPACE_BITS:
            count = self.keyspace_count()
            out.append(
                f"small key space: {count} keys (2^{bits:.1f}); an attacker holding the model "
                "can try them all. Use a larger block size or another method."
            )
        if self.reference_seed is not None:
            out.append(
                "reference-seed key: it is only as strong as the seed (torch uses its low 32 bits); a "
                "small integer seed can be enumerated with torch.randperm. Use it only to interoperate "
                "with the authors' code."
            )
        return out


# -- file I/O -------------------------------------------------------------------------------

def generate(method: str, block_size: int, reference_seed: int | None = None,
             ffx_password: bytes | None = None) -> Key:
    """A new key with a fresh 256-bit secret from the OS CSPRNG."""
    validate_params(method, block_size, reference_seed, ffx_password)
    return Key(method=method, block_size=block_size, secret=secrets.token_bytes(32),
               reference_seed=reference_seed, ffx_password=ffx_password)


def validate_params(method: str, block_size: int, reference_seed: int | None = None,
                    ffx_password: bytes | None = None) -> None:
    """Refuse what no valid key file can hold, before anything is derived or written."""
    method_ = methods.get(method)  # KeyshardError naming the registered methods
    if not _int_in(block_size, 1, MAX_BLOCK_SIZE):
        raise KeyshardError(f"block size must be an integer from 1 to {MAX_BLOCK_SIZE}, got {_show(block_size)}")
    if reference_seed is not None and not _int_in(reference_seed, 0, MAX_REFERENCE_SEED):
        raise KeyshardError(f"reference seed must be an integer from 0 to 2^63-1, got {_show(reference_seed)}")
    if ffx_password is not None:
        if not method_.takes_password:
            raise KeyshardError(f"an FFX password applies only to method {' or '.join(password_methods())}")
        if not 1 <= len(ffx_password) <= MAX_FFX_PASSWORD_BYTES:
            raise KeyshardError(f"the FFX password must be 1 to {MAX_FFX_PASSWORD_BYTES} bytes long")


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _show(value) -> str:
    """A short rendering of a bad parameter (never a 5000-digit integer)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 40 else text[:40] + "..."


def to_json(key: Key) -> dict:
    doc = {"format": KEY_FORMAT, "method": key.method, "block_size": key.block_size,
           "channels": CHANNELS, "derivation": key.derivation, "secret": key.secret.hex()}
    if key.reference_seed is not None:
        doc["reference_seed"] = key.reference_seed
    if key.ffx_password is not None:
        doc["ffx_password"] = key.ffx_password.decode("utf-8", "surrogateescape")
    if key.explicit is not None:
        doc["material"] = methods.get(key.method).material_to_json(key.explicit)
    return doc


def save(key: Key, path: str | os.PathLike, force: bool = False) -> None:
    """Write the key file with mode 0600; refuse to replace an existing file unless ``force``.

    The content is checked first, exactly as ``load`` will check it, so a key that could not be
    read back is never written.  The file is created exclusively under a temporary name with 0600
    from the start (never world-readable, not even briefly) and renamed into place.
    """
    path = Path(path)
    doc = to_json(key)
    from_json(doc, f"{path}: cannot write key file")
    if path.exists() and not force:
        raise KeyshardError(f"{path}: already exists; refusing to overwrite a key (`force=True` replaces it)")
    if path.is_dir():
        raise KeyshardError(f"{path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise KeyshardError(f"{path}: cannot write key, directory {parent} does not exist")
    write_new(path, (json.dumps(doc, indent=2) + "\n").encode(), 0o600, overwrite=force, what="key file")


def load(path: str | os.PathLike) -> Key:
    """Read and validate a key file; any problem is one KeyshardError naming the file.

    Only a regular file of at most ``MAX_KEY_FILE_BYTES`` is read (never a device, a FIFO or a
    directory); its JSON is checked against ``manifests/key.schema.json`` and then for what the
    schema cannot say.  A file that group or others may read gets one warning line on stderr
    (once per file and command).  Error messages never quote the file's content (it holds the
    secret).
    """
    path = Path(path)
    raw, mode = read_secret_file(path, MAX_KEY_FILE_BYTES, "key file")
    key = from_json(_parse_json(raw, path), f"{path}: invalid key file", path=str(path))
    warn_if_readable(path, mode, "key file")
    return key


def from_json(doc, where: str, path: str | None = None) -> Key:
    """A Key from a parsed key file: the schema first, then the checks it cannot express.

    Any problem is one KeyshardError ``"<where>: <field> <what is wrong>"``.
    """
    try:
        # The first error only: a bad list of 786432 items is not walked again for a best match.
        error = next(iter(_validator().iter_errors(doc)), None)
    except RecursionError:
        raise KeyshardError(f"{where}: nested too deeply") from None
    if error is not None:
        raise KeyshardError(f"{where}: {_describe(error)}")
    method, block_size = doc["method"], doc["block_size"]
    explicit = None
    if doc.get("material") is not None:  # the schema has checked types, bounds and which fields each method has
        explicit = methods.get(method).material_from_json(block_size, doc["material"], where)
    password = doc.get("ffx_password")
    if password is not None:
        try:
            password = password.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise KeyshardError(f"{where}: 'ffx_password' holds an unpaired surrogate, not text") from None
    return Key(method=method, block_size=block_size, secret=bytes.fromhex(doc["secret"]),
               reference_seed=doc.get("reference_seed"), ffx_password=password, explicit=explicit, path=path)


@lru_cache(maxsize=1)
def key_schema() -> dict:
    """``manifests/key.schema.json`` (package data of ``keyshard.manifests``)."""
    from importlib import resources

    return json.loads(resources.files("keyshard.manifests").joinpath("key.schema.json").read_text())


def password_methods() -> list[str]:
    """The registered methods whose keys take a password (FFX)."""
    return [name for name in methods.names() if methods.get(name).takes_password]


def _validator():
    """The validator of the key schema for the methods registered now (see ``_validator_for``)."""
    return _validator_for(methods.names())


@lru_cache(maxsize=4)
def _validator_for(method_names: tuple[str, ...]):
    """A Draft 2020-12 validator of the key schema, with the registered methods' fragments
    filled in (``methods.key_schema``; for the built-ins that is the file on disk) and two
    adjustments.

    * ``integer`` means a JSON integer as written (Python ``int``, not ``4.0`` and not ``true``).
    * ``items`` of plain bounded integers takes a fast path: an explicit permutation has up to
      786432 entries and the generic code spends ~4 µs on each.  The same answer comes from
      checking them all at C speed and descending only into the first bad one, which is the
      generic code's first error.
    """
    import jsonschema

    base = jsonschema.Draft202012Validator
    generic_items = base.VALIDATORS["items"]

    def items(validator, subschema, instance, schema):
        bad = _first_bad_int(instance, subschema) if "prefixItems" not in schema else None
        if bad is None:
            yield from generic_items(validator, subschema, instance, schema)
        elif bad >= 0:
            yield from validator.descend(instance[bad], subschema, path=bad)

    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
    schema = methods.key_schema(key_schema(), method_names)
    return jsonschema.validators.extend(base, validators={"items": items}, type_checker=checker)(schema)


def _first_bad_int(instance, subschema) -> int | None:
    """For a list checked against ``{"type": "integer", "minimum": a, "maximum": b}``: -1 when every
    item passes, else the index of the first that does not; None for any other list or schema."""
    if not (isinstance(instance, list) and isinstance(subschema, dict) and subschema.get("type") == "integer"
            and set(subschema) <= {"type", "minimum", "maximum"}):
        return None
    low, high = subschema.get("minimum"), subschema.get("maximum")
    if all(type(v) is int for v in instance) and (
            not instance or ((low is None or min(instance) >= low) and (high is None or max(instance) <= high))):
        return -1
    for index, v in enumerate(instance):
        if type(v) is not int or (low is not None and v < low) or (high is not None and v > high):
            return index
    return -1  # (not reached: the fast check failed for some item)


_TYPE_NAMES = {"integer": "an integer", "string": "a string", "array": "a list", "object": "an object",
               "number": "a number", "boolean": "true or false", "null": "null"}


def _describe(error) -> str:
    """The first schema error as '<field> <rule>': it names the field and the rule, never the value."""
    parts = list(error.absolute_path)
    kw, value = error.validator, error.validator_value
    sub = error.schema if isinstance(error.schema, dict) else {}
    field = _field(parts)
    if kw == "type":
        types = [value] if isinstance(value, str) else list(value)
        return f"{field} must be {' or '.join(_TYPE_NAMES.get(t, t) for t in types)}"
    if kw == "const":
        return f"{field} must be {value!r}"
    if kw == "enum":
        return f"{field} must be one of {', '.join(map(str, value))}"
    if kw in ("minimum", "maximum"):
        return f"{field} must be at {'least' if kw == 'minimum' else 'most'} {value}"
    if kw in ("minLength", "maxLength", "minItems", "maxItems"):
        unit = "characters" if kw.endswith("Length") else "items"
        return f"{field} must have at {'least' if kw.startswith('min') else 'most'} {value} {unit}"
    if kw == "uniqueItems":
        return f"{field} must not repeat a value"
    if kw == "required":
        missing = [name for name in value if name not in error.instance]
        return f"{_field(parts + missing[:1])} is missing"
    if kw == "additionalProperties":
        unknown = [name for name in error.instance if name not in sub.get("properties", {})]
        return f"unknown field {_field(parts + unknown[:1])}"
    if kw == "not" and "errorMessage" in sub:
        return f"{field} {sub['errorMessage']}"
    return f"{field} does not match the key file schema ({kw})"


def _field(parts: list) -> str:
    """'material.permutation[3]' for a path in the document; names from the file are shortened."""
    if not parts:
        return "the top level"
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = "".join(c if c.isprintable() else "?" for c in str(part)[:40]) or "(empty name)"
            out += ("." if out else "") + name + ("..." if len(str(part)) > 40 else "")
    return f"'{out}'"


class _DuplicateField(ValueError):
    pass


def _no_duplicate_fields(pairs: list) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateField(name)
            seen.add(name)
    return doc


def _parse_json(raw: bytes, path: Path):
    """JSON from the file's bytes; every way it can fail is one KeyshardError naming the file."""
    not_json = f"{path}: not a keyshard key file (invalid JSON"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyshardError(f"{not_json}: not UTF-8 text)") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_fields)
    except _DuplicateField as exc:
        raise KeyshardError(f"{path}: invalid key file: field {_field([exc.args[0]])} appears twice") from None
    except json.JSONDecodeError as exc:  # its message names the position, never the content
        raise KeyshardError(f"{not_json}: {exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise KeyshardError(f"{not_json}: nested too deeply)") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise KeyshardError(f"{not_json}: a number with too many digits)") from None


# -- secrets on disk ------------------------------------------------------------------------

_FILE_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def read_secret_file(path: str | os.PathLike, max_bytes: int, what: str) -> tuple[bytes, int]:
    """The bytes of a small secret file (a key, a password) and its mode.

    Only a regular file is opened for reading (``/dev/zero`` or a FIFO would never end or never
    start), without blocking, and at most ``max_bytes`` are accepted.  Problems are one
    KeyshardError naming the file.
    """
    path = Path(path)
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                st = os.fstat(fd)  # the file actually opened
                if stat.S_ISREG(st.st_mode) and st.st_size <= max_bytes:
                    chunks, size = [], 0
                    chunk_size = max(st.st_size + 1, 1 << 16)  # no max_bytes buffer for a small file
                    while size <= max_bytes and (chunk := os.read(fd, min(chunk_size, max_bytes + 1 - size))):
                        chunks.append(chunk)
                        size += len(chunk)
                    data = b"".join(chunks)
            finally:
                os.close(fd)
    except FileNotFoundError:
        raise KeyshardError(f"{path}: {what} not found") from None
    except (OSError, ValueError) as exc:
        raise KeyshardError(f"{path}: cannot read {what} ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise KeyshardError(f"{path}: is a directory, not {_a(what)}")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise KeyshardError(f"{path}: is {kind}; {_a(what)} must be a regular file")
    if st.st_size > max_bytes or len(data) > max_bytes:
        raise KeyshardError(f"{path}: too large for {_a(what)} (at most {max_bytes} bytes)")
    return data, st.st_mode


def _a(what: str) -> str:
    return ("an " if what[:1] in "aeiouF" else "a ") + what


_MODE_WARNED: set[str] = set()  # outside a click command: once per file and process


def warn_if_readable(path: str | os.PathLike, mode: int, what: str = "key file") -> None:
    """One ``warning:`` line on stderr when group or others may read a secret file.

    Once per file and command (click's context), whichever and however many loaders read it.
    """
    message = _mode_warning(path, mode, what)
    if message is None:
        return
    import click

    ctx = click.get_current_context(silent=True)
    seen = ctx.meta.setdefault("keyshard.keys.mode_warned", set()) if ctx is not None else _MODE_WARNED
    ident = os.path.realpath(path)
    if ident not in seen:
        seen.add(ident)
        click.echo(f"warning: {message}", err=True)


def _mode_warning(path, mode: int, what: str) -> str | None:
    mode = stat.S_IMODE(mode)
    if mode & 0o077:
        return f"{path}: {what} mode is {mode:04o}; it should be 0600 (chmod 600 {path})"
    return None


def check_file_mode(path: str | os.PathLike) -> str | None:
    """A warning if the key file is readable by group/others (it should be 0600)."""
    return _mode_warning(path, os.stat(path).st_mode, "key file")


def ffx_password_from(option: str | None, file: str | os.PathLike | None = None, use_env: bool = True,
                      environ=None) -> tuple[bytes | None, str | None]:
    """The FFX password from ``--ffx-password``, ``--ffx-password-file`` or ``$KEYSHARD_FFX_PASSWORD``.

    The command line is visible to ``ps`` and kept in shell history; a file (read like a key
    file: regular, size-capped, mode warning; one trailing newline dropped) or the environment
    variable (an empty one counts as unset; ``use_env=False`` ignores it) are not.  At most one
    may be given.  Returns the password's bytes and where it came from (None, None when none
    was given).  No message ever contains the password.
    """
    environ = os.environ if environ is None else environ
    env = (environ.get(FFX_PASSWORD_ENV) or None) if use_env else None
    given = [name for name, v in (("--ffx-password", option), ("--ffx-password-file", file),
                                  (f"${FFX_PASSWORD_ENV}", env)) if v is not None]
    if len(given) > 1:
        raise KeyshardError(f"the FFX password was given twice ({' and '.join(given)}); give it one way only")
    if not given:
        return None, None
    if file is not None:
        source = f"--ffx-password-file {file}"
        raw, mode = read_secret_file(file, MAX_FFX_PASSWORD_BYTES + 2, "FFX password file")
        password = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
        warn_if_readable(file, mode, "FFX password file")
    else:
        source = given[0]
        try:
            password = (option if option is not None else env).encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise KeyshardError(f"{source}: the FFX password is not text") from None
    if not 1 <= len(password) <= MAX_FFX_PASSWORD_BYTES:
        raise KeyshardError(f"{source}: the FFX password must be 1 to {MAX_FFX_PASSWORD_BYTES} bytes long")
    return password, source
