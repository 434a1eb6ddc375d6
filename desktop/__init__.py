"""Bastion's desktop application (PySide6). It talks only to the engine's public API."""
