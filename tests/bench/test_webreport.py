"""asv's web report offline (moebench.bench.webreport): the assets come from an npm registry
checked against their pins, the page's CDN tags point at vendor/ copies, and the report
built from the committed results opens in headless Chromium with no host but 127.0.0.1,
where asv's own page shows only the swallow error."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import asv
import pytest

from moebench import cli
from moebench.bench import webreport
from moebench.bench.asv import config_under
from moebench.bench.webreport import Asset, AssetError

ROOT = Path(__file__).resolve().parents[2]
ASV_WWW = Path(asv.__file__).parent / "www"
SWALLOW = "Can not determine continental origin of swallow"

# --- a fake npm registry on 127.0.0.1 ---------------------------------------------------

JS, CSS = b"window.fakelib = 1;\n", b"body { color: black }\n"
FAKE = (
    Asset("https://cdn.example/fakelib.min.js", "fakelib", "1.0.0", "dist/fakelib.min.js",
          hashlib.sha256(JS).hexdigest()),
    Asset("https://cdn.example/fakelib.css", "fakelib", "1.0.0", "dist/fakelib.css",
          hashlib.sha256(CSS).hexdigest()),
)  # fmt: skip


def tgz(files: dict[str, bytes]) -> bytes:
    """An npm tarball: the files under package/."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """The folder an npm registry on 127.0.0.1 serves (<pkg>/-/<pkg>-<version>.tgz), with
    fakelib 1.0.0 in it; ASSETS is FAKE and the cache is tmp_path/cache meanwhile."""
    folder = tmp_path / "registry"
    (folder / "fakelib" / "-").mkdir(parents=True)
    tarball = folder / "fakelib" / "-" / "fakelib-1.0.0.tgz"
    tarball.write_bytes(tgz({"dist/fakelib.min.js": JS, "dist/fakelib.css": CSS}))
    monkeypatch.setattr(webreport, "ASSETS", FAKE)
    monkeypatch.setenv("MOEBENCH_ASSETS", str(tmp_path / "cache"))
    with webreport.serve(folder) as url:
        monkeypatch.setenv("npm_config_registry", url)
        yield tarball


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_fetch_downloads_checks_and_keeps_the_assets(registry, tmp_path):
    folder = webreport.fetch_assets()
    assert folder == tmp_path / "cache"
    assert files(folder) == ["fakelib@1.0.0/dist/fakelib.css", "fakelib@1.0.0/dist/fakelib.min.js"]
    assert (folder / FAKE[0].path).read_bytes() == JS
    # Kept: with the registry gone, the cache alone answers.
    registry.unlink()
    assert webreport.fetch_assets() == folder


def test_a_damaged_cached_file_is_fetched_again(registry):
    folder = webreport.fetch_assets()
    (folder / FAKE[1].path).write_bytes(b"truncated")
    webreport.fetch_assets()
    assert (folder / FAKE[1].path).read_bytes() == CSS


def test_a_file_that_is_not_the_pinned_one_is_refused_and_not_stored(registry, tmp_path):
    registry.write_bytes(tgz({"dist/fakelib.min.js": b"evil()", "dist/fakelib.css": CSS}))
    with pytest.raises(AssetError) as err:
        webreport.fetch_assets()
    message = str(err.value)
    assert FAKE[0].path in message and "fakelib-1.0.0.tgz" in message
    assert "MOEBENCH_ASSETS" in message
    cache = tmp_path / "cache"
    assert not cache.exists() or files(cache) == []  # no temporary file left either


def test_a_failed_download_names_the_url_and_the_way_out(registry, monkeypatch):
    registry.unlink()
    with pytest.raises(AssetError, match=r"fakelib/-/fakelib-1\.0\.0\.tgz.*MOEBENCH_ASSETS"):
        webreport.fetch_assets()


def test_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MOEBENCH_ASSETS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert webreport.cache_dir() == tmp_path / "xdg" / "moebench" / "asv-assets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert webreport.cache_dir() == Path.home() / ".cache" / "moebench" / "asv-assets"
    monkeypatch.setenv("MOEBENCH_ASSETS", str(tmp_path / "copied"))
    assert webreport.cache_dir() == tmp_path / "copied"
    assert webreport.cache_dir(tmp_path / "given") == tmp_path / "given"


PAGE = """<html><head>
<script src="https://cdn.example/fakelib.min.js" integrity="sha256-x" crossorigin="anonymous" \
referrerpolicy="no-referrer" onerror="js_load_failure()"></script>
<link rel="stylesheet" href='https://cdn.example/fakelib.css' integrity="sha256-y" crossorigin>
<script src="asv.js"></script>
</head><body><a href="https://github.com/airspeed-velocity/asv/">asv</a></body></html>
"""
LOCAL = """<html><head>
<script src="vendor/fakelib@1.0.0/dist/fakelib.min.js" onerror="js_load_failure()"></script>
<link rel="stylesheet" href="vendor/fakelib@1.0.0/dist/fakelib.css">
<script src="asv.js"></script>
</head><body><a href="https://github.com/airspeed-velocity/asv/">asv</a></body></html>
"""


def test_localize_points_the_tags_at_vendor_and_runs_twice(registry, tmp_path):
    html = tmp_path / "html"
    (html / "sub").mkdir(parents=True)
    (html / "index.html").write_text(PAGE)
    (html / "sub" / "page.html").write_text(PAGE.replace('src="asv.js"', 'src="../asv.js"'))
    copies = webreport.localize(html)
    assert copies == [html / "vendor" / a.path for a in FAKE]
    assert [p.read_bytes() for p in copies] == [JS, CSS]
    assert (html / "index.html").read_text() == LOCAL
    deeper = LOCAL.replace("vendor/", "../vendor/").replace('"asv.js"', '"../asv.js"')
    assert (html / "sub" / "page.html").read_text() == deeper  # vendor/ relative to each page
    before = {p: p.read_bytes() for p in html.rglob("*") if p.is_file()}
    assert webreport.localize(html) == copies
    assert {p: p.read_bytes() for p in html.rglob("*") if p.is_file()} == before


def test_localize_refuses_a_cdn_url_it_does_not_know(registry, tmp_path):
    html = tmp_path / "html"
    html.mkdir()
    page = PAGE.replace("fakelib.min.js", "newlib.min.js")
    (html / "index.html").write_text(page)
    with pytest.raises(AssetError, match=r"https://cdn\.example/newlib\.min\.js.*ASSETS"):
        webreport.localize(html)
    assert (html / "index.html").read_text() == page  # nothing half done
    assert not (html / "vendor").exists()


def test_localize_wants_a_published_report(tmp_path):
    with pytest.raises(FileNotFoundError, match="asv publish"):
        webreport.localize(tmp_path)


def test_the_table_covers_what_asv_loads_and_pins_its_files():
    """Every remote URL of asv's pages is in ASSETS and nothing else is; where asv's integrity
    attribute is a sha256 the pinned file is the very file asv loads."""
    loaded = {}
    for page in ASV_WWW.rglob("*.html"):
        for tag in re.findall(r"<(?:script|link|img)\b[^>]*>", page.read_text()):
            url = re.search(r"""\s(?:src|href)=["']((?:https?:)?//[^"']+)""", tag)
            if url:
                integrity = re.search(r'integrity="([^"]*)"', tag)
                loaded[url[1]] = integrity[1] if integrity else None
    assert set(loaded) == {a.url for a in webreport.ASSETS}
    assert len({a.path for a in webreport.ASSETS}) == len(webreport.ASSETS)
    same = [
        a.package
        for a in webreport.ASSETS
        if loaded[a.url] == "sha256-" + base64.b64encode(bytes.fromhex(a.sha256)).decode()
    ]
    assert same == ["jquery", "flot-orderbars", "bootstrap", "bootstrap"]


# --- the real report, in Chromium -------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    if not Path(webreport.CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"no {webreport.CHROMIUM} in CI: apt-get install -y chromium")
        pytest.skip(f"no {webreport.CHROMIUM} (Debian: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def report(tmp_path_factory, chromium):
    """asv's report of the committed results (results/asv): as asv publishes it (the first
    folder), and as `moebench report --html` (`nox -s report`) does (the second). Assets
    come from the usual cache (see cache_dir)."""
    tmp = tmp_path_factory.mktemp("report")
    shutil.copytree(ROOT / "results" / "asv", tmp / "asv")
    config = config_under(ROOT / "asv.conf.json", tmp)
    cmd = [sys.executable, "-m", "asv", "publish", "--config", str(config)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)  # asv loads the plugin here
    shutil.copytree(tmp / "html", tmp / "as-published")
    shutil.rmtree(tmp / "html")
    args = ["--results-dir", str(tmp / "no runs"), "--html", "--asv-config", str(config)]
    assert cli.main(["report", *args]) == 0
    return tmp / "as-published", tmp / "html"


def names() -> list[str]:
    """The benchmarks of the committed results."""
    table = json.loads((ROOT / "results" / "asv" / "benchmarks.json").read_text())
    return [name for name in table if name != "version"]


def test_asv_as_published_shows_only_the_swallow_offline(report):
    dom = webreport.dump_dom(report[0])
    assert SWALLOW in dom
    assert "benchmark-container" not in dom


def test_the_summary_grid_shows_every_benchmark_with_plots(report):
    dom = webreport.dump_dom(report[1])
    assert SWALLOW not in dom
    shown = re.findall(r'<a class="btn benchmark-container" href="#([^"]+)"', dom)
    assert sorted(shown) == sorted(names())
    # flot draws each thumbnail in view (summarygrid.js plots on scroll into view).
    assert dom.count('<canvas class="flot-base"') >= 4


def test_a_benchmark_graph_plots_its_series(report):
    name = "families.IsoParams.track_time_ms"
    assert name in names()
    dom = webreport.dump_dom(report[1], name)
    assert SWALLOW not in dom
    assert '<canvas class="flot-base"' in dom
    ticks = re.findall(r'class="flot-tick-label[^"]*"[^>]*>([^<]+)<', dom)
    assert len([t for t in ticks if re.fullmatch(r"[\d.]+", t)]) >= 3  # the y axis, in ms
    assert re.search(r'class="legendLabel">impl-naive; point-E=\d+; skew-balanced<', dom)


def test_the_benchmark_list_is_sorted_by_stupidtable(report):
    """npm's stupid-table-plugin 1.1.3 stands in for 1.0.1: asv's list sorts with it."""
    dom = webreport.dump_dom(report[1], "summarylist?sort=1&dir=desc")
    assert SWALLOW not in dom
    heads = re.findall(r"<th data-sort=\"\w+\"(?: class=\"([^\"]*)\")?>", dom)
    assert "desc" in heads[1].split()  # set by asv's handler of stupidtable's aftertablesort
    values = [float(v) for v in re.findall(r'<td class="value" data-sort-value="([^"]+)"', dom)]
    assert len(values) > 100
    assert values == sorted(values, reverse=True)


def test_a_screenshot_of_the_report(report, tmp_path):
    png = webreport.screenshot(report[1], tmp_path / "grid.png", size=(640, 480))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (640, 480)
