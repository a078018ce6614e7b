"""The config contract (DESIGN section 3): defaults, validation, errors naming key and file."""

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
