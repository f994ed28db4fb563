"""Signed bundles: Ed25519 signatures over the manifest, which holds every file's sha256.

A signature covers SIGNED_PREFIX + the exact bytes of manifest.yaml, so it vouches for every file through the
checksums. Signatures live beside the manifest in manifest.sig (JSON), several at once (key rotation):

    {"format": "edgellm-manifest-signatures", "version": 1,
     "signatures": [{"algorithm": "ed25519", "key_id": "<sha256 hex of the raw public key>",
                     "public_key": "<base64 raw key>", "signer": "<comment>", "signature": "<base64>"}]}

The public key in the file only lets `edgellm info --verify` say who signed; trust comes from the keys the
operator configures (trust.public_keys), matched on the whole key. See docs/signed-bundles.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bundle_format.bundle import MANIFEST_NAME, Bundle, BundleError, verify_bundle

SIGNATURE_NAME = "manifest.sig"
ALGORITHM = "ed25519"
_FORMAT = "edgellm-manifest-signatures"
# Domain separation: a signature made here cannot be replayed as a signature over anything else the key signs.
SIGNED_PREFIX = b"edgellm bundle manifest v1\n"
PASSWORD_ENV = "EDGELLM_SIGNING_KEY_PASSWORD"  # for a private key file encrypted with a passphrase


class KeyFileError(ValueError):
    """A key file that cannot be read or is not an Ed25519 key; the message names the file."""


@dataclass(frozen=True)
class Signature:
    key_id: str
    public_key: bytes  # raw 32 bytes
    signer: str
    value: bytes


@dataclass(frozen=True)
class SignatureCheck:
    """One signature of a bundle, checked: valid (it matches the manifest bytes) and trusted (its key is configured)."""

    signature: Signature
    valid: bool
    trusted: bool

    def describe(self) -> str:
        s = self.signature
        who = f"key {s.key_id}" + (f" ({s.signer})" if s.signer else "")
        if not self.valid:
            return f"{who}: INVALID (the manifest changed after it was signed, or the signature is corrupt)"
        return f"{who}: valid, " + ("trusted" if self.trusted else "not among the trusted keys")


def key_id(key: Ed25519PublicKey) -> str:
    """The key's fingerprint: sha256 of its raw 32 bytes, in hex."""
    return hashlib.sha256(_raw(key)).hexdigest()


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """A PEM (PKCS#8) Ed25519 private key, as `openssl genpkey -algorithm ed25519` or `edgellm keygen` write it."""
    data = _read_key_file(path)
    password = os.environ.get(PASSWORD_ENV)
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password else None)
    except TypeError:  # encrypted without a password, or a password for a key that has none
        why = f"{PASSWORD_ENV} is set but the key is not encrypted" if password else f"an encrypted key: set {PASSWORD_ENV}"
        raise KeyFileError(f"{path}: {why}") from None
    except ValueError as e:
        raise KeyFileError(f"{path}: not a PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__.removeprefix('_')} key; bundles are signed with Ed25519 keys")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM Ed25519 public key (`openssl pkey -pubout`, or the .pub file `edgellm keygen` writes)."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        hint = "; that is a private key: give its public half (the .pub file)" if b"PRIVATE KEY" in data else ""
        raise KeyFileError(f"{path}: not a PEM public key{hint} ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e.strerror}") from None


def load_trusted_keys(paths: list[str | os.PathLike]) -> dict[str, Ed25519PublicKey]:
    """Key id -> public key, for each file of `paths`."""
    return {key_id(k): k for k in (load_public_key(Path(p)) for p in paths)}


def generate_key_pair(private_path: Path) -> tuple[Path, Path, str]:
    """Write a new Ed25519 private key (mode 0600, never over an existing file) and its public key beside it
    (PRIVATE_PATH.pub); returns both paths and the key id."""
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise FileExistsError(f"{p} already exists; keygen never replaces a key")
    # Created 0600 by open(2) itself: the key is never readable by others, not even for a moment.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = key.public_key()
    public_path.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path, key_id(public)


def read_signatures(folder: Path) -> list[Signature]:
    """The signatures in folder/manifest.sig ([] when there is none); BundleError when the file is malformed."""
    path = Path(folder) / SIGNATURE_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: cannot read it ({e})") from None
    try:
        doc = json.loads(text)
        if doc.get("format") != _FORMAT or doc.get("version") != 1:
            raise ValueError(f"not an {_FORMAT} v1 file")
        out = []
        for i, entry in enumerate(doc["signatures"]):
            if entry.get("algorithm") != ALGORITHM:
                raise ValueError(f"signature {i}: algorithm {entry.get('algorithm')!r}, this edgellm checks {ALGORITHM}")
            public = base64.b64decode(entry["public_key"], validate=True)
            # The signer is a label outside the signed bytes: shown, never trusted, kept printable.
            signer = "".join(c if c.isprintable() else "?" for c in str(entry.get("signer", "")))[:200]
            sig = Signature(str(entry["key_id"]), public, signer, base64.b64decode(entry["signature"], validate=True))
            if len(public) != 32 or hashlib.sha256(public).hexdigest() != sig.key_id:
                raise ValueError(f"signature {i}: key_id does not match its public key")
            out.append(sig)
        return out
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise BundleError(f"{path}: not a valid signature file ({e})") from None


def check_signatures(bundle: Bundle, trusted: dict[str, Ed25519PublicKey]) -> list[SignatureCheck]:
    """Each signature of the bundle checked against the manifest bytes it was loaded from."""
    checks = []
    for sig in read_signatures(bundle.path):
        valid = _verifies(sig, bundle.manifest_bytes)
        # Trusted: the whole configured key, not only its id, equals the one that verified.
        key = trusted.get(sig.key_id)
        checks.append(SignatureCheck(sig, valid, key is not None and _raw(key) == sig.public_key))
    return checks


def sign_bundle(folder: Path, key: Ed25519PrivateKey, signer: str = "") -> Signature:
    """Add (or renew) this key's signature over folder/manifest.yaml; other keys' signatures that still match stay."""
    folder = Path(folder)
    manifest = (folder / MANIFEST_NAME).read_bytes()
    public = key.public_key()
    sig = Signature(key_id(public), _raw(public), signer, key.sign(SIGNED_PREFIX + manifest))
    try:
        others = [s for s in read_signatures(folder) if s.key_id != sig.key_id]
    except BundleError:  # a corrupt file is replaced
        others = []
    # A signature of another manifest would only make the bundle look tampered with: it is dropped.
    others = [s for s in others if _verifies(s, manifest)]
    doc = {"format": _FORMAT, "version": 1, "signatures": [
        {"algorithm": ALGORITHM, "key_id": s.key_id, "public_key": base64.b64encode(s.public_key).decode(),
         "signer": s.signer, "signature": base64.b64encode(s.value).decode()} for s in [*others, sig]]}
    tmp = folder / f".{SIGNATURE_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.rename(folder / SIGNATURE_NAME)  # a reader sees the old file or the new one, never half of one
    return sig


def _verifies(sig: Signature, manifest: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(sig.public_key).verify(sig.value, SIGNED_PREFIX + manifest)
        return True
    except (InvalidSignature, ValueError):
        return False


def verify_trusted_bundle(bundle: Bundle, trusted: dict[str, Ed25519PublicKey]) -> SignatureCheck:
    """What the daemon requires when trust.public_keys is set, before it loads anything of the bundle: a valid
    signature by a trusted key, every file matching its checksum, nothing in the folder that the manifest does
    not list, and no file that another user could change between this check and the load. Returns the signature
    that vouches for it; BundleError names the key or file otherwise."""
    checks = check_signatures(bundle, trusted)
    if not checks:
        raise BundleError(f"{bundle.path}: unsigned (no {SIGNATURE_NAME}), and trust.public_keys requires a signed "
                          f"bundle: sign it with `edgellm sign {bundle.path} --key KEY`")
    good = next((c for c in checks if c.valid and c.trusted), None)
    if good is None:
        raise BundleError(f"{bundle.path / SIGNATURE_NAME}: no valid signature by a trusted key: "
                          + "; ".join(c.describe() for c in checks))
    _check_exact_contents(bundle)
    _check_not_writable_by_others(bundle)
    verify_bundle(bundle)
    return good


def _check_exact_contents(bundle: Bundle) -> None:
    """A signed bundle holds its signed files only: the tokenizer also reads optional files it finds beside them
    (chat_template.jinja, special_tokens_map.json), which no checksum would cover."""
    expected = {MANIFEST_NAME, SIGNATURE_NAME} | {name.split("/")[0] for name in bundle.manifest["files"]}
    extra = sorted(p.name for p in bundle.path.iterdir() if p.name not in expected)
    if extra:
        raise BundleError(f"{bundle.path / extra[0]}: not listed in the signed manifest; a signed bundle holds only "
                          f"its signed files (remove {', '.join(extra)})")


def _check_not_writable_by_others(bundle: Bundle) -> None:
    """The files are checked, then loaded by path: nobody but their owner may change them in between."""
    for p in [bundle.path, *(bundle.path / name for name in [MANIFEST_NAME, *bundle.manifest["files"]])]:
        mode = os.stat(p).st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise BundleError(f"{p}: writable by {'others' if mode & stat.S_IWOTH else 'its group'}; a signed bundle's "
                              f"folder and files must be writable by their owner only (chmod go-w)")
