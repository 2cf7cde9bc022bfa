"""The listener's request parsing without llhttp: the same verdicts as llhttp.

aiohttp falls back to its pure-Python parser where its C extension is missing;
`sidecar.forward.listener.refuse_as_llhttp` makes that parser refuse what llhttp
refuses. The raw-socket battery (tests/forward/test_request_parsing.py) runs on both
parsers; here the grammar edges are compared with llhttp itself, directly on
the parsers, including inputs both must accept.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from unittest import mock

import pytest
from aiohttp import http_parser
from aiohttp.http_exceptions import HttpProcessingError

from sidecar.forward.listener import refuse_as_llhttp

LLHTTP = getattr(http_parser, "HttpRequestParserC", None)
needs_llhttp = pytest.mark.skipif(LLHTTP is None, reason="aiohttp without its C extension")

HEAD = b"POST /x HTTP/1.1\r\nHost: x\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def verdict(parser_class: type, data: bytes, loop: asyncio.AbstractEventLoop) -> object:
    """What the parser makes of ``data``: each request with its body, or the refusal."""
    parser = parser_class(mock.Mock(), loop, 2**16, max_headers=8, payload_exception=OSError)
    refuse_as_llhttp(parser)
    try:
        messages, _, _ = parser.feed_data(data)
    except HttpProcessingError:
        return "refused"
    return [
        (m.method, m.path, None if body.exception() else body.read_nowait()) for m, body in messages
    ]


def same_as_llhttp(data: bytes, loop: asyncio.AbstractEventLoop) -> None:
    assert LLHTTP is not None
    expected = verdict(LLHTTP, data, loop)
    assert verdict(http_parser.HttpRequestParserPy, data, loop) == expected, data


def test_only_the_pure_python_parser_is_changed(loop: asyncio.AbstractEventLoop) -> None:
    parser = http_parser.HttpRequestParserPy(mock.Mock(), loop, 2**16, max_headers=8)
    refuse_as_llhttp(parser)
    refuse_as_llhttp(parser)  # once only: the head limit is not moved twice
    assert parser.max_headers == 10  # it counts the request line and the empty line
    if LLHTTP is not None:
        c_parser = LLHTTP(mock.Mock(), loop, 2**16)
        refuse_as_llhttp(c_parser)
        assert type(c_parser) is LLHTTP


@needs_llhttp
@pytest.mark.parametrize(
    "line",
    [
        b"GET /x HTTP/1.1",
        b"get /x HTTP/1.1",
        b"Get /x HTTP/1.1",
        b"FOO /x HTTP/1.1",
        b"M-SEARCH /x HTTP/1.1",
        b"QUERY /x HTTP/1.1",
        b"PATCH /x HTTP/1.1",
        b"GET  /x HTTP/1.1",
        b"GET /x   HTTP/1.1",
        b"GET /x HTTP/1.1 ",
        b"GET /\xc3\xa9 HTTP/1.1",
        b"GET /\xe9 HTTP/1.1",
        b"GET /%C3%A9 HTTP/1.1",
        b"GET /x HTTP/1.0",
        b"GET /x HTTP/1.2",
        b"GET /x HTTP/3.0",
        b"OPTIONS * HTTP/1.1",
        b"CONNECT api.example:443 HTTP/1.1",
    ],
)
def test_request_lines(line: bytes, loop: asyncio.AbstractEventLoop) -> None:
    same_as_llhttp(line + b"\r\nHost: x\r\n\r\n", loop)


@needs_llhttp
@pytest.mark.parametrize("data", [b"\x00" * 10, b"get", b"GE", b"GET", b"POST /x HT", b"\x16\x03"])
def test_a_request_line_is_refused_at_its_first_impossible_byte(
    data: bytes, loop: asyncio.AbstractEventLoop
) -> None:
    same_as_llhttp(data, loop)


@needs_llhttp
@pytest.mark.parametrize(
    "length", [b"5", b"0005", b"18446744073709551614", b"18446744073709551616", b"9" * 30]
)
def test_content_length_fits_64_bits(length: bytes, loop: asyncio.AbstractEventLoop) -> None:
    same_as_llhttp(HEAD + b"Content-Length: " + length + b"\r\n\r\nhello", loop)


@needs_llhttp
@pytest.mark.parametrize(
    "codings",
    [
        b"chunked",
        b"Chunked",
        b"gzip, chunked",
        b"chunked, chunked",
        b"chunked,chunked",
        b"chunked , chunked",
        b"chunked, gzip, chunked",
        b"chunked, gzip",
    ],  # fmt: skip
)
def test_chunked_is_the_last_coding_once(codings: bytes, loop: asyncio.AbstractEventLoop) -> None:
    same_as_llhttp(
        HEAD + b"Transfer-Encoding: " + codings + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n", loop
    )


@needs_llhttp
@pytest.mark.parametrize(
    "size", [b"5", b"05", b"0ffffffffffffffff", b"10000000000000000", b"f" * 17, b"+5", b" 5"]
)
def test_chunk_sizes_fit_64_bits(size: bytes, loop: asyncio.AbstractEventLoop) -> None:
    same_as_llhttp(CHUNKED + size + b"\r\nhello\r\n0\r\n\r\n", loop)


def _extensions() -> Iterator[bytes]:
    """Chunk extensions of up to 4 characters from the grammar's interesting bytes."""
    alphabet = [b"a", b"=", b";", b'"', b"\\", b" ", b"\t", b"\x80", b"\x01", b"@"]
    for n in range(1, 5):
        for chars in itertools.product(alphabet[: 6 if n == 4 else None], repeat=n):
            yield b";" + b"".join(chars)


@needs_llhttp
def test_chunk_extensions_as_llhttp_reads_them(loop: asyncio.AbstractEventLoop) -> None:
    """2 406 extensions: the regular expression in the listener is llhttp's grammar."""
    assert LLHTTP is not None
    differ = []
    for ext in _extensions():
        data = CHUNKED + b"5" + ext + b"\r\nhello\r\n0\r\n\r\n"
        if verdict(http_parser.HttpRequestParserPy, data, loop) != verdict(LLHTTP, data, loop):
            differ.append(ext)
    assert differ == []


def test_a_chunk_size_line_split_over_reads_is_checked_whole(
    loop: asyncio.AbstractEventLoop,
) -> None:
    parser = http_parser.HttpRequestParserPy(mock.Mock(), loop, 2**16, payload_exception=OSError)
    refuse_as_llhttp(parser)
    messages, _, _ = parser.feed_data(CHUNKED + b"5;a=")
    ((_, body),) = messages
    parser.feed_data(b'"b c"\r\nhel')
    parser.feed_data(b"lo\r\n3;x\r")
    assert body.read_nowait() == b"hello"
    with pytest.raises(HttpProcessingError):
        parser.feed_data(b" y\r\nabc\r\n0\r\n\r\n")  # `;x\r y`: a bare CR in the extension
