"""Streaming origin rewriting: upstream links in headers and bodies become local ones.

SuccessFactors builds absolute links from its own base URL: OData ``__next``
paging, ``__metadata.uri``, ``__deferred`` navigation, ``Location`` after a
create. A client talking to the sidecar at ``http://127.0.0.1:8080`` must get
links back to the sidecar, so every spelling of the upstream base URL (origin
plus path prefix) is replaced by the origin the client used, ``http://`` plus
its Host header. Because the proxy maps local ``/x`` to upstream
``prefix + /x``, a base maps to the bare local origin::

    upstream_bases(upstream, rewrite_hosts)     every spelling, longest first
      │   https://h:443/p  https://h/p  https://twin/p  https:\\/\\/h\\/p ...
      ├──► rewritten_headers()   Location, Content-Location; Set-Cookie via
      │                          rewrite_set_cookie(); body-bound headers dropped
      └──► BodyRewriter          Decoder (gzip/deflate → plain bytes)
                                 └─► StreamRewriter (bases → local origin)

    should_rewrite(content_type, content_encoding)   which bodies at all

Everything here is pure and works on ``str``/``bytes``; the proxy feeds it
chunks and headers.

Choices, and why:

- **Matching is literal**, leftmost-longest, and needs a *boundary*: a base
  counts only when the next byte cannot continue a host name or port, i.e. is
  one of `BOUNDARY` (``/ ? # " ' < > \\ ) &`` or whitespace) or the end of the
  body. So ``https://h`` is not rewritten inside ``https://h.other.com``,
  ``https://hostname`` or ``https://h:8443``; the ``:443`` spelling is a base
  of its own. Host names are case-insensitive, but the bases are matched in
  lower case and as configured only: SuccessFactors builds links from the Host
  header the sidecar sends, which is lower case.
- **Streaming**: `StreamRewriter` holds back at most ``len(longest base)``
  bytes (a partial base plus its boundary byte) between chunks; its output is
  the same as one ``re.sub`` over the whole body, however the body is cut.
- **JSON-escaped slashes** (``https:\\/\\/h\\/p``, written by some OData JSON
  serialisers) are bases too, and are replaced by the local origin escaped
  the same way, so the output keeps the server's style and stays valid JSON.
  Percent-encoded links (``https%3A%2F%2F...`` in a query value) are left
  alone: they are data for the server, not links for the client.
- **Which bodies**: JSON, XML and Atom only. ``multipart/*`` (OData
  ``$batch``) passes byte-identical: its parts carry their own headers and
  lengths that a rewrite would break. Content encodings identity, gzip and
  deflate are decoded; any other (br, zstd, several stacked, unknown) passes
  through unchanged rather than being guessed at. `decodable_accept_encoding`
  lets the proxy ask the upstream only for codings that can be rewritten.
- **Bounded inflation**: a compressed body is decoded in pieces of at most
  `DECODED_PIECE` bytes, the next one only once the caller has taken the
  last (``BodyRewriter.feed`` is a generator), so a small gzip answer that
  inflates to gigabytes costs no more memory than an honest one.
- **Rewritten bodies go out identity-encoded**: ``Content-Encoding`` and
  ``Content-Length`` are dropped and the body is sent chunked. Identity is
  always acceptable to an HTTP client, localhost bandwidth is free, and a
  streaming re-compressor would have to flush per chunk (worse ratio, more
  CPU) for nothing. `Encoder` exists for callers and tests that want to
  produce compressed streams. ``ETag`` is kept: OData uses it for optimistic
  concurrency (``If-Match``) against the upstream, whose view of the entity
  has not changed. ``Vary`` is kept as the upstream sent it.
- **Headers**: ``Location`` and ``Content-Location`` pointing at a base (also
  scheme-relative ``//host/...``) become local; relative values stay.
  ``Set-Cookie`` loses ``Domain`` (the cookie becomes host-only for the local
  host) and ``Secure`` (so a client on plain-HTTP localhost sends it back);
  everything else, ``SameSite`` included, stays byte-identical. Browsers
  reject ``SameSite=None`` without ``Secure``; the sidecar's clients (Postman,
  scripts, SDKs) do not enforce SameSite, and changing it would alter what a
  browser sends cross-site, so the attribute is left as the server wrote it.
- **Left to the caller**: no body rewriting for HEAD, 204, 304 and 206 (a
  byte range of the upstream's bytes cannot be rewritten on its own) or when
  ``rewrite_links`` is off; a `BodyDecodeError` after the response started
  means cutting the client connection, as for any upstream failure there.

Its length (~530 lines, a third of them this note) is one algorithm: the bases,
the boundary matcher and the streaming decoder only make sense together.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Iterable, Iterator
from typing import Final

from sidecar.config import UpstreamURL
from sidecar.http_rules import ORIGIN_HOST_VALUE, host_and_port, plain_twin

#: Bytes that may follow a base URL: they cannot continue a host name or port.
BOUNDARY: Final = b"/?#\"'<>\\)& \t\r\n\f\v"
_BOUNDARY_TEXT: Final = BOUNDARY.decode("ascii")
_BOUNDARY_CLASS: Final = b"[" + b"".join(b"\\x%02x" % c for c in BOUNDARY) + b"]"

_ESCAPED_SLASH: Final = b"\\/"

#: At most this many decoded bytes at a time, however far a compressed body inflates.
DECODED_PIECE: Final = 64 * 1024

_JSON_TYPES: Final = frozenset({"application/json"})
_XML_TYPES: Final = frozenset({"application/xml", "text/xml"})
_DECODABLE: Final = {"identity": "identity", "gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}

#: Response headers that describe the upstream's bytes, wrong once a body is rewritten.
BODY_BOUND_HEADERS: Final = frozenset(
    {
        "content-length",
        "content-encoding",
        "content-md5",
        "content-digest",
        "repr-digest",
        "digest",
        "accept-ranges",
    }
)

# ------------------------------------------------------------------- the bases


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _origins(scheme: str, host: str, port: int) -> set[str]:
    default = 443 if scheme == "https" else 80
    hosts = {_bracketed(host), _bracketed(host.lower())}
    origins = {f"{scheme}://{h}:{port}" for h in hosts}
    if port == default:
        origins |= {f"{scheme}://{h}" for h in hosts}
    return origins


def upstream_bases(upstream: UpstreamURL, rewrite_hosts: tuple[str, ...]) -> tuple[bytes, ...]:
    """Every spelling of the upstream base URL that is rewritten, longest first.

    The upstream's origin (with and without ``:443`` when that is its port,
    only as written otherwise), its plain twin on the same port, and every
    ``rewrite_hosts`` entry (https; with and without ``:443`` unless the entry
    names another port); each host as configured and in lower case; each
    followed by the upstream's path prefix; each also with JSON-escaped
    slashes.
    """
    origins = _origins(upstream.scheme, upstream.host, upstream.port)
    twin = plain_twin(upstream.host)
    if twin is not None:
        origins |= _origins(upstream.scheme, twin, upstream.port)
    for entry in rewrite_hosts:
        host, port = host_and_port(entry.strip())
        if host:
            origins |= _origins("https", host, port)
    bases = {origin + upstream.path_prefix for origin in origins}
    encoded = {b.encode("utf-8") for b in bases}
    encoded |= {b.replace(b"/", _ESCAPED_SLASH) for b in encoded}
    return tuple(sorted(encoded, key=lambda b: (-len(b), b)))


def local_origin(host_header: str, *, scheme: str = "http") -> str:
    """``http://`` plus the client's Host header, refused unless it is host[:port].

    ``scheme`` is the one an absolute-form target named (``http`` or
    ``https``), kept as the client wrote it. The value ends up inside JSON and
    XML bodies, so anything that could break out of a string there raises
    ValueError.
    """
    host = host_header.strip()
    if not ORIGIN_HOST_VALUE.match(host):
        raise ValueError(f"Host header {host_header!r} is not host[:port]")
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {scheme!r} is not http or https")
    return f"{scheme}://{host}"


# ------------------------------------------------------------ the stream core


class StreamRewriter:
    """Replace every occurrence of any pattern by ``replacement``, chunk by chunk.

    A pattern counts only when followed by a `BOUNDARY` byte or the end of the
    body; among patterns starting at the same place the longest wins, and the
    scan goes on after the replaced text. A pattern holding a JSON-escaped
    slash (``\\/``) is replaced by ``replacement`` with its slashes escaped the
    same way. The output of ``feed``s and ``flush`` equals one ``re.sub`` of
    that alternation over the whole body, for any cutting into chunks, while
    at most ``len(longest pattern)`` bytes are held back between chunks: the
    longest pattern less one byte, plus the boundary byte that decides it.
    """

    def __init__(self, patterns: tuple[bytes, ...], replacement: bytes) -> None:
        self._replacement = replacement
        self._escaped = replacement.replace(b"/", _ESCAPED_SLASH)
        self._window, self._mid, self._end = _matchers(patterns)
        self._pending = b""

    @property
    def held(self) -> int:
        """How many bytes wait for the next chunk to decide whether they match."""
        return len(self._pending)

    def _replace(self, match: re.Match[bytes]) -> bytes:
        return self._escaped if _ESCAPED_SLASH in match.group() else self._replacement

    def feed(self, chunk: bytes) -> bytes:
        """Rewrite ``chunk``; returns what is decided, keeps the undecided tail."""
        if not self._window:
            return chunk
        buf = self._pending + chunk if self._pending else chunk
        # a match starting before here has its pattern and boundary byte in buf
        decided = len(buf) - self._window
        out: list[bytes] = []
        pos = 0
        while (match := self._mid.search(buf, pos)) is not None and match.start() < decided:
            out += (buf[pos : match.start()], self._replace(match))
            pos = match.end()
        keep = max(pos, decided)
        out.append(buf[pos:keep])
        self._pending = buf[keep:]
        return b"".join(out)

    def flush(self) -> bytes:
        """The end of the body: rewrite and return what was held back."""
        pending, self._pending = self._pending, b""
        if not self._window:
            return pending
        return self._end.sub(self._replace, pending)


@functools.lru_cache(maxsize=64)
def _matchers(patterns: tuple[bytes, ...]) -> tuple[int, re.Pattern[bytes], re.Pattern[bytes]]:
    """The longest pattern's length and the mid-body and end-of-body regexes, built once
    per route's bases (every rewritten answer asks)."""
    if any(not p for p in patterns):
        raise ValueError("an empty pattern would match everywhere")
    ordered = sorted(set(patterns), key=lambda p: (-len(p), p))
    alternation = b"(?:" + b"|".join(re.escape(p) for p in ordered) + b")"
    # mid-body the end of the buffer is not the end of the body: no \Z there
    mid = re.compile(alternation + b"(?=" + _BOUNDARY_CLASS + b")")
    end = re.compile(alternation + b"(?=" + _BOUNDARY_CLASS + b"|\\Z)")
    return (len(ordered[0]) if ordered else 0), mid, end


# ---------------------------------------------------------------- encodings


def content_coding(value: str | None) -> str | None:
    """``identity``, ``gzip`` or ``deflate`` for a decodable Content-Encoding, else None.

    ``x-gzip`` is gzip; identity entries are ignored; several stacked codings
    (``gzip, gzip``) and anything else (br, zstd, unknown) are not decodable.
    """
    codings = [c.strip().lower() for c in (value or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return "identity"
    if len(codings) == 1:
        return _DECODABLE.get(codings[0])
    return None


def decodable_accept_encoding(value: str | None) -> str | None:
    """The client's Accept-Encoding without codings this module cannot decode.

    Forwarding ``gzip, deflate, br`` could earn a brotli body that then passes
    unrewritten; asking for ``gzip, deflate`` keeps the upstream's compression
    on the wire and the rewriting. Refusals (``q=0``) are kept; an offer left
    empty becomes ``identity``; no header stays no header.
    """
    if value is None:
        return None
    kept: list[str] = []
    for item in value.split(","):
        coding, _, params = item.strip().partition(";")
        name = coding.strip().lower()
        if not name:
            continue
        refused = re.search(r"(?:^|;)\s*q\s*=\s*0(?:\.0*)?\s*(?:;|$)", params) is not None
        if name in _DECODABLE or refused:
            kept.append(item.strip())
    return ", ".join(kept) if kept else "identity"


class BodyDecodeError(ValueError):
    """The upstream's compressed body does not decode (corrupt or cut short)."""


class Decoder:
    """Streaming decoder for one decodable Content-Encoding (see `content_coding`).

    Memory is bounded whatever the compression ratio: `decode` yields the
    output in pieces of at most ``piece`` bytes, inflating the next one only
    when the caller asks for it (zlib's ``max_length`` and
    ``unconsumed_tail``), so a gzip bomb costs ``piece`` bytes at a time.

    gzip may hold several members (RFC 1952). deflate is zlib-wrapped per RFC
    9110, but some servers send raw deflate: the input is kept until the first
    output shows the zlib wrapper is right, else decoding restarts raw.
    """

    def __init__(self, content_encoding: str | None, *, piece: int = DECODED_PIECE) -> None:
        coding = content_coding(content_encoding)
        if coding is None:
            raise ValueError(f"cannot decode Content-Encoding {content_encoding!r}")
        self.coding = coding
        self._piece = piece
        self._obj = self._new()
        self._probe: bytes | None = b"" if coding == "deflate" else None
        self._seen = False

    def _new(self) -> zlib._Decompress:
        if self.coding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return zlib.decompressobj(zlib.MAX_WBITS)

    def decode(self, chunk: bytes) -> Iterator[bytes]:
        """The decoded bytes ``chunk`` completes (possibly none), piece by piece."""
        if not chunk:
            return
        if self.coding == "identity":
            yield chunk
            return
        self._seen = True
        try:
            if self.coding == "gzip":
                yield from self._gunzip(chunk)
            else:
                yield from self._inflate(chunk)
        except zlib.error as exc:
            raise BodyDecodeError(
                f"the upstream's {self.coding} body does not decode: {exc}"
            ) from exc

    def _drain(self, data: bytes) -> Iterator[bytes]:
        """Inflate ``data`` with the current object, at most ``piece`` bytes per step."""
        while not self._obj.eof:
            out = self._obj.decompress(data, self._piece)
            if out:
                yield out
            data = self._obj.unconsumed_tail
            if not data and len(out) < self._piece:
                return  # input used up and nothing pending inside zlib

    def _gunzip(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._obj.eof:  # another member follows
                self._obj = self._new()
            yield from self._drain(data)
            data = self._obj.unused_data if self._obj.eof else b""

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        if self._probe is None:
            yield from self._drain(data)
            return
        self._probe += data
        try:
            out = self._obj.decompress(data, self._piece)
        except zlib.error:
            probe, self._probe = self._probe, None
            self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
            yield from self._drain(probe)
            return
        if out:
            self._probe = None
            yield out
        yield from self._drain(self._obj.unconsumed_tail)

    def flush(self) -> bytes:
        """The end of the body; raises BodyDecodeError when the stream was cut short."""
        if self.coding == "identity" or not self._seen:
            return b""
        if not self._obj.eof:
            raise BodyDecodeError(f"the upstream's {self.coding} body ends before its stream does")
        return b""  # `decode` drained every byte up to the end of the stream


class Encoder:
    """Streaming encoder: gzip, zlib-wrapped deflate, or identity.

    Every chunk is sync-flushed so what goes in comes out at once.
    """

    def __init__(self, content_encoding: str | None) -> None:
        coding = content_coding(content_encoding)
        if coding is None:
            raise ValueError(f"cannot encode Content-Encoding {content_encoding!r}")
        self.coding = coding
        wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
        self._obj = zlib.compressobj(wbits=wbits)

    def encode(self, chunk: bytes) -> bytes:
        """The encoded form of ``chunk``, flushed."""
        if self.coding == "identity":
            return chunk
        if not chunk:
            return b""
        return self._obj.compress(chunk) + self._obj.flush(zlib.Z_SYNC_FLUSH)

    def flush(self) -> bytes:
        """The end of the stream (trailer and checksum)."""
        return b"" if self.coding == "identity" else self._obj.flush()


class BodyRewriter:
    """Decode, rewrite and return identity-encoded bytes, chunk by chunk.

    The output of one chunk comes as pieces of at most about ``DECODED_PIECE``
    bytes (plus what rewriting adds), each decoded only when the previous one
    was taken: the caller writes them with back-pressure and memory stays
    bounded however far the body inflates.
    """

    def __init__(
        self, bases: tuple[bytes, ...], local_origin: str, content_encoding: str | None
    ) -> None:
        self._decoder = Decoder(content_encoding)
        self._rewriter = StreamRewriter(bases, local_origin.encode("utf-8"))

    @property
    def coding(self) -> str:
        """The decoded Content-Encoding: ``identity``, ``gzip`` or ``deflate``."""
        return self._decoder.coding

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """Rewritten pieces for ``chunk``; raises BodyDecodeError on a corrupt body."""
        for piece in self._decoder.decode(chunk):
            if out := self._rewriter.feed(piece):
                yield out

    def flush(self) -> bytes:
        """The rest of the body; raises BodyDecodeError when it was cut short."""
        self._decoder.flush()
        return self._rewriter.flush()


def should_rewrite(content_type: str | None, content_encoding: str | None) -> bool:
    """True for JSON, XML and Atom bodies in a decodable encoding.

    ``multipart/*`` (OData ``$batch``) and every other type pass unchanged, as
    do encodings `content_coding` cannot decode.
    """
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    textual = (
        media in _JSON_TYPES
        or media in _XML_TYPES
        or (media.startswith("application/") and media.endswith(("+json", "+xml")))
    )
    return textual and content_coding(content_encoding) is not None


# ------------------------------------------------------------------ headers


def _match_length(value: str, base: str) -> int:
    """How much of ``value`` ``base`` covers (0: none); scheme and host ignore case."""
    authority = base.find("/", base.find("//") + 2)
    authority = len(base) if authority < 0 else authority
    end = len(base)
    if (
        len(value) < end
        or value[:authority].lower() != base[:authority].lower()
        or value[authority:end] != base[authority:]
        or (len(value) > end and value[end] not in _BOUNDARY_TEXT)
    ):
        return 0
    return end


def rewrite_location(value: str, bases: tuple[bytes, ...], local_origin: str) -> str:
    """``value`` with a leading base replaced by ``local_origin``; others unchanged.

    For ``Location`` and ``Content-Location``: absolute URLs and scheme-relative
    ones (``//host/...``) pointing at a base keep their path, query and
    fragment behind the local origin; relative values and other hosts stay.
    """
    for raw in bases:
        if _ESCAPED_SLASH in raw:
            continue
        base = raw.decode("utf-8")
        if value.startswith("//"):
            base = base[base.find("//") :]
        if length := _match_length(value, base):
            return local_origin + value[length:]
    return value


def rewrite_set_cookie(value: str) -> str:
    """``value`` without its ``Domain`` and ``Secure`` attributes, the rest byte-identical."""
    name_value, *attributes = value.split(";")
    kept = [
        a for a in attributes if a.partition("=")[0].strip().lower() not in ("domain", "secure")
    ]
    return ";".join([name_value, *kept])


def rewritten_headers(
    headers: Iterable[tuple[str, str]],
    *,
    bases: tuple[bytes, ...],
    local_origin: str,
    body_rewritten: bool,
) -> list[tuple[str, str]]:
    """The response headers to send when links are rewritten, in their order.

    ``Location``, ``Content-Location`` and ``Set-Cookie`` are rewritten; when
    the body is rewritten too (`BodyRewriter`), the headers describing the
    upstream's bytes (`BODY_BOUND_HEADERS`: length, encoding, digests,
    ranges) are dropped, so the body goes out chunked and identity-encoded.
    """
    out: list[tuple[str, str]] = []
    for name, value in headers:
        key = name.lower()
        if body_rewritten and key in BODY_BOUND_HEADERS:
            continue
        if key in ("location", "content-location"):
            value = rewrite_location(value, bases, local_origin)
        elif key == "set-cookie":
            value = rewrite_set_cookie(value)
        out.append((name, value))
    return out
