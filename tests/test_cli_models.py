"""``bastion models`` through the installed command."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import DEFAULT_MODEL, assert_one_line_error, write_gguf

CONTRACT_KEYS = {
    "id",
    "path",
    "arch",
    "quant",
    "params",
    "context_length",
    "size_bytes",
    "base",
    "adapter",
}


def test_list_json_has_the_contract_fields(cli) -> None:
    result = cli("models", "list", "--json")
    assert result.code == 0, result.stderr
    models = result.json()
    assert isinstance(models, list)
    default = next(m for m in models if m["id"] == DEFAULT_MODEL)
    assert set(default) >= CONTRACT_KEYS
    assert default["arch"] == "llama" and default["quant"] == "Q4_1"
    assert default["params"] == 134515008 and default["context_length"] == 8192
    assert default["base"] is None and default["adapter"] is None
    assert result.stderr == ""


def test_list_plain(cli) -> None:
    result = cli("models", "list")
    assert result.code == 0
    assert DEFAULT_MODEL in result.stdout and "Q4_1" in result.stdout


def test_import_valid_file_then_info(cli, tiny_gguf: Path) -> None:
    result = cli("models", "import", str(tiny_gguf), "--json")
    assert result.code == 0, result.stderr
    entry = result.json()
    assert entry["id"] == "tiny-test.f32"
    assert entry["arch"] == "llama" and entry["params"] == 256
    assert entry["path"] == str(tiny_gguf.resolve())
    listed = {m["id"] for m in cli("models", "list", "--json").json()}
    assert {"tiny-test.f32", DEFAULT_MODEL} <= listed
    info = cli("models", "info", "tiny-test.f32", "--json")
    assert info.code == 0, info.stderr
    data = info.json()
    assert data["has_chat_template"] is True
    assert data["fit"]["fits_in_ram"] is True
    assert data["hardware"]["physical_cores"] >= 1


def test_import_with_id_and_copy(cli, tiny_gguf: Path, home: Path) -> None:
    result = cli("models", "import", str(tiny_gguf), "--id", "mine", "--copy", "--json")
    assert result.code == 0, result.stderr
    assert Path(result.json()["path"]).parent == (home / "models").resolve()


def test_info_of_default_model_plain(cli) -> None:
    result = cli("models", "info", DEFAULT_MODEL)
    assert result.code == 0
    assert "from the model file" in result.stdout and "threads" in result.stdout


def _registered(cli) -> set[str]:
    return {m["id"] for m in cli("models", "list", "--json").json()}


def test_bad_files_are_refused_with_one_line_and_nothing_registered(
    cli, tmp_path: Path, model_copy: Path
) -> None:
    before = _registered(cli)
    text = tmp_path / "readme.gguf"
    text.write_text("not a model")
    assert_one_line_error(cli("models", "import", str(text)), 2, "not a GGUF model")

    with model_copy.open("r+b") as fh:
        fh.truncate(model_copy.stat().st_size - 1000)
    assert_one_line_error(cli("models", "import", str(model_copy)), 2, "truncated")

    assert_one_line_error(
        cli("models", "import", str(tmp_path / "missing.gguf")), 2, "no such file"
    )
    assert_one_line_error(cli("models", "import", str(tmp_path)), 2, "not a file")

    adapter = write_gguf(tmp_path / "lora.gguf", general_type="adapter")
    assert_one_line_error(cli("models", "import", str(adapter)), 2, "LoRA adapter")
    assert _registered(cli) == before


def test_duplicate_id_and_duplicate_file(cli, tiny_gguf: Path, tmp_path: Path) -> None:
    assert cli("models", "import", str(tiny_gguf), "--id", "one").code == 0
    other = write_gguf(tmp_path / "other.gguf")
    assert_one_line_error(cli("models", "import", str(other), "--id", "one"), 2, "exists")
    assert_one_line_error(
        cli("models", "import", str(tiny_gguf), "--id", "two"), 2, "registered already"
    )
    assert_one_line_error(
        cli("models", "import", str(other), "--id", "Bad Id!"), 2, "invalid model id"
    )
    assert _registered(cli) >= {"one"} and "two" not in _registered(cli)


def test_unknown_model_info(cli) -> None:
    assert_one_line_error(cli("models", "info", "nope"), 2, "no model 'nope'", DEFAULT_MODEL)


def test_settings_set_and_clear(cli) -> None:
    result = cli("models", "set", DEFAULT_MODEL, "--context", "1024", "--threads", "1", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["settings"] == {"gpu_layers": None, "context": 1024, "threads": 1}
    info = cli("models", "info", DEFAULT_MODEL, "--json").json()
    assert info["load"]["context"] == 1024 and info["load"]["threads"] == 1
    cleared = cli("models", "set", DEFAULT_MODEL, "--context", "auto", "--json").json()
    assert cleared["settings"]["context"] is None
    assert_one_line_error(cli("models", "set", DEFAULT_MODEL, "--threads", "many"), 2, "threads")
    assert_one_line_error(cli("models", "set", DEFAULT_MODEL, "--context", "0"), 2, "positive")


def test_remove_keeps_the_file(cli, tiny_gguf: Path) -> None:
    cli("models", "import", str(tiny_gguf), "--id", "gone")
    assert cli("models", "remove", "gone").code == 0
    assert "gone" not in _registered(cli)
    assert tiny_gguf.exists()


def test_an_adapter_imports_as_a_fine_tune_of_its_base(cli, home: Path, tmp_path: Path) -> None:
    """``models import ADAPTER --base ID``: how a bundled or exported fine-tune comes back."""
    adapter = write_gguf(tmp_path / "lora.gguf", general_type="adapter")  # a llama adapter
    result = cli(
        "models", "import", str(adapter), "--base", DEFAULT_MODEL, "--id", "my-tune", "--copy",
        "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    entry = result.json()
    assert entry["id"] == "my-tune" and entry["base"] == DEFAULT_MODEL
    kept = Path(entry["adapter"])
    assert kept.parent == home / "adapters" / "imported" / "my-tune"
    assert kept.read_bytes() == adapter.read_bytes()

    before = _registered(cli)
    model = write_gguf(tmp_path / "model.gguf")
    assert_one_line_error(
        cli("models", "import", str(model), "--base", DEFAULT_MODEL), 2, "not a LoRA adapter"
    )
    qwen = write_gguf(tmp_path / "qwen-lora.gguf", "qwen2", general_type="adapter")
    assert_one_line_error(
        cli("models", "import", str(qwen), "--base", DEFAULT_MODEL, "--copy"), 2, "qwen2"
    )
    assert_one_line_error(cli("models", "import", str(adapter), "--base", "nope"), 2, "no model")
    assert _registered(cli) == before
    assert not (home / "adapters" / "imported" / "qwen-lora").exists()
