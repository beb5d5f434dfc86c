"""Optional Ed25519 signatures of model bundles, offline: keys are PEM files (docs/bundle.md section 8a).

The signature covers the exact bytes of `bundle.json`, prefixed by `DOMAIN`. The manifest holds
every file's SHA-256 and the content version, and the loader checks every file against it, so one
signature covers the whole bundle. It lives in `bundle.sig` beside the manifest, which does not list
it: signing a bundle leaves its version unchanged.

`cryptography` is imported only inside the functions that need it, so loading and serving a bundle
without signatures works where that optional package is not installed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.bundle.format import MANIFEST, Bundle, BundleError, load_bundle

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE = "bundle.sig"
SIGNATURE_FORMAT = "anomaly-scores bundle signature v1"
ALGORITHM = "ed25519"
# Prefixed to the manifest before signing, so that a signature made with a bundle key can never be
# replayed as a signature of anything else a key holder might sign (and vice versa).
DOMAIN = b"anomaly-scores bundle signature v1\n"
INSTALL_HINT = "pip install 'anomaly-scores[sign]'"
SIGNATURE_BYTES = 64
KEY_ID_CHARS = 16
# A real bundle.sig is about 200 bytes; the bound keeps a hostile file from being read into memory.
MAX_SIGNATURE_FILE_BYTES = 64 * 1024
_KEY_ID = re.compile(f"[0-9a-f]{{{KEY_ID_CHARS}}}")


class SignatureError(BundleError):
    """A bundle signature or a key cannot be made or verified: unsigned, malformed, untrusted or bad
    signature, an unusable key file, or cryptography missing."""


@dataclass(frozen=True)
class SignatureInfo:
    key_id: str  # SHA-256 of the raw 32-byte public key, first 16 lowercase hex characters
    algorithm: str
    path: Path  # the bundle.sig file


def _require_cryptography() -> None:
    """Fail with the install hint, not an ImportError, where the optional package is missing."""
    try:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401  (an import check only)
    except ImportError as e:
        raise SignatureError(
            f"bundle signatures need the cryptography package, which is not installed: {INSTALL_HINT}"
        ) from e


def key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, first 16 hex characters: names a key in bundle.sig."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_CHARS]


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SignatureError(f"cannot read the {what} key {path}: {e.strerror or e}") from e


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM SubjectPublicKeyInfo file; anything else is refused by name."""
    _require_cryptography()
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    data = _read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SignatureError(f"{path} is not a PEM public key: {e}") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(
            f"{path} holds a public key of type {_key_kind(key)}; bundle signatures use Ed25519"
        )
    return key


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    _require_cryptography()
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # raised for an encrypted key when no password is given
        raise SignatureError(f"{path} is an encrypted private key; keygen writes unencrypted PKCS8") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SignatureError(f"{path} is not a PEM private key: {e}") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(
            f"{path} holds a private key of type {_key_kind(key)}; bundle signatures use Ed25519"
        )
    return key


def _key_kind(key: object) -> str:
    """'RSA', 'EC', ... from cryptography's class name, for error messages."""
    return type(key).__name__.removesuffix("PublicKey").removesuffix("PrivateKey")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode`; never replace an existing file (O_EXCL also beats a racing writer)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as e:
        raise SignatureError(f"{path} exists; refusing to overwrite a key file") from e
    except OSError as e:
        raise SignatureError(f"cannot create {path}: {e.strerror or e}") from e
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have narrowed it; 0600 must not become wider anyway
        f.write(data)


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair as PEM files and return its key id: the private key as unencrypted
    PKCS8, mode 0600; the public key as SubjectPublicKeyInfo. Existing files are never overwritten."""
    _require_cryptography()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise SignatureError(f"the private and the public key would be the same file {private_path}")
    for path in (private_path, public_path):
        if path.exists():  # checked for both first, so a refusal leaves no half pair behind
            raise SignatureError(f"{path} exists; refusing to overwrite a key file")
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except SignatureError:
        private_path.unlink()  # created above by this call: a private key without its public half is useless
        raise
    return key_id(private.public_key())


def _read_manifest_bytes(root: Path) -> bytes:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a model bundle: {MANIFEST} is missing")
    try:
        return path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror or e}") from e


def sign_bundle(bundle_dir: Path, private_key_path: Path) -> SignatureInfo:
    """Sign the bundle's manifest with an Ed25519 private key and write `bundle.sig` (replacing any
    previous signature). The bundle is loaded and verified first, and the bytes signed are checked to
    be the manifest that was loaded: a signature never blesses a corrupt bundle."""
    root = Path(bundle_dir)
    private = _load_private_key(Path(private_key_path))
    manifest = _read_manifest_bytes(root)
    bundle = load_bundle(root)
    _same_manifest(bundle, manifest)
    signature = private.sign(DOMAIN + manifest)
    info = SignatureInfo(key_id(private.public_key()), ALGORITHM, root / SIGNATURE)
    document = {
        "format": SIGNATURE_FORMAT,
        "algorithm": ALGORITHM,
        "key_id": info.key_id,
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    _replace_file(info.path, (json.dumps(document, indent=2) + "\n").encode("ascii"))
    return info


def _replace_file(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so no reader ever sees half a signature."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # like the bundle's other files: the service user must read it
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise SignatureError(f"cannot write {path}: {e.strerror or e}") from e


def _trusted_keys(paths: Sequence[Path]) -> dict[str, Ed25519PublicKey]:
    if not paths:
        raise SignatureError("no trusted public keys given")
    return {key_id(key): key for key in (load_public_key(Path(p)) for p in paths)}


def _read_signature(path: Path) -> tuple[str, bytes]:
    """The key id and raw signature of a bundle.sig file; any deviation from the format is refused."""
    if not path.is_file():
        raise SignatureError(
            f"{path.parent} is unsigned: it has no {SIGNATURE} (sign it with `anomaly-scores sign`)"
        )
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SIGNATURE_FILE_BYTES + 1)
    except OSError as e:
        raise SignatureError(f"cannot read {path}: {e.strerror or e}") from e
    malformed = f"malformed {path}"
    if len(data) > MAX_SIGNATURE_FILE_BYTES:
        raise SignatureError(f"{malformed}: larger than {MAX_SIGNATURE_FILE_BYTES} bytes")
    try:
        document: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SignatureError(f"{malformed}: not JSON: {e}") from e
    expected_keys = {"format", "algorithm", "key_id", "signature"}
    if not isinstance(document, dict) or set(document) != expected_keys:
        raise SignatureError(
            f"{malformed}: must be a JSON object with exactly the keys {sorted(expected_keys)}"
        )
    if document["format"] != SIGNATURE_FORMAT:
        raise SignatureError(f"{malformed}: format {document['format']!r}, expected {SIGNATURE_FORMAT!r}")
    if document["algorithm"] != ALGORITHM:
        raise SignatureError(
            f"{malformed}: algorithm {document['algorithm']!r}, this build verifies {ALGORITHM!r} only"
        )
    kid = document["key_id"]
    if not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
        raise SignatureError(f"{malformed}: key_id must be {KEY_ID_CHARS} lowercase hex characters")
    try:
        signature = base64.b64decode(document["signature"], validate=True)
    except (TypeError, ValueError, binascii.Error) as e:
        raise SignatureError(f"{malformed}: signature is not base64: {e}") from e
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(
            f"{malformed}: an Ed25519 signature has {SIGNATURE_BYTES} bytes, this one {len(signature)}"
        )
    return kid, signature


def verify_manifest(
    bundle_dir: Path, manifest: bytes, trusted_public_key_paths: Sequence[Path]
) -> SignatureInfo:
    """Check that `manifest` (the bytes of the bundle's bundle.json, as read by the caller) is signed
    in the bundle's bundle.sig by one of the trusted keys. Says which failed: unsigned, malformed,
    untrusted key or bad signature. The caller must then use exactly these bytes (or a manifest equal
    to their parse) and no later read of bundle.json: see load_verified_bundle."""
    _require_cryptography()
    from cryptography.exceptions import InvalidSignature

    trusted = _trusted_keys(trusted_public_key_paths)
    path = Path(bundle_dir) / SIGNATURE
    kid, signature = _read_signature(path)
    if kid not in trusted:
        raise SignatureError(
            f"{path} is signed by key {kid}, which is not trusted (trusted: {', '.join(sorted(trusted))})"
        )
    try:
        trusted[kid].verify(signature, DOMAIN + manifest)
    except InvalidSignature as e:
        raise SignatureError(
            f"{path}: bad signature by key {kid}: {MANIFEST} was changed after signing "
            "(or the signature was not made by that key)"
        ) from e
    return SignatureInfo(kid, ALGORITHM, path)


def verify_bundle(bundle_dir: Path, trusted_public_key_paths: Sequence[Path]) -> SignatureInfo:
    """Read bundle.json once and check its signature (verify_manifest). Only the signature: loading
    the bundle is the caller's, and it must load the manifest bytes verified here, not re-read the
    file, or the manifest may be replaced in between; load_verified_bundle does both safely."""
    root = Path(bundle_dir)
    return verify_manifest(root, _read_manifest_bytes(root), trusted_public_key_paths)


def _same_manifest(bundle: Bundle, manifest: bytes) -> None:
    """The loader reads bundle.json itself: refuse if what it parsed is not the bytes at hand."""
    try:
        same = bundle.manifest == json.loads(manifest)
    except (UnicodeDecodeError, json.JSONDecodeError):
        same = False
    if not same:
        raise SignatureError(f"{bundle.path / MANIFEST} changed while it was being read; try again")


def load_verified_bundle(
    bundle_dir: Path, trusted_public_key_paths: Sequence[Path]
) -> tuple[Bundle, SignatureInfo]:
    """Verify the signature, load the bundle, and check that the loaded manifest is the verified one.
    The loader checks every file against that manifest's SHA-256, so the whole bundle is covered."""
    root = Path(bundle_dir)
    manifest = _read_manifest_bytes(root)
    info = verify_manifest(root, manifest, trusted_public_key_paths)
    bundle = load_bundle(root)
    _same_manifest(bundle, manifest)
    return bundle, info
