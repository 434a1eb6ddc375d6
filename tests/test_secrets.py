"""Secrets go to the keyring; on a headless machine, to an encrypted file."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import EnvironmentFault
from engine.privacy import secrets
from engine.privacy.secrets import SecretStore


def test_round_trip_in_the_encrypted_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "_os_keyring_available", lambda: False)
    monkeypatch.setenv("BASTION_KEYRING_PASSWORD", "correct horse")
    home.mkdir(parents=True)
    store = SecretStore(home)
    store.set("hf_token", "hf_very_secret_value")
    assert "cryptfile" in store.backend_name
    assert SecretStore(home).get("hf_token") == "hf_very_secret_value"
    on_disk = (home / "secrets" / "keyring.cfg").read_text()
    assert "hf_very_secret_value" not in on_disk

    monkeypatch.setenv("BASTION_KEYRING_PASSWORD", "wrong passphrase")
    with pytest.raises(EnvironmentFault, match="cannot be decrypted"):
        SecretStore(home).get("hf_token")

    monkeypatch.setenv("BASTION_KEYRING_PASSWORD", "correct horse")
    SecretStore(home).delete("hf_token")
    assert SecretStore(home).get("hf_token") is None
    SecretStore(home).delete("never-set")  # deleting nothing is fine
