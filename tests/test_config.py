"""The config contract (config.toml's keys): defaults, validation, errors naming key and file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from ldct_node.config import ConfigError, load_settings, parse_settings

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_the_contract() -> None:
    s = parse_settings({})
    assert s.node.ae_title == "LDCT_NODE" and s.node.port == 11112
    assert s.node.max_associations == 10
    assert s.security.allowed_calling_aets == [] and not s.security.tls_enabled
    assert s.security.require_called_aet
    assert s.security.association_request_timeout == 10.0
    assert s.security.max_pending_connections == 64
    assert s.storage.retention_days == 7 and s.storage.min_free_gb == 5
    assert s.series.stable_seconds == 30
    assert s.series.accept_sop_classes == ["1.2.840.10008.5.1.4.1.1.2"]
    assert s.series.skip_image_types == ["LOCALIZER"] and s.series.ignore_derived
    assert (s.model.batch_size, s.model.device, s.model.precision) == (4, "auto", "float32")
    assert [o.name for o in s.outputs] == ["denoised"] and s.outputs[0].blend == 0.0
    assert s.outputs[0].series_number_offset == 1000
    assert s.outputs[0].hu_fidelity_mm == 2.0  # the measured default (README)
    assert s.destinations == []
    assert s.forward.max_attempts == 10 and s.forward.backoff_seconds == [10, 30, 60, 300, 900]
    assert s.dicom.uid_root == ""


def test_bundled_config_is_valid_and_paths_resolve_against_it() -> None:
    s = load_settings(REPO / "config.toml")
    assert s.destinations[0].ae_title == "PACS"
    assert s.spool_path == REPO / "var" / "spool"
    assert s.database_url == f"sqlite:///{REPO}/var/ldct-node.db"
    assert s.weights_path == REPO / "weights"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[node]\nport = 'x'\n", "'node.port'"),
        ("[node]\nprot = 1\n", "unknown key 'node.prot'"),
        ("[nodes]\nport = 1\n", "unknown key 'nodes'"),
        ("[[outputs]]\nname = 'a'\nblend = 1.5\n", "'outputs[0].blend'"),
        ("[[outputs]]\nname = 'a'\nhu_fidelity_mm = -1\n", "'outputs[0].hu_fidelity_mm'"),
        ("[[destinations]]\nname = 'p'\nae_title = 'P'\nhost = 'h'\n", "'destinations[0].port'"),
        ("[node]\nae_title = 'MUCH_TOO_LONG_AE_TITLE'\n", "'node.ae_title'"),
        ("[security]\nallowed_hosts = ['10.0.0.300']\n", "'security.allowed_hosts'"),
        ("[security]\ntls_cert = 'a.pem'\n", "tls_key"),
        ("[security]\nassociation_request_timeout = 0\n", "'security.association_request_timeout'"),
        ("[security]\nmax_pending_connections = 0\n", "'security.max_pending_connections'"),
        ("[security]\nrequire_called_aet = 'yes'\n", "'security.require_called_aet'"),
        ("[model]\nprecision = 'int8'\n", "'model.precision'"),
        ("[dicom]\nuid_root = '1.2.abc'\n", "'dicom.uid_root'"),
        ("[forward]\nbackoff_seconds = []\n", "'forward.backoff_seconds'"),
        ("[[outputs]]\nname='a'\n[[outputs]]\nname='a'\n", "duplicate name"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert needle in str(err.value)
    assert str(cfg) in str(err.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_env_var_selects_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[node]\nport = 4000\n")
    monkeypatch.setenv("LDCT_NODE_CONFIG", str(cfg))
    assert load_settings().node.port == 4000


def test_backoff_schedule_repeats_last_delay() -> None:
    f = parse_settings({"forward": {"backoff_seconds": [1, 2]}}).forward
    assert [f.delay_for(a) for a in (1, 2, 3, 9)] == [1.0, 2.0, 2.0, 2.0]


def test_config_checkrun_cli(tmp_path: Path) -> None:
    ok = run_cli("config", "check", "--config", str(REPO / "config.toml"), "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["node"]["ae_title"] == "LDCT_NODE"
    assert data["resolved"]["weights_dir"] == str(REPO / "weights")

    bad = tmp_path / "bad.toml"
    bad.write_text("[storage]\nretention_days = 'soon'\n")
    res = run_cli("config", "check", "--config", str(bad))
    assert res.returncode == 2
    assert "storage.retention_days" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [("retry",), ("retry", "abc"), ("no-such-command",), ("denoise",)])
def test_usage_errors_exit_2_with_one_clear_line(args: tuple[str, ...]) -> None:
    res = run_cli(*args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "Error" in res.stderr


def test_worker_lease_seconds() -> None:
    assert parse_settings({}).worker.lease_seconds == 300.0
    assert parse_settings({"worker": {"lease_seconds": 30}}).worker.lease_seconds == 30.0
    with pytest.raises(ConfigError, match=r"worker\.lease_seconds"):
        parse_settings({"worker": {"lease_seconds": 0}}, source="x.toml")


# ------------------------------------------- config check and serve: what serve needs


def _copied_config(folder: Path, **edits: str) -> Path:
    """The shipped config.toml copied elsewhere, on 127.0.0.1 and a free port."""
    from _net_util import free_port

    folder.mkdir(parents=True, exist_ok=True)
    text = (REPO / "config.toml").read_text()
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"', 1)
    text = text.replace("port = 11112", f"port = {free_port()}", 1)
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    path = folder / "config.toml"
    path.write_text(text)
    return path


def test_a_copied_config_uses_the_bundled_weights(tmp_path: Path) -> None:
    """Issue 16: a config copied to another folder passed `config check` and then
    `serve` exited with "no MANIFEST.json": an unset weights_dir means the bundled ones."""
    import tomllib

    config = _copied_config(tmp_path / "etc")
    assert load_settings(config).weights_path == REPO / "weights"
    res = run_cli("config", "check", "--config", config)
    assert res.returncode == 0, res.stderr
    checks = [line for line in res.stdout.splitlines() if line.startswith("# ")]
    assert any(line.startswith("# ok") and "weights:" in line and "(bundled)" in line
               for line in checks), checks  # fmt: skip
    assert res.stdout.rstrip().endswith("# config OK")
    # The output is the effective config as valid TOML, resolved paths on their own.
    printed = tomllib.loads(res.stdout)
    assert printed["node"]["ae_title"] == "LDCT_NODE"
    assert printed["outputs"][0]["name"] == "denoised"
    assert printed["resolved"]["weights_dir"] == str(REPO / "weights")
    assert printed["resolved"]["config_file"] == str(config)
    assert not (tmp_path / "etc" / "var").exists()  # a check creates nothing


def test_config_check_fails_on_what_serve_would_trip_on(tmp_path: Path) -> None:
    import socket

    (tmp_path / "file").write_text("not a folder")
    config = _copied_config(
        tmp_path / "a",
        **{
            'weights_dir = ""': 'weights_dir = "no-such-weights"',
            'spool_dir = "var/spool"': f'spool_dir = "{tmp_path / "file" / "spool"}"',
        },
    )
    settings = load_settings(config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", settings.node.port))
        taken.listen()
        res = run_cli("config", "check", "--config", config, "--json")
    assert res.returncode == 2, res.stdout
    failed = {c["name"]: c["detail"] for c in json.loads(res.stdout)["checks"] if not c["ok"]}
    assert set(failed) == {"spool", "dicom port", "weights"}, failed
    assert "cannot be created" in failed["spool"] and "storage.spool_dir" in failed["spool"]
    assert "in use" in failed["dicom port"] and "node.port" in failed["dicom port"]
    assert "no MANIFEST.json" in failed["weights"] and "model.weights_dir" in failed["weights"]
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


@pytest.mark.slow
def test_serve_checks_port_and_weights_first_and_leaves_nothing_behind(tmp_path: Path) -> None:
    import socket
    import time

    bad_weights = _copied_config(
        tmp_path / "w", **{'weights_dir = ""': 'weights_dir = "no-such-weights"'}
    )
    res = run_cli("serve", "--config", bad_weights, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "weights" in res.stderr and "no MANIFEST.json" in res.stderr
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["config.toml"]

    port_taken = _copied_config(tmp_path / "p")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", load_settings(port_taken).node.port))
        taken.listen()
        started = time.monotonic()
        res = run_cli("serve", "--config", port_taken, timeout=120)
        elapsed = time.monotonic() - started
    # Exit 1: a port still held may free itself (systemd restarts on 1, never on 2).
    assert res.returncode == 1, res.stderr
    assert "in use" in res.stderr and "node.port" in res.stderr
    assert "loaded cascade" not in res.stderr + res.stdout  # refused before the networks
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["config.toml"]
    print(f"serve with its port taken exited after {elapsed:.1f} s")


def test_config_check_loads_destination_tls_files_and_passwords(tmp_path: Path) -> None:
    """A destination whose CA file or password cannot be read fails `config check` (and
    `serve`), not the first forward hours later; the password is never printed."""
    config = _copied_config(tmp_path / "d")
    (tmp_path / "d" / "secret").write_text("hunter2-not-shown\n")
    config.write_text(
        config.read_text()
        + '\n[[destinations]]\nname = "tlspacs"\nae_title = "PACS2"\nhost = "127.0.0.1"\n'
        'port = 4243\ntls = true\ntls_ca = "missing-ca.pem"\n'
        '\n[[destinations]]\nname = "web"\ntype = "dicomweb"\n'
        'url = "http://127.0.0.1:8042/dicom-web"\nusername = "ldct"\npassword_file = "secret"\n'
        '\n[[destinations]]\nname = "web2"\ntype = "dicomweb"\n'
        'url = "http://127.0.0.1:8042/dicom-web"\nusername = "ldct"\n'
        'password_env = "LDCT_TEST_UNSET_PASSWORD"\n'
        '\n[[destinations]]\nname = "wide"\nae_title = "PACS3"\nhost = "127.0.0.1"\n'
        "port = 4244\nassociations = 3\n"
    )
    res = run_cli("config", "check", "--config", config, "--json")
    assert res.returncode == 2, res.stdout
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["destination pacs"]["ok"] and checks["destination web"]["ok"]
    assert not checks["destination tlspacs"]["ok"]
    assert "tls_ca" in checks["destination tlspacs"]["detail"]
    assert not checks["destination web2"]["ok"]
    assert "LDCT_TEST_UNSET_PASSWORD" in checks["destination web2"]["detail"]
    assert "hunter2" not in res.stdout + res.stderr
    assert checks["destination wide"]["detail"] == (
        "PACS3@127.0.0.1:4244, 3 associations at once"
    ), checks["destination wide"]
    assert "associations" not in checks["destination pacs"]["detail"]
