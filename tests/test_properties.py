"""Property tests: config parsing, header filtering and query merging, for any input.

- `parse_config` turns any YAML-ish text built from the schema's keys and
  random values into a `Config` or raises `ConfigError` / `UsageError`;
  nothing else escapes (no TypeError, no OverflowError, no RecursionError,
  no YAML internals);
- `filter_headers` never returns a hop-by-hop header, a header the
  Connection header names, or one of ``drop``, and keeps every other header
  with its value, in order;
- `merge_query` keeps the client's query string as a byte-for-byte prefix and
  adds only the configured names the client did not send itself.
"""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import parse_qsl

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import parse_config
from sidecar.errors import ConfigError, UsageError
from sidecar.forward.headers import HOP_BY_HOP, filter_headers, merge_query

# derandomize: the same examples on every run and machine, so a result never flickers
PROPERTY = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# ------------------------------------------------------------------ config parsing

LEAF = None  # a scalar setting
MAP = "map"  # a mapping of names to values (headers, query)
LIST = "list"  # a list of strings (rewrite_hosts)

ROUTE: dict[str, Any] = {
    "name": LEAF,
    "listen": LEAF,
    "upstream": LEAF,
    "company_id": LEAF,
    "headers": MAP,
    "query": MAP,
    "credentials": {
        "pem": LEAF,
        "key": LEAF,
        "pkcs12": LEAF,
        "password_env": LEAF,
        "password_file": LEAF,
        "destination": {"name": LEAF, "service_key": LEAF, "refresh": LEAF},
        "warn_before": LEAF,
    },
    "tls": {"ca_file": LEAF, "server_name": LEAF},
    "rewrite_links": LEAF,
    "rewrite_hosts": LIST,
    "timeouts": {"connect": LEAF, "read": LEAF, "shutdown": LEAF},
    "inbound": {"allow_remote": LEAF, "token_env": LEAF},
    "limits": {
        "max_connections": LEAF,
        "max_header_size": LEAF,
        "max_headers": LEAF,
        "header_timeout": LEAF,
        "idle_timeout": LEAF,
        "max_body": LEAF,
    },
}
SCHEMA: dict[str, Any] = {
    "log": {"level": LEAF, "format": LEAF, "access_log": LEAF, "query_values": LEAF},
    "admin_prefix": LEAF,
    "routes": [ROUTE],
}

# Values a user could plausibly write, valid and not, next to random ones.
PLAUSIBLE = [
    "", "0", "-1", "1", "10s", "500ms", "15m", "1h", "30d", "1.5m", "-5s", "10 parsecs",
    "64KiB", "100MB", "1GiB", "12 bytes", "${HOME}", "${}", "${A-B}", "${UNSET}", "$", "${",
    "127.0.0.1:8080", "0.0.0.0:80", "[::1]:8080", "[::]:0", "::1:80", "localhost:99999",
    ":80", "8080", "host:", "https://api.example.test", "https://api.example.test:99999",
    "http://api.example.test", "https://u:p@h/", "https://h/p?q=1", "https://[::1]:8443/b/",
    "https://", "/etc/sidecar/client.pem", "~/client.pem", "certs/../client.p12", "true",
    "false", "yes", "off", "debug", "JSON", "/-/", "/", "//", "X-Header", "bad header",
    "a\r\nb", "nul\x00", "é", "SIDECAR_TOKEN", "lower-case-env", "1e400", ".inf",
]  # fmt: skip

EDGES = [float("inf"), float("-inf"), float("nan"), 0, -1, 0.5, 2**63, 10**30, True, False, ""]
SCALARS = st.one_of(
    st.sampled_from(EDGES),
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(PLAUSIBLE),
)
ANYTHING = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
NAMES = st.sampled_from(["X-Extra", "x-extra", "bad name", "", "successfactors-companyid", "$top"])


def document(schema: Any) -> st.SearchStrategy[Any]:
    """A value shaped (mostly) like ``schema``, sometimes anything at all."""
    if isinstance(schema, dict):
        shaped = st.fixed_dictionaries(
            {},
            optional={key: document(sub) for key, sub in schema.items()},
        )
        misspelled = st.dictionaries(
            st.sampled_from(["nmae", "route", "limit", "?"]), SCALARS, max_size=1
        )
        shaped = st.builds(lambda a, b: {**a, **b}, shaped, misspelled | st.just({}))
        return st.one_of(shaped, shaped, shaped, ANYTHING)
    if isinstance(schema, list):
        return st.one_of(st.lists(document(schema[0]), max_size=3), ANYTHING)
    if schema == MAP:
        return st.one_of(
            st.dictionaries(NAMES | st.text(max_size=6), SCALARS, max_size=3), ANYTHING
        )
    if schema == LIST:
        return st.one_of(st.lists(SCALARS, max_size=3), ANYTHING)
    return st.one_of(SCALARS, SCALARS, ANYTHING)


VALID_ROUTE: dict[str, Any] = {
    "name": "sf",
    "listen": "127.0.0.1:8080",
    "upstream": "https://api.example.test/odata",
    "company_id": "ACME1234",
    "headers": {"X-Extra": "value"},
    "query": {"$format": "json"},
    "credentials": {"pem": "certs/client.pem", "password_env": "KEY_PW", "warn_before": "30d"},
    "tls": {"ca_file": "ca.pem", "server_name": "api.example.test"},
    "rewrite_links": True,
    "rewrite_hosts": ["api.example.test"],
    "timeouts": {"connect": "10s", "read": 300, "shutdown": "1m"},
    "inbound": {"allow_remote": False, "token_env": "TOKEN"},
    "limits": {"max_connections": 10, "max_header_size": "16KiB", "max_headers": 50,
               "header_timeout": "5s", "idle_timeout": 60, "max_body": "10MB"},
}  # fmt: skip
VALID: dict[str, Any] = {
    "log": {"level": "info", "format": "json", "access_log": True, "query_values": False},
    "admin_prefix": "/-/",
    "routes": [VALID_ROUTE],
}


def _paths(schema: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of the schema (routes[0] standing for any route)."""
    if isinstance(schema, list):
        return _paths(schema[0], (*prefix, 0))
    if not isinstance(schema, dict):
        return []
    out = []
    for key, sub in schema.items():
        out.append((*prefix, key))
        out += _paths(sub, (*prefix, key))
    return out


PATHS = _paths(SCHEMA)


def _mutate(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> None:
    for step in path[:-1]:
        if isinstance(doc, dict) and isinstance(step, str):
            doc = doc.setdefault(step, {})
        elif isinstance(doc, list) and isinstance(step, int) and step < len(doc):
            doc = doc[step]
        else:
            return  # an earlier mutation replaced the container: nothing to reach
    if not isinstance(doc, dict):
        return
    if delete:
        doc.pop(path[-1], None)
    else:
        doc[path[-1]] = value


@st.composite
def mutated_valid(draw: st.DrawFn) -> Any:
    """The valid document with one to three settings replaced or removed: reaches deep."""
    doc = copy.deepcopy(VALID)
    if draw(st.booleans()):
        doc["routes"].append(copy.deepcopy(VALID_ROUTE) | {"name": "second", "listen": "8081"})
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        _mutate(doc, path, draw(st.one_of(SCALARS, ANYTHING)), delete=draw(st.integers(0, 4)) == 0)
    return doc


@st.composite
def yaml_text(draw: st.DrawFn) -> str:
    """A YAML dump of a schema-shaped document, sometimes damaged."""
    doc = draw(st.one_of(mutated_valid(), mutated_valid(), document(SCHEMA)))
    text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), sort_keys=False)
    damage = draw(st.sampled_from(["none", "none", "none", "insert", "cut"]))
    if damage == "insert":
        at = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from([":", "- ", "\t", "{", "&a", "*a", "!!x ", "'", "<<: "]))
        text = text[:at] + junk + text[at:]
    elif damage == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    return text


@PROPERTY
@given(yaml_text())
def test_config_parsing_raises_nothing_but_config_errors(text: str) -> None:
    try:
        parse_config(text, env={})
    except (ConfigError, UsageError) as exc:
        assert str(exc)  # a message for the user
        assert "Traceback" not in str(exc)


ROUTE_TEXT = """\
routes:
  - upstream: https://api.example.test
    credentials: {pem: client.pem}
"""


@pytest.mark.parametrize("key", ["max_connections", "max_headers"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1.5", "true", "'12x'"])
def test_a_count_that_is_no_whole_number_is_a_config_error(key: str, value: str) -> None:
    """Found by the property above: ``.inf`` used to escape as OverflowError."""
    with pytest.raises(ConfigError, match=rf"routes\[0\]\.limits\.{key}"):
        parse_config(ROUTE_TEXT + f"    limits: {{{key}: {value}}}\n", env={})


@pytest.mark.parametrize(
    "text",
    ["routes: &a [*a]\n", "log: &a {x: *a}\n", ROUTE_TEXT + "    headers: &h {x: *h}\n"],
    ids=["routes", "log", "headers"],
)
def test_a_recursive_alias_is_a_config_error(text: str) -> None:
    """A self-referencing alias used to recurse until RecursionError."""
    with pytest.raises(ConfigError):
        parse_config(text, env={})


def test_a_reused_alias_is_still_fine() -> None:
    text = ROUTE_TEXT + "    headers: &h {x-a: b}\n    query: *h\n"
    (route,) = parse_config(text, env={}).routes
    assert dict(route.query) == {"x-a": "b"}


# ---------------------------------------------------------------- header filtering

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SPECIAL = sorted(HOP_BY_HOP) + ["proxy-foo", "Proxy-Bar", "host", "x-sidecar-token", "x-foo"]


@st.composite
def any_case(draw: st.DrawFn, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(name, flips, strict=True))


HEADER_NAMES = st.one_of(
    st.sampled_from(SPECIAL).flatmap(lambda n: any_case(n)),
    st.text(TOKEN_CHARS, min_size=1, max_size=12),
)
HEADER_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


@st.composite
def connection_value(draw: st.DrawFn, present: list[str]) -> str:
    """A Connection header naming some present headers (any case) and options."""
    pick = st.sampled_from(present).flatmap(lambda n: any_case(n)) if present else HEADER_NAMES
    options = st.sampled_from(["close", "keep-alive", ""])
    tokens = draw(st.lists(pick | HEADER_NAMES | options, max_size=4))
    separators = st.sampled_from([",", ", ", " ,", ",,", " , "])
    seps = draw(st.lists(separators, min_size=len(tokens), max_size=len(tokens)))
    return "".join(t + sep for t, sep in zip(tokens, seps, strict=True)).strip(" ,")


@st.composite
def request_headers(draw: st.DrawFn) -> list[tuple[str, str]]:
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=12))
    present = [name for name, _ in headers]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(headers)))
        headers.insert(at, (draw(any_case("connection")), draw(connection_value(present))))
    return headers


def connection_names(headers: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    }


@PROPERTY
@given(request_headers(), st.data())
def test_filter_headers_keeps_exactly_the_end_to_end_headers(
    headers: list[tuple[str, str]], data: st.DataObject
) -> None:
    """``drop`` holds lower-case names, as `route_target` builds it."""
    present = sorted({name.lower() for name, _ in headers})
    some_present = st.sampled_from(present) if present else HEADER_NAMES.map(str.lower)
    drop = data.draw(st.frozensets(some_present | HEADER_NAMES.map(str.lower), max_size=4))
    named = connection_names(headers)
    result = filter_headers(CIMultiDictProxy(CIMultiDict(headers)), drop)
    for name in result:
        low = name.lower()
        assert low not in HOP_BY_HOP
        assert not low.startswith("proxy-")
        assert low not in named, f"{name} is named by Connection"
        assert low not in drop
    expected = [
        (name, value)
        for name, value in headers
        if name.lower() not in HOP_BY_HOP | named | drop and not name.lower().startswith("proxy-")
    ]
    assert list(result.items()) == expected  # every other header, its value, its order


# -------------------------------------------------------------------- query merging

QUERY_CHARS = st.characters(codec="utf-8")  # no lone surrogates: they are not text
QUERY_STRINGS = st.one_of(
    st.text(st.sampled_from("ab$%2F4&=+;?/ éx"), max_size=20),
    st.lists(
        st.tuples(
            st.sampled_from(["$top", "%24top", "%2524top", "a", "a+b", "a b", "", "lang"]),
            st.sampled_from(["", "1", "x%20y", "%zz", "="]),
        )
    ).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs)),
)
EXTRA = st.dictionaries(
    st.one_of(
        st.sampled_from(["$top", "$format", "a b", "lang", "a", "&", "=", "+"]),
        st.text(QUERY_CHARS, max_size=6),
    ),
    st.text(QUERY_CHARS, max_size=8),
    max_size=4,
)


@PROPERTY
@given(QUERY_STRINGS, EXTRA)
@example("lang=de&%24format=xml", {"$format": "json", "lang": "en"})
@example("%2524top=1", {"$top": "5"})
def test_merge_query_keeps_the_clients_query_and_adds_only_what_it_lacks(
    query: str, extra: dict[str, str]
) -> None:
    merged = merge_query(query, extra)
    assert merged[: len(query)] == query  # byte for byte, whatever it holds
    sent = {name for name, _ in parse_qsl(query, keep_blank_values=True)}
    missing = [(k, v) for k, v in extra.items() if k not in sent]
    tail = merged[len(query) :]
    if not missing:
        assert merged == query
        return
    if query:
        assert tail.startswith("&")
    added = parse_qsl(tail, keep_blank_values=True)
    assert added == missing  # only what the client lacks, with its value, in order
    assert (
        parse_qsl(merged, keep_blank_values=True)
        == parse_qsl(query, keep_blank_values=True) + missing
    )
