"""API keys: created once, stored as salted hashes in a 0600 file, listed, revoked; the CLI."""

import json
import stat

from typer.testing import CliRunner

from app.cli import app
from llmrec.keys import KeyStore, keys_file


def test_key_is_stored_only_as_a_salted_hash_in_a_private_file(tmp_path):
    store = KeyStore(keys_file(tmp_path))
    first, second = store.create("web", "read"), store.create("web2", "read")
    text = store.path.read_text()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    for key in (first, second):
        assert key.split("_", 2)[2] not in text
    entries = json.loads(text)["keys"]
    assert len({e["salt"] for e in entries.values()}) == 2 and len({e["hash"] for e in entries.values()}) == 2
    assert store.verify(first).name == "web" and store.verify(second).name == "web2"
    assert store.verify(first[:-1] + ("A" if first[-1] != "A" else "B")) is None
    assert store.verify(None) is None and store.verify("") is None and store.verify("a_b") is None


def test_scopes_and_revocation_keep_the_entry(tmp_path):
    store = KeyStore(keys_file(tmp_path))
    admin = store.create("ops", "admin")
    read = store.create("web", "read")
    assert store.verify(admin).allows("read") and store.verify(admin).allows("admin")
    assert store.verify(read).allows("read") and not store.verify(read).allows("admin")
    web_id = next(e.key_id for e in store.list() if e.name == "web")
    assert store.revoke("web") == [web_id]
    assert store.verify(read) is None
    assert [e.revoked is not None for e in store.list()] == [False, True]


def test_cli_create_list_revoke(tmp_path):
    runner = CliRunner()
    home = str(tmp_path)
    created = runner.invoke(app, ["api-key", "create", "--name", "web", "--scope", "read", "--home", home])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    assert KeyStore(keys_file(tmp_path)).verify(key).scope == "read"
    listed = runner.invoke(app, ["api-key", "list", "--home", home])
    assert listed.exit_code == 0 and "web" in listed.stdout and "read" in listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout
    assert runner.invoke(app, ["api-key", "revoke", "web", "--home", home]).exit_code == 0
    assert KeyStore(keys_file(tmp_path)).verify(key) is None


def test_cli_user_errors_exit_2_with_one_line(tmp_path):
    runner = CliRunner()
    bad_scope = runner.invoke(app, ["api-key", "create", "--name", "x", "--scope", "root", "--home", str(tmp_path)])
    assert bad_scope.exit_code == 2 and "--scope 'root'" in bad_scope.output
    unknown = runner.invoke(app, ["api-key", "revoke", "nobody", "--home", str(tmp_path)])
    assert unknown.exit_code == 2 and "nobody" in unknown.output
    bad_k = runner.invoke(app, ["api", "--home", str(tmp_path), "--quantize", "int4"])
    assert bad_k.exit_code == 2 and "compression.quantize" in bad_k.output and "Traceback" not in bad_k.output
    bad_port = runner.invoke(app, ["api", "--home", str(tmp_path), "--port", "70000"])
    assert bad_port.exit_code == 2 and "port" in bad_port.output
