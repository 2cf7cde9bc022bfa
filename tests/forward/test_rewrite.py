"""Origin rewriting: the bases, the streaming replacer, codings, headers.

The property tests cut bodies at random places and compare the streamed
output with one ``re.sub`` over the whole body, built here independently of
the module's own regex.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import UpstreamURL
from sidecar.forward.rewrite import (
    BODY_BOUND_HEADERS,
    BOUNDARY,
    BodyDecodeError,
    BodyRewriter,
    Decoder,
    Encoder,
    StreamRewriter,
    content_coding,
    decodable_accept_encoding,
    local_origin,
    rewrite_location,
    rewrite_set_cookie,
    rewritten_headers,
    should_rewrite,
    upstream_bases,
)
from sidecar.http_rules import plain_twin

HOST = "api10.cert.successfactors.com"
TWIN = "api10.successfactors.com"
LOCAL = "http://127.0.0.1:8080"
SF = UpstreamURL(host=HOST)
SF_BASES = upstream_bases(SF, ())


def rewrite(body: bytes, bases: tuple[bytes, ...] = SF_BASES, *, chunk: int = 0) -> bytes:
    rewriter = StreamRewriter(bases, LOCAL.encode())
    if not chunk:
        return rewriter.feed(body) + rewriter.flush()
    pieces = [rewriter.feed(body[i : i + chunk]) for i in range(0, len(body), chunk)]
    return b"".join(pieces) + rewriter.flush()


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def reference(patterns: list[bytes], replacement: bytes, body: bytes) -> bytes:
    """One re.sub over the whole body: leftmost, longest alternative first."""
    ordered = sorted(patterns, key=len, reverse=True)
    boundary = b"[" + b"".join(re.escape(bytes([c])) for c in BOUNDARY) + b"]"
    pattern = b"(?:" + b"|".join(re.escape(p) for p in ordered) + b")(?=" + boundary + b"|\\Z)"
    escaped = replacement.replace(b"/", b"\\/")
    return re.sub(pattern, lambda m: escaped if b"\\/" in m.group() else replacement, body)


# ------------------------------------------------------------------- bases


@pytest.mark.parametrize(
    ("host", "twin"),
    [
        ("api10.cert.successfactors.com", "api10.successfactors.com"),
        ("api55.cert.sapsf.eu", "api55.sapsf.eu"),
        ("API12.CERT.sapsf.com", "API12.sapsf.com"),
        ("api10.successfactors.com", None),
        ("cert.example.com", None),
        ("api.example.cert", None),
        ("x.cert.com", None),
        ("127.0.0.1", None),
        ("::1", None),
    ],
)
def test_plain_twin(host: str, twin: str | None) -> None:
    assert plain_twin(host) == twin


def test_bases_of_a_successfactors_host() -> None:
    assert set(SF_BASES) == {
        b"https://api10.cert.successfactors.com",
        b"https://api10.cert.successfactors.com:443",
        b"https://api10.successfactors.com",
        b"https://api10.successfactors.com:443",
        b"https:\\/\\/api10.cert.successfactors.com",
        b"https:\\/\\/api10.cert.successfactors.com:443",
        b"https:\\/\\/api10.successfactors.com",
        b"https:\\/\\/api10.successfactors.com:443",
    }
    assert [len(b) for b in SF_BASES] == sorted((len(b) for b in SF_BASES), reverse=True)


def test_bases_with_other_port_prefix_and_rewrite_hosts() -> None:
    upstream = UpstreamURL(host="sf.test", port=8443, path_prefix="/odata/v2")
    bases = upstream_bases(upstream, ("alias.test", "other.test:9443", "[::1]:7443"))
    plain = {b for b in bases if b"\\/" not in b}
    assert plain == {
        b"https://sf.test:8443/odata/v2",
        b"https://alias.test/odata/v2",
        b"https://alias.test:443/odata/v2",
        b"https://other.test:9443/odata/v2",
        b"https://[::1]:7443/odata/v2",
    }
    assert b"https:\\/\\/sf.test:8443\\/odata\\/v2" in bases
    assert len(bases) == 2 * len(plain)


def test_bases_hold_hosts_as_written_and_in_lower_case() -> None:
    bases = upstream_bases(UpstreamURL(host="API10.Cert.SuccessFactors.com"), ("Alias.Test",))
    for base in (
        b"https://API10.Cert.SuccessFactors.com",
        b"https://api10.cert.successfactors.com:443",
        b"https://API10.SuccessFactors.com",
        b"https://api10.successfactors.com",
        b"https://Alias.Test:443",
        b"https://alias.test",
    ):
        assert base in bases


def test_local_origin() -> None:
    assert local_origin("127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert local_origin("localhost") == "http://localhost"
    assert local_origin("[::1]:8080") == "http://[::1]:8080"
    for bad in ('evil"}', "a b", "host/path", "", "h:123456"):
        with pytest.raises(ValueError, match="is not host\\[:port\\]"):
            local_origin(bad)
    # an absolute-form target's scheme is kept as the client wrote it
    assert local_origin("127.0.0.1:8443", scheme="https") == "https://127.0.0.1:8443"
    with pytest.raises(ValueError, match="scheme 'ftp' is not http or https"):
        local_origin("h", scheme="ftp")


# ---------------------------------------------------------- stream rewriter


def test_rewrites_odata_json_links() -> None:
    body = (
        b'{"d":{"results":[{"__metadata":{"uri":"https://api10.cert.successfactors.com:443'
        b'/odata/v2/User(\'a\')"},"manager":{"__deferred":{"uri":'
        b"\"https://api10.successfactors.com/odata/v2/User('a')/manager\"}}}],"
        b'"__next":"https://api10.cert.successfactors.com/odata/v2/User?$skiptoken=x"}}'
    )
    out = rewrite(body)
    data = json.loads(out)["d"]
    assert data["__next"] == "http://127.0.0.1:8080/odata/v2/User?$skiptoken=x"
    assert data["results"][0]["__metadata"]["uri"] == "http://127.0.0.1:8080/odata/v2/User('a')"
    assert data["results"][0]["manager"]["__deferred"]["uri"].startswith(LOCAL + "/odata")
    assert b"successfactors" not in out


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # the boundary: a base inside a longer host, name or other port is not one
        (b'"https://api10.cert.successfactors.com.evil.com/x"', None),
        (b'"https://api10.cert.successfactors.community/x"', None),
        (b'"https://api10.cert.successfactors.com-x/x"', None),
        (b'"https://api10.cert.successfactors.com:8443/x"', None),
        (b'"https://api10.cert.successfactors.com:4430/x"', None),
        (b'"https://api10.cert.successfactors.com@evil.com/x"', None),
        (b'"http://api10.cert.successfactors.com/x"', None),
        (b'"https://xapi10.successfactors.com/x"', b'"https://xapi10.successfactors.com/x"'),
        # what may follow a base
        (b'"https://api10.cert.successfactors.com:443/x"', b'"http://127.0.0.1:8080/x"'),
        (b'"https://api10.cert.successfactors.com"', b'"http://127.0.0.1:8080"'),
        (b"<a>https://api10.successfactors.com</a>", b"<a>http://127.0.0.1:8080</a>"),
        (b"'https://api10.successfactors.com?x'", b"'http://127.0.0.1:8080?x'"),
        (b"(https://api10.successfactors.com#f)", b"(http://127.0.0.1:8080#f)"),
        (b"https://api10.successfactors.com\thttps://api10.successfactors.com\n", b"%\t%\n"),
        # the very start and end of the body
        (b"https://api10.cert.successfactors.com", b"http://127.0.0.1:8080"),
        (b"https://api10.cert.successfactors.com:443", b"http://127.0.0.1:8080"),
        (b"https://api10.cert.successfactors.com:44", None),
        # JSON-escaped slashes keep their style
        (
            b'"https:\\/\\/api10.cert.successfactors.com:443\\/odata\\/v2\\/User"',
            b'"http:\\/\\/127.0.0.1:8080\\/odata\\/v2\\/User"',
        ),
        # adjacent occurrences
        (
            b"https://api10.successfactors.com/https://api10.successfactors.com/",
            b"http://127.0.0.1:8080/http://127.0.0.1:8080/",
        ),
    ],
)
def test_boundaries(body: bytes, expected: bytes | None) -> None:
    want = body if expected is None else expected.replace(b"%", LOCAL.encode())
    for chunk in (0, 1, 2, 3, 7, 40):
        assert rewrite(body, chunk=chunk) == want, chunk


def test_path_prefix_is_part_of_the_base() -> None:
    bases = upstream_bases(UpstreamURL(host="sf.test", path_prefix="/odata/v2"), ())
    body = (
        b'["https://sf.test/odata/v2/User", "https://sf.test/odata/v2", '
        b'"https://sf.test/odata/v22/User", "https://sf.test/other/User"]'
    )
    assert json.loads(rewrite(body, bases, chunk=5)) == [
        "http://127.0.0.1:8080/User",
        "http://127.0.0.1:8080",
        "https://sf.test/odata/v22/User",
        "https://sf.test/other/User",
    ]


def test_rewrite_hosts_are_rewritten_in_bodies() -> None:
    bases = upstream_bases(SF, ("pmsalesdemo8.successfactors.com",))
    body = b'"https://pmsalesdemo8.successfactors.com:443/sf/home" "https://other.com/x"'
    assert rewrite(body, bases, chunk=3) == b'"http://127.0.0.1:8080/sf/home" "https://other.com/x"'


def test_holds_back_at_most_the_longest_pattern() -> None:
    longest = max(len(b) for b in SF_BASES)
    rewriter = StreamRewriter(SF_BASES, b"L")
    body = b'{"x":"https://api10.cert.successfactors.com:443/y"} ' * 50
    out = []
    for byte in body:
        out.append(rewriter.feed(bytes([byte])))
        assert rewriter.held <= longest
    out.append(rewriter.flush())
    assert rewriter.held == 0
    assert b"".join(out) == body.replace(b"https://api10.cert.successfactors.com:443", b"L")


def test_large_chunks_are_not_kept() -> None:
    rewriter = StreamRewriter(SF_BASES, b"L")
    out = rewriter.feed(b"x" * 1_000_000)
    assert len(out) == 1_000_000 - max(len(b) for b in SF_BASES)
    assert len(out) + len(rewriter.flush()) == 1_000_000


def test_no_patterns_pass_everything() -> None:
    rewriter = StreamRewriter((), b"L")
    assert rewriter.feed(b"abc") == b"abc"
    assert rewriter.held == 0
    assert rewriter.flush() == b""


def test_an_empty_pattern_is_refused() -> None:
    with pytest.raises(ValueError, match="empty pattern"):
        StreamRewriter((b"a", b""), b"L")


# Small alphabets make overlapping, nested and adjacent occurrences common; they
# hold boundary bytes ("/", '"', "\\", " "), others (":", "."), and escaped slashes.
PATTERN_BYTES = b"ab:/\\"
BODY_BYTES = b'ab:/\\". x'
patterns_st = st.lists(
    st.binary(min_size=1, max_size=6).map(
        lambda b: bytes(PATTERN_BYTES[c % len(PATTERN_BYTES)] for c in b)
    ),
    min_size=1,
    max_size=5,
    unique=True,
)


@st.composite
def cut_bodies(draw: st.DrawFn) -> tuple[list[bytes], bytes, bytes, list[int]]:
    patterns = draw(patterns_st)
    filler = st.binary(max_size=4).map(lambda b: bytes(BODY_BYTES[c % len(BODY_BYTES)] for c in b))
    pieces = draw(st.lists(st.one_of(st.sampled_from(patterns), filler), max_size=30))
    body = b"".join(pieces)
    replacement = draw(st.sampled_from([b"", b"R", b"http://L:1", b"ab/"]))
    cuts = draw(st.lists(st.integers(0, len(body)), max_size=12))
    return patterns, replacement, body, cuts


@settings(max_examples=200, deadline=None)
@given(cut_bodies())
def test_streaming_equals_one_substitution(
    case: tuple[list[bytes], bytes, bytes, list[int]],
) -> None:
    patterns, replacement, body, cuts = case
    rewriter = StreamRewriter(tuple(patterns), replacement)
    longest = max(len(p) for p in patterns)
    out = []
    for piece in split(body, cuts):
        out.append(rewriter.feed(piece))
        assert rewriter.held <= longest
    out.append(rewriter.flush())
    assert b"".join(out) == reference(patterns, replacement, body)


PLAIN_BASES = [b.decode() for b in SF_BASES if b"\\/" not in b]


@settings(max_examples=100, deadline=None)
@given(
    links=st.lists(
        st.tuples(
            st.sampled_from(PLAIN_BASES),
            st.sampled_from(["/odata/v2/User", "?$top=1", "", ".evil.com/", ":8443/", "x/"]),
        ),
        max_size=8,
    ),
    escaped=st.booleans(),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
)
def test_every_base_and_nothing_else(
    links: list[tuple[str, str]], escaped: bool, cuts: list[int]
) -> None:
    items = [base + tail for base, tail in links]
    text = json.dumps(items)
    body = (text.replace("/", "\\/") if escaped else text).encode()
    rewriter = StreamRewriter(SF_BASES, LOCAL.encode())
    out = b"".join(rewriter.feed(p) for p in split(body, [c % (len(body) + 1) for c in cuts]))
    out += rewriter.flush()
    assert (b"\\/" in out) is (escaped and bool(items))
    for (base, tail), after in zip(links, json.loads(out), strict=True):
        assert after == (base + tail if tail[:1] in (".", ":", "x") else LOCAL + tail)


# ------------------------------------------------------------------ codings


@pytest.mark.parametrize(
    ("value", "coding"),
    [
        (None, "identity"),
        ("", "identity"),
        ("identity", "identity"),
        ("gzip", "gzip"),
        ("GZIP", "gzip"),
        ("x-gzip", "gzip"),
        (" deflate ", "deflate"),
        ("gzip, identity", "gzip"),
        ("br", None),
        ("zstd", None),
        ("compress", None),
        ("gzip, gzip", None),
        ("deflate, br", None),
    ],
)
def test_content_coding(value: str | None, coding: str | None) -> None:
    assert content_coding(value) == coding


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("gzip, deflate, br", "gzip, deflate"),
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", "gzip;q=0.8"),
        ("br", "identity"),
        ("*", "identity"),
        ("gzip, br;q=0", "gzip, br;q=0"),
        ("identity;q=0, *;q=0", "identity;q=0, *;q=0"),
        ("zstd;q=0.0", "zstd;q=0.0"),
        ("", "identity"),
    ],
)
def test_decodable_accept_encoding(value: str | None, expected: str | None) -> None:
    assert decodable_accept_encoding(value) == expected


@pytest.mark.parametrize(
    ("content_type", "content_encoding", "expected"),
    [
        ("application/json", None, True),
        ("application/json;charset=utf-8;odata=verbose", "gzip", True),
        ("Application/JSON", "identity", True),
        ("application/problem+json", "deflate", True),
        ("application/xml", None, True),
        ("text/xml; charset=utf-8", None, True),
        ("application/atom+xml;type=feed", "x-gzip", True),
        ("application/atomsvc+xml", None, True),
        ("multipart/mixed; boundary=batch_1", None, False),
        ("multipart/mixed; boundary=batch_1", "gzip", False),
        ("text/html", None, False),
        ("text/plain", None, False),
        ("application/octet-stream", None, False),
        ("image/svg+xml", None, False),
        (None, None, False),
        ("application/json", "br", False),
        ("application/json", "zstd", False),
        ("application/json", "gzip, br", False),
        ("application/json", "what", False),
    ],
)
def test_should_rewrite(
    content_type: str | None, content_encoding: str | None, expected: bool
) -> None:
    assert should_rewrite(content_type, content_encoding) is expected


def decode_all(decoder: Decoder, data: bytes, chunk: int) -> bytes:
    out = [b"".join(decoder.decode(data[i : i + chunk])) for i in range(0, len(data), chunk)]
    return b"".join(out) + decoder.flush()


PLAIN = json.dumps({"d": [{"n": i, "uri": f"https://{HOST}/x/{i}"} for i in range(300)]}).encode()


@pytest.mark.parametrize("chunk", [1, 13, 4096, 1 << 20])
@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),  # zlib-wrapped, as RFC 9110 means it
        ("deflate", lambda b: zlib.compress(b, wbits=-zlib.MAX_WBITS)),  # raw, as some send it
        ("identity", lambda b: b),
    ],
)
def test_decoder(coding: str, compress: object, chunk: int) -> None:
    assert callable(compress)
    assert decode_all(Decoder(coding), compress(PLAIN), chunk) == PLAIN


def test_decoder_reads_every_gzip_member() -> None:
    data = gzip.compress(b"one,") + gzip.compress(b"two,") + gzip.compress(b"three")
    for chunk in (1, 5, len(data)):
        assert decode_all(Decoder("gzip"), data, chunk) == b"one,two,three"


def gzip_bomb(size: int) -> bytes:
    """A gzip body that inflates to ``size`` zero bytes (about a thousandth of it)."""
    compressor = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + compressor.flush()


def test_decoder_inflates_a_bomb_piece_by_piece() -> None:
    bomb = gzip_bomb(64 << 20)
    decoder = Decoder("gzip", piece=4096)
    pieces = decoder.decode(bomb)  # one chunk that holds all 64 MiB
    first = next(pieces)
    assert len(first) == 4096  # the rest is inflated only when asked for
    total = len(first)
    for piece in pieces:
        assert 0 < len(piece) <= 4096
        total += len(piece)
    assert total == 64 << 20
    assert decoder.flush() == b""


@pytest.mark.parametrize("piece", [1, 7, 4096])
@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", lambda b: gzip.compress(b[:1000]) + gzip.compress(b[1000:])),  # two members
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b, wbits=-zlib.MAX_WBITS)),
    ],
)
def test_small_pieces_decode_and_rewrite_the_same(
    coding: str, compress: object, piece: int
) -> None:
    assert callable(compress)
    data = compress(PLAIN)
    decoder = Decoder(coding, piece=piece)
    assert all(len(p) <= piece for p in decoder.decode(compress(PLAIN)))
    assert decode_all(Decoder(coding, piece=piece), data, 4096) == PLAIN
    # links cut across pieces are still rewritten: same output as one piece
    whole = rewrite(PLAIN)
    rewriter = StreamRewriter(SF_BASES, LOCAL.encode())
    out = b"".join(rewriter.feed(p) for p in Decoder(coding, piece=piece).decode(data))
    assert out + rewriter.flush() == whole


def test_decoder_of_an_empty_body() -> None:
    assert Decoder("gzip").flush() == b""
    assert decode_all(Decoder("gzip"), gzip.compress(b""), 3) == b""


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_decoder_refuses_garbage(coding: str) -> None:
    with pytest.raises(BodyDecodeError, match=f"upstream's {coding} body does not decode"):
        b"".join(Decoder(coding).decode(b"\xff\xfe this is not compressed at all"))


@pytest.mark.parametrize(
    ("coding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
def test_decoder_refuses_a_cut_stream(coding: str, compress: object) -> None:
    assert callable(compress)
    data = compress(PLAIN)
    decoder = Decoder(coding)
    b"".join(decoder.decode(data[: len(data) // 2]))
    with pytest.raises(BodyDecodeError, match="ends before its stream does"):
        decoder.flush()


def test_unsupported_codings_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot decode Content-Encoding 'br'"):
        Decoder("br")
    with pytest.raises(ValueError, match="cannot encode Content-Encoding 'zstd'"):
        Encoder("zstd")


@pytest.mark.parametrize("coding", ["gzip", "deflate", "identity"])
def test_encoder_streams_what_the_decoder_reads(coding: str) -> None:
    encoder, decoder = Encoder(coding), Decoder(coding)
    out = []
    for i in range(0, len(PLAIN), 1000):
        # sync-flushed: each encoded chunk decodes at once to what went in
        piece = PLAIN[i : i + 1000]
        assert b"".join(decoder.decode(encoder.encode(piece))) == piece
        out.append(piece)
    assert encoder.encode(b"") == b""
    assert b"".join(decoder.decode(encoder.flush())) == b""
    assert decoder.flush() == b""
    if coding == "gzip":
        encoder = Encoder("gzip")
        assert gzip.decompress(encoder.encode(PLAIN) + encoder.flush()) == PLAIN


# ------------------------------------------------------------ whole bodies

ODATA_PAGE = {
    "d": {
        "results": [
            {
                "__metadata": {
                    "uri": f"https://{HOST}:443/odata/v2/User('u{i}')",
                    "type": "SFOData.User",
                },
                "manager": {"__deferred": {"uri": f"https://{TWIN}/odata/v2/User('u{i}')/manager"}},
                "email": f"u{i}@{HOST}",
            }
            for i in range(200)
        ],
        "__next": f"https://{HOST}:443/odata/v2/User?$skiptoken=eyJzdGFydFJvdyI6MjAwfQ",
    }
}


def rewrite_body(data: bytes, coding: str, chunk: int) -> bytes:
    rewriter = BodyRewriter(SF_BASES, LOCAL, coding)
    out = [b"".join(rewriter.feed(data[i : i + chunk])) for i in range(0, len(data), chunk)]
    return b"".join(out) + rewriter.flush()


@pytest.mark.parametrize("chunk", [1, 61, 65536])
@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b, wbits=-zlib.MAX_WBITS)),
        (None, lambda b: b),
    ],
)
def test_compressed_json_comes_out_plain_valid_and_local(
    coding: str | None, compress: object, chunk: int
) -> None:
    assert callable(compress)
    plain = json.dumps(ODATA_PAGE).encode()
    page = json.loads(rewrite_body(compress(plain), coding or "identity", chunk))["d"]
    assert page["__next"] == f"{LOCAL}/odata/v2/User?$skiptoken=eyJzdGFydFJvdyI6MjAwfQ"
    for i, user in enumerate(page["results"]):
        assert user["__metadata"]["uri"] == f"{LOCAL}/odata/v2/User('u{i}')"
        assert user["manager"]["__deferred"]["uri"] == f"{LOCAL}/odata/v2/User('u{i}')/manager"
        assert user["email"] == f"u{i}@{HOST}"  # not a link: no "https://" before it


def test_atom_xml_is_rewritten() -> None:
    feed = (
        f'<?xml version="1.0" encoding="utf-8"?>\n'
        f'<feed xml:base="https://{HOST}:443/odata/v2/" xmlns="http://www.w3.org/2005/Atom">'
        f"<id>https://{HOST}:443/odata/v2/User</id>"
        f'<link rel="next" href="https://{HOST}:443/odata/v2/User?$skiptoken=1"/></feed>'
    ).encode()
    out = rewrite_body(gzip.compress(feed), "gzip", 17).decode()
    assert 'xml:base="http://127.0.0.1:8080/odata/v2/"' in out
    assert "<id>http://127.0.0.1:8080/odata/v2/User</id>" in out
    assert 'href="http://127.0.0.1:8080/odata/v2/User?$skiptoken=1"' in out


def test_batch_multipart_is_passed_byte_identical() -> None:
    content_type = "multipart/mixed; boundary=batchresponse_1"
    body = (
        b"--batchresponse_1\r\nContent-Type: application/http\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nLocation: https://api10.cert.successfactors.com:443/odata/v2/"
        b"User('x')\r\nContent-Length: 2\r\n\r\n{}\r\n--batchresponse_1--\r\n"
    )
    assert not should_rewrite(content_type, None)
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    assert (
        rewritten_headers(headers, bases=SF_BASES, local_origin=LOCAL, body_rewritten=False)
        == headers
    )


def test_a_corrupt_body_raises_the_module_error() -> None:
    with pytest.raises(BodyDecodeError):
        rewrite_body(b"\x1f\x8b\x08\x00garbage-garbage-garbage", "gzip", 4)


# ------------------------------------------------------------------ headers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"https://{HOST}:443/odata/v2/User('x')", f"{LOCAL}/odata/v2/User('x')"),
        (
            f"https://{HOST}/odata/v2/User?$format=json#top",
            f"{LOCAL}/odata/v2/User?$format=json#top",
        ),
        (f"https://{HOST}?a=1", f"{LOCAL}?a=1"),
        (f"https://{HOST}#f", f"{LOCAL}#f"),
        (f"https://{HOST}", LOCAL),
        (f"https://{TWIN}:443/sf/start", f"{LOCAL}/sf/start"),
        ("HTTPS://API10.Cert.SuccessFactors.COM/x", f"{LOCAL}/x"),
        (f"//{HOST}/odata/v2/User", f"{LOCAL}/odata/v2/User"),
        ("/odata/v2/User('x')", "/odata/v2/User('x')"),
        ("User('x')", "User('x')"),
        ("https://other.example.com/x", "https://other.example.com/x"),
        (f"https://{HOST}.evil.com/x", f"https://{HOST}.evil.com/x"),
        (f"https://{HOST}:8443/x", f"https://{HOST}:8443/x"),
        (f"http://{HOST}/x", f"http://{HOST}/x"),
        ("", ""),
    ],
)
def test_rewrite_location(value: str, expected: str) -> None:
    assert rewrite_location(value, SF_BASES, LOCAL) == expected


def test_rewrite_location_keeps_the_prefix_rule() -> None:
    bases = upstream_bases(UpstreamURL(host="sf.test", path_prefix="/api"), ("alias.test",))
    assert rewrite_location("https://sf.test/api/x?y#z", bases, LOCAL) == f"{LOCAL}/x?y#z"
    assert rewrite_location("https://alias.test:443/api", bases, LOCAL) == LOCAL
    assert rewrite_location("https://sf.test/API/x", bases, LOCAL) == "https://sf.test/API/x"
    assert rewrite_location("https://sf.test/apix", bases, LOCAL) == "https://sf.test/apix"
    assert rewrite_location("https://sf.test/other", bases, LOCAL) == "https://sf.test/other"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "JSESSIONID=abc; Path=/; Secure; HttpOnly; SameSite=None",
            "JSESSIONID=abc; Path=/; HttpOnly; SameSite=None",
        ),
        (
            "r=1; Domain=.successfactors.com; Path=/o; Expires=Wed, 21 Oct 2026 07:28:00 GMT",
            "r=1; Path=/o; Expires=Wed, 21 Oct 2026 07:28:00 GMT",
        ),
        ("a=b;domain=x.com;secure;samesite=Lax", "a=b;samesite=Lax"),
        ("a=b ; DOMAIN = x.com ; SECURE ; Max-Age=60", "a=b ; Max-Age=60"),
        ("a=b; Secure;", "a=b;"),
        ("Secure=1; Path=/", "Secure=1; Path=/"),
        ("Domain=1", "Domain=1"),
        ("a=b; SecureX; Domains=1", "a=b; SecureX; Domains=1"),
        ("a=b", "a=b"),
        ('a="x y"; HttpOnly;  Partitioned', 'a="x y"; HttpOnly;  Partitioned'),
    ],
)
def test_rewrite_set_cookie(value: str, expected: str) -> None:
    assert rewrite_set_cookie(value) == expected


def test_rewritten_headers_of_a_rewritten_body() -> None:
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", "1234"),
        ("Content-Encoding", "gzip"),
        ("ETag", 'W/"1"'),
        ("Vary", "Accept-Encoding"),
        ("Content-MD5", "abc"),
        ("Accept-Ranges", "bytes"),
        ("Set-Cookie", "a=1; Domain=.successfactors.com; Secure"),
        ("Set-Cookie", "b=2; Path=/; Secure; HttpOnly"),
        ("Content-Location", f"https://{HOST}:443/odata/v2/User"),
        ("X-Other", f"https://{HOST}/kept"),
    ]
    out = rewritten_headers(headers, bases=SF_BASES, local_origin=LOCAL, body_rewritten=True)
    assert out == [
        ("Content-Type", "application/json"),
        ("ETag", 'W/"1"'),
        ("Vary", "Accept-Encoding"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2; Path=/; HttpOnly"),
        ("Content-Location", f"{LOCAL}/odata/v2/User"),
        ("X-Other", f"https://{HOST}/kept"),
    ]
    assert {"content-length", "content-encoding"} <= BODY_BOUND_HEADERS


@pytest.mark.parametrize("status_line", ["201 Created", "302 Found"])
def test_rewritten_headers_keep_an_untouched_body_described(status_line: str) -> None:
    headers = [
        ("Location", f"https://{HOST}:443/odata/v2/User('new')"),
        ("Content-Length", "0"),
        ("Content-Encoding", "gzip"),
    ]
    out = rewritten_headers(headers, bases=SF_BASES, local_origin=LOCAL, body_rewritten=False)
    assert out == [
        ("Location", f"{LOCAL}/odata/v2/User('new')"),
        ("Content-Length", "0"),
        ("Content-Encoding", "gzip"),
    ], status_line
