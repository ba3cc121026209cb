"""asv's web report, offline: the scripts and the stylesheet that its index.html loads from
CDNs, kept beside it.

asv 0.6 loads jQuery, flot and four other libraries from CDNs; without them (an air-gapped
GPU runner, a report opened on a plane) the page shows only "Can not determine continental
origin of swallow". ASSETS lists each URL with the npm package file that serves it, pinned
by sha256. fetch_assets() keeps those files in a cache folder, from the npm registry (the one
registry every machine of the project reaches); localize() copies them into the report's
vendor/ folder and points the page's tags there. The report is still read over HTTP (serve(),
`python -m http.server -d results/html`, `asv preview`): its own scripts fetch its JSON,
which browsers refuse under file://. dump_dom() and screenshot() open a report in headless
Chromium with every host but 127.0.0.1 unresolvable, as an offline reader would.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import os
import re
import subprocess
import tarfile
import tempfile
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .runs import write_atomic

REGISTRY = "https://registry.npmjs.org/"


@dataclass(frozen=True)
class Asset:
    url: str  # as asv's index.html spells it
    package: str  # on npm
    version: str
    file: str  # inside the package (npm's tarballs put it under package/)
    sha256: str  # of that file, pinned when it was first checked by hand

    @property
    def path(self) -> str:
        """Where it lives in the cache and under vendor/: npm's own layout, so two versions
        or two packages never share a name, and bootstrap's CSS finds ../fonts as on npm."""
        return f"{self.package}@{self.version}/{self.file}"

    def tarball(self, registry: str) -> str:
        return f"{registry.rstrip('/')}/{self.package}/-/{self.package}-{self.version}.tgz"


_CDNJS = "https://cdnjs.cloudflare.com/ajax/libs"
_JSDELIVR = "https://cdn.jsdelivr.net/npm"
# asv 0.6.6's www/index.html. The files of jquery, flot-orderbars, blueimp-md5 and bootstrap
# are byte for byte the ones asv loads: their sha256 matches the page's integrity attribute.
# npm's flot 0.8.3 ships no .min.js: the unminified files of the same release stand in for
# cdnjs's minified ones. npm has no stupid-table-plugin 1.0.1, only 1.1.3: the same plugin,
# whose stupidtable(sortFns) and stupidsort(direction), all that asv calls, are unchanged.
ASSETS = (
    Asset(
        "https://code.jquery.com/jquery-3.3.1.min.js",
        "jquery", "3.3.1", "dist/jquery.min.js",
        "160a426ff2894252cd7cebbdd6d6b7da8fcd319c65b70468f10b6690c45d02ef",
    ),
    Asset(
        f"{_CDNJS}/flot/0.8.3/jquery.flot.min.js",
        "flot", "0.8.3", "jquery.flot.js",
        "b7b931f273c38b1277b9c6c1f4e05c4ec09885a487bddaf3279e2d7e49a38e12",
    ),
    Asset(
        f"{_CDNJS}/flot/0.8.3/jquery.flot.time.min.js",
        "flot", "0.8.3", "jquery.flot.time.js",
        "a582c832adc7138a6b05aaf61f16ebac274701f1be4afea77e739a1c34b9c41a",
    ),
    Asset(
        f"{_CDNJS}/flot/0.8.3/jquery.flot.selection.min.js",
        "flot", "0.8.3", "jquery.flot.selection.js",
        "e6c85f6c1ebe4b4da29d8ae238c7c5060283f05f7ef054f6b91817d02c092918",
    ),
    Asset(
        f"{_CDNJS}/flot/0.8.3/jquery.flot.categories.min.js",
        "flot", "0.8.3", "jquery.flot.categories.js",
        "6e81664b28ea795c734906f4aa15614640a75ac7fbd399a7fb9084040698351a",
    ),
    Asset(
        f"{_JSDELIVR}/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js",
        "flot-orderbars", "1.0.0", "js/jquery.flot.orderBars.js",
        "39735b4f46f96ff4e082572401f47c55a2767b366fd1d1e821e44a8d830a12bf",
    ),
    Asset(
        f"{_CDNJS}/stupidtable/1.0.1/stupidtable.min.js",
        "stupid-table-plugin", "1.1.3", "stupidtable.min.js",
        "4642380f28ebe9ed7cac251793b281ef8620c4386205d92788f9b12f5cceb4e0",
    ),
    Asset(
        f"{_CDNJS}/blueimp-md5/2.19.0/js/md5.min.js",
        "blueimp-md5", "2.19.0", "js/md5.min.js",
        "64d7ded388c562e4bde9e58ce205e5fa01b9734fcd434d496eb7b4fbfe9b927d",
    ),
    Asset(
        f"{_JSDELIVR}/bootstrap@3.1.1/dist/js/bootstrap.min.js",
        "bootstrap", "3.1.1", "dist/js/bootstrap.min.js",
        "898d05a17f2cfc5120ddcdba47a885c378c0b466f30f0700e502757e24b403a1",
    ),
    Asset(
        f"{_JSDELIVR}/bootstrap@3.1.1/dist/css/bootstrap.min.css",
        "bootstrap", "3.1.1", "dist/css/bootstrap.min.css",
        "e9503448692b738dd260fbd7f7cabf2e11f09b600fa97e6eb3a56eba5b1a7e9b",
    ),
)  # fmt: skip


class AssetError(RuntimeError):
    """An asset could not be had, or is not the pinned file, or a page loads one that
    ASSETS does not list."""


def cache_dir(cache=None) -> Path:
    """`cache`, else $MOEBENCH_ASSETS (a folder copied onto an air-gapped machine), else
    moebench/asv-assets under $XDG_CACHE_HOME or ~/.cache."""
    if cache is None:
        cache = os.environ.get("MOEBENCH_ASSETS")
    if not cache:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        cache = Path(base, "moebench", "asv-assets")
    return Path(cache)


def _matches(asset: Asset, data: bytes) -> bool:
    return hashlib.sha256(data).hexdigest() == asset.sha256


def _store(asset: Asset, data: bytes, folder: Path, source: str) -> Path:
    """data into folder/asset.path, only if it is the pinned file: a half-written or wrong
    file is never left where the next run would take it for the real one."""
    if not _matches(asset, data):
        raise AssetError(
            f"{asset.path} from {source} has sha256 {hashlib.sha256(data).hexdigest()}, "
            f"not the pinned {asset.sha256}: nothing stored. Check that the registry serves "
            f"the real {asset.package} {asset.version}, or copy a checked folder of assets "
            "from a machine that has one and set MOEBENCH_ASSETS to it."
        )
    out = folder / asset.path
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, lambda f: f.write(data))


def _download(url: str, asset: Asset, folder: Path) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except OSError as e:  # URLError and HTTPError are OSErrors, as are timeouts
        raise AssetError(
            f"{asset.path} is not in {folder} and cannot be downloaded from {url} ({e}). "
            "Offline, copy that folder from a machine where fetch_assets() filled it (or a "
            "report's vendor/ folder) and set MOEBENCH_ASSETS to the copy; or set "
            "npm_config_registry to an npm registry this machine reaches."
        ) from e


def fetch_assets(cache=None) -> Path:
    """Every asset of ASSETS in the cache folder (see cache_dir), each checked against its
    sha256; missing or damaged ones come from the npm registry ($npm_config_registry, else
    registry.npmjs.org). Returns the folder. Raises AssetError naming the asset, the URL and
    what to do when one cannot be had."""
    folder = cache_dir(cache)
    # npm's own lower-case spelling, which npm sets for the scripts it runs.
    registry = os.environ.get("npm_config_registry") or REGISTRY  # noqa: SIM112
    tarballs: dict[str, bytes] = {}  # flot and bootstrap serve several assets: one download
    for asset in ASSETS:
        cached = folder / asset.path
        if cached.is_file() and _matches(asset, cached.read_bytes()):
            continue
        url = asset.tarball(registry)
        if url not in tarballs:
            tarballs[url] = _download(url, asset, folder)
        _store(asset, _member(tarballs[url], asset, url), folder, url)
    return folder


def _member(tgz: bytes, asset: Asset, url: str) -> bytes:
    """asset.file out of an npm tarball, read in memory: nothing of the tarball is written
    to disk, so its paths cannot point outside the cache. npm puts a package's files under
    one top folder, nearly always package/."""
    try:
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
            for info in tar:
                if info.isfile() and info.name.split("/", 1)[-1] == asset.file:
                    return tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise AssetError(f"{url} is not a readable npm tarball ({e})") from e
    raise AssetError(f"{url} has no {asset.file}: is ASSETS' entry for {asset.url} right?")


# A tag that loads something, and one attribute in it (a quoted value is taken whole).
_TAG = re.compile(r"""<(?:script|link|img)\b(?:[^>"']|"[^"]*"|'[^']*')*>""", re.IGNORECASE)
_ATTR = re.compile(r"""\s+([^\s=>/"']+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s"'>]+))?""")
_REMOTE = re.compile(r"(?:https?:)?//", re.IGNORECASE)
# Our sha256 stands in for integrity; crossorigin would refuse the file under file://.
_DROP = {"integrity", "crossorigin", "referrerpolicy"}


def _rewrite(page: Path, vendor: Path, by_url: dict[str, Asset]) -> str:
    """The page with each tag that loads from a CDN pointing at vendor/ instead."""
    prefix = Path(os.path.relpath(vendor, page.parent)).as_posix()

    def tag(match: re.Match) -> str:
        attrs = {m[1].lower(): m for m in _ATTR.finditer(match[0])}
        load = attrs.get("src") or attrs.get("href")
        url = load[2].strip("\"'") if load and load[2] else ""
        if not _REMOTE.match(url):  # a file of the report, or one localized already
            return match[0]
        if url not in by_url:
            raise AssetError(
                f"{page} loads {url}, which moebench.bench.webreport.ASSETS does not list "
                "(a newer asv?): add its npm package, version, file and sha256 there."
            )

        def attr(m: re.Match) -> str:
            if m[1].lower() in _DROP:
                return ""
            if m.span() == load.span():
                return f'{m[0][: m.start(2) - m.start()]}"{prefix}/{by_url[url].path}"'
            return m[0]

        return _ATTR.sub(attr, match[0])

    return _TAG.sub(tag, page.read_text(encoding="utf-8"))


def localize(html_dir, cache=None) -> list[Path]:
    """asv's web report in html_dir made to open offline: the assets (fetch_assets) copied
    into html_dir/vendor/, checked again, and every HTML page's CDN tags pointing there,
    without their integrity, crossorigin and referrerpolicy attributes. Running it again
    changes nothing. Returns the copies under vendor/. Raises FileNotFoundError without an
    index.html, AssetError for a CDN URL that ASSETS does not list (nothing is rewritten
    then) or an asset that cannot be had."""
    html_dir = Path(html_dir)
    if not (html_dir / "index.html").is_file():
        raise FileNotFoundError(f"no index.html in {html_dir}: run `asv publish` first")
    vendor = html_dir / "vendor"
    by_url = {asset.url: asset for asset in ASSETS}
    # Every page rewritten in memory first: an unknown URL stops before anything changes.
    pages = {}
    for page in sorted(html_dir.rglob("*.html")):
        if vendor not in page.parents:
            pages[page] = _rewrite(page, vendor, by_url)
    folder = fetch_assets(cache)
    copies = [_store(a, (folder / a.path).read_bytes(), vendor, str(folder)) for a in ASSETS]
    for page, text in pages.items():
        if text != page.read_text(encoding="utf-8"):
            write_atomic(page, lambda f, text=text: f.write(text.encode("utf-8")))
    return copies


# Headless Chromium as an offline reader: no host but 127.0.0.1 resolves (so the test of a
# localized report means the same on a machine with internet), and no background traffic.
CHROMIUM = "/usr/bin/chromium"  # Debian's package `chromium`
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # Chromium will not start as root (CI) with its sandbox
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # one line a file on stderr otherwise
        pass


@contextlib.contextmanager
def serve(html_dir):
    """html_dir over HTTP on 127.0.0.1 (asv's page reads its JSON with XHR, which Chromium
    refuses under file://), on a free port, in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(html_dir))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        # A short poll: shutdown() waits for it, 0.5 s by default.
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            thread.join()


def _chromium(html_dir, page: str, args: list[str], budget_ms: int, timeout: float) -> str:
    """Chromium's stdout for index.html#page of html_dir, after budget_ms of virtual time
    (it runs ahead of the clock while the page is idle: XHRs and timers settle in it)."""
    with serve(html_dir) as base, tempfile.TemporaryDirectory() as profile:
        url = base + "index.html" + (f"#{page}" if page else "")
        cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               f"--virtual-time-budget={budget_ms}", *args, url]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(html_dir, page: str = "", budget_ms: int = 10_000, timeout: float = 60) -> str:
    """The DOM of the report in html_dir, at asv's page `page` (the URL's hash: "" the
    summary grid, a benchmark's name its graph), once its scripts have run."""
    return _chromium(html_dir, page, ["--dump-dom"], budget_ms, timeout)


def screenshot(
    html_dir,
    out_png,
    page: str = "",
    size: tuple[int, int] = (1280, 900),
    budget_ms: int = 10_000,
    timeout: float = 60,
) -> Path:
    """A PNG of the report in html_dir at asv's page `page` (see dump_dom). Returns it."""
    out_png = Path(out_png).resolve()
    args = [f"--screenshot={out_png}", f"--window-size={size[0]},{size[1]}"]
    _chromium(html_dir, page, args, budget_ms, timeout)
    return out_png
