"""A store on a PKCS#11 module given at init (the production path), not the embedded token.

SoftHSM2 loaded directly stands in for a vendor's module here: envfs must record
module and token (never the PIN) and reach them again at every mount.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import PIN, Envfs

from envfs.hsm import HsmAdmin

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


@pytest.fixture
def production_token(envfs: Envfs) -> Envfs:
    tokens = envfs.root / "vendor-tokens"
    tokens.mkdir()
    config = envfs.root / "softhsm2.conf"
    config.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    envfs.env["SOFTHSM2_CONF"] = str(config)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "vendor", "--pin", PIN, "--so-pin", PIN],
        env=envfs.env, check=True, capture_output=True,
    )  # fmt: skip
    return envfs


@pytest.mark.parametrize("how", ["options", "uri"])
def test_store_on_a_given_module(production_token: Envfs, how: str) -> None:
    env = production_token
    if how == "options":
        env.init("--pkcs11-module", SOFTHSM, "--token", "vendor")
    else:
        env.init("--pkcs11-uri", f"pkcs11:token=vendor;module-path={SOFTHSM}")
    superblock = json.loads((env.store / "envfs.json").read_text())
    assert superblock["hsm"] == {"type": "pkcs11", "module": SOFTHSM, "token": "vendor"}
    assert PIN not in (env.store / "envfs.json").read_text()
    assert not (env.data_home / "envfs" / "softhsm").exists()  # no embedded token was made
    env.mount()
    data = os.urandom(70_000)
    (env.mnt / "f").write_bytes(data)
    env.remount()
    assert (env.mnt / "f").read_bytes() == data
    env.unmount()
    wrong = dict(env.env, ENVFS_PIN="wrong-pin-9999")
    result = env.run("mount", str(env.store), str(env.mnt), env=wrong, check=False)
    assert result.returncode == 10 and result.stderr.count("\n") == 1, result.stderr
    assert not Path(env.mnt).is_mount()


def test_rotate_retire_and_fsck_on_a_given_module(production_token: Envfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator tools reach a production module as the mount does."""
    env = production_token
    env.init("--pkcs11-module", SOFTHSM, "--token", "vendor")
    env.mount()
    data = os.urandom(70_000)
    (env.mnt / "f").write_bytes(data)
    env.unmount()
    env.run("rotate", str(env.store), "--retire")
    status = env.status()
    assert status["current_key_version"] == 2 and [k["version"] for k in status["key_versions"]] == [2]
    # The old master key is gone from the token, the new one is there.
    monkeypatch.setenv("SOFTHSM2_CONF", env.env["SOFTHSM2_CONF"])
    labels = {k["version"]: k["label"] for k in json.loads((env.store / "envfs.json").read_text())["keys"]}
    admin = HsmAdmin(SOFTHSM, "vendor", PIN)
    try:
        assert admin.has_key(labels[2])
        assert not admin.has_key(labels[2].removesuffix("-v2") + "-v1")
    finally:
        admin.close()
    assert "damaged:   0 (clean)" in env.run("fsck", str(env.store)).stdout
    env.mount()
    assert (env.mnt / "f").read_bytes() == data
