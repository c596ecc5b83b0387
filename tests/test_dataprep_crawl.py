"""The crawler against local HTTP servers only: robots.txt obeyed by user agent, every request paced and
carrying the user agent, bodies cut at the cap, redirects and errors each counted, every URL in one
bucket; the WARC it writes well formed and read back by our WarcReader to the pages' text."""

import base64
import gzip
import hashlib
import random
import socket
import threading
import time
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmforge.common import LmforgeError
from lmforge.dataprep.crawl import crawl, read_url_list
from lmforge.dataprep.readers import HtmlExtractor, WarcReader, warc_records
from lmforge.dataprep.synthetic import html_page, prose_paragraphs

UA = "test-bot/1.0 (+mailto:crawl@example.com)"


@pytest.fixture
def serve():
    """start(routes, host, port) -> (base URL, request log) for a fresh server on host:port (127.0.0.1 and a free
    port unless given; crawls reach it only with allow_private, or as a patched "public" address). A route is
    path (query ignored) -> (status, headers, body), or a callable taking the handler and writing the reply itself;
    every other path is a 404. The log holds (path, user agent, time.monotonic()) of each request."""
    servers = []

    def start(routes: dict, host: str = "127.0.0.1", port: int = 0):
        log = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def do_GET(self):
                log.append((self.path, self.headers.get("User-Agent"), time.monotonic()))
                missing = (404, {"Content-Type": "text/html"}, b"<html>not here</html>")
                route = routes.get(self.path.partition("?")[0], missing)
                if callable(route):
                    return route(self)
                status, headers, body = route
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the crawler hung up at its size cap
                    pass

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://{host}:{server.server_port}", log

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def html(text: str) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "text/html; charset=utf-8"}, html_page("A page", text).encode()


def records(path):
    with gzip.open(path) as f:
        recs = list(warc_records(f))
    assert not [r for r in recs if r.problem]  # well formed, whole
    return [(r.headers, r.block) for r in recs]


def read_back(folder):
    """Documents and stats of WarcReader + HtmlExtractor over a folder, run in-process."""
    reader, extractor = WarcReader(str(folder)), HtmlExtractor()
    docs = list(extractor.run(reader.run()))
    return docs, {k: v.total for k, v in reader.stats.stats.items()}


def buckets(counts) -> int:
    """The per-URL buckets: fetched, skipped_*, error_* (status_*, redirected, truncated describe fetched ones)."""
    return sum(v for k, v in counts.items() if k == "fetched" or k.startswith(("skipped_", "error_")))


def test_url_list_skips_comments_and_names_a_bad_line(tmp_path):
    good = tmp_path / "urls.txt"
    good.write_text("# seeds\nhttps://a.example/\n\n  http://b.example/x?y=1  \nhttps://a.example/\n")
    assert read_url_list(good) == ["https://a.example/", "http://b.example/x?y=1", "https://a.example/"]
    bad = tmp_path / "bad.txt"
    bad.write_text("https://a.example/\n\nftp://files.example/x\n")
    with pytest.raises(LmforgeError, match=r"bad\.txt:3: 'ftp://files.example/x' is not an http\(s\) URL.*#"):
        read_url_list(bad)
    (tmp_path / "host.txt").write_text("example.com/page\n")
    with pytest.raises(LmforgeError, match=r"host\.txt:1"):
        read_url_list(tmp_path / "host.txt")


def test_robots_user_agent_redirects_and_errors_each_counted(serve, tmp_path):
    page = "\n\n".join(prose_paragraphs(random.Random(0), 3))
    robots = b"User-agent: test-bot\nDisallow: /private/\n\nUser-agent: *\nDisallow: /\n"  # only our name may crawl

    def trickle(handler):  # headers at once, then a byte every 50 ms: the deadline must cut it short
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        for sent in range(100):
            try:
                handler.wfile.write(b"x")
                handler.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                trickled.append(sent)
                return
            time.sleep(0.05)
        trickled.append(100)
    trickled = []
    other, other_log = serve({"/robots.txt": (404, {}, b""), "/landing": html(page)})
    base, log = serve({
        "/robots.txt": (200, {"Content-Type": "text/plain"}, robots),
        "/page": html(page),
        "/old": (301, {"Location": "/page?moved=1"}, b""),
        "/away": (302, {"Location": f"{other}/landing"}, b""),
        "/to-private": (302, {"Location": "/private/b"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/slow": trickle,
    })
    down, _ = serve({"/robots.txt": (503, {}, b"")})
    urls = [f"{base}/page", f"{base}/page", f"{base}/page#top", f"{base}/private/a", f"{base}/to-private",
            f"{base}/old", f"{base}/away", f"{base}/missing", f"{base}/loop", f"{base}/slow", "ftp://x.example/f",
            f"{down}/page", f"http://127.0.0.1:{closed_port()}/page"]
    counts = crawl(urls, tmp_path / "out" / "crawl.warc.gz", user_agent=UA, delay_s=0, timeout_s=1, workers=3,
                   progress=False, allow_private=True)

    assert counts == {"fetched": 4, "status_2xx": 3, "status_4xx": 1, "redirected": 2, "skipped_duplicate": 2,
                      "skipped_robots": 2, "error_too_many_redirects": 1, "error_timeout": 1,
                      "skipped_not_allowed_scheme": 1, "skipped_robots_unavailable": 1, "error_connection": 1}
    assert buckets(counts) == len(urls)
    paths = [path for path, _, _ in log]
    assert not any(p.startswith("/private/") for p in paths)  # disallowed: never asked for, redirect hop included
    assert paths.count("/robots.txt") == 1 and paths.count("/page") == 1  # robots.txt once per host; no duplicate
    assert paths.count("/loop") == 6  # the URL and 5 redirects followed, then given up
    assert [p for p, _, _ in other_log] == ["/robots.txt", "/landing"]  # the other host's robots.txt read too
    assert {ua for _, ua, _ in log + other_log} == {UA}  # robots.txt fetches included
    for _ in range(50):  # the server notices the hang-up at its next write
        if trickled:
            break
        time.sleep(0.1)
    assert trickled and trickled[0] < 100  # cut at the deadline, not read to the end

    docs, stats = read_back(tmp_path / "out")
    assert stats["documents_in"] == 4 and stats["dropped_http_status_not_200"] == 1
    assert sorted(d.id for d in docs) == sorted([f"{base}/page", f"{base}/page?moved=1", f"{other}/landing"])
    by_uri = {h["warc-target-uri"]: h for h, _ in records(tmp_path / "out" / "crawl.warc.gz")
              if h["warc-type"] == "response"}
    assert by_uri[f"{base}/page?moved=1"]["lmforge-requested-uri"] == f"{base}/old"
    assert by_uri[f"{other}/landing"]["lmforge-requested-uri"] == f"{base}/away"
    assert not (tmp_path / "out" / "crawl.warc.gz.partial").exists()


def test_requests_to_a_host_are_spaced_by_the_delay_or_crawl_delay(serve, tmp_path):
    fast, fast_log = serve({f"/{i}": html(f"Page {i}.") for i in range(4)})  # no robots.txt: a 404, all allowed
    slow, slow_log = serve({"/robots.txt": (200, {}, b"User-agent: *\nCrawl-delay: 1\n"), "/0": html("Page.")})
    urls = [f"{fast}/{i}" for i in range(4)] + [f"{slow}/0"]
    counts = crawl(urls, tmp_path / "c.warc.gz", user_agent=UA, delay_s=0.2, workers=2, progress=False,
                   allow_private=True)
    assert counts["fetched"] == 5 and counts["status_2xx"] == 5
    for log, least_s in ((fast_log, 0.2), (slow_log, 1.0)):
        times = [t for _, _, t in log]
        assert len(times) == len(log) and [p for p, _, _ in log][0] == "/robots.txt"
        assert all(b - a >= least_s for a, b in zip(times, times[1:])), (least_s, times)
    assert len(fast_log) == 5 and len(slow_log) == 2


def test_a_body_over_the_cap_is_cut_and_marked_truncated(serve, tmp_path):
    big = bytes(range(256)) * 1000  # 256,000 bytes
    base, _ = serve({"/big": (200, {"Content-Type": "application/octet-stream"}, big), "/small": html("Small.")})
    out = tmp_path / "c.warc.gz"
    counts = crawl([f"{base}/big", f"{base}/small"], out, user_agent=UA, delay_s=0, max_bytes=10_000,
                   progress=False, allow_private=True)
    assert counts["fetched"] == 2 and counts["truncated"] == 1
    responses = {h["warc-target-uri"]: (h, block) for h, block in records(out) if h["warc-type"] == "response"}
    headers, block = responses[f"{base}/big"]
    head, _, body = block.partition(b"\r\n\r\n")
    assert headers["warc-truncated"] == "length" and body == big[:10_000]
    assert b"\r\nContent-Length: 10000" in head and b"X-Crawler-Content-Length: 256000" in head
    assert headers["warc-payload-digest"] == "sha1:" + base64.b32encode(hashlib.sha1(body).digest()).decode()
    assert "warc-truncated" not in responses[f"{base}/small"][0]


def test_crawled_pages_read_back_to_their_text_through_a_well_formed_warc(serve, tmp_path):
    rng = random.Random(1)
    texts = ["\n\n".join(prose_paragraphs(rng, 3)) for _ in range(3)]
    zipped = gzip.compress(html_page("Zipped", texts[2]).encode())  # stored decoded, its encoding renamed
    base, _ = serve({"/a": html(texts[0]), "/b": html(texts[1]),
                     "/c": (200, {"Content-Type": "text/html; charset=utf-8", "Content-Encoding": "gzip"}, zipped)})
    out = tmp_path / "warc" / "crawl.warc.gz"
    counts = crawl([f"{base}/a", f"{base}/b", f"{base}/c"], out, user_agent=UA, delay_s=0, progress=False,
                   allow_private=True)
    assert counts == {"fetched": 3, "status_2xx": 3}

    raw = out.read_bytes()
    assert raw.count(b"\x1f\x8b\x08") >= 7  # one gzip member per record: warcinfo + 3 x (request, response)
    recs = records(out)
    assert [h["warc-type"] for h, _ in recs] == ["warcinfo"] + ["request", "response"] * 3
    info_id = recs[0][0]["warc-record-id"]
    assert UA.encode() in recs[0][1]
    ids = [h["warc-record-id"] for h, _ in recs]
    assert len(set(ids)) == len(ids) and all(i.startswith("<urn:uuid:") for i in ids)
    for (req, req_block), (resp, block) in zip(recs[1::2], recs[2::2]):
        assert req["warc-concurrent-to"] == resp["warc-record-id"]
        assert resp["warc-concurrent-to"] == req["warc-record-id"]
        assert req["warc-target-uri"] == resp["warc-target-uri"] and resp["warc-warcinfo-id"] == info_id
        assert resp["content-type"] == "application/http; msgtype=response" and resp["warc-date"].endswith("Z")
        assert int(resp["content-length"]) == len(block) and block.startswith(b"HTTP/1.")
        assert resp["warc-block-digest"] == "sha1:" + base64.b32encode(hashlib.sha1(block).digest()).decode()
        assert req_block.startswith(b"GET /") and f"User-Agent: {UA}".encode() in req_block
    zipped_block = next(b for h, b in recs if h["warc-type"] == "response" and h["warc-target-uri"] == f"{base}/c")
    assert b"X-Crawler-Content-Encoding: gzip" in zipped_block and b"<html>" in zipped_block

    docs, stats = read_back(tmp_path / "warc")
    assert stats["documents_in"] == 3 and stats["skipped_request"] == 3 and stats["skipped_warcinfo"] == 1
    got = {d.id: " ".join(d.text.split()) for d in docs}
    assert sorted(got) == [f"{base}/a", f"{base}/b", f"{base}/c"]
    for url, text in zip(sorted(got), texts):
        assert " ".join(text.split()) in got[url]  # the article, whole
        assert "Copyright 2026" not in got[url]  # the boilerplate, gone


# ----------------------------------------------------------------------------- private addresses (SSRF)

def test_only_public_addresses_pass_the_address_check():
    from lmforge.dataprep.crawl import _is_public_address

    refused = ["127.0.0.1", "127.255.0.9", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
               "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1",
               "fe80::1%1", "fc00::1", "fd12:3456::1", "ff02::1", "ff0e::1", "::ffff:127.0.0.1",
               "::ffff:169.254.169.254", "::ffff:10.0.0.1", "::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1",
               "2001:db8::1"]
    public = ["8.8.8.8", "93.184.215.14", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
              "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
    assert [a for a in refused if _is_public_address(a)] == []
    assert [a for a in public if not _is_public_address(a)] == []


def test_private_addresses_are_refused_without_the_opt_in_robots_txt_included(serve, tmp_path):
    base, log = serve({"/page": html("A page.")})
    port = base.rpartition(":")[2]
    # the same server under other spellings of loopback, then link-local and private addresses (port 9, discard:
    # nothing to reach should the check fail; the metadata address is in the address check's test)
    urls = [f"{base}/page", f"http://localhost:{port}/page", f"http://0x7f000001:{port}/page",
            f"http://[::ffff:127.0.0.1]:{port}/page", "http://169.254.0.1:9/", "http://10.255.255.1:9/",
            "http://[::1]:9/"]
    counts = crawl(urls, tmp_path / "c.warc.gz", user_agent=UA, delay_s=0, timeout_s=2, progress=False)
    assert counts == {"skipped_private_address": len(urls)}
    assert log == []  # not even robots.txt was asked for
    assert [h["warc-type"] for h, _ in records(tmp_path / "c.warc.gz")] == ["warcinfo"]
    opted_in = crawl(urls[:1], tmp_path / "d.warc.gz", user_agent=UA, delay_s=0, progress=False, allow_private=True)
    assert opted_in == {"fetched": 1, "status_2xx": 1} and [p for p, _, _ in log] == ["/robots.txt", "/page"]


@pytest.fixture
def public_loopback_2(monkeypatch):
    """127.0.0.2 counts as a public address (the stand-in for a host on the internet); the rest of loopback,
    127.0.0.1 included, stays private."""
    from lmforge.dataprep import crawl as crawl_module

    check = crawl_module._is_public_address
    monkeypatch.setattr(crawl_module, "_is_public_address", lambda address: address == "127.0.0.2" or check(address))


def test_a_redirect_or_a_robots_txt_redirect_to_a_private_address_is_refused(serve, tmp_path, public_loopback_2):
    inside, inside_log = serve({"/robots.txt": (404, {}, b""), "/secret": html("Internal.")})
    public, public_log = serve({"/robots.txt": (404, {}, b""), "/page": html("Public."),
                                "/away": (302, {"Location": f"{inside}/secret"}, b"")}, host="127.0.0.2")
    robots_away, robots_log = serve({"/robots.txt": (301, {"Location": f"{inside}/robots.txt"}, b""),
                                     "/page": html("Public.")}, host="127.0.0.2")
    urls = [f"{public}/page", f"{public}/away", f"{robots_away}/page"]
    counts = crawl(urls, tmp_path / "c.warc.gz", user_agent=UA, delay_s=0, timeout_s=2, progress=False)
    assert counts == {"fetched": 1, "status_2xx": 1, "skipped_private_address": 2}
    assert inside_log == []
    assert [p for p, _, _ in public_log] == ["/robots.txt", "/page", "/away"]
    assert [p for p, _, _ in robots_log] == ["/robots.txt"]  # its robots.txt could not be read: none of its pages


def test_the_address_checked_is_the_address_connected_to(serve, tmp_path, monkeypatch, public_loopback_2):
    """DNS rebinding: a name answering a public address when it is checked and a private one a moment later
    must not reach the private one (the check and the connection use one lookup)."""
    outside, outside_log = serve({"/robots.txt": (404, {}, b""), "/page": html("Public.")}, host="127.0.0.2")
    port = int(outside.rpartition(":")[2])
    inside, inside_log = serve({"/robots.txt": (404, {}, b""), "/page": html("Internal.")}, port=port)
    real, lookups = socket.getaddrinfo, []

    def rebinding(host, *args, **kwargs):
        if host != "rebind.test":
            return real(host, *args, **kwargs)
        lookups.append("127.0.0.2" if not lookups else "127.0.0.1")  # public once, then the internal address
        return real(lookups[-1], *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    counts = crawl([f"http://rebind.test:{port}/page", f"http://rebind.test:{port}/page?2"], tmp_path / "c.warc.gz",
                   user_agent=UA, delay_s=0, timeout_s=2, progress=False)
    assert inside_log == []  # never connected to the address a later lookup gave
    assert [p for p, _, _ in outside_log][0] == "/robots.txt" and lookups[0] == "127.0.0.2"
    assert buckets(counts) == 2 and set(counts) <= {"fetched", "status_2xx", "skipped_private_address"}


def test_behind_a_proxy_the_target_is_checked_before_the_proxy_is_asked(serve, tmp_path, monkeypatch):
    proxy, proxy_log = serve({})  # logs any request that reaches it
    target = "http://127.0.0.1:9/page"
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy)
    counts = crawl([target], tmp_path / "c.warc.gz", user_agent=UA, delay_s=0, timeout_s=2, progress=False)
    assert counts == {"skipped_private_address": 1} and proxy_log == []
    opted_in = crawl([target], tmp_path / "d.warc.gz", user_agent=UA, delay_s=0, progress=False, allow_private=True)
    assert opted_in["fetched"] == 1 and [p for p, _, _ in proxy_log][0] == "http://127.0.0.1:9/robots.txt"


# ----------------------------------------------------------------------------- compression bombs

@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """200 MB of zeros as gzip and as deflate (zlib), ~200 KB each, compressed a MiB at a time."""
    zeros, out = bytes(1 << 20), {}
    for encoding, wbits in (("gzip", 31), ("deflate", 15)):
        packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
        out[encoding] = b"".join(packer.compress(zeros) for _ in range(200)) + packer.flush()
    return out


def test_a_compression_bomb_stops_at_the_cap_in_a_page_and_a_robots_txt_redirect(serve, tmp_path, bombs):
    def bomb(status: int, encoding: str, **headers) -> tuple[int, dict, bytes]:
        return status, {"Content-Type": "text/html", "Content-Encoding": encoding, **headers}, bombs[encoding]
    base, log = serve({"/robots.txt": bomb(302, "gzip", Location="/robots-2.txt"),  # a hop's body is not read
                       "/robots-2.txt": bomb(200, "deflate"), "/hop": bomb(301, "deflate", Location="/gzip"),
                       "/gzip": bomb(200, "gzip"), "/deflate": bomb(200, "deflate")})
    out, cap = tmp_path / "c.warc.gz", 1 << 20
    tracemalloc.start()
    try:
        counts = crawl([f"{base}/hop", f"{base}/deflate"], out, user_agent=UA, delay_s=0, max_bytes=cap,
                       progress=False, allow_private=True)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counts == {"fetched": 2, "status_2xx": 2, "truncated": 2, "redirected": 1}
    assert [p for p, _, _ in log] == ["/robots.txt", "/robots-2.txt", "/hop", "/gzip", "/deflate"]
    bodies = [block.partition(b"\r\n\r\n")[2] for h, block in records(out) if h["warc-type"] == "response"]
    assert bodies == [bytes(cap)] * 2  # stored decoded, cut at the cap of decoded bytes
    assert peak_bytes < 32 << 20, f"{peak_bytes:,} bytes at the peak for a {cap:,}-byte cap"
