"""A polite web crawler that writes WARC: the input side of the data pipeline (`lmforge data crawl`).

    read_url_list(path)            one http(s) URL a line; blank lines and `#` comments skipped
    crawl(urls, "out.warc.gz")     fetch each URL once, politely, into one gzip WARC 1.1 file

Politeness: robots.txt is fetched once per host (scheme, host and port: the scope RFC 9309 gives a
robots.txt) with our user agent and obeyed with urllib.robotparser's rules; a 404 (any 4xx but 401,
403 and 429) allows everything, 401/403 forbid everything (robotparser's choice, the cautious one),
and a 5xx or 429 forbids the host for this crawl, as Google documents for an unreachable robots.txt
(developers.google.com/search/docs/crawling-indexing/robots/robots_txt). Requests to one host are
sequential and at least `delay_s` apart (end of one to start of the next, the robots.txt fetch
included), or `Crawl-delay` / `Request-rate` apart where robots.txt asks for more; `workers` hosts
are crawled at once. Every request carries the User-Agent. A redirect is followed at most 5 times,
each hop checked against its own host's robots.txt and rate limit. A body is streamed and cut at
`max_bytes`, and a whole request (body included) is given up after `timeout_s`.

Only public addresses are fetched. A URL list is input from anyone, and a crawler that fetches whatever
it names is a proxy into the machine it runs on and that machine's network (a request forgery: an admin
page on localhost, a database on 10.x, the cloud metadata service at 169.254.169.254 that hands out
credentials). So every connection, the first request to a host (its robots.txt), each page and each
redirect hop alike, resolves the host and dials only an address that is globally routable unicast:
loopback, private (RFC 1918, fc00::/7), shared (100.64/10), link-local (169.254/16, fe80::/10), multicast,
unspecified, reserved and documentation ranges are refused, and so are IPv6 forms carrying such an IPv4
address (::ffff:a.b.c.d, 6to4, NAT64). The address checked is the address dialled (one lookup per
connection; the Host header, TLS SNI and certificate check keep the name), so a name that answers a
public address to the check and a private one a moment later (DNS rebinding) gets nowhere. A host with
only refused addresses counts its URLs `skipped_private_address`. allow_private=True (--allow-private)
lifts this, for a crawl of a local test server or an intranet on purpose.

Output, as Common Crawl writes it: each record its own gzip member (so a reader can seek to one),
a `warcinfo` record first, then for each fetched URL a `request` record and a `response` record,
linked both ways by WARC-Concurrent-To. The response block is the status line, the headers and the
body; the body is stored decoded (gzip/deflate/br undone, chunking undone), so the original
Content-Encoding, Transfer-Encoding and Content-Length headers are renamed X-Crawler-* and a
Content-Length of the stored body is written, as Common Crawl does: the block then reads as what
it says it is, in readers.WarcReader and in warcio. A cut body is marked `WARC-Truncated: length`;
a redirected URL's record is the final response, under the final URL, with the URL asked for in
`Lmforge-Requested-URI` (names starting WARC- are the standard's). Records appear in the order
fetches finish, which with several workers is not the order of the list.

Counting (the returned Counter). Every URL of the list lands in exactly one bucket, so they sum to
len(urls):
    fetched                         a response was written (any status)
    skipped_duplicate               the same URL (fragment ignored) earlier in the list
    skipped_not_allowed_scheme      not http(s)
    skipped_robots                  robots.txt disallows it (or a redirect hop of it)
    skipped_robots_unavailable      its host's robots.txt answered 5xx or 429
    skipped_private_address         its host (or a redirect hop's, or its robots.txt's redirect) resolves only to
                                    addresses that are not public, and allow_private is off
    error_<kind>                    nothing written: timeout, connection, dns, tls, body, invalid_url,
                                    too_many_redirects, redirect_not_http, other; a network error on a
                                    host's robots.txt counts that host's URLs here, under the same kind
and, describing the fetched ones: status_2xx ... status_5xx, redirected, truncated.

Why requests and not the stdlib: it streams a body with gzip/deflate (and brotli when installed)
decoded chunk by chunk, so the size cap applies to decoded bytes, what is stored, and a compression
bomb stops at it (urllib3 >= 2.6 inflates no more than a read asks for; a redirect's body, which
requests reads whole, is never read: redirects, robots.txt's too, are followed here, see _Session);
it verifies TLS against certifi, honours proxy settings, keeps connections alive per session, and
times out connect and read separately. urllib.request does neither the decoding nor the pool,
and its robotparser.read() fetches with urllib's own user agent, so robots.txt is fetched here and
handed to RobotFileParser.parse. What requests does not give is the bytes on the wire: the request
and response headers in the WARC are rebuilt from what it sent and received (in order, repeated
headers kept), which is what WARC writers built on HTTP libraries do.

Known limits: robotparser applies the first matching Allow/Disallow line and knows no `*`/`$`
wildcards (Google applies the longest match with wildcards), and takes only an integer Crawl-delay,
which is obeyed however long. A 429/503 Retry-After is not honoured beyond the fixed delay,
robots.txt is not re-read during a long crawl, and http:// and https:// of one host are paced
apart (two origins). The robots.txt fetches are not written to the WARC. Through a proxy (http_proxy
and the like) the proxy resolves and dials the host, so the address check resolves the name here and
refuses it unless every address is public: a name that rebinds between that lookup and the proxy's is
beyond our reach (refuse private destinations at the proxy too), and a name this machine cannot resolve
counts as error_dns.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import ipaddress
import os
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit
from urllib.robotparser import RobotFileParser

import requests
import requests.adapters
import urllib3
import urllib3.util.connection
from tqdm import tqdm

from lmforge import __version__
from lmforge.base import LmforgeError

# Name the crawler and say where to complain; a real crawl should pass its own contact (--user-agent).
DEFAULT_USER_AGENT = f"lmforge-crawler/{__version__} (language-model data research; obeys robots.txt)"
MAX_REDIRECTS = 5  # RFC 1945's limit, which Google also applies to robots.txt
MAX_ROBOTS_BYTES = 500 * 1024  # Google reads the first 500 KiB of a robots.txt and ignores the rest
_CHUNK_BYTES = 64 * 1024
# Headers describing the bytes on the wire, which the stored (decoded, perhaps cut) body no longer matches.
_WIRE_HEADERS = frozenset({"content-encoding", "transfer-encoding", "content-length"})


def read_url_list(path: str | os.PathLike) -> list[str]:
    """The URLs of a text file, one per line, in order (duplicates kept: crawl counts them); blank lines
    and lines starting with `#` are skipped. Any other line that is not an http(s) URL is an error."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file; give a text file with one http(s) URL per line")
    urls = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = urlsplit(line)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or any(c.isspace() for c in line):
            raise LmforgeError(f"{path}:{number}: {line[:80]!r} is not an http(s) URL; write one absolute URL per "
                               "line (https://host/path), or start the line with # to comment it out")
        urls.append(line)
    if not urls:
        raise LmforgeError(f"{path}: no URLs in the file; write one http(s) URL per line")
    return urls


# ----------------------------------------------------------------------------- WARC records

def _warc_date() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha1_base32(data: bytes) -> str:
    """The digest form WARC writers use (Heritrix, Common Crawl, warcio): sha1:BASE32."""
    return "sha1:" + base64.b32encode(hashlib.sha1(data).digest()).decode()


def _record_id() -> str:
    return f"<urn:uuid:{uuid.uuid4()}>"


def _warc_record(fields: dict[str, str], block: bytes) -> bytes:
    """One WARC/1.1 record: version line, fields, Content-Length, blank line, block, two CRLFs."""
    head = "WARC/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("utf-8") + f"Content-Length: {len(block)}\r\n\r\n".encode() + block + b"\r\n\r\n"


def _http_head(first_line: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [first_line, *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")  # HTTP headers are Latin-1 (RFC 9110)


class _WarcWriter:
    """Appends records to one open file, each record one gzip member, a fetch's records together."""

    def __init__(self, file, filename: str, user_agent: str):
        self.file, self.lock = file, threading.Lock()
        self.warcinfo_id = _record_id()
        info = (f"software: lmforge/{__version__} (lmforge.dataprep.crawl)\r\nformat: WARC File Format 1.1\r\n"
                "conformsTo: https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/\r\n"
                f"http-header-user-agent: {user_agent}\r\nrobots: obey (urllib.robotparser)\r\n").encode()
        self.write(_warc_record({"WARC-Type": "warcinfo", "WARC-Date": _warc_date(), "WARC-Filename": filename,
                                 "WARC-Record-ID": self.warcinfo_id, "Content-Type": "application/warc-fields"},
                                info))

    def write(self, *records: bytes) -> None:
        members = b"".join(gzip.compress(r, compresslevel=6, mtime=0) for r in records)
        with self.lock:
            self.file.write(members)
            self.file.flush()  # every finished fetch is on disk: a crawl killed midway leaves a readable file


# ----------------------------------------------------------------------------- hosts: robots.txt and pacing

@dataclass
class _Host:
    """One origin's politeness state. Its lock is held for the whole of each request to it, so requests
    to a host are sequential even when a redirect from another worker's host lands here."""
    origin: str  # scheme://host[:port]
    delay_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_request_s: float = 0.0  # time.monotonic() before which no request may start
    robots: RobotFileParser | None = None
    robots_verdict: str | None = None  # a bucket for every URL of the host when robots.txt could not be read

    def wait_turn(self) -> None:
        pause = self.next_request_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)

    def done(self) -> None:
        self.next_request_s = time.monotonic() + self.delay_s


def _origin(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    if ":" in host:
        host = f"[{host}]"  # IPv6
    port = parts.port  # raises ValueError on a bad port
    default = {"http": 80, "https": 443}[parts.scheme.lower()]
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port not in (None, default) else "")


class _Timeout(Exception):
    """The whole request took longer than timeout_s (requests' timeouts are per socket operation)."""


# ----------------------------------------------------------------------------- public addresses only

class _PrivateAddress(Exception):
    """A host resolves only to addresses the crawler does not dial without allow_private. Not an OSError, so
    urllib3 neither retries it nor wraps it: it reaches fetch as it was raised."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address a NAT64 dials


def _is_public_address(address: str) -> bool:
    """Whether the crawler may dial address (an IP literal, as getaddrinfo gives it): globally routable unicast.
    An IPv6 address that stands for an IPv4 one (mapped ::ffff:a.b.c.d, NAT64) is judged as that IPv4 address;
    a 6to4 one (2002::/16) must be public itself and carry a public one."""
    ip = ipaddress.ip_address(address.partition("%")[0])  # an IPv6 zone (fe80::1%eth0) is not part of the address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped or ip in _NAT64:
            return _is_public_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)))
        if ip.sixtofour and not _is_public_address(str(ip.sixtofour)):
            return False
    # is_global alone lets multicast through, and reserved ranges (240/4, ::/8) differ between Python versions
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_loopback
                                 or ip.is_link_local or ip.is_unspecified)


def _resolve(host: str, port: int) -> list[str]:
    """The distinct addresses host resolves to, in the resolver's order (socket.gaierror when it does not)."""
    infos = socket.getaddrinfo(host, port, urllib3.util.connection.allowed_gai_family(), socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _refuse(host: str, addresses: list[str]) -> _PrivateAddress:
    return _PrivateAddress(f"{host} resolves to {', '.join(addresses)}, not a public address; crawl with "
                           "allow_private=True (--allow-private) to fetch it")


class _PinnedConnection(urllib3.connection.HTTPConnection):
    """Dials only a public address of its host, and the very address it checked: the host is resolved once
    here and the socket opened to that IP literal (urllib3 would resolve the name again), while self.host,
    hence the Host header, SNI and certificate check, stays the name."""

    def _new_conn(self) -> socket.socket:
        name = self._dns_host
        try:
            addresses = _resolve(name, self.port)
        except socket.gaierror as e:
            raise urllib3.exceptions.NameResolutionError(self.host, self, e) from e
        public = [a for a in addresses if _is_public_address(a)]
        if not public:
            raise _refuse(self.host, addresses)
        error: Exception | None = None
        for address in public:  # as create_connection does: the next address when one does not answer
            self._dns_host = address
            try:
                return super()._new_conn()
            except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError) as e:
                error = e
            finally:
                self._dns_host = name
        raise error


class _PinnedHTTPSConnection(_PinnedConnection, urllib3.connection.HTTPSConnection):
    pass  # HTTPSConnection.connect opens its socket with _new_conn, then wraps it in TLS for self.host


class _PinnedHTTPConnectionPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _PinnedConnection


class _PinnedHTTPSConnectionPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


class _PublicOnlyAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with pinned, public-only connections. A proxied request does not use them (requests
    opens it through a ProxyManager, to the proxy the user chose), so its target is checked by name first."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PinnedHTTPConnectionPool,
                                                   "https": _PinnedHTTPSConnectionPool}

    def send(self, request, *args, proxies=None, **kwargs):
        if requests.utils.select_proxy(request.url, proxies):
            parts = urlsplit(request.url)
            try:
                addresses = _resolve(parts.hostname, parts.port or {"http": 80, "https": 443}[parts.scheme])
            except socket.gaierror as e:
                raise requests.ConnectionError(f"{parts.hostname}: {e}", request=request) from e
            if not all(_is_public_address(a) for a in addresses):  # the proxy may dial any of them
                raise _refuse(parts.hostname, addresses)
        return super().send(request, *args, proxies=proxies, **kwargs)


# What a failed request may raise: requests' exceptions, urllib3's from reading the raw body, ours, and
# ValueError for a URL that urlsplit or urllib3 refuses.
_FAILURES = (requests.RequestException, urllib3.exceptions.HTTPError, _Timeout, _PrivateAddress, ValueError)


def _error_kind(exc: BaseException) -> str:
    """The bucket of a failed request, skipped_private_address or error_<kind>, looking through the wrappers
    requests and urllib3 put around the cause (ConnectionError(MaxRetryError(reason=NameResolutionError(
    gaierror))), say)."""
    chain, todo = [], [exc]
    while todo and len(chain) < 16:
        e = todo.pop()
        if isinstance(e, BaseException) and not any(e is c for c in chain):
            chain.append(e)
            todo += [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]

    def caused_by(*types) -> bool:
        return any(isinstance(e, types) for e in chain)
    if caused_by(_PrivateAddress):
        return "skipped_private_address"
    timeouts = (_Timeout, requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    if any(isinstance(e, timeouts) and not isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain):
        return "error_timeout"  # (urllib3 makes a refused connection a ConnectTimeoutError, for history's sake)
    if caused_by(socket.gaierror):
        return "error_dns"
    if caused_by(ssl.SSLError, requests.exceptions.SSLError, urllib3.exceptions.SSLError):
        return "error_tls"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError,
                        urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError)):
        return "error_body"  # the headers came, the body broke off or would not decompress
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                        requests.exceptions.MissingSchema, requests.exceptions.InvalidHeader, ValueError)):
        return "error_invalid_url"
    if isinstance(exc, (requests.ConnectionError, urllib3.exceptions.HTTPError)):
        return "error_connection"
    return "error_other"


# ----------------------------------------------------------------------------- the crawler

class _Session(requests.Session):
    """A session that never follows a redirect itself: the crawler follows them hop by hop (robots.txt and
    pacing per hop, and a hop's body unread). requests' resolve_redirects reads a hop's whole body into memory
    (Response.content) before anything else, even with allow_redirects=False, where Session.send runs it to
    fill Response.next: a redirect with a 10 GB body, or a compression bomb, would be read whole."""

    def resolve_redirects(self, *args, **kwargs):
        return iter(())


class _Crawler:
    def __init__(self, writer: _WarcWriter, user_agent: str, delay_s: float, max_bytes: int, timeout_s: float,
                 allow_private: bool):
        self.writer, self.user_agent = writer, user_agent
        self.delay_s, self.max_bytes, self.timeout_s = delay_s, max_bytes, timeout_s
        self.allow_private = allow_private
        self.hosts: dict[str, _Host] = {}
        self.hosts_lock = threading.Lock()

    def session(self) -> requests.Session:
        session = _Session()
        session.headers["User-Agent"] = self.user_agent
        if not self.allow_private:
            adapter = _PublicOnlyAdapter()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        return session

    def host(self, url: str) -> _Host:
        origin = _origin(url)
        with self.hosts_lock:
            return self.hosts.setdefault(origin, _Host(origin, self.delay_s))

    def _get(self, session: requests.Session, url: str, *, max_bytes: int):
        """(response, body, truncated): the body streamed and cut at max_bytes of decoded bytes, within timeout_s
        overall. A redirect is returned, not followed, its body unread (a hop's body may be a bomb too)."""
        deadline = time.monotonic() + self.timeout_s
        response = session.get(url, stream=True, allow_redirects=False, timeout=self.timeout_s)
        with response:
            if response.is_redirect:
                return response, b"", False  # closing it unread drops the connection
            body, truncated = bytearray(), False
            # read1 returns what has arrived, so a server trickling bytes meets the deadline too (iter_content
            # blocks until a whole chunk is in), and since urllib3 2.6 it inflates no more than it returns
            chunks = iter(lambda: response.raw.read1(_CHUNK_BYTES, decode_content=True), b"")
            for chunk in chunks:
                body += chunk
                if len(body) > max_bytes:
                    del body[max_bytes:]
                    truncated = True
                    break  # closing the response drops the connection rather than read the rest
                if time.monotonic() > deadline:
                    raise _Timeout(url)
        return response, bytes(body), truncated

    def robots_verdict(self, host: _Host, session: requests.Session, url: str) -> str | None:
        """None when the host's robots.txt lets us fetch url, else the bucket for url. Called under host.lock;
        the first call fetches robots.txt (a request like any other: paced, with our user agent)."""
        if host.robots is None and host.robots_verdict is None:
            host.wait_turn()
            try:
                self._read_robots(host, session)
            finally:
                host.done()  # after reading it, so a Crawl-delay already paces the next request
        if host.robots_verdict is not None:
            return host.robots_verdict
        return None if host.robots.can_fetch(self.user_agent, url) else "skipped_robots"

    def _read_robots(self, host: _Host, session: requests.Session) -> None:
        """Set host.robots, or host.robots_verdict where robots.txt cannot be read."""
        robots = RobotFileParser(host.origin + "/robots.txt")
        url = robots.url
        try:  # robots.txt redirects are followed (5 hops) as Google does; more count as a 404
            for _ in range(MAX_REDIRECTS + 1):
                response, body, _ = self._get(session, url, max_bytes=MAX_ROBOTS_BYTES)
                if not response.is_redirect:
                    status = response.status_code
                    break
                url = urljoin(response.url, response.headers["location"])
            else:
                status, body = 404, b""
        except _FAILURES as exc:
            host.robots_verdict = _error_kind(exc)  # the host is unreachable: its pages would be too
            return
        if status == 429 or status >= 500:
            host.robots_verdict = "skipped_robots_unavailable"
            return
        if status in (401, 403):
            robots.disallow_all = True
        elif status >= 300:  # 404 and the other 4xx; a 3xx left here is a redirect without Location
            robots.allow_all = True
        else:
            robots.parse(body.decode("utf-8", "replace").splitlines())
            rate = robots.request_rate(self.user_agent)
            host.delay_s = max(host.delay_s, float(robots.crawl_delay(self.user_agent) or 0),
                               rate.seconds / rate.requests if rate and rate.requests else 0.0)
        host.robots = robots

    def fetch(self, session: requests.Session, url: str) -> tuple[str, ...]:
        """Fetch one URL (following redirects) and write its records; returns its bucket then any
        descriptive counts (status class, redirected, truncated)."""
        current, hops = url, 0
        try:
            while True:
                if urlsplit(current).scheme.lower() not in ("http", "https"):
                    return ("error_redirect_not_http",)
                host = self.host(current)
                with host.lock:
                    verdict = self.robots_verdict(host, session, current)
                    if verdict is not None:
                        return (verdict,)
                    host.wait_turn()
                    date = _warc_date()
                    try:
                        response, body, truncated = self._get(session, current, max_bytes=self.max_bytes)
                    finally:
                        host.done()
                if not response.is_redirect:
                    break
                if hops == MAX_REDIRECTS:
                    return ("error_too_many_redirects",)
                current, hops = urljoin(response.url, response.headers["location"]), hops + 1
        except _FAILURES as exc:
            return (_error_kind(exc),)
        self._write(url if hops else None, response, body, truncated, date)
        return ("fetched", f"status_{response.status_code // 100}xx") + (("redirected",) if hops else ()) + \
            (("truncated",) if truncated else ())

    def _write(self, redirected_from: str | None, response: requests.Response, body: bytes, truncated: bool,
               date: str) -> None:
        sent = response.request
        target = response.url  # as sent: requests quotes what urljoin left unquoted
        request_block = _http_head(f"{sent.method} {sent.path_url} HTTP/1.1",
                                   [("Host", urlsplit(target).netloc.rpartition("@")[2]), *sent.headers.items()])
        version = {9: "HTTP/0.9", 10: "HTTP/1.0", 11: "HTTP/1.1", 20: "HTTP/2"}.get(response.raw.version, "HTTP/1.1")
        headers = [(f"X-Crawler-{k}" if k.lower() in _WIRE_HEADERS else k, v) for k, v in response.raw.headers.items()]
        headers.append(("Content-Length", str(len(body))))
        response_block = _http_head(f"{version} {response.status_code} {response.reason or ''}".rstrip(),
                                    headers) + body
        request_id, response_id = _record_id(), _record_id()
        common = {"WARC-Date": date, "WARC-Target-URI": target, "WARC-Warcinfo-ID": self.writer.warcinfo_id}
        request = _warc_record({"WARC-Type": "request", "WARC-Record-ID": request_id, **common,
                                "WARC-Concurrent-To": response_id,
                                "Content-Type": "application/http; msgtype=request",
                                "WARC-Block-Digest": _sha1_base32(request_block)}, request_block)
        fields = {"WARC-Type": "response", "WARC-Record-ID": response_id, **common, "WARC-Concurrent-To": request_id,
                  "Content-Type": "application/http; msgtype=response",
                  "WARC-Block-Digest": _sha1_base32(response_block), "WARC-Payload-Digest": _sha1_base32(body)}
        if truncated:
            fields["WARC-Truncated"] = "length"
        if redirected_from:
            fields["Lmforge-Requested-URI"] = redirected_from
        self.writer.write(request, _warc_record(fields, response_block))


def crawl(urls: list[str], out_path: str | os.PathLike, *, user_agent: str = DEFAULT_USER_AGENT,
          delay_s: float = 1.0, max_bytes: int = 5 * 1024 * 1024, timeout_s: float = 20.0, workers: int = 4,
          progress: bool = True, allow_private: bool = False) -> Counter:
    """Fetch each URL once into one gzip WARC file at out_path (written as out_path + ".partial" and renamed
    when the crawl completes). delay_s: least seconds between two requests to one host; max_bytes: the
    most body bytes kept of one response; timeout_s: the most seconds one request may take; workers:
    hosts crawled at once; allow_private: also fetch loopback, private and link-local addresses (off: a URL
    list cannot reach this machine or its network). Returns the counts described in the module docstring."""
    if delay_s < 0 or max_bytes < 1 or timeout_s <= 0 or workers < 1:
        raise LmforgeError(f"crawl: delay {delay_s} s, max bytes {max_bytes}, timeout {timeout_s} s, workers "
                           f"{workers}: the delay must be >= 0 and the others > 0")
    if not user_agent.strip() or not user_agent.isascii() or not user_agent.isprintable():
        raise LmforgeError(f"crawl: user agent {user_agent!r}: HTTP headers take printable ASCII; name the crawler "
                           "and a contact, e.g. 'mybot/1.0 (+https://example.com/bot)'")
    counts: Counter = Counter()
    by_host: dict[str, list[str]] = {}  # first appearance order; one worker per host
    seen: set[str] = set()
    for url in urls:
        url = url.strip()
        key = urldefrag(url).url
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            counts["skipped_not_allowed_scheme"] += 1
        elif key in seen:
            counts["skipped_duplicate"] += 1
        else:
            seen.add(key)
            try:
                by_host.setdefault(_origin(key), []).append(key)
            except ValueError:  # no host, a bad port
                counts["error_invalid_url"] += 1

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    counts_lock, stop = threading.Lock(), threading.Event()
    with open(partial, "wb") as file, tqdm(total=len(urls), unit="url", desc="crawl", disable=not progress) as bar:
        bar.update(sum(counts.values()))
        crawler = _Crawler(_WarcWriter(file, out_path.name, user_agent), user_agent, delay_s, max_bytes, timeout_s,
                           allow_private)

        def crawl_host(host_urls: list[str]) -> None:
            with crawler.session() as session:  # one connection pool per worker, used by one thread
                for url in host_urls:
                    if stop.is_set():
                        return
                    outcome = crawler.fetch(session, url)
                    with counts_lock:
                        counts.update(outcome)
                    bar.update(1)

        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            for done in [pool.submit(crawl_host, group) for group in by_host.values()]:
                done.result()  # a bug in a worker surfaces here
        finally:  # on Ctrl-C or a bug, hosts not started are dropped and the others stop after their current URL
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
    os.replace(partial, out_path)
    return counts
