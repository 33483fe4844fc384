"""Signed manifests: Ed25519 signing keys, detached ``manifest.json.sig``, and manifest provenance.

A *signing* key is not an encryption key.  The encryption key (``keygen``) decides the pixels and
must stay secret from everyone who should not use the model; the signing key lets the
*publisher* of a dataset vouch for its ``manifest.json``, and anyone holding the public half (a
trainer, an auditor) can check that vouching without any secret.  Because the manifest lists the
sha256 of every shard and the readers check those while streaming, a verified signature covers
the shards too: whoever can replace a shard can rewrite its sha256 in the manifest, but cannot
re-sign the manifest.

Files (``keyshard signing-key -o NAME``):

* ``NAME``: the Ed25519 private key, PKCS#8 PEM, unencrypted, mode 0600 (written under a
  temporary name created 0600 and renamed; an existing file is never replaced).  Same format as
  ``openssl genpkey -algorithm ed25519``.
* ``NAME.pub``: the public key, SubjectPublicKeyInfo PEM (``openssl pkey -pubout``), mode 0644.

``manifest.json.sig`` is one line: the standard base64 (RFC 4648, padded) of the raw 64-byte
Ed25519 signature over the exact bytes of ``manifest.json``, then a newline.  Nothing is hashed
or prefixed first, so stock tools verify it too::

    base64 -d manifest.json.sig > sig.bin
    openssl pkeyutl -verify -pubin -inkey NAME.pub -rawin -in manifest.json -sigfile sig.bin

The signer *fingerprint* is the SHA-256 (hex) of the 32 raw public-key bytes.  A public key is
public data, so a plain hash is fine here — unlike the encryption key's fingerprint, which is an
HMAC because the NP/FFX key spaces are small enough to hash every candidate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from keyshard.errors import KeyshardError
from keyshard.fsutil import write_new

SIGNATURE_SUFFIX = ".sig"
SIGNATURE_FILE = "manifest.json" + SIGNATURE_SUFFIX
PUBLIC_SUFFIX = ".pub"
SIGNATURE_BYTES = 64


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a core dependency
        raise KeyshardError("signed manifests need the cryptography package (pip install cryptography)") from None
    return serialization, ed25519, InvalidSignature, UnsupportedAlgorithm


# -- key files ------------------------------------------------------------------------------

def public_path(name: str | os.PathLike) -> Path:
    return Path(str(name) + PUBLIC_SUFFIX)


def generate(name: str | os.PathLike) -> str:
    """Write a new Ed25519 key pair: ``name`` (private, 0600) and ``name.pub``; return the signer
    fingerprint.  An existing ``name`` or ``name.pub`` is an error (nothing is written)."""
    serialization, ed25519, _, _ = _crypto()
    private_path, pub_path = Path(name), public_path(name)
    for path in (private_path, pub_path):
        if path.is_dir():
            raise KeyshardError(f"{path}: is a directory")
        if path.exists() or path.is_symlink():
            raise KeyshardError(f"{path}: already exists; refusing to overwrite a signing key")
    parent = private_path.parent if str(private_path.parent) else Path(".")
    if not parent.is_dir():
        raise KeyshardError(f"{private_path}: cannot write signing key, directory {parent} does not exist")
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    write_new(private_path, private_pem, 0o600, what="signing key")
    try:
        write_new(pub_path, public_pem, 0o644, what="public key")
    except KeyshardError:
        private_path.unlink()  # ours, just written: leave no half pair behind
        raise
    return fingerprint(private.public_key())


def _read(path: str | os.PathLike, what: str) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyshardError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise KeyshardError(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        raise KeyshardError(f"{path}: cannot read {what} ({exc.strerror})") from None


def load_private(path: str | os.PathLike):
    """The Ed25519 private key of a signing-key file; one line (never quoting the file) otherwise."""
    serialization, ed25519, _, unsupported = _crypto()
    raw = _read(path, "signing key")
    if b"-----BEGIN PUBLIC KEY-----" in raw:
        raise KeyshardError(f"{path}: is a public key; signing needs the private key file "
                            f"(NAME, not NAME{PUBLIC_SUFFIX})")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except TypeError:
        raise KeyshardError(f"{path}: is a passphrase-protected private key; keyshard needs an "
                            "unencrypted PEM key kept with mode 0600") from None
    except (ValueError, unsupported):
        raise KeyshardError(f"{path}: not a PEM private key (make one with `keyshard signing-key -o NAME`)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyshardError(f"{path}: holds a key of type {_kind(key)}; keyshard signs with Ed25519 keys only")
    return key


def load_public(path: str | os.PathLike):
    """The Ed25519 public key of a ``NAME.pub`` file; one line otherwise.  A private key is refused:
    verifying needs no secret, and the private key should not travel to trainers."""
    serialization, ed25519, _, unsupported = _crypto()
    raw = _read(path, "public key")
    if b"PRIVATE KEY-----" in raw:
        raise KeyshardError(f"{path}: is a private key; verifying needs only the public key "
                            f"(NAME{PUBLIC_SUFFIX}) — keep the private key with the publisher")
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, unsupported):
        raise KeyshardError(f"{path}: not a PEM public key (expected NAME{PUBLIC_SUFFIX} "
                            "from `keyshard signing-key`)") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyshardError(f"{path}: holds a key of type {_kind(key)}; keyshard verifies Ed25519 keys only")
    return key


def _kind(key) -> str:
    name = type(key).__name__.lstrip("_")
    return name.replace("PrivateKey", "").replace("PublicKey", "") or name


def fingerprint(public_key) -> str:
    """SHA-256 hex of the raw 32-byte public key (public data: a plain hash is fine)."""
    serialization, _, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def check_file_mode(path: str | os.PathLike) -> str | None:
    """A warning if a private signing key is readable by group/others."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        return f"{path}: signing key mode is {mode:04o}; it should be 0600 (chmod 600 {path})"
    return None


# -- signatures -----------------------------------------------------------------------------

def encode_signature(signature: bytes) -> bytes:
    return base64.b64encode(signature) + b"\n"


def decode_signature(text: bytes, where: str) -> bytes:
    try:
        sig = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        sig = b""
    if len(sig) != SIGNATURE_BYTES:
        raise KeyshardError(f"{where}: not a keyshard signature (expected the base64 of a "
                            f"{SIGNATURE_BYTES}-byte Ed25519 signature)")
    return sig


def sign(private_key, data: bytes) -> bytes:
    """The detached signature file content for ``data``."""
    return encode_signature(private_key.sign(data))


def verify(public_key, data: bytes, signature: bytes) -> bool:
    _, _, invalid, _ = _crypto()
    try:
        public_key.verify(signature, data)
    except invalid:
        return False
    return True


def write_signature(manifest_path: str | os.PathLike, private_key) -> Path:
    """Sign the exact bytes now in ``manifest_path`` and write ``<manifest>.sig`` next to it,
    atomically (temporary name, fsync, rename).  The result is checked before it is written."""
    from keyshard.fsutil import write_atomic

    manifest_path = Path(manifest_path)
    data = manifest_path.read_bytes()
    content = sign(private_key, data)
    if not verify(private_key.public_key(), data, decode_signature(content, "signature")):
        raise KeyshardError(f"{manifest_path}: signature did not verify right after signing")  # pragma: no cover
    sig_path = manifest_path.with_name(manifest_path.name + SIGNATURE_SUFFIX)
    write_atomic(sig_path, content)
    return sig_path


# -- what checkpoints and audits record -----------------------------------------------------

def manifest_provenance(source, raw_manifest: bytes, trust: str | os.PathLike | None) -> dict:
    """Where a manifest comes from: its sha256, whether its signature was verified, and by whom.

    With ``trust`` (a public-key file), ``manifest.json.sig`` next to the manifest (directory or
    URL base) must exist and verify over ``raw_manifest``, else one ``KeyshardError`` line naming
    the file.  Without it the sha256 is recorded and any signature is left unchecked.
    """
    from keyshard import sources

    digest = hashlib.sha256(raw_manifest).hexdigest()
    if trust is None:
        return {"manifest_sha256": digest, "signature_verified": False, "signer_fingerprint": None}
    public_key = load_public(trust)
    location = sources.join(source, SIGNATURE_FILE)
    unsigned = f"{location}: missing — the manifest is unsigned, and the public key {trust} requires a signature"
    if not sources.is_url(source) and not Path(location).is_file():
        raise KeyshardError(unsigned)
    try:
        raw_sig = sources.read_bytes(location, max_bytes=4096)
    except KeyshardError as exc:
        if "missing" in str(exc):
            raise KeyshardError(unsigned) from None
        raise
    signature = decode_signature(raw_sig, location)
    if not verify(public_key, raw_manifest, signature):
        raise KeyshardError(f"{location}: bad signature — {sources.join(source, 'manifest.json')} was changed "
                            f"after signing, or was signed by another key than {trust}")
    return {"manifest_sha256": digest, "signature_verified": True, "signer_fingerprint": fingerprint(public_key)}
