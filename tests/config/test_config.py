"""Tests of sidecar.config: the YAML schema, route flags and config file lookup.

Parsing is pure, so most tests feed text to `parse_config` and check either the
frozen objects it returns or the one message it raises: the key path, the
``file:LINE`` origin and what to do about it.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sidecar
from sidecar.config import (
    Config,
    CredentialsConfig,
    DestinationRef,
    InboundConfig,
    InterceptConfig,
    ListenAddress,
    LogConfig,
    RouteConfig,
    RouteFlags,
    SessionConfig,
    Timeouts,
    TLSConfig,
    UpstreamURL,
    config_from_flags,
    find_config_file,
    load_config,
    parse_config,
    parse_duration,
    parse_listen,
    parse_upstream,
)
from sidecar.errors import ConfigError, UsageError

BASE = Path("/etc/sidecar")
NAME = "sidecar.yaml"

# The YAML example of DESIGN.md with every key, split so that each route has exactly
# one credential source: pem (+key, password_env), pkcs12 (+password_file), destination.
FULL = """\
log:
  level: debug
  format: json
  access_log: false
  query_values: true
admin_prefix: /_admin/
routes:
  - name: successfactors
    listen: 127.0.0.1:8080
    upstream: https://API.example-sf.test:8443/odata/
    company_id: ACME1234
    headers: {X-Extra: value, successfactors-companyid: OTHER}
    query: {customPageSize: "100"}
    credentials:
      pem: certs/client.pem
      key: certs/client.key
      password_env: SIDECAR_KEY_PASSWORD
      warn_before: 14d
    tls:
      ca_file: certs/ca.pem
      server_name: sf.internal
    rewrite_links: false
    rewrite_hosts: [Other.Example-SF.test, cdn.example-sf.test]
    timeouts: {connect: 500ms, read: 15m, shutdown: 1h}
    inbound:
      allow_remote: false
      token_env: SIDECAR_INBOUND_TOKEN
  - name: p12
    listen: "[::1]:8081"
    upstream: https://p12.example.test
    credentials:
      pkcs12: /abs/client.p12
      password_file: /run/secrets/key-password
  - name: btp
    listen: 0.0.0.0:8082
    credentials:
      destination:
        name: sap_hcmcloud_core_odata
        service_key: destination-service-key.json
        refresh: 30s
    inbound:
      allow_remote: true
      token_env: SIDECAR_INBOUND_TOKEN
"""

# DESIGN.md's example verbatim: it lists all three sources to document them.
DESIGN_VERBATIM = """\
log:
  level: info              # debug | info | warning | error
  format: text             # text | json
  access_log: true
  query_values: false      # true: log query values too (they may hold personal data)
admin_prefix: /-/          # health, ready, status, metrics on every listener
routes:
  - name: successfactors   # unique; used in logs and metrics
    listen: 127.0.0.1:8080
    upstream: https://api.example-sf.test      # optional when a destination supplies URL
    company_id: ACME1234                       # sent as successfactors-companyid
    headers: {x-extra: value}                  # set on every upstream request
    query: {}                                  # added to every upstream query string
    credentials:           # exactly one of pem, pkcs12, destination
      pem: certs/client.pem        # chain and optionally the key; base64-wrapped PEM accepted
      key: certs/client.key        # optional separate key file
      pkcs12: certs/client.p12
      password_env: SIDECAR_KEY_PASSWORD
      password_file: /run/secrets/key-password
      destination:
        name: sap_hcmcloud_core_odata
        service_key: destination-service-key.json  # else VCAP_SERVICES, else $SERVICE_BINDING_ROOT
        refresh: 15m               # at least 1s
      warn_before: 30d             # log a warning when the leaf expires sooner
      probe_before_switch: true    # a renewed certificate is used only once the upstream accepts it
      probe_path: /odata/v2/       # what that probe requests (any answer but a rejection = accepted)
    session:
      reuse: true                  # keep the upstream's session cookies for clients that send none
      csrf: true                   # fetch, cache and send X-CSRF-Token on writes that carry none
    intercept:
      enabled: false               # serve CONNECT for the upstream's own host names (https_proxy clients)
      cert_dir: null               # where the interception certificate is kept; default: user state dir
    tls:
      ca_file: null                # extra trust anchors for the upstream server
      server_name: null            # SNI / verification name override
    rewrite_links: true            # rewrite upstream absolute URLs to the local origin
    rewrite_hosts: []              # more upstream host names whose links are rewritten
    timeouts: {connect: 10s, read: 300s, shutdown: 10s}
    inbound:
      allow_remote: false          # listening beyond loopback needs this AND a token
      token_env: SIDECAR_INBOUND_TOKEN  # clients send it as X-Sidecar-Token
"""  # noqa: E501 - DESIGN.md's text, verbatim

MINIMAL = """\
routes:
  - upstream: https://api.example.test
    credentials:
      pem: client.pem
"""


def parse(text: str, *, env: dict[str, str] | None = None, **kw: object) -> Config:
    return parse_config(
        textwrap.dedent(text),
        filename=NAME,
        base_dir=BASE,
        env={} if env is None else env,
        **kw,  # type: ignore[arg-type]
    )


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the ``nth`` line of ``text`` that contains ``needle``."""
    hits = [i for i, line in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in line]
    return hits[nth - 1]


def expect_error(text: str, key_path: str, line: int, *fragments: str, **kw: object) -> str:
    """Parse ``text``; it must fail naming ``key_path`` and ``sidecar.yaml:LINE``."""
    with pytest.raises(ConfigError) as info:
        parse(text, **kw)  # type: ignore[arg-type]
    message = str(info.value)
    assert re.match(re.escape(f"{key_path} ({NAME}:{line}): "), message), message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return message


def route(extra: str = "", *, credentials: str = "pem: client.pem", head: str = "") -> str:
    """A one-route config: credentials on line 2, ``extra`` lines from line 3 on."""
    text = f"routes:\n  - credentials: {{{credentials}}}\n"
    text += textwrap.indent(textwrap.dedent(extra), "    ")
    text += "    upstream: https://api.example.test\n"
    return head + text


# ---------------------------------------------------------------- the full schema


def test_full_example_parses_into_frozen_dataclasses() -> None:
    config = parse(FULL, env={})
    assert config.source == BASE / NAME
    assert config.log == LogConfig(
        level="debug", format="json", access_log=False, query_values=True
    )
    assert config.admin_prefix == "/_admin/"
    sf, p12, btp = config.routes

    assert sf == RouteConfig(
        name="successfactors",
        listen=ListenAddress("127.0.0.1", 8080),
        upstream=UpstreamURL(host="api.example-sf.test", port=8443, path_prefix="/odata"),
        company_id="ACME1234",
        headers={"x-extra": "value", "successfactors-companyid": "OTHER"},
        query={"customPageSize": "100"},
        credentials=CredentialsConfig(
            pem=BASE / "certs/client.pem",
            key=BASE / "certs/client.key",
            password_env="SIDECAR_KEY_PASSWORD",
            warn_before=14 * 86400,
        ),
        tls=TLSConfig(ca_file=BASE / "certs/ca.pem", server_name="sf.internal"),
        rewrite_links=False,
        rewrite_hosts=("other.example-sf.test", "cdn.example-sf.test"),
        timeouts=Timeouts(connect=0.5, read=900.0, shutdown=3600.0),
        inbound=InboundConfig(allow_remote=False, token_env="SIDECAR_INBOUND_TOKEN"),
    )
    assert sf.credentials.kind == "pem"
    assert sf.credentials.files == (BASE / "certs/client.pem", BASE / "certs/client.key")
    assert str(sf.upstream) == "https://api.example-sf.test:8443/odata"
    assert sf.upstream is not None and sf.upstream.origin == "https://api.example-sf.test:8443"

    assert p12.listen == ListenAddress("::1", 8081)
    assert str(p12.listen) == "[::1]:8081"
    assert p12.listen.is_loopback
    assert p12.credentials == CredentialsConfig(
        pkcs12=Path("/abs/client.p12"), password_file=Path("/run/secrets/key-password")
    )
    assert p12.credentials.kind == "pkcs12"

    assert btp.upstream is None
    assert btp.credentials.kind == "destination"
    assert btp.credentials.destination == DestinationRef(
        name="sap_hcmcloud_core_odata",
        service_key=BASE / "destination-service-key.json",
        refresh=30.0,
    )
    assert btp.listen == ListenAddress("0.0.0.0", 8082)
    assert not btp.listen.is_loopback
    assert btp.inbound == InboundConfig(allow_remote=True, token_env="SIDECAR_INBOUND_TOKEN")


def test_config_objects_are_frozen() -> None:
    config = parse(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].credentials.pem = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log.level = "error"  # type: ignore[misc]
    assert isinstance(config.routes, tuple)


def test_design_example_verbatim_lists_all_sources_and_is_rejected_for_that() -> None:
    expect_error(
        DESIGN_VERBATIM,
        "routes[0].credentials",
        line_of(DESIGN_VERBATIM, "credentials:"),
        "exactly one of pem, pkcs12, destination (found: pem, pkcs12, destination)",
    )


def test_design_example_with_one_source_parses() -> None:
    text = re.sub(r"\n      pkcs12:.*\n", "\n", DESIGN_VERBATIM)
    text = re.sub(r"\n      password_file:.*\n", "\n", text)
    text = re.sub(r"\n      destination:\n(        .*\n){3}", "\n", text)
    (r,) = parse(text).routes
    assert r.credentials == CredentialsConfig(
        pem=BASE / "certs/client.pem",
        key=BASE / "certs/client.key",
        password_env="SIDECAR_KEY_PASSWORD",
        warn_before=30 * 86400,
    )
    assert r.headers == {"x-extra": "value"}
    assert r.tls == TLSConfig()
    assert r.timeouts == Timeouts(connect=10, read=300, shutdown=10)
    assert r.session == SessionConfig(reuse=True, csrf=True)
    assert r.intercept == InterceptConfig(enabled=False, cert_dir=None)


def test_probe_before_switch_and_probe_path() -> None:
    (r,) = parse(MINIMAL).routes
    assert r.credentials.probe_before_switch is True
    assert r.credentials.probe_path == "/odata/v2/"
    text = route(credentials="pem: a.pem, probe_before_switch: no, probe_path: '/api/ping?x=1'")
    (r,) = parse(text).routes
    assert r.credentials.probe_before_switch is False
    assert r.credentials.probe_path == "/api/ping?x=1"


@pytest.mark.parametrize("value", ["odata/v2/", "/a b", "/a#b", "'/a\\b'", "https://h/x"])
def test_probe_path_must_be_a_request_path(value: str) -> None:
    text = route(credentials=f"pem: a.pem, probe_path: {value}")
    expect_error(text, "routes[0].credentials.probe_path", 2, "is not a request path")


def test_session_switches_parse() -> None:
    (r,) = parse(route("session: {reuse: false, csrf: no}\n")).routes
    assert r.session == SessionConfig(reuse=False, csrf=False)
    (r,) = parse(route("session: {csrf: false}\n")).routes
    assert r.session == SessionConfig(reuse=True, csrf=False)


def test_intercept_parses_with_cert_dir_against_the_config_folder() -> None:
    (r,) = parse(route("intercept: {enabled: true, cert_dir: state/intercept}\n")).routes
    assert r.intercept == InterceptConfig(enabled=True, cert_dir=BASE / "state/intercept")
    (r,) = parse(route("intercept: {enabled: on, cert_dir: /var/lib/sidecar}\n")).routes
    assert r.intercept == InterceptConfig(enabled=True, cert_dir=Path("/var/lib/sidecar"))
    (r,) = parse(route("intercept: {cert_dir: '${STATE}/x'}\n"), env={"STATE": "/s"}).routes
    assert r.intercept == InterceptConfig(enabled=False, cert_dir=Path("/s/x"))
    (r,) = parse(route("intercept:\n")).routes
    assert r.intercept == InterceptConfig()


def test_defaults_when_keys_are_omitted() -> None:
    config = parse(MINIMAL)
    assert config.log == LogConfig(level="info", format="text", access_log=True, query_values=False)
    assert config.admin_prefix == "/-/"
    (r,) = config.routes
    assert r == RouteConfig(
        name="default",
        listen=ListenAddress("127.0.0.1", 8080),
        upstream=UpstreamURL(host="api.example.test"),
        credentials=CredentialsConfig(pem=BASE / "client.pem"),
    )
    assert r.company_id is None
    assert r.headers == {} and r.query == {}
    assert r.rewrite_links is True and r.rewrite_hosts == ()
    assert r.timeouts == Timeouts(connect=10.0, read=300.0, shutdown=10.0)
    assert r.inbound == InboundConfig(allow_remote=False, token_env=None)
    assert r.session == SessionConfig(reuse=True, csrf=True)
    assert r.intercept == InterceptConfig(enabled=False, cert_dir=None)
    assert r.credentials.warn_before == 30 * 86400
    assert r.credentials.key is None and r.credentials.password_env is None


def test_nulls_mean_defaults() -> None:
    config = parse(
        route(
            """\
            company_id: null
            headers: null
            tls: {ca_file: null, server_name: null}
            timeouts: null
            inbound: null
            """,
            head="log: null\n",
        )
    )
    (r,) = config.routes
    assert config.log == LogConfig()
    assert r.tls == TLSConfig() and r.timeouts == Timeouts() and r.inbound == InboundConfig()


def test_destination_shorthand_and_default_refresh() -> None:
    (r,) = parse("routes:\n  - credentials: {destination: my_dest}\n").routes
    assert r.credentials.destination == DestinationRef(name="my_dest", refresh=15 * 60)
    assert r.upstream is None


def test_bare_port_and_numbers_where_strings_are_expected() -> None:
    (r,) = parse(route("listen: 9000\ncompany_id: 1234\nheaders: {x-n: 5}\n")).routes
    assert r.listen == ListenAddress("127.0.0.1", 9000)
    assert r.company_id == "1234"
    assert r.headers == {"x-n": "5"}


def test_unnamed_routes_get_distinct_names() -> None:
    text = MINIMAL + "  - upstream: https://b.example.test\n    listen: 8081\n"
    text += "    credentials: {pem: b.pem}\n"
    config = parse(text)
    assert [r.name for r in config.routes] == ["default", "routes[1]"]


def test_relative_and_absolute_and_home_paths() -> None:
    (r,) = parse(
        route(credentials="pem: sub/../x.pem, key: /abs/x.key, password_file: ~/pw")
    ).routes
    assert r.credentials.pem == BASE / "sub/../x.pem"
    assert r.credentials.key == Path("/abs/x.key")
    assert r.credentials.password_file == Path("~/pw").expanduser()


def test_booleans_accept_yaml_words() -> None:
    config = parse(route("rewrite_links: 'off'\n", head="log: {access_log: 'no'}\n"))
    assert config.routes[0].rewrite_links is False
    assert config.log.access_log is False
    expect_error(
        route("rewrite_links: maybe\n"),
        "routes[0].rewrite_links",
        3,
        "expected true or false, got 'maybe'",
    )


def test_log_choices_are_case_insensitive_and_checked() -> None:
    assert parse(MINIMAL.replace("routes:", "log: {level: WARNING}\nroutes:")).log.level == (
        "warning"
    )
    expect_error(
        "log: {format: xml}\n" + MINIMAL, "log.format", 1, "'xml' is not one of: text, json"
    )


@pytest.mark.parametrize("path", ["sidecar/starter.yaml", "config/sidecar.example.yaml"])
def test_shipped_configs_parse(path: str) -> None:
    file = Path(sidecar.__file__).parent.parent / path
    config = load_config(file, env={})
    assert config.source == file.resolve()
    (r,) = config.routes
    assert r.name == "successfactors"
    assert r.company_id == "ACME1234"
    assert r.credentials.pem == file.resolve().parent / "certs/client-bundle.pem"
    assert r.listen == ListenAddress("127.0.0.1", 8080)


# --------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("30d", 30 * 86400.0),
        ("1.5h", 5400.0),
        (" 7 s ", 7.0),
        ("42", 42.0),
        (42, 42.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10x", "'10x' is not a duration; use a number of seconds or 500ms, 10s, 15m, 1h, 30d"),
        ("-1", "'-1' is not a duration"),
        ("", "'' is not a duration"),
        ("s", "'s' is not a duration"),
        ("1 h 2 m", "is not a duration"),
        (-1, "a duration cannot be negative"),
        (True, "expected a duration such as 500ms, 10s, 15m, 1h, 30d"),
        (float("nan"), "is not a duration"),
        (float("inf"), "is not a duration"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10x", "'10x' is not a duration"),
        ("'-1'", "'-1' is not a duration"),
        ("-1", "a duration cannot be negative"),
        ("true", "expected a duration such as 500ms"),
        (".inf", "is not a duration"),
        ("[1, 2]", "expected a string, got a list"),
        ("{a: 1}", "expected a string, got a mapping"),
    ],
)
def test_bad_durations_in_yaml(value: str, message: str) -> None:
    expect_error(route(f"timeouts: {{read: {value}}}\n"), "routes[0].timeouts.read", 3, message)


def test_refresh_below_one_second_is_rejected() -> None:
    text = "routes:\n  - credentials:\n      destination: {name: d, refresh: 500ms}\n"
    expect_error(text, "routes[0].credentials.destination.refresh", 3, "must be at least 1s")
    (r,) = parse(text.replace("500ms", "1s")).routes
    assert r.credentials.destination is not None
    assert r.credentials.destination.refresh == 1.0


def test_zero_connect_timeout_is_rejected() -> None:
    expect_error(
        route("timeouts: {connect: 0}\n"),
        "routes[0].timeouts.connect",
        3,
        "must be at least 0.001s",
    )


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}


@given(n=st.integers(min_value=0, max_value=10**9), unit=st.sampled_from(sorted(_UNITS)))
def test_duration_property_units(n: int, unit: str) -> None:
    assert parse_duration(f"{n}{unit}") == n * _UNITS[unit]


@given(st.text())
def test_duration_property_never_raises_other_errors(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert seconds >= 0


# ------------------------------------------------------------------ ${VAR} expansion


def test_env_expansion() -> None:
    text = route(
        "company_id: ${COMPANY}\nheaders: {x-tenant: 'pre-${TENANT}-post'}\n",
        credentials="pem: '${CERTS}/client.pem'",
    ).replace("https://api.example.test", "https://${HOST}/api")
    env = {"COMPANY": "ACME1", "TENANT": "t1", "CERTS": "/secrets", "HOST": "sf.example.test"}
    (r,) = parse(text, env=env).routes
    assert r.company_id == "ACME1"
    assert r.headers == {"x-tenant": "pre-t1-post"}
    assert r.credentials.pem == Path("/secrets/client.pem")
    assert str(r.upstream) == "https://sf.example.test/api"


def test_env_expansion_of_relative_path_is_relative_to_the_file() -> None:
    (r,) = parse(route(credentials="pem: '${NAME}.pem'"), env={"NAME": "c"}).routes
    assert r.credentials.pem == BASE / "c.pem"


def test_unset_variable_names_variable_and_key_path() -> None:
    message = expect_error(
        route("company_id: ${SF_COMPANY}\n"),
        "routes[0].company_id",
        3,
        "environment variable SF_COMPANY is not set",
        "export SF_COMPANY=",
    )
    assert "hint" in message


def test_unset_variable_in_nested_key() -> None:
    expect_error(
        route(credentials="pem: '${BUNDLE_DIR}/c.pem'"),
        "routes[0].credentials.pem",
        2,
        "BUNDLE_DIR is not set",
    )


def test_invalid_variable_reference() -> None:
    expect_error(
        route("company_id: '${1BAD}'\n"),
        "routes[0].company_id",
        3,
        "${1BAD} is not a valid environment variable name",
    )


def test_parse_config_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_TEST_COMPANY", "FROMENV")
    text = route("company_id: ${SIDECAR_TEST_COMPANY}\n")
    config = parse_config(text, filename=NAME, base_dir=BASE)
    assert config.routes[0].company_id == "FROMENV"


# ------------------------------------------------------------------ validation errors


def test_unknown_key_in_route_suggests_the_right_one() -> None:
    text = MINIMAL.replace("  - upstream:", "  - upstrem:")
    expect_error(text, "routes[0].upstrem", 2, "unknown key", "did you mean 'upstream'?")


def test_unknown_key_in_credentials_suggests() -> None:
    text = route(credentials="pem: a.pem, pasword_env: PW")
    expect_error(text, "routes[0].credentials.pasword_env", 2, "did you mean 'password_env'?")


def test_unknown_nested_key_with_line() -> None:
    text = route("timeouts:\n  connect: 1s\n  raed: 10s\n")
    expect_error(text, "routes[0].timeouts.raed", 5, "did you mean 'read'?")


def test_unknown_top_level_key() -> None:
    expect_error("logs: {}\n" + MINIMAL, "logs", 1, "unknown key", "did you mean 'log'?")
    message = expect_error(MINIMAL + "zzz: 1\n", "zzz", 5, "unknown key")
    assert "allowed: log, admin_prefix, routes" in message


@pytest.mark.parametrize(
    ("extra", "key_path", "message"),
    [
        (
            "headers: [a, b]\n",
            "routes[0].headers",
            "expected a mapping of names to values, got a list",
        ),
        ("tls: [a]\n", "routes[0].tls", "expected a mapping, got a list"),
        ("inbound: yes\n", "routes[0].inbound", "expected a mapping, got a boolean"),
        ("company_id: {a: 1}\n", "routes[0].company_id", "expected a string, got a mapping"),
        ("upstream2: x\n", "routes[0].upstream2", "unknown key"),
        ("listen: {port: 1}\n", "routes[0].listen", "expected a string, got a mapping"),
        ("rewrite_hosts: {a: b}\n", "routes[0].rewrite_hosts", "expected a list, got a mapping"),
        ("rewrite_hosts: ['']\n", "routes[0].rewrite_hosts[0]", "must not be empty"),
        ("name: [a]\n", "routes[0].name", "expected a string, got a list"),
        ("name: 'my route'\n", "routes[0].name", "use letters, digits, '.', '_' and '-' only"),
        ("query: {a: null}\n", "routes[0].query.a", "needs a value"),
        ("session: yes\n", "routes[0].session", "expected a mapping, got a boolean"),
        ("session: {reuse: maybe}\n", "routes[0].session.reuse", "expected true or false"),
        ("session: {cookies: true}\n", "routes[0].session.cookies", "unknown key"),
        ("intercept: yes\n", "routes[0].intercept", "expected a mapping, got a boolean"),
        ("intercept: {enabled: maybe}\n", "routes[0].intercept.enabled", "expected true or false"),
        ("intercept: {cert_dir: [a]}\n", "routes[0].intercept.cert_dir", "expected a string"),
        ("intercept: {certdir: x}\n", "routes[0].intercept.certdir", "did you mean 'cert_dir'?"),
    ],
)
def test_wrong_types(extra: str, key_path: str, message: str) -> None:
    expect_error(route(extra), key_path, 3, message)


def test_mapping_where_upstream_string_expected() -> None:
    text = "routes:\n  - upstream: {host: h}\n    credentials: {pem: a.pem}\n"
    expect_error(text, "routes[0].upstream", 2, "expected a string, got a mapping")


def test_list_where_mapping_expected() -> None:
    expect_error("- a\n- b\n", "config", 1, "expected a mapping, got a list")
    expect_error(
        route(credentials="").replace("{}", "[a.pem]"),
        "routes[0].credentials",
        2,
        "expected a mapping, got a list",
    )
    expect_error("log: [1]\n" + MINIMAL, "log", 1, "expected a mapping, got a list")


def test_routes_must_be_a_list_of_mappings() -> None:
    expect_error("routes: {a: 1}\n", "routes", 1, "expected a list, got a mapping")
    expect_error("routes:\n  - 5\n", "routes[0]", 2, "expected a mapping, got int 5")
    expect_error("routes:\n  -\n", "routes[0]", 2, "a route must be a mapping")


def test_pem_and_pkcs12_together() -> None:
    expect_error(
        route(credentials="pem: a.pem, pkcs12: a.p12"),
        "routes[0].credentials",
        2,
        "needs exactly one of pem, pkcs12, destination (found: pem, pkcs12)",
    )


def test_no_credential_source() -> None:
    expect_error(
        route(credentials="warn_before: 1d"),
        "routes[0].credentials",
        2,
        "needs exactly one of pem, pkcs12, destination (found: none)",
    )


def test_missing_credentials_names_the_route() -> None:
    text = "routes:\n  - name: a\n    upstream: https://h.test\n"
    expect_error(text, "routes[0].credentials", 2, "is required", "credentials.pem")


def test_key_without_pem() -> None:
    text = route(credentials="pkcs12: a.p12, key: a.key")
    expect_error(text, "routes[0].credentials.key", 2, "goes with `pem` only")
    text = "routes:\n  - upstream: https://h.test\n    credentials:\n      key: a.key\n"
    expect_error(text, "routes[0].credentials", 3, "found: none")


def test_password_env_and_password_file_together() -> None:
    text = "routes:\n  - upstream: https://h.test\n    credentials:\n      pem: a.pem\n"
    text += "      password_env: PW\n      password_file: pw.txt\n"
    expect_error(
        text,
        "routes[0].credentials.password_file",
        6,
        "give password_env or password_file, not both",
    )


@pytest.mark.parametrize("name", ["hunter2!", "my password", "1ABC"])
def test_password_env_must_be_a_variable_name(name: str) -> None:
    text = route(credentials=f"pem: a.pem, password_env: '{name}'")
    expect_error(
        text,
        "routes[0].credentials.password_env",
        2,
        f"{name!r} is not an environment variable name",
        "not its value",
    )


def test_bad_token_env_name() -> None:
    expect_error(
        route("inbound: {token_env: 'a-b'}\n"),
        "routes[0].inbound.token_env",
        3,
        "'a-b' is not an environment variable name",
    )


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ("http://api.example.test", "must start with https://"),
        ("api.example.test", "must start with https://"),
        ("https://api.example.test/odata?x=1", "must not hold a query or fragment"),
        ("https://api.example.test/#top", "must not hold a query or fragment"),
        ("https://user:pw@api.example.test", "must not hold user info"),
        ("https://api.example.test:99999", "has an invalid port"),
        ("https:///path", "has no host name"),
    ],
)
def test_bad_upstream(upstream: str, message: str) -> None:
    text = f"routes:\n  - credentials: {{pem: a.pem}}\n    upstream: '{upstream}'\n"
    expect_error(text, "routes[0].upstream", 3, message)


def test_missing_upstream_without_destination() -> None:
    text = "routes:\n  - name: r\n    credentials: {pem: a.pem}\n"
    expect_error(
        text, "routes[0].upstream", 2, "is required unless the credentials come from a destination"
    )


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("8080x", "'8080x' is not HOST:PORT"),
        ("'[::1]'", "'[::1]' is not HOST:PORT; write IPv6 hosts as [::1]:8080"),
        ("host:99999", "'host:99999': the port must be a number from 0 to 65535"),
        ("'::1:8080'", "write IPv6 hosts in brackets"),
        ("':8080'", "is not HOST:PORT"),
        ("'127.0.0.1:'", "the port must be a number"),
    ],
)
def test_bad_listen(listen: str, message: str) -> None:
    expect_error(route(f"listen: {listen}\n"), "routes[0].listen", 3, message)


def test_non_loopback_listen_needs_allow_remote() -> None:
    expect_error(
        route("listen: 0.0.0.0:8080\n"),
        "routes[0].listen",
        3,
        "0.0.0.0:8080 is reachable from other machines",
        "inbound.allow_remote",
    )


def test_allow_remote_needs_token_env() -> None:
    text = route("listen: 0.0.0.0:8080\ninbound:\n  allow_remote: true\n")
    expect_error(
        text,
        "routes[0].inbound.token_env",
        4,
        "is required when allow_remote is true",
        "X-Sidecar-Token",
    )


def test_allow_remote_with_token_env_is_accepted() -> None:
    text = route("listen: 0.0.0.0:8080\ninbound: {allow_remote: true, token_env: TOK}\n")
    (r,) = parse(text).routes
    assert r.inbound == InboundConfig(allow_remote=True, token_env="TOK")


def test_localhost_listen_is_loopback() -> None:
    (r,) = parse(route("listen: localhost:9000\n")).routes
    assert r.listen.is_loopback


TWO_ROUTES = """\
routes:
  - name: a
    listen: 127.0.0.1:8080
    upstream: https://a.test
    credentials: {pem: a.pem}
  - name: b
    listen: 127.0.0.1:8081
    upstream: https://b.test
    credentials: {pem: b.pem}
"""


def test_two_routes_parse() -> None:
    a, b = parse(TWO_ROUTES).routes
    assert (a.name, a.listen.port, b.name, b.listen.port) == ("a", 8080, "b", 8081)


def test_duplicate_route_names() -> None:
    text = TWO_ROUTES.replace("name: b", "name: a")
    expect_error(text, "routes[1].name", 6, "'a' is already used by routes[0]", "unique name")


def test_duplicate_listen_addresses() -> None:
    text = TWO_ROUTES.replace("8081", "8080")
    expect_error(
        text, "routes[1].listen", 7, "127.0.0.1:8080 is already used by routes[0]", "its own port"
    )


def test_duplicate_default_listen_points_at_the_route() -> None:
    text = MINIMAL + "  - name: b\n    upstream: https://b.test\n    credentials: {pem: b}\n"
    expect_error(text, "routes[1].listen", 5, "127.0.0.1:8080 is already used by routes[0]")


def test_port_zero_may_repeat() -> None:
    text = TWO_ROUTES.replace("8080", "0").replace("8081", "0")
    assert len(parse(text).routes) == 2


@pytest.mark.parametrize("name", ["bad header", "x:y", "caf\u00e9", "x@y"])
def test_invalid_header_name(name: str) -> None:
    expect_error(
        route(f"headers: {{'{name}': v}}\n"),
        f"routes[0].headers.{name}",
        3,
        f"{name!r} is not a valid HTTP header name",
    )


@pytest.mark.parametrize("name", ["Content-Length", "transfer-encoding", "Connection", "TE"])
def test_framing_headers_cannot_be_set(name: str) -> None:
    expect_error(
        route(f"headers: {{'{name}': '5'}}\n"),
        f"routes[0].headers.{name}",
        3,
        "cannot be set: the sidecar frames each request itself",
    )


def test_header_value_with_a_control_character() -> None:
    expect_error(
        route('headers: {x-a: "a\\x01b"}\n'),
        "routes[0].headers.x-a",
        3,
        "'x-a' has a line break or control character in its value",
    )


@pytest.mark.parametrize("value", [r'"a\nb"', r'"a\rb"', r'"a\0b"'])
def test_header_value_with_line_break(value: str) -> None:
    expect_error(
        route(f"headers: {{x-a: {value}}}\n"),
        "routes[0].headers.x-a",
        3,
        "must not contain line breaks or NUL",
    )


def test_header_names_are_lower_cased_query_names_are_not() -> None:
    (r,) = parse(route("headers: {X-API-Key: K}\nquery: {Page: '1'}\n")).routes
    assert r.headers == {"x-api-key": "K"}
    assert r.query == {"Page": "1"}


@pytest.mark.parametrize("prefix", ["admin", "/admin", "admin/", "/", "//"])
def test_admin_prefix_needs_slashes(prefix: str) -> None:
    text = f"admin_prefix: '{prefix}'\n" + MINIMAL
    expect_error(text, "admin_prefix", 1, "must start and end with '/', e.g. /-/")


@pytest.mark.parametrize(
    ("text", "line"),
    [("routes: []\n", 1), ("log: {}\n", 1), ("log: {}\nroutes:\n", 2)],
)
def test_no_routes(text: str, line: int) -> None:
    expect_error(text, "routes", line, "at least one route is required", "mtls-sidecar init")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(text: str) -> None:
    expect_error(text, "routes", 1, "at least one route is required")


def test_invalid_yaml_reports_the_line() -> None:
    text = MINIMAL + "    tls: [unclosed\n"
    with pytest.raises(ConfigError, match=re.escape(f"{NAME}:6: not valid YAML")) as info:
        parse(text)
    assert "check indentation and quoting" in str(info.value)


def test_bad_indentation_reports_the_line() -> None:
    text = "routes:\n  - upstream: https://h.test\n   credentials:\n      pem: a.pem\n"
    with pytest.raises(ConfigError, match=re.escape(f"{NAME}:3: not valid YAML")):
        parse(text)


def test_tab_indentation_is_invalid_yaml() -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{NAME}:2: not valid YAML")):
        parse("routes:\n\t- upstream: x\n")


def test_duplicate_keys() -> None:
    text = MINIMAL + "    upstream: https://other.test\n"
    with pytest.raises(ConfigError, match=re.escape(f"{NAME}:5: key 'upstream' appears twice")):
        parse(text)


def test_duplicate_top_level_keys() -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{NAME}:2: key 'log' appears twice")):
        parse("log: {}\nlog: {}\n" + MINIMAL)


def test_non_string_key() -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{NAME}:3: key 1 must be a string")):
        parse(route("1: x\n"))


def test_errors_have_no_line_breaks_and_name_the_file() -> None:
    bad = [
        MINIMAL.replace("upstream", "upstrem"),
        route("listen: 8080x\n"),
        route("timeouts: {read: 10x}\n"),
        "routes: []\n",
    ]
    for text in bad:
        with pytest.raises(ConfigError) as info:
            parse(text)
        assert "\n" not in str(info.value)
        assert f"({NAME}:" in str(info.value)


# --------------------------------------------------------------- small parsers


def test_parse_listen_forms() -> None:
    assert parse_listen("8080") == ListenAddress("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ListenAddress("::1", 0)
    assert parse_listen(" 10.0.0.1:443 ") == ListenAddress("10.0.0.1", 443)
    assert str(ListenAddress("::", 1)) == "[::]:1"


def test_parse_upstream_forms() -> None:
    u = parse_upstream("https://API.Example.test/odata/v2/")
    assert (u.host, u.port, u.path_prefix) == ("api.example.test", 443, "/odata/v2")
    assert u.origin == "https://api.example.test"
    v6 = parse_upstream("https://[::1]:8443")
    assert v6.origin == "https://[::1]:8443"


# ----------------------------------------------------------------------- route flags


def test_config_from_flags_builds_the_same_objects(tmp_path: Path) -> None:
    flags = RouteFlags(
        listen="127.0.0.1:9090",
        upstream="https://api.example.test/odata",
        cert="certs/client.pem",
        key="certs/client.key",
        password_env="PW",
        company_id="ACME1234",
        headers=("X-Extra: value", "X-Other:two"),
        ca_file="/abs/ca.pem",
        token_env="TOKEN",
    )
    flag_config = config_from_flags(flags, env={}, cwd=tmp_path)
    yaml_config = parse_config(
        textwrap.dedent(
            """\
            routes:
              - listen: 127.0.0.1:9090
                upstream: https://api.example.test/odata
                company_id: ACME1234
                headers: {X-Extra: value, x-other: two}
                credentials:
                  pem: certs/client.pem
                  key: certs/client.key
                  password_env: PW
                tls: {ca_file: /abs/ca.pem}
                inbound: {token_env: TOKEN}
            """
        ),
        filename=NAME,
        base_dir=tmp_path,
        env={},
    )
    assert flag_config.routes == yaml_config.routes
    assert flag_config.source is None
    (r,) = flag_config.routes
    assert r.credentials.pem == tmp_path / "certs/client.pem"
    assert r.headers == {"x-extra": "value", "x-other": "two"}


def test_config_from_flags_pkcs12_and_destination(tmp_path: Path) -> None:
    (p12,) = config_from_flags(
        RouteFlags(upstream="https://h.test", pkcs12="c.p12", password_file="pw"),
        env={},
        cwd=tmp_path,
    ).routes
    assert p12.credentials == CredentialsConfig(
        pkcs12=tmp_path / "c.p12", password_file=tmp_path / "pw"
    )
    (dest,) = config_from_flags(
        RouteFlags(destination="d", service_key="key.json"), env={}, cwd=tmp_path
    ).routes
    assert dest.credentials.destination == DestinationRef(
        name="d", service_key=tmp_path / "key.json"
    )


def test_config_from_flags_defaults_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (r,) = config_from_flags(RouteFlags(upstream="https://h.test", cert="b.pem"), env={}).routes
    assert r.credentials.pem == tmp_path / "b.pem"


def test_remote_listen_from_flags() -> None:
    flags = RouteFlags(
        upstream="https://h.test",
        cert="/b.pem",
        listen="0.0.0.0:8080",
        allow_remote=True,
        token_env="TOK",
    )
    (r,) = config_from_flags(flags, env={}).routes
    assert r.inbound == InboundConfig(allow_remote=True, token_env="TOK")


FILE_ROUTE = """\
routes:
  - name: file-route
    upstream: https://file.example.test
    company_id: FILECO
    headers: {x-a: "1", x-b: "2"}
    credentials:
      pem: file.pem
      key: file.key
      password_env: PW
      warn_before: 7d
"""


def test_flags_override_the_single_route_of_a_file(tmp_path: Path) -> None:
    flags = RouteFlags(
        upstream="https://flag.example.test", cert="flag.pem", headers=("X-A: 9",), listen="9000"
    )
    (r,) = parse(FILE_ROUTE, flags=flags, cwd=tmp_path).routes
    assert r.name == "file-route"
    assert str(r.upstream) == "https://flag.example.test"
    assert r.company_id == "FILECO"
    assert r.listen == ListenAddress("127.0.0.1", 9000)
    assert r.headers == {"x-a": "9", "x-b": "2"}
    # --cert replaces the file's source (and its key) but keeps its password and warn_before.
    assert r.credentials == CredentialsConfig(
        pem=tmp_path / "flag.pem", password_env="PW", warn_before=7 * 86400
    )


def test_flags_fill_in_a_file_route(tmp_path: Path) -> None:
    (r,) = parse(FILE_ROUTE, flags=RouteFlags(company_id="FLAGCO"), cwd=tmp_path).routes
    assert r.company_id == "FLAGCO"
    assert r.credentials.pem == BASE / "file.pem"
    assert r.credentials.key == BASE / "file.key"


def test_flags_with_two_route_file_are_a_usage_error() -> None:
    with pytest.raises(
        UsageError, match="route flags cannot be combined with a config file that has 2 routes"
    ):
        parse(TWO_ROUTES, flags=RouteFlags(company_id="X"))


def test_empty_flags_leave_two_route_file_alone() -> None:
    assert len(parse(TWO_ROUTES, flags=RouteFlags()).routes) == 2


@pytest.mark.parametrize("line", ["no colon", "", "X-A"])
def test_bad_header_flag(line: str) -> None:
    flags = RouteFlags(upstream="https://h.test", cert="b.pem", headers=(line,))
    with pytest.raises(ConfigError, match=r"^--header: .* is not 'Name: value'"):
        config_from_flags(flags, env={})


def test_bad_header_name_flag() -> None:
    flags = RouteFlags(upstream="https://h.test", cert="b.pem", headers=("bad name: x",))
    with pytest.raises(
        ConfigError,
        match=re.escape("routes[0].headers.bad name (--header): 'bad name' is not a valid"),
    ):
        config_from_flags(flags, env={})


@pytest.mark.parametrize(
    ("flags", "prefix", "message"),
    [
        (
            RouteFlags(upstream="http://h.test", cert="b.pem"),
            "routes[0].upstream (--upstream)",
            "must start with https://",
        ),
        (
            RouteFlags(upstream="https://h.test", cert="b.pem", listen="80x"),
            "routes[0].listen (--listen)",
            "is not HOST:PORT",
        ),
        (
            RouteFlags(upstream="https://h.test", cert="b.pem", listen="0.0.0.0:80"),
            "routes[0].listen (--listen)",
            "reachable from other machines",
        ),
        (
            RouteFlags(upstream="https://h.test", cert="b.pem", password_env="not a name"),
            "routes[0].credentials.password_env (--password-env)",
            "not an environment variable",
        ),
        (
            RouteFlags(upstream="https://h.test", pkcs12="c.p12", key="k.pem"),
            "routes[0].credentials.key (--key)",
            "goes with `pem` only",
        ),
        (
            RouteFlags(upstream="https://h.test", cert="b.pem", pkcs12="c.p12"),
            "routes[0].credentials (--cert)",
            "exactly one of pem, pkcs12, destination",
        ),
        (
            RouteFlags(
                upstream="https://h.test", cert="b.pem", listen="0.0.0.0:80", allow_remote=True
            ),
            "routes[0].inbound.token_env (--allow-remote)",
            "is required when allow_remote",
        ),
        (
            RouteFlags(upstream="https://h.test", cert="b.pem", token_env="a-b"),
            "routes[0].inbound.token_env (--token-env)",
            "not an environment variable",
        ),
        (
            RouteFlags(upstream="https://${UNSET_HOST}", cert="b.pem"),
            "routes[0].upstream (--upstream)",
            "UNSET_HOST is not set",
        ),
    ],
)
def test_flag_errors_name_the_flag(flags: RouteFlags, prefix: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(prefix) + ": .*" + re.escape(message)):
        config_from_flags(flags, env={})


def test_flags_missing_upstream_or_credentials() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("routes[0].upstream (command line): is required")
    ) as info:
        config_from_flags(RouteFlags(cert="b.pem"), env={})
    assert "--upstream" in str(info.value)
    with pytest.raises(
        ConfigError, match=re.escape("routes[0].credentials (command line): is required")
    ) as info:
        config_from_flags(RouteFlags(upstream="https://h.test"), env={})
    assert "--cert" in str(info.value)


def test_flag_error_in_file_context_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=re.escape("routes[0].upstream (--upstream): ")):
        parse(FILE_ROUTE, flags=RouteFlags(upstream="http://x.test"))


def test_any_given() -> None:
    assert not RouteFlags().any_given()
    assert RouteFlags(allow_remote=True).any_given()
    assert RouteFlags(headers=("a: b",)).any_given()


# ------------------------------------------------------------------ config file lookup


def test_find_config_file_explicit_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sidecar.yaml").write_text(MINIMAL)
    assert find_config_file("other.yaml", env={"SIDECAR_CONFIG": "env.yaml"}) == Path("other.yaml")


def test_find_config_file_env_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sidecar.yaml").write_text(MINIMAL)
    assert find_config_file(None, env={"SIDECAR_CONFIG": "env.yaml"}) == Path("env.yaml")


def test_find_config_file_default_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_config_file(None, env={}) is None
    (tmp_path / "sidecar.yaml").mkdir()
    assert find_config_file(None, env={}) is None  # a directory is not a config file
    (tmp_path / "sidecar.yaml").rmdir()
    (tmp_path / "sidecar.yaml").write_text(MINIMAL)
    assert find_config_file(None, env={}) == Path("sidecar.yaml")
    assert find_config_file(None, env={"SIDECAR_CONFIG": ""}) == Path("sidecar.yaml")


def test_find_config_file_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIDECAR_CONFIG", "/x/from-env.yaml")
    assert find_config_file(None) == Path("/x/from-env.yaml")
    monkeypatch.delenv("SIDECAR_CONFIG")
    assert find_config_file(None) is None


def test_load_config_without_anything_is_a_usage_error() -> None:
    with pytest.raises(
        UsageError, match="no configuration: no -c FILE, no \\$SIDECAR_CONFIG and no ./sidecar.yaml"
    ) as info:
        load_config(None, RouteFlags(), env={})
    assert "mtls-sidecar init" in str(info.value)
    with pytest.raises(UsageError):
        load_config(None, env={})


def test_load_config_with_flags_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, RouteFlags(upstream="https://h.test", cert="b.pem"), env={})
    assert config.routes[0].credentials.pem == tmp_path / "b.pem"


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: config file not found")):
        load_config(path, env={})


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: is a directory")):
        load_config(tmp_path, env={})


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"routes: \xff\xfe\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot read config file")):
        load_config(path, env={})


def test_load_config_paths_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    path = folder / "my.yaml"
    path.write_text(MINIMAL)
    config = load_config(path, env={})
    assert config.source == path
    assert config.routes[0].credentials.pem == folder / "client.pem"


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text(MINIMAL.replace("upstream", "upstrem"))
    with pytest.raises(ConfigError, match=re.escape("routes[0].upstrem (my.yaml:2): unknown key")):
        load_config(path, env={})


def test_load_config_merges_flags(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(MINIMAL)
    config = load_config(path, RouteFlags(company_id="FLAG"), env={})
    assert config.routes[0].company_id == "FLAG"
    path.write_text(TWO_ROUTES)
    with pytest.raises(UsageError):
        load_config(path, RouteFlags(company_id="FLAG"), env={})


def test_load_config_env_expansion(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(route("company_id: ${CO}\n"))
    assert load_config(path, env={"CO": "X1"}).routes[0].company_id == "X1"
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "routes[0].company_id (sidecar.yaml:3): environment variable CO is not set"
        ),
    ):
        load_config(path, env={})


# ------------------------------------------------------------ limits.upstream_connections


def test_upstream_connections_defaults_to_100_and_is_a_choice() -> None:
    assert parse(MINIMAL).routes[0].limits.upstream_connections == 100
    text = MINIMAL + "    limits: {upstream_connections: 8}\n"
    assert parse(text).routes[0].limits.upstream_connections == 8


@pytest.mark.parametrize(
    ("value", "problem"),
    [("0", "at least 1"), ("-1", "at least 1"), ("many", "whole number"), ("1.5", "whole number")],
)
def test_upstream_connections_must_be_a_positive_count(value: str, problem: str) -> None:
    text = MINIMAL + f"    limits:\n      upstream_connections: {value}\n"
    key = "routes[0].limits.upstream_connections"
    expect_error(text, key, line_of(text, "upstream_conn"), problem)
