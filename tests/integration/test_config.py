"""Server settings: flags and files, strict types, the security settings, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dd.cli import _server_config, build_parser
from dd.config import ConfigError, ServerConfig, load_server_config
from tests.faults import null_model
from tests.serverproc import REPO, free_port


def test_defaults_are_the_documented_ones() -> None:
    """docs/operations.md states these; change both together."""
    cfg = load_server_config(None, {})
    assert (cfg.host, cfg.port, cfg.kserve_port) == ("0.0.0.0", 50051, 0)
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, cfg.auth_token_file) == ("", "", "", "")
    assert cfg.max_image_pixels == 3840 * 2160 and cfg.grace_s == 10.0 and cfg.default_timeout_s == 30.0
    assert cfg.max_pending == 256 and cfg.max_message_mb == 64.0


LIMITS = ("max_image_pixels", "max_jpeg_scans", "max_request_id_bytes", "max_message_mb", "upload_timeout_s",
          "max_pending", "max_held_response_mb", "stream_window", "max_concurrent_calls", "max_streams_per_connection",
          "max_connections", "idle_timeout_s", "handshake_timeout_s", "keepalive_s")


def test_every_limit_is_documented_with_its_flag_and_default() -> None:
    """docs/operations.md's Limits table has a row for each limit, naming its key, its flag and its default."""
    import argparse

    from dd.cli import _server_flags

    parser = argparse.ArgumentParser()
    _server_flags(parser)
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    doc = (REPO / "docs" / "operations.md").read_text()
    table = doc[doc.index("## Limits against hostile and clumsy clients"):doc.index("## Logs")]
    cfg = load_server_config(None, {})
    for key in LIMITS:
        row = next((line for line in table.splitlines() if f"`{key}`" in line), None)
        assert row is not None, f"{key} is not in the Limits table"
        assert f"`{flags[key]}`" in row, (key, flags[key], row)
        default = getattr(cfg, key)
        shown = "3840 x 2160" if key == "max_image_pixels" else f"{default:g}"
        assert f"| {shown}" in row, (key, default, row)


@pytest.mark.parametrize("override, message", [
    ({"grace_s": float("nan")}, "grace_s: expected a number"),
    ({"default_timeout_s": "inf"}, "default_timeout_s: expected a number"),
    ({"port": 2.5}, "port: expected int"),
    ({"port": True}, "port: expected int"),
    ({"port": 70000}, "port must be in"),
    ({"kserve_port": -1}, "kserve_port must be in"),
    ({"port": 9000, "kserve_port": 9000}, "kserve_port 9000 is the main port, which serves KServe already"),
    ({"max_image_pixels": 1}, "max_image_pixels must be at least 4"),
    ({"max_pending": 0}, "max_pending must be at least 1"),
    ({"ring_slots": 0}, "ring_slots must be in"),
    ({"grace_s": -1}, "grace_s non-negative"),
    ({"tls_cert": "/nonexistent/cert.pem"}, "tls_cert and tls_key go together"),
    ({"tls_client_ca": "/nonexistent/ca.pem"}, "needs tls_cert and tls_key"),
    ({"auth_token_file": "/nonexistent/token"}, "auth_token_file: /nonexistent/token does not exist"),
    ({"stream_window": 0}, "stream_window must be at least 1"),
    ({"max_jpeg_scans": 0}, "max_jpeg_scans must be at least 1"),
    ({"idle_timeout_s": 0}, "idle_timeout_s must be positive"),
    ({"log_max_mb": -1}, "log_max_mb and log_backups must be >= 0"),
    ({"allow_client_shm": "yes"}, "allow_client_shm: expected true or false"),
    ({"allow_client_shm": 1}, "allow_client_shm: expected true or false"),
])
def test_bad_settings_are_refused_with_the_reason(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_server_config(None, override)


def test_tls_files_must_be_pem(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="tls_cert: .* is not a PEM file"):
        load_server_config(None, {"tls_cert": str(cert), "tls_key": str(key)})


def test_file_paths_are_relative_to_the_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text("x" * 32)
    conf = tmp_path / "server.yaml"
    conf.write_text("port: 6000\ngrace_s: 3\nauth_token_file: secrets/token\nmax_pending: 17\n")
    monkeypatch.chdir("/")
    cfg = load_server_config(conf, {"port": 7000})  # a flag wins over the file
    assert cfg.port == 7000 and cfg.grace_s == 3.0 and cfg.max_pending == 17
    assert cfg.auth_token_file == str(tmp_path / "secrets" / "token")


def test_unknown_settings_in_a_file_are_named(tmp_path: Path) -> None:
    conf = tmp_path / "server.json"
    conf.write_text(json.dumps({"prot": 1}))
    with pytest.raises(ConfigError, match=r"unknown settings \['prot'\]"):
        load_server_config(conf, {})


def test_security_flags_reach_the_config(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 20)
    args = build_parser().parse_args(["serve", str(tmp_path), "--auth-token-file", str(token), "--max-pending", "9",
                                      "--grace", "2.5"])
    cfg = _server_config(args)
    assert cfg.auth_token_file == str(token) and cfg.max_pending == 9 and cfg.grace_s == 2.5
    assert isinstance(cfg, ServerConfig)


def _serve(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dd", "serve", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_bad_security_setup_fails_before_any_process_starts(tmp_path: Path) -> None:
    """One clear line and exit status 2, rather than frontends that crash and restart forever."""
    model = null_model(tmp_path / "m")
    short = tmp_path / "token"
    short.write_text("abc\n")
    res = _serve(str(model), "--auth-token-file", str(short), "--port", "0")
    assert res.returncode == 2 and "at least 16" in res.stderr, res.stderr
    pem = tmp_path / "cert.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    res = _serve(str(model), "--tls-cert", str(pem), "--tls-key", str(pem), "--port", "0")
    assert res.returncode == 2 and "cannot load them as a certificate and its private key" in res.stderr, res.stderr


def test_too_little_shared_memory_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    model = null_model(tmp_path / "m")
    run_dir = tmp_path / "run"
    res = _serve(str(model), "--slot-mb", "1000000", "--ring-slots", "4096", "--port", "0", "--run-dir", str(run_dir))
    assert res.returncode == 2 and "--shm-size" in res.stderr, res.stderr
    assert not run_dir.exists(), "the run directory and its lock are removed again"


def test_unusable_run_and_log_folders_are_one_line(tmp_path: Path) -> None:
    """A --run-dir or --log-dir that is a file (or lies under one) is one line and status 2, not a traceback,
    for `serve` and for a frontend run alone."""
    model = null_model(tmp_path / "m")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = {("serve", "--run-dir", str(a_file)): f"run directory {a_file} is a file, not a folder",
             ("serve", "--run-dir", str(a_file / "run")): f"cannot create the run directory {a_file / 'run'}",
             ("serve", "--log-dir", str(a_file)): f"cannot create the log folder {a_file}",
             ("frontend", "--run-dir", str(a_file)): f"run directory {a_file} is a file, not a folder"}
    for (command, *flags), message in cases.items():
        res = subprocess.run([sys.executable, "-m", "dd", command, str(model), "--port", str(free_port()),
                              "--metrics-port", "0",
                              *flags], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == 2, (command, flags, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, (command, flags, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (command, flags, res.stderr)


def test_serve_without_path_names_a_bad_node_config_file(tmp_path: Path) -> None:
    """`docker run -e NODE_CONFIG_FILE=... IMAGE` runs `serve` with no PATH: a wrong value is named as such."""
    import os

    env = dict(os.environ, NODE_CONFIG_FILE="model_repository/x/node_config.json", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "dd", "serve", "--port", "0"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "NODE_CONFIG_FILE=model_repository/x/node_config.json (serve was given no PATH)" in res.stderr
    assert "no such file or folder" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_client_shared_memory_is_off_by_default_and_a_switch() -> None:
    assert load_server_config(None, {}).allow_client_shm is False
    assert load_server_config(None, {"allow_client_shm": True}).allow_client_shm is True
