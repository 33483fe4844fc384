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
(``mask_size``; ``rule_mask_size`` says what each derivation selects).

The fingerprint is HMAC-SHA256 keyed by the secret over the public parameters and the derived
material: it identifies a key without letting anyone test guesses offline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from keyshard.errors import KeyshardError

KEY_FORMAT = "keyshard-key/1"
METHODS = ("shf", "np", "ffx")
CHANNELS = 3
DERIVE_SECRET = "keyshard-shake256/1"
DERIVE_REFERENCE = "reference-torch-randperm/1"
DERIVE_EXPLICIT = "explicit/1"
# Key spaces below this many bits can be enumerated against a stolen model in reasonable time.
SMALL_KEYSPACE_BITS = 40


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
class KeyMaterial:
    """What a transform needs: the method, block size and the derived permutation/mask/table."""

    method: str
    block_size: int
    perm: np.ndarray | None = None  # SHF: out[k] = in[perm[k]] within each flattened block
    mask: np.ndarray | None = None  # NP/FFX: bool, True where the value is transformed
    table: np.ndarray | None = None  # FFX: uint16 code for each value 0..255

    @property
    def block_len(self) -> int:
        return self.block_size * self.block_size * CHANNELS

    @property
    def divisor(self) -> int:
        """The value the model divides pixels by: 255, or max(table) for FFX (as the reference)."""
        return int(self.table.max()) if self.method == "ffx" else 255

    def canonical_bytes(self) -> bytes:
        """Stable byte encoding of the material, used inside the keyed fingerprint."""
        parts = []
        if self.perm is not None:
            parts.append(b"perm" + self.perm.astype("<u4").tobytes())
        if self.mask is not None:
            parts.append(b"mask" + np.packbits(self.mask.astype(np.uint8)).tobytes())
        if self.table is not None:
            parts.append(b"table" + self.table.astype("<u2").tobytes())
        return b"|".join(parts)

    def equals(self, other: "KeyMaterial") -> bool:
        """True when both apply exactly the same transform."""

        def same(a, b):
            return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))

        return (
            self.method == other.method
            and self.block_size == other.block_size
            and same(self.perm, other.perm)
            and same(self.mask, other.mask)
            and same(self.table, other.table)
        )


@dataclass(frozen=True)
class Key:
    """A loaded key file. ``material`` and ``fingerprint`` are derived lazily and cached."""

    method: str
    block_size: int
    secret: bytes
    reference_seed: int | None = None
    ffx_password: bytes | None = None  # as given in the file; None means derived from the secret
    explicit: KeyMaterial | None = None
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
    def material(self) -> KeyMaterial:
        if self.explicit is not None:
            return self.explicit
        n = self.block_size * self.block_size * CHANNELS
        if self.method == "shf":
            perm = (reference_permutation(self.reference_seed, n) if self.reference_seed is not None
                    else fisher_yates(self.secret, b"shf-permutation", n))
            return KeyMaterial("shf", self.block_size, perm=perm)
        if self.reference_seed is not None:
            mask = reference_permutation(self.reference_seed, n) > n / 2  # rule_mask_size: n - 1 - n // 2
        else:
            mask = np.zeros(n, dtype=bool)
            mask[fisher_yates(self.secret, b"mask-order", n)[: rule_mask_size(self.block_size, DERIVE_SECRET)]] = True
        table = ffx_table(self.password) if self.method == "ffx" else None
        return KeyMaterial(self.method, self.block_size, mask=mask, table=table)

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
        """log2 of the number of distinct keys of this kind (method, block size, mask size).

        For FFX this counts masks only: the attacker is assumed to know the password, as in
        the paper's fixed-password setting (the worst case).
        """
        n = self.block_size * self.block_size * CHANNELS
        if self.method == "shf":
            return math.lgamma(n + 1) / math.log(2)
        selected = mask_size(self.material)
        return math.log2(math.comb(n, selected)) if n < 4000 else _log2_comb(n, selected)

    def keyspace_count(self) -> int | None:
        """Exact number of keys when it is small enough to print, else None."""
        if self.keyspace_bits() > 64:
            return None
        n = self.block_size * self.block_size * CHANNELS
        if self.method == "shf":
            return math.factorial(n)
        return math.comb(n, mask_size(self.material))

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


def rule_mask_size(block_size: int, derivation: str) -> int | None:
    """How many of the 3M² block positions an NP/FFX mask of ``derivation`` selects.

    ``keyshard-shake256/1``: exactly half (``n // 2``).  The reference code's ``perm > n/2``
    selects the values ``floor(n/2) + 1 .. n - 1``: ``n - 1 - n // 2`` positions (one fewer than
    half for even n).  An explicit key's mask is whatever its file holds: None here, ask
    ``mask_size(material)``.  This is the one place that knows these counts; wrong keys, near-miss
    keys and key search all follow ``mask_size`` of the key they are given.
    """
    n = block_size * block_size * CHANNELS
    if derivation == DERIVE_SECRET:
        return n // 2
    if derivation == DERIVE_REFERENCE:
        return n - 1 - n // 2
    return None


def mask_size(material: KeyMaterial) -> int:
    """How many positions an NP/FFX key's mask selects (what its wrong keys and searches keep)."""
    if material.mask is None:
        raise ValueError(f"{material.method} keys have no mask")
    return int(material.mask.sum())


def _log2_comb(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


# -- file I/O -------------------------------------------------------------------------------

def generate(method: str, block_size: int, reference_seed: int | None = None,
             ffx_password: bytes | None = None) -> Key:
    """A new key with a fresh 256-bit secret from the OS CSPRNG."""
    validate_params(method, block_size)
    if ffx_password is not None and method != "ffx":
        raise KeyshardError("--ffx-password applies only to --method ffx")
    return Key(method=method, block_size=block_size, secret=secrets.token_bytes(32),
               reference_seed=reference_seed, ffx_password=ffx_password)


def validate_params(method: str, block_size: int) -> None:
    if method not in METHODS:
        raise KeyshardError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise KeyshardError(f"block size must be a positive integer, got {block_size!r}")


def to_json(key: Key) -> dict:
    doc = {"format": KEY_FORMAT, "method": key.method, "block_size": key.block_size,
           "channels": CHANNELS, "derivation": key.derivation, "secret": key.secret.hex()}
    if key.reference_seed is not None:
        doc["reference_seed"] = key.reference_seed
    if key.ffx_password is not None:
        doc["ffx_password"] = key.ffx_password.decode("utf-8", "surrogateescape")
    if key.explicit is not None:
        m = key.explicit
        material = {}
        if m.perm is not None:
            material["permutation"] = m.perm.tolist()
        if m.mask is not None:
            material["mask"] = "".join("1" if b else "0" for b in m.mask)
        if m.table is not None:
            material["table"] = m.table.tolist()
        doc["material"] = material
    return doc


def save(key: Key, path: str | os.PathLike, force: bool = False) -> None:
    """Write the key file with mode 0600; refuse to replace an existing file unless ``force``.

    The file is created exclusively under a temporary name with 0600 from the start (never
    world-readable, not even briefly) and renamed into place.
    """
    path = Path(path)
    if path.exists() and not force:
        raise KeyshardError(f"{path}: already exists; refusing to overwrite a key (use --force)")
    if path.is_dir():
        raise KeyshardError(f"{path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise KeyshardError(f"{path}: cannot write key, directory {parent} does not exist")
    tmp = parent / f".{path.name}.tmp-{os.getpid()}"
    data = (json.dumps(to_json(key), indent=2) + "\n").encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if not force and path.exists():
            raise KeyshardError(f"{path}: already exists; refusing to overwrite a key (use --force)")
        os.replace(tmp, path)
    except OSError as exc:
        raise KeyshardError(f"{path}: cannot write key file ({exc.strerror})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: str | os.PathLike) -> Key:
    """Read and validate a key file; any problem is one KeyshardError naming the file.

    Error messages never quote the file's content (it holds the secret).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyshardError(f"{path}: key file not found") from None
    except IsADirectoryError:
        raise KeyshardError(f"{path}: is a directory, not a key file") from None
    except OSError as exc:
        raise KeyshardError(f"{path}: cannot read key file ({exc.strerror})") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyshardError(f"{path}: not a keyshard key file (invalid JSON)") from None

    def bad(what: str) -> KeyshardError:
        return KeyshardError(f"{path}: invalid key file: {what}")

    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
        raise bad(f"'format' must be {KEY_FORMAT!r}")
    method, block_size = doc.get("method"), doc.get("block_size")
    if method not in METHODS:
        raise bad(f"'method' must be one of {', '.join(METHODS)}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise bad("'block_size' must be a positive integer")
    if doc.get("channels", CHANNELS) != CHANNELS:
        raise bad("'channels' must be 3")
    secret_hex = doc.get("secret")
    try:
        secret = bytes.fromhex(secret_hex) if isinstance(secret_hex, str) else b""
    except ValueError:
        secret = b""
    if len(secret) != 32:
        raise bad("'secret' must be 64 hex characters (32 bytes)")
    seed = doc.get("reference_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise bad("'reference_seed' must be a non-negative integer")
    password = doc.get("ffx_password")
    if password is not None:
        if method != "ffx" or not isinstance(password, str) or not password:
            raise bad("'ffx_password' must be a non-empty string and only for method ffx")
        password = password.encode("utf-8", "surrogateescape")
    explicit = _load_explicit(doc, method, block_size, bad) if "material" in doc else None
    key = Key(method=method, block_size=block_size, secret=secret, reference_seed=seed,
              ffx_password=password, explicit=explicit, path=str(path))
    if doc.get("derivation", key.derivation) != key.derivation:
        raise bad(f"'derivation' {doc.get('derivation')!r} does not match the file's fields")
    return key


def _load_explicit(doc: dict, method: str, block_size: int, bad) -> KeyMaterial:
    """Material stored in the file itself (recovered or imported keys)."""
    material = doc["material"]
    n = block_size * block_size * CHANNELS
    if not isinstance(material, dict):
        raise bad("'material' must be an object")
    if method == "shf":
        perm = np.asarray(material.get("permutation", []), dtype=np.int64)
        if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
            raise bad(f"'material.permutation' must be a permutation of 0..{n - 1}")
        return KeyMaterial("shf", block_size, perm=perm)
    mask_text = material.get("mask", "")
    if not isinstance(mask_text, str) or len(mask_text) != n or set(mask_text) - {"0", "1"}:
        raise bad(f"'material.mask' must be a string of {n} '0'/'1' characters")
    mask = np.frombuffer(mask_text.encode(), dtype=np.uint8) == ord("1")
    table = None
    if method == "ffx":
        table = np.asarray(material.get("table", []), dtype=np.int64)
        if table.shape != (256,) or table.min() < 0 or table.max() > 999 or len(set(table.tolist())) != 256:
            raise bad("'material.table' must be 256 distinct codes in 0..999")
        table = table.astype(np.uint16)
    return KeyMaterial(method, block_size, mask=mask, table=table)


def check_file_mode(path: str | os.PathLike) -> str | None:
    """A warning if the key file is readable by group/others (it should be 0600)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        return f"{path}: key file mode is {mode:04o}; it should be 0600 (chmod 600 {path})"
    return None
