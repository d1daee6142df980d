"""Settings: precedence flags > env > file > defaults, validation messages, the example file."""

from __future__ import annotations

import json

import pytest

from replicator.errors import UsageError
from tests.pgplugin import pgferry


def test_flags_beat_env_beat_file_beat_defaults(tmp_path):
    cfg = tmp_path / "pgferry.toml"
    cfg.write_text('source = "host=from-file"\ntarget = "host=t-file"\nbatch_rows = 100\nslot = "file_slot"\n'
                   'tables = ["public.a", "b"]\n')
    r = pgferry("config", "show", "--config", str(cfg), "--source", "host=from-flag",
                env={"PGFERRY_SOURCE": "host=from-env", "PGFERRY_TARGET": "host=t-env", "PGFERRY_BATCH_ROWS": "200"})
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["source"] == "host=from-flag"  # flag over env and file
    assert shown["target"] == "host=t-env"  # env over file
    assert shown["batch_rows"] == 200  # env over file, converted from text
    assert shown["slot"] == "file_slot"  # file over default
    assert shown["tables"] == ["public.a", "b"]
    assert shown["publication"] == "pgferry" and shown["batch_ms"] == 500.0  # defaults
    # the config file can also come from the environment
    r = pgferry("config", "show", env={"PGFERRY_CONFIG": str(cfg)})
    assert json.loads(r.stdout)["slot"] == "file_slot"


def test_invalid_keys_and_values_name_the_key_and_the_expected_form(tmp_path):
    bad = tmp_path / "bad.toml"
    cases = [
        ("bach_rows = 3\n", "unknown key(s) bach_rows; known keys: source, target"),
        ('batch_rows = "many"\n', "batch_rows: expected int, got str"),
        ("batch_rows = 0\n", "batch_rows: expected int >= 1"),
        ('log_format = "xml"\n', "log_format: expected one of 'auto', 'text', 'json', got 'xml'"),
        ("metrics_port = 70000\n", "metrics_port: expected int <= 65535"),
        ("nice = 20\n", "nice: expected int <= 19"),
        ("batch_rows = [\n", "is not valid TOML"),
    ]
    for text, expected in cases:
        bad.write_text(text)
        r = pgferry("config", "show", "--config", str(bad))
        assert r.returncode == 2, (text, r.stderr)
        assert expected in r.stderr and str(bad) in r.stderr and "Traceback" not in r.stderr, (text, r.stderr)
    r = pgferry("config", "show", env={"PGFERRY_BATCH_MS": "soon"})
    assert r.returncode == 2 and "PGFERRY_BATCH_MS='soon': batch_ms: expected float" in r.stderr, r.stderr
    r = pgferry("config", "show", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "No such file or directory" in r.stderr, r.stderr
    r = pgferry("start", "--batch-rows", "0", "--source", "host=x", "--target", "host=y")
    assert r.returncode == 2 and "expected a positive number" in r.stderr, r.stderr
    r = pgferry("start", "--nice", "-1", "--source", "host=x", "--target", "host=y")
    assert r.returncode == 2 and "invalid setting: nice: expected int >= 0" in r.stderr, r.stderr


def test_the_example_config_is_valid_and_passwords_are_never_shown(tmp_path):
    example = pgferry("config", "example")
    assert example.returncode == 0 and "batch_rows = 50000" in example.stdout
    cfg = tmp_path / "example.toml"
    cfg.write_text(example.stdout)
    r = pgferry("config", "show", "--config", str(cfg), "--source", "host=db password='s3 cret' user=me",
                env={"PGFERRY_TARGET": "postgresql://me:hunter2@new-db/app"})
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["source"] == "host=db password=*** user=me"
    assert shown["target"] == "postgresql://me:***@new-db/app"
    assert "s3 cret" not in r.stdout + r.stderr and "hunter2" not in r.stdout + r.stderr


def test_a_server_error_no_command_expected_is_one_line_and_exit_1(monkeypatch, capsys):
    """The last resort: a psycopg2 error escaping a command (a connection lost mid-way) is printed
    as one line with the command's name, never as a traceback."""
    import psycopg2

    from replicator.cli import commands as cli

    def lost(*_: object) -> int:
        raise psycopg2.OperationalError("server closed the connection unexpectedly\n\tThis probably means...")

    monkeypatch.setattr(cli, "_admin", lost)
    assert cli.main(["verify", "--source", "host=s", "--target", "host=t"]) == 1
    err = capsys.readouterr().err
    assert err == "pgferry: error: verify: server closed the connection unexpectedly\n", err


def test_a_misspelt_environment_variable_is_refused_like_an_unknown_toml_key():
    from replicator.cli import config

    with pytest.raises(UsageError, match=r"PGFERRY_BATCH_ROW \(did you mean PGFERRY_BATCH_ROWS\?\)") as exc:
        config.load(None, {}, environ={"PGFERRY_BATCH_ROW": "5"})
    assert exc.value.exit_code == 2
    # the variables that are not settings pass
    st = config.load(None, {}, environ={"PGFERRY_BATCH_ROWS": "5", "PGFERRY_PG15_BINDIR": "/x", "PGFERRY_CONFIG": "",
                                        "PGFERRY_PURE_PYTHON": "1", "PGFERRY_TEST_HOOK_FILE": "/tmp/x"})
    assert st.batch_rows == 5


def test_conflict_settings_per_table_name_it_as_the_sink_does(tmp_path):
    """`[conflicts.tables."public.My T"]` and `[conflicts.tables.'public."My T"']` are one table,
    named as every message names it: public."My T"."""
    from replicator.cli import config

    for key in ('"public.My T"', "'public.\"My T\"'"):
        f = tmp_path / "c.toml"
        f.write_text(f'[conflicts.tables.{key}]\ninsert_exists = "skip"\n')
        policies = config.policies(config.load(str(f), {}, environ={}))
        assert list(policies.tables) == ['public."My T"'], key
        assert policies.for_table('public."My T"').insert_exists == "skip"
