"""Secrets (tokens, API keys) in the OS keyring, with an encrypted file where there is none.

macOS Keychain, Windows Credential Locker and the Secret Service (GNOME Keyring, KWallet)
are used when present. A headless Linux machine has none of them; there Bastion uses
``keyrings.cryptfile`` (AES-GCM, key derived with Argon2) in ``<home>/secrets/keyring.cfg``.
Its passphrase is ``$BASTION_KEYRING_PASSWORD`` when set; otherwise a random key kept in
the user's config folder (mode 0600), outside the data folder -- so a copied or backed-up
data folder does not carry readable secrets. Secrets never go to ``config.toml`` or logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from engine.errors import EnvironmentFault
from engine.paths import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, restrict_mode

log = logging.getLogger(__name__)
SERVICE = "bastion"
PASSWORD_ENV = "BASTION_KEYRING_PASSWORD"
# Backends that are not a real OS keyring: fall-backs, plain files, or refusals.
_NOT_OS_KEYRINGS = ("keyrings.cryptfile", "keyrings.alt", "keyring.backends.fail",
                    "keyring.backends.null", "keyring.backends.chainer")  # fmt: skip


def _os_keyring_available() -> bool:
    from keyring.backend import get_all_keyring

    return any(
        not type(kr).__module__.startswith(_NOT_OS_KEYRINGS) and kr.priority > 0
        for kr in get_all_keyring()
    )


def _file_key() -> str:
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    import platformdirs

    key_path = Path(platformdirs.user_config_dir("bastion", appauthor=False)) / "keyring.key"
    if not key_path.exists():
        key_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return key_path.read_text().strip()


class SecretStore:
    """Get and set named secrets for Bastion."""

    def __init__(self, home: Path) -> None:
        self._home = home
        self._backend: Any = None

    @property
    def backend_name(self) -> str:
        backend = self._keyring()
        return f"{type(backend).__module__}.{type(backend).__name__}"

    def _keyring(self) -> Any:
        if self._backend is None:
            import keyring

            if _os_keyring_available():
                self._backend = keyring.get_keyring()
            else:
                from keyrings.cryptfile.cryptfile import CryptFileKeyring

                backend = CryptFileKeyring()
                folder = self._home / "secrets"
                folder.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
                # An older version's folder, or one loosened by hand: private again.
                # keyrings.cryptfile creates keyring.cfg 0600 itself.
                try:
                    restrict_mode(folder, PRIVATE_DIR_MODE)
                    restrict_mode(folder / "keyring.cfg", PRIVATE_FILE_MODE)
                except OSError as exc:  # not the owner: the file is still encrypted
                    log.warning("could not make %s private: %s", folder, exc.strerror or exc)
                backend.file_path = str(folder / "keyring.cfg")
                backend.keyring_key = _file_key()
                self._backend = backend
            log.info("secrets kept by %s", type(self._backend).__name__)
        return self._backend

    def set(self, name: str, value: str) -> None:
        try:
            self._keyring().set_password(SERVICE, name, value)
        except Exception as exc:
            raise EnvironmentFault(f"could not store the secret {name!r}: {exc}") from exc

    def get(self, name: str) -> str | None:
        try:
            value = self._keyring().get_password(SERVICE, name)
        except ValueError as exc:  # wrong passphrase for the encrypted file
            raise EnvironmentFault(
                "the secrets file cannot be decrypted with this passphrase",
                hint=f"check {PASSWORD_ENV}",
            ) from exc
        return value if isinstance(value, str) else None

    def delete(self, name: str) -> None:
        import keyring.errors

        with contextlib.suppress(keyring.errors.PasswordDeleteError):
            self._keyring().delete_password(SERVICE, name)
