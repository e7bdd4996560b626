"""The /metrics endpoint: bind address, TLS, HTTP basic auth, start-up validation, and a real
Prometheus scraping it over HTTPS with basic auth (``up == 1``) with the scrape config that
docs/observability.md documents (``configs/prometheus/scrape-tls-basic-auth.yml``).

The certificate is self-signed, made by the ``openssl`` command line for ``localhost`` and
``127.0.0.1``; no broker is needed.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from stream.config import ConfigError, MetricsConfig, parse_config
from stream.metrics import PipelineMetrics, serve_metrics
from stream.metrics_http import ENV_PASSWORD, ENV_USERNAME, BasicAuth, MetricsEndpoint, start_metrics_server

ROOT = Path(__file__).resolve().parents[1]
SCRAPE_CONFIG = ROOT / "configs" / "prometheus" / "scrape-tls-basic-auth.yml"
PASSWORD = "scrape-pw-6d1e"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (Debian packages `openssl`, `prometheus`; tests/run.sh installs them)"
        if os.environ.get("STREAM_REQUIRE_KAFKA") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "metrics.crt", tmp / "metrics.key"
    subprocess.run(
        [binary("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("endpoint_probe", "a metric to find", registry=reg).inc()
    return reg


Response = tuple[int, dict[str, str], str]


def get(url: str, *, cafile: Path | None = None, auth: tuple[str, str] | None = None) -> Response:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@pytest.fixture()
def tls_auth_server(tls: tuple[Path, Path]) -> Iterator[int]:
    cert, key = tls
    server = start_metrics_server(
        MetricsEndpoint("127.0.0.1", 0, str(cert), str(key), BasicAuth("prometheus", PASSWORD)), registry()
    )
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()


# -- basic auth ---------------------------------------------------------------------------------


def test_basic_auth_accepts_only_the_right_pair() -> None:
    auth = BasicAuth("prometheus", "pw:with:colons")

    def header(user: str, pw: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

    assert auth.check(header("prometheus", "pw:with:colons"))
    assert auth.check("basic " + header("prometheus", "pw:with:colons").split()[1])  # scheme is case-insensitive
    for bad in (header("prometheus", "pw"), header("Prometheus", "pw:with:colons"), header("", ""), "Basic !!!",
                "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer abc", "", None):  # fmt: skip
        assert not auth.check(bad), bad


def test_no_or_wrong_credentials_get_401_with_www_authenticate(tls: tuple[Path, Path], tls_auth_server: int) -> None:
    url = f"https://127.0.0.1:{tls_auth_server}/metrics"
    for auth in (None, ("prometheus", "wrong"), ("someone", PASSWORD)):
        status, headers, body = get(url, cafile=tls[0], auth=auth)
        assert status == 401, auth
        assert headers["WWW-Authenticate"] == 'Basic realm="stream metrics", charset="UTF-8"'
        assert "endpoint_probe" not in body
    status, _, body = get(url, cafile=tls[0], auth=("prometheus", PASSWORD))
    assert status == 200 and "endpoint_probe_total 1.0" in body


def test_plain_http_on_the_tls_port_fails(tls_auth_server: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", tls_auth_server, timeout=5)
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/metrics")
        conn.getresponse().read()
    conn.close()


def test_a_stalled_tls_client_does_not_block_other_scrapes(tls: tuple[Path, Path], tls_auth_server: int) -> None:
    with socket.create_connection(("127.0.0.1", tls_auth_server)):  # connects, never says hello
        status, _, _ = get(f"https://127.0.0.1:{tls_auth_server}/metrics", cafile=tls[0], auth=("prometheus", PASSWORD))
        assert status == 200


# -- bind address -------------------------------------------------------------------------------


def test_binds_the_configured_address_only() -> None:
    server = start_metrics_server(MetricsEndpoint("127.0.0.1", 0), registry())
    try:
        assert server.server_address[0] == "127.0.0.1"
        status, _, body = get(f"http://127.0.0.1:{server.server_port}/metrics")
        assert status == 200 and "endpoint_probe_total" in body
    finally:
        server.shutdown()
        server.server_close()
    server = start_metrics_server(MetricsEndpoint("0.0.0.0", 0), registry())
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        server.shutdown()
        server.server_close()


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = start_metrics_server(MetricsEndpoint("::1", 0), registry())
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    try:
        status, _, _ = get(f"http://[::1]:{server.server_port}/metrics")
        assert status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_host_from_config_and_command_line() -> None:
    from stream.cli import _config, build_parser

    assert parse_config({}).metrics.host == "0.0.0.0"
    args = build_parser().parse_args(["run", "--metrics-host", "127.0.0.1", "--metrics-port", "9999"])
    config = _config(args)
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9999)
    args = build_parser().parse_args(["demo", "--metrics-host", "::1"])
    assert args.metrics_host == "::1"


def test_serve_metrics_serves_on_host_with_tls_and_auth(tls: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = tls
    (tmp_path / "pw").write_text(PASSWORD + "\n")  # the trailing newline is not part of it
    port = free_port()
    config = parse_config({"metrics": {"port": port, "host": "127.0.0.1", "tls_cert_file": str(cert),
                                       "tls_key_file": str(key), "basic_auth_username": "prometheus",
                                       "basic_auth_password_file": str(tmp_path / "pw")}})  # fmt: skip
    reg = CollectorRegistry()
    metrics = serve_metrics(config, reg)
    try:
        assert isinstance(metrics, PipelineMetrics)
        status, _, body = get(f"https://127.0.0.1:{port}/metrics", cafile=cert, auth=("prometheus", PASSWORD))
        assert status == 200 and "stream_build_info" in body
        assert get(f"https://127.0.0.1:{port}/metrics", cafile=cert)[0] == 401
    finally:
        metrics.close()


# -- start-up validation ------------------------------------------------------------------------


def endpoint(environ: dict[str, str] | None = None, **metrics: Any) -> MetricsEndpoint:
    return MetricsEndpoint.from_config(MetricsConfig(**metrics), environ or {})


def test_validation_at_start_up(tls: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = tls
    with pytest.raises(ConfigError, match="go together"):
        parse_config({"metrics": {"tls_cert_file": str(cert)}})
    with pytest.raises(ConfigError, match="go together"):
        endpoint(tls_key_file=str(key))
    with pytest.raises(ConfigError, match=r"tls_cert_file: no such file: /nope\.crt"):
        endpoint(tls_cert_file="/nope.crt", tls_key_file=str(key))
    with pytest.raises(ConfigError, match=r"tls_key_file: no such file"):
        endpoint(tls_cert_file=str(cert), tls_key_file=str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match="cannot use tls_cert_file"):  # the key given as the certificate
        endpoint(tls_cert_file=str(key), tls_key_file=str(key))
    with pytest.raises(ConfigError, match="no password"):
        endpoint(basic_auth_username="prometheus")
    with pytest.raises(ConfigError, match="no username"):
        endpoint({ENV_PASSWORD: "x"})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        endpoint(basic_auth_username="u", basic_auth_password_file=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"basic_auth_password_file: no such file"):
        endpoint(basic_auth_username="u", basic_auth_password_file=str(tmp_path / "nope"))
    # The password is never a config key: the TOML cannot hold it in clear.
    with pytest.raises(ConfigError, match="unknown field `basic_auth_password`") as info:
        parse_config({"metrics": {"basic_auth_password": "in-clear-pw"}})
    assert "in-clear-pw" not in str(info.value)


def test_credentials_from_environment(tmp_path: Path) -> None:
    e = endpoint({ENV_USERNAME: "env-user", ENV_PASSWORD: "env-pw"})
    assert e.auth is not None and e.auth.check("Basic " + base64.b64encode(b"env-user:env-pw").decode())
    (tmp_path / "pw").write_text("file-pw")
    e = endpoint({ENV_PASSWORD: "env-pw"}, basic_auth_username="u", basic_auth_password_file=str(tmp_path / "pw"))
    assert e.auth is not None and e.auth.check("Basic " + base64.b64encode(b"u:file-pw").decode())
    assert endpoint().auth is None and endpoint().scheme == "http"


def test_a_bad_endpoint_is_a_configuration_error_of_stream_run(tmp_path: Path) -> None:
    from stream.cli import main

    (tmp_path / "c.toml").write_text(
        f'[metrics]\nport = {free_port()}\ntls_cert_file = "{tmp_path}/a.crt"\ntls_key_file = "{tmp_path}/a.key"\n'
        '[learners.x]\nkind = "custom"\ninput = "purchases"\noutput_topic = "x"\nlabel = "quantity"\n'
        'task = "regression"\nfeatures = ["unit_price"]\nmodel = [{ class = "linear_model.LinearRegression" }]\n'
    )
    assert main(["run", "--config", str(tmp_path / "c.toml")]) == 2


# -- a real Prometheus --------------------------------------------------------------------------


def test_promtool_accepts_the_documented_scrape_config(tls: tuple[Path, Path], tmp_path: Path) -> None:
    text = SCRAPE_CONFIG.read_text()
    assert "scheme: https" in text and "tls_config:" in text and "basic_auth:" in text and "password_file:" in text
    assert "scheme: https" in (ROOT / "docs" / "observability.md").read_text()
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    # The files it names, where promtool looks for them (next to the config).
    shutil.copy(tls[0], tmp_path / "stream-ca.crt")
    (tmp_path / "stream-metrics-password").write_text(PASSWORD)
    result = subprocess.run([binary("promtool"), "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_over_tls_with_basic_auth(
    tls: tuple[Path, Path], tls_auth_server: int, tmp_path: Path
) -> None:
    """The documented scrape job, pointed at the test's endpoint: ``up == 1``; and a job
    without credentials against the same endpoint: ``up == 0`` (401)."""
    text = SCRAPE_CONFIG.read_text().replace("stream.example.com:9100", f"127.0.0.1:{tls_auth_server}")
    text = text.replace("scrape_interval: 15s", "scrape_interval: 1s")
    assert f"127.0.0.1:{tls_auth_server}" in text
    text += (
        "  - job_name: stream-no-auth\n    scheme: https\n    tls_config:\n      ca_file: stream-ca.crt\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{tls_auth_server}']\n"
    )
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(tls[0], tmp_path / "stream-ca.crt")
    (tmp_path / "stream-metrics-password").write_text(PASSWORD)
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        up: dict[str, str] = {}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and set(up) != {"stream", "stream-no-auth"}:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
            try:
                query = urllib.parse.urlencode({"query": "up"})
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5) as r:
                    doc = json.loads(r.read())
            except OSError:
                continue
            up = {s["metric"]["job"]: s["value"][1] for s in doc["data"]["result"]}
        assert up == {"stream": "1", "stream-no-auth": "0"}, (up, (tmp_path / "prometheus.log").read_text()[-2000:])
        # The probe metric came through the authenticated scrape.
        query = urllib.parse.urlencode({"query": 'endpoint_probe_total{job="stream"}'})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5) as r:
            assert json.loads(r.read())["data"]["result"], "no sample scraped"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
