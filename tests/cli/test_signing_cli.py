"""`anomaly-scores keygen`, `sign` and `verify` end to end, and their refusals (exit 2, `error: ...`)."""

import json
import shutil
from pathlib import Path

import pytest

from app.bundle.format import MANIFEST, load_bundle
from app.cli import main


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    return err


def test_keygen_sign_verify(bundle, tmp_path, capsys):
    private, public = tmp_path / "signer.pem", tmp_path / "signer.pub"
    assert main(["keygen", "--private", str(private), "--public", str(public)]) == 0
    key_id = capsys.readouterr().err.split()[1].rstrip(":")
    assert private.stat().st_mode & 0o777 == 0o600

    assert main(["sign", str(bundle), "--key", str(private)]) == 0
    assert f"with key {key_id}" in capsys.readouterr().err
    assert json.loads((bundle / "bundle.sig").read_text())["key_id"] == key_id

    assert main(["verify", str(bundle), "--trusted-key", str(public)]) == 0
    out = capsys.readouterr().out
    assert load_bundle(bundle).version in out and key_id in out


def test_refusals_exit_2_with_a_clear_message(bundle, tmp_path, capsys):
    keys = {}
    for name in ("a", "b"):
        keys[name] = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
        assert main(["keygen", "--private", str(keys[name][0]), "--public", str(keys[name][1])]) == 0
    capsys.readouterr()

    other = tmp_path / "other.pub"
    assert "exists; refusing to overwrite" in refused(
        ["keygen", "--private", str(keys["a"][0]), "--public", str(other)], capsys
    )
    assert not other.exists()

    assert "is unsigned" in refused(["verify", str(bundle), "--trusted-key", str(keys["a"][1])], capsys)
    assert main(["sign", str(bundle), "--key", str(keys["a"][0])]) == 0
    capsys.readouterr()
    assert "not trusted" in refused(["verify", str(bundle), "--trusted-key", str(keys["b"][1])], capsys)
    assert "is not a PEM public key" in refused(
        ["verify", str(bundle), "--trusted-key", str(keys["a"][0])], capsys
    )
    assert (
        main(["verify", str(bundle), "--trusted-key", str(keys["b"][1]), "--trusted-key", str(keys["a"][1])])
        == 0
    )

    # A changed file: the signature of the manifest holds, the load does not.
    leaderboard = bundle / "leaderboard.csv"
    leaderboard.write_text(leaderboard.read_text() + "\n")
    assert "leaderboard.csv has" in refused(
        ["verify", str(bundle), "--trusted-key", str(keys["a"][1])], capsys
    )
    # Nor may such a bundle be signed again; the old signature stays as it was.
    before = (bundle / "bundle.sig").read_bytes()
    assert "leaderboard.csv has" in refused(["sign", str(bundle), "--key", str(keys["b"][0])], capsys)
    assert (bundle / "bundle.sig").read_bytes() == before

    # A manifest changed after signing.
    manifest = bundle / MANIFEST
    manifest.write_bytes(manifest.read_bytes() + b"\n")
    assert "bad signature" in refused(["verify", str(bundle), "--trusted-key", str(keys["a"][1])], capsys)
