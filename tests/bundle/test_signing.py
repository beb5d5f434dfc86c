"""Bundle signatures (app.bundle.signing, docs/bundle.md section 8a): round trip, every refusal with
its own message, key files, and the documented message checked with cryptography directly."""

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from app.bundle import signing
from app.bundle.format import MANIFEST, BundleError, content_version, load_bundle
from app.bundle.signing import (
    SignatureError,
    generate_keypair,
    load_verified_bundle,
    sign_bundle,
    verify_bundle,
)

ROOT = Path(__file__).resolve().parents[2]
# Written out, not imported: the test checks the documented message, not the module's constant.
PREFIX = b"anomaly-scores bundle signature v1\n"


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    """A private copy of the session's tiny bundle, free to sign and tamper with."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def keypair(directory: Path, name: str) -> tuple[Path, Path, str]:
    private, public = directory / f"{name}.pem", directory / f"{name}.pub"
    return private, public, generate_keypair(private, public)


def raw_key_id(public: Path) -> str:
    key = serialization.load_pem_public_key(public.read_bytes())
    return hashlib.sha256(key.public_bytes_raw()).hexdigest()[:16]


def test_a_signed_bundle_verifies_and_the_signature_is_the_documented_one(bundle, tmp_path):
    private, public, kid = keypair(tmp_path, "signer")
    manifest_before = (bundle / MANIFEST).read_bytes()
    signed = sign_bundle(bundle, private)
    assert (signed.key_id, signed.algorithm, signed.path) == (kid, "ed25519", bundle / "bundle.sig")
    assert kid == raw_key_id(public)

    # Signing leaves the manifest, hence the version, untouched; the signature file is not listed.
    assert (bundle / MANIFEST).read_bytes() == manifest_before
    assert "bundle.sig" not in json.loads(manifest_before)["files"]
    assert (bundle / "bundle.sig").stat().st_mode & 0o777 == 0o644

    # Independently: the file's format, and Ed25519 over prefix + the exact manifest bytes.
    document = json.loads((bundle / "bundle.sig").read_text())
    assert document.keys() == {"format", "algorithm", "key_id", "signature"}
    assert document["format"] == "anomaly-scores bundle signature v1"
    assert (document["algorithm"], document["key_id"]) == ("ed25519", kid)
    signature = base64.b64decode(document["signature"], validate=True)
    key = serialization.load_pem_public_key(public.read_bytes())
    key.verify(signature, PREFIX + manifest_before)
    with pytest.raises(InvalidSignature):
        key.verify(signature, manifest_before)  # the prefix is part of the message

    assert verify_bundle(bundle, [public]) == signed
    loaded, info = load_verified_bundle(bundle, [public])
    assert info == signed and loaded.version == load_bundle(bundle).version


def test_a_signature_made_outside_the_product_verifies(bundle, tmp_path):
    """An independent signer following docs/bundle.md section 8a is accepted."""
    key = ed25519.Ed25519PrivateKey.generate()
    public = tmp_path / "outside.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    kid = hashlib.sha256(key.public_key().public_bytes_raw()).hexdigest()[:16]
    signature = key.sign(PREFIX + (bundle / MANIFEST).read_bytes())
    document = {
        "format": "anomaly-scores bundle signature v1",
        "algorithm": "ed25519",
        "key_id": kid,
        "signature": base64.b64encode(signature).decode(),
    }
    (bundle / "bundle.sig").write_text(json.dumps(document))
    assert verify_bundle(bundle, [public]).key_id == kid


def test_the_documented_verifier_runs_as_printed(bundle, tmp_path, monkeypatch):
    doc = (ROOT / "docs" / "bundle.md").read_text()
    section = doc[doc.index("## 8a. Signature") : doc.index("## 9. ")]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    shutil.move(bundle, tmp_path / "my-model")
    private, _, _ = keypair(tmp_path, "signer")
    sign_bundle(tmp_path / "my-model", private)
    namespace: dict = {}
    exec(compile(code, "docs/bundle.md section 8a", "exec"), namespace)
    assert namespace["man"]["version"] == load_bundle(tmp_path / "my-model").version

    manifest = tmp_path / "my-model" / MANIFEST
    manifest.write_bytes(manifest.read_bytes().replace(b'"name": "tiny"', b'"name": "tinY"'))
    with pytest.raises(InvalidSignature):
        exec(compile(code, "docs/bundle.md section 8a", "exec"), {})


def test_an_unsigned_bundle_is_refused(bundle, tmp_path):
    _, public, _ = keypair(tmp_path, "signer")
    with pytest.raises(SignatureError, match=r"is unsigned: it has no bundle\.sig"):
        verify_bundle(bundle, [public])
    with pytest.raises(SignatureError, match="unsigned"):
        load_verified_bundle(bundle, [public])


def test_a_signature_by_an_untrusted_key_is_refused_naming_both_keys(bundle, tmp_path):
    private_a, public_a, kid_a = keypair(tmp_path, "a")
    _, public_b, kid_b = keypair(tmp_path, "b")
    _, public_c, kid_c = keypair(tmp_path, "c")
    sign_bundle(bundle, private_a)
    with pytest.raises(SignatureError, match="not trusted") as refused:
        verify_bundle(bundle, [public_b, public_c])
    assert kid_a in str(refused.value) and kid_b in str(refused.value) and kid_c in str(refused.value)
    assert verify_bundle(bundle, [public_b, public_a]).key_id == kid_a  # any trusted key will do
    with pytest.raises(SignatureError, match="no trusted public keys"):
        verify_bundle(bundle, [])


def test_a_manifest_edited_after_signing_is_refused_though_it_loads(bundle, tmp_path):
    private, public, _ = keypair(tmp_path, "signer")
    sign_bundle(bundle, private)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["name"] = "renamed"
    manifest["version"] = content_version(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    assert load_bundle(bundle).name == "renamed"  # a consistent bundle, only not the one signed
    with pytest.raises(SignatureError, match=r"bad signature .* changed after signing"):
        verify_bundle(bundle, [public])
    with pytest.raises(SignatureError, match="bad signature"):
        load_verified_bundle(bundle, [public])


def test_a_file_changed_after_signing_cannot_be_loaded(bundle, tmp_path):
    private, public, _ = keypair(tmp_path, "signer")
    sign_bundle(bundle, private)
    calibration = bundle / "calibration.safetensors"
    data = bytearray(calibration.read_bytes())
    data[-1] ^= 1  # one bit of the last calibration score
    calibration.write_bytes(bytes(data))
    # The signature of the manifest still holds; the manifest's hash of the file does not.
    assert verify_bundle(bundle, [public]).path == bundle / "bundle.sig"
    with pytest.raises(BundleError, match=r"calibration\.safetensors does not match its SHA-256"):
        load_verified_bundle(bundle, [public])


def test_a_manifest_replaced_between_verification_and_loading_is_refused(bundle, tmp_path, monkeypatch):
    """The loader reads bundle.json again: what it parsed must be the manifest verified (or signed)."""
    private, public, _ = keypair(tmp_path, "signer")
    sign_bundle(bundle, private)

    swaps = iter(range(1, 100))

    def load_after_a_swap(path):
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["name"] = f"swapped {next(swaps)}"
        manifest["version"] = content_version(manifest)
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return load_bundle(path)

    monkeypatch.setattr(signing, "load_bundle", load_after_a_swap)
    with pytest.raises(SignatureError, match="changed while it was being read"):
        load_verified_bundle(bundle, [public])
    signature = (bundle / "bundle.sig").read_bytes()
    with pytest.raises(SignatureError, match="changed while it was being read"):
        sign_bundle(bundle, private)
    assert (bundle / "bundle.sig").read_bytes() == signature


def test_signing_refuses_a_bundle_that_does_not_load(bundle, tmp_path):
    private, _, _ = keypair(tmp_path, "signer")
    (bundle / "weights.safetensors").write_bytes(b"not the weights")
    with pytest.raises(BundleError, match=r"weights\.safetensors has 15 bytes"):
        sign_bundle(bundle, private)
    assert not (bundle / "bundle.sig").exists()


def signature_document(bundle: Path) -> dict:
    return json.loads((bundle / "bundle.sig").read_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: b"{not json", "not JSON"),
        (lambda d: b"[]", "exactly the keys"),
        (lambda d: {**d, "extra": 1}, "exactly the keys"),
        (lambda d: {k: v for k, v in d.items() if k != "key_id"}, "exactly the keys"),
        (lambda d: d | {"format": "something else"}, "format 'something else'"),
        (lambda d: d | {"algorithm": "rsa-pss"}, "algorithm 'rsa-pss', this build verifies 'ed25519'"),
        (lambda d: d | {"key_id": d["key_id"].upper()}, "key_id must be 16 lowercase hex"),
        (lambda d: d | {"signature": "!!" + d["signature"][2:]}, "signature is not base64"),
        (lambda d: d | {"signature": 42}, "signature is not base64"),
        (lambda d: d | {"signature": base64.b64encode(b"\0" * 63).decode()}, "has 64 bytes, this one 63"),
        (lambda d: d | {"signature": base64.b64encode(b"\0" * 65).decode()}, "has 64 bytes, this one 65"),
        (lambda d: b" " * (64 * 1024 + 1), "larger than 65536 bytes"),
    ],
)
def test_a_malformed_signature_file_is_refused_as_such(bundle, tmp_path, change, message):
    private, public, _ = keypair(tmp_path, "signer")
    sign_bundle(bundle, private)
    changed = change(signature_document(bundle))
    (bundle / "bundle.sig").write_bytes(
        changed if isinstance(changed, bytes) else json.dumps(changed).encode()
    )
    with pytest.raises(SignatureError, match=r"malformed .*bundle\.sig: ") as refused:
        verify_bundle(bundle, [public])
    assert message in str(refused.value)


def test_a_trusted_key_file_that_is_no_ed25519_public_key_is_refused_by_name(bundle, tmp_path):
    private, _, _ = keypair(tmp_path, "signer")
    sign_bundle(bundle, private)
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    rsa_key = tmp_path / "rsa.pub"
    rsa_key.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(*spki))
    ec_key = tmp_path / "ec.pub"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*spki))
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    for path, message in [
        (rsa_key, "holds a public key of type RSA; bundle signatures use Ed25519"),
        (ec_key, "holds a public key of type EC; bundle signatures use Ed25519"),
        (garbage, "is not a PEM public key"),
        (private, "is not a PEM public key"),  # the private half given by mistake
        (tmp_path / "missing.pub", "cannot read the public key"),
    ]:
        with pytest.raises(SignatureError, match=re.escape(message)) as refused:
            verify_bundle(bundle, [path])
        assert str(path) in str(refused.value)


def test_a_signing_key_that_is_no_ed25519_private_key_is_refused_by_name(bundle, tmp_path):
    rsa_pem = tmp_path / "rsa.pem"
    rsa_pem.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    _, public, _ = keypair(tmp_path, "signer")
    for path, message in [
        (rsa_pem, "holds a private key of type RSA"),
        (encrypted, "is an encrypted private key"),
        (public, "is not a PEM private key"),
        (tmp_path / "missing.pem", "cannot read the private key"),
    ]:
        with pytest.raises(SignatureError, match=re.escape(message)) as refused:
            sign_bundle(bundle, path)
        assert str(path) in str(refused.value)
    assert not (bundle / "bundle.sig").exists()


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    private, public, kid = keypair(tmp_path, "signer")
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey) and raw_key_id(public) == kid

    before = private.read_bytes(), public.read_bytes()
    for pair in [(private, tmp_path / "new.pub"), (tmp_path / "new.pem", public)]:
        with pytest.raises(SignatureError, match="exists; refusing to overwrite"):
            generate_keypair(*pair)
        assert not (tmp_path / "new.pub").exists() and not (tmp_path / "new.pem").exists()
    assert (private.read_bytes(), public.read_bytes()) == before
    with pytest.raises(SignatureError, match="would be the same file"):
        generate_keypair(tmp_path / "same", tmp_path / "same")
    with pytest.raises(SignatureError, match="cannot create"):
        generate_keypair(tmp_path / "no-such-dir" / "k.pem", tmp_path / "k.pub")


def test_bundles_load_and_the_cli_imports_without_cryptography(tiny_bundle, tmp_path):
    """cryptography is an optional extra: without it only signing and verifying fail, saying how to
    install it."""
    path = str(tiny_bundle)
    script = f"""
import sys
sys.modules["cryptography"] = None  # any import of it now raises ImportError
import app.cli
from app.bundle.format import load_bundle
from app.bundle.signing import SignatureError, sign_bundle, verify_bundle
assert load_bundle({path!r}).name == "tiny"
for call in (lambda: verify_bundle({path!r}, ["k.pub"]), lambda: sign_bundle({path!r}, "k.pem")):
    try:
        call()
    except SignatureError as e:
        assert "pip install 'anomaly-scores[sign]'" in str(e), e
    else:
        raise AssertionError("no error")
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
