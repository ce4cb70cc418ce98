"""PNG plots and the self-contained HTML report, opened in a real headless Chromium."""

from __future__ import annotations

import copy
import html.parser
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from pytest_infmax.cli import main as cli_main
from pytest_infmax.measure.cost import default_price
from pytest_infmax.measure.verdicts import SLAFailed
from pytest_infmax.reports import plots
from pytest_infmax.reports.html import render_html, write_html_report
from pytest_infmax.reports.markdown import sweep_to_dict
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers.launch import ServerConfig, running_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(not plots.plots_available()[0], reason=plots.plots_available()[1])


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; fails on anything that is not a PNG."""
    assert data[:8] == PNG_MAGIC, "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run with a failed SLA and a 3-point sweep with a frontier SLA, as JSON-ready dicts with records."""
    logs = tmp_path_factory.mktemp("logs")
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "2")), logs) as server:
        one = Infmax(server, name="tests/test_perf.py::test_one<b>")
        result = one.run("1k1k-mini", concurrency=2, num_requests=6)
        with pytest.raises(SLAFailed):  # check() records the verdicts the report shows
            result.check("p99(ttft) < 0.001ms", "p50(interactivity) > 100 tok/s/user")
        sweep = Infmax(server, name="tests/test_perf.py::test_sweep").sweep(
            "1k1k-mini", concurrency=[1, 2, 4], duration=1.2, price=default_price("H100")
        )
    lo, hi = sweep.frontier().x_range
    sweep.check(f"throughput_per_gpu@interactivity={(lo + hi) / 2:.1f} > 1 tok/s")
    return {"results": [result.to_dict()] + [r.to_dict() for r in sweep.results], "sweeps": [sweep_to_dict(sweep)]}


# -- plots ----------------------------------------------------------------------------


@needs_matplotlib
def test_plots_are_written_as_valid_pngs(real: dict[str, Any], tmp_path: Path) -> None:
    paths = plots.write_plots(real["results"], tmp_path, prefix="perf", sweeps=real["sweeps"])
    # the sweep is priced, so its cost frontier is drawn too (InferenceMAX: $/Mtok against interactivity)
    assert sorted(p.name for p in paths) == [
        "perf-cost-frontier.png",
        "perf-frontier.png",
        "perf-latency.png",
        "perf-throughput.png",
    ]
    for p in paths:
        data = p.read_bytes()
        w, h = png_size(data)
        assert w >= 800 and h >= 400, (p.name, w, h)
        assert len(data) > 15_000, f"{p.name} is only {len(data)} bytes: an empty figure?"
    assert not list(tmp_path.glob(".*.tmp"))


@needs_matplotlib
def test_frontier_plot_describes_its_points(real: dict[str, Any]) -> None:
    p = plots.frontier_plot(real["results"], real["sweeps"])
    assert p.png is not None
    assert "1k1k-mini test_sweep: 3 points" in p.alt
    assert "1k1k-mini test_one<b>: 1 points, 1 on the frontier" in p.alt
    cost = plots.frontier_plot(real["results"], real["sweeps"], y="cost_per_mtok")
    # only the priced sweep has a cost; lower is better, so the cheapest points make its frontier
    assert cost.name == "cost-frontier" and cost.png is not None
    assert "1k1k-mini test_sweep: 3 points" in cost.alt and "test_one" not in cost.alt


@needs_matplotlib
def test_plots_without_records_say_why(real: dict[str, Any]) -> None:
    bare = [{k: v for k, v in r.items() if k != "records"} for r in real["results"]]
    drawn = {p.name: p for p in plots.render_plots(bare)}
    assert drawn["frontier"].png is not None  # needs only metrics
    assert drawn["latency"].png is None and "records" in drawn["latency"].reason
    assert drawn["throughput"].png is None and "records" in drawn["throughput"].reason


def test_throughput_series_bins_chunk_tokens_by_hand() -> None:
    result = {
        "measured_window_s": [10.0, 12.5],
        "records": [
            {"warmup": True, "chunk_times": [10.1], "chunk_tokens": [100]},  # warm-up: left out
            {"warmup": False, "error_kind": None, "chunk_times": [10.2, 10.9, 11.5], "chunk_tokens": [1, 3, 2]},
            {"warmup": False, "error_kind": None, "chunk_times": [12.2, 12.4], "chunk_tokens": [4, 4]},
            {"warmup": False, "error_kind": "timeout", "chunk_times": [10.5], "chunk_tokens": [50]},  # failed
        ],
    }
    edges, rates = plots.throughput_series(result, bin_s=1.0)
    assert edges == [0.0, 1.0, 2.0, 2.5]
    # [10, 11): 1 + 3 tokens; [11, 12): 2; [12, 12.5): 8 tokens in half a second.
    assert rates == pytest.approx([4.0, 2.0, 16.0])


def test_without_matplotlib_a_clear_message(monkeypatch: pytest.MonkeyPatch, real: dict[str, Any]) -> None:
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    ok, why = plots.plots_available()
    assert not ok and "pip install 'pytest-infmax[plots]'" in why
    with pytest.raises(plots.PlotsUnavailable, match=r"pip install 'pytest-infmax\[plots\]'"):
        plots.write_plots(real["results"], "unused")
    page = render_html(real["results"])
    assert 'id="plots-unavailable"' in page and "pytest-infmax[plots]" in page
    assert "<img" not in page


# -- the HTML ---------------------------------------------------------------------------


class Outline(html.parser.HTMLParser):
    """Every URL-bearing attribute, the tables (class, rows) and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.tables: list[list[Any]] = []
        self.text: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for k, v in attrs:
            if k in ("src", "href", "srcset", "action", "poster", "data") and v is not None:
                self.urls.append((tag, k, v))
        if tag == "table":
            self.tables.append([dict(attrs).get("class"), 0])
        if tag == "tr" and self.tables:
            self.tables[-1][1] += 1
        if tag == "script":
            self.scripts += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_self_contained_with_tables_and_verdicts(real: dict[str, Any]) -> None:
    page = render_html(
        real["results"],
        real["sweeps"],
        price=default_price("H100"),
        environment={"plugin_version": "9.9", "python": "3.x", "hostname": "ci-gpu-7"},
    )
    outline = Outline()
    outline.feed(page)
    assert outline.scripts == 0
    external = [u for u in outline.urls if not u[2].startswith("data:")]
    assert external == [], f"external references: {external}"
    if plots.plots_available()[0]:
        imgs = [u for u in outline.urls if u[0] == "img"]
        assert len(imgs) == 4 and all(u[2].startswith("data:image/png;base64,") for u in imgs)
    tables = {cls: rows for cls, rows in outline.tables}
    assert tables["results"] == 1 + 4  # header + one row per result
    assert tables["frontier"] == 1 + 3
    assert tables["verdicts"] == 1 + 2
    text = " ".join(outline.text)
    assert "FAILED: 1 failed (1 SLA)" in text
    assert "FAILED p99(ttft) < 0.001 ms" in text
    assert "ci-gpu-7" in text
    assert "SemiAnalysis TCO survey" in text
    # The test name's '<b>' is text, never markup.
    assert "tests/test_perf.py::test_one&lt;b&gt;" in page and "test_one<b>" not in page


def find_chromium() -> tuple[str | None, str]:
    """(a working Chrome/Chromium binary, "") or (None, why not)."""
    explicit = os.environ.get("INFMAX_CHROMIUM")
    names = [explicit] if explicit else ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    found = [p for p in (shutil.which(n) for n in names if n) if p]
    if not found:
        return None, (
            "no headless Chromium: install it (Debian: apt-get install -y chromium; `make test` does "
            "when it can) or set INFMAX_CHROMIUM to a Chrome/Chromium binary"
        )
    try:  # Ubuntu's chromium-browser may be a snap stub that cannot run here
        done = subprocess.run([found[0], "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{found[0]} --version failed: {exc}"
    if done.returncode != 0:
        return None, f"{found[0]} --version failed ({done.returncode}): {(done.stderr or done.stdout)[-300:]}"
    return found[0], ""


CHROMIUM, NO_CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)

# Written into the page after it loaded: what the browser made of each image and table.
PROBE = """<script>
window.addEventListener("load", function () {
  var out = {images: [], tables: {}};
  document.querySelectorAll("img").forEach(function (i) {
    out.images.push({plot: i.dataset.plot, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                     shown_w: i.getBoundingClientRect().width});
  });
  document.querySelectorAll("table").forEach(function (t) {
    out.tables[t.className] = t.querySelectorAll("tbody tr").length;
  });
  out.first_test = document.querySelector("table.results tbody td").textContent;
  out.verdict = document.getElementById("verdict").textContent;
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--hide-scrollbars",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@needs_chromium
@needs_matplotlib
def test_report_in_headless_chromium(real: dict[str, Any], tmp_path: Path) -> None:
    rendered = plots.render_plots(real["results"], real["sweeps"])
    report = write_html_report(tmp_path / "report.html", real["results"], sweeps=real["sweeps"], plots=rendered)
    # The probe is the only change: it may run inline scripts, and still only data: images.
    page = report.read_text(encoding="utf-8")
    page = page.replace("style-src 'unsafe-inline'", "style-src 'unsafe-inline'; script-src 'unsafe-inline'")
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        done = chromium("--dump-dom", probe_page.as_uri(), profile=Path(profile))
    assert done.returncode == 0, done.stderr[-2000:]
    start = done.stdout.index('<pre id="probe">') + len('<pre id="probe">')
    seen = json.loads(html.unescape(done.stdout[start : done.stdout.index("</pre>", start)]))
    expected = {p.name: png_size(p.png) for p in rendered if p.png}
    assert (
        {i["plot"] for i in seen["images"]} == set(expected) == {"frontier", "cost-frontier", "latency", "throughput"}
    )
    for img in seen["images"]:
        assert img["complete"] and (img["w"], img["h"]) == expected[img["plot"]], img
        assert img["shown_w"] > 300, img
    assert seen["tables"]["results"] == 4
    assert seen["tables"]["verdicts"] == 2
    assert seen["tables"]["frontier"] == 3
    assert seen["first_test"] == "tests/test_perf.py::test_one<b>"
    assert seen["verdict"] == "FAILED: 1 failed (1 SLA)"

    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        done = chromium("--window-size=1400,2400", f"--screenshot={shot}", report.as_uri(), profile=Path(profile))
    assert done.returncode == 0, done.stderr[-2000:]
    w, h = png_size(shot.read_bytes())
    assert (w, h) == (1400, 2400) and shot.stat().st_size > 50_000
    keep = os.environ.get("INFMAX_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_report_command_from_a_results_file(
    real: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_infmax.reports.document import results_document

    doc = results_document(real["results"], [])
    doc["sweeps"] = real["sweeps"]
    src = tmp_path / "perf.json"
    src.write_text(json.dumps(doc), encoding="utf-8")
    summary = tmp_path / "step.md"
    summary.write_text("earlier\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert cli_main(["report", str(src), "--plots", "--markdown", "--step-summary"]) == 0
    page = (tmp_path / "perf.html").read_text(encoding="utf-8")
    assert "infmax report: perf.json" in page and 'table class="results"' in page
    md = (tmp_path / "perf.md").read_text(encoding="utf-8")
    assert "### Failed SLAs" in md
    assert summary.read_text(encoding="utf-8") == "earlier\n\n" + md
    if plots.plots_available()[0]:
        assert {p.name for p in tmp_path.glob("perf-*.png")} == {
            "perf-cost-frontier.png",
            "perf-frontier.png",
            "perf-latency.png",
            "perf-throughput.png",
        }
        assert "perf-frontier.png" in md  # the summary points at the artifacts
    assert "wrote" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    assert cli_main(["report", str(bad)]) == 2
    assert "not an --infmax-json document" in capsys.readouterr().err


def test_energy_and_modelled_power_in_the_report(real: dict[str, Any]) -> None:
    r = copy.deepcopy(real["results"][0])
    r["energy"] = {
        "measured": True,
        "modelled": True,
        "source": "modelled: http://127.0.0.1:1/sim/power",
        "energy_j": 10.0,
        "avg_power_w": 700.0,
        "peak_power_w": 720.0,
        "j_per_token": 0.5,
        "j_per_input_token": 1.0,
        "j_per_output_token": 1.0,
        "tokens_per_s_per_mw": 2e6,
        "samples": 9,
        "method": "counter",
        "timeline": [[0.0, 690.0], [0.1, 700.0], [0.2, 720.0]],
    }
    page = render_html([r], plots=False)
    outline = Outline()
    outline.feed(page)
    assert dict((c, n) for c, n in outline.tables)["energy"] == 2
    text = " ".join(outline.text)
    assert "modelled" in text and "2,000,000" in text and "/sim/power" in text
    if plots.plots_available()[0]:
        names = [p.name for p in plots.render_plots([r]) if p.png]
        assert "power" in names


def test_a_run_where_every_request_failed_still_reports(real: dict[str, Any]) -> None:
    from pytest_infmax.measure.metrics import compute_metrics
    from pytest_infmax.records import RequestRecord
    from pytest_infmax.reports.markdown import markdown_summary

    r = copy.deepcopy(real["results"][0])
    for rec in r["records"]:
        rec.update(
            error_kind="connect_error", first_token_time=None, chunk_times=[], chunk_tokens=[], output_tokens=None
        )
    r["metrics"] = compute_metrics([RequestRecord.from_dict(x) for x in r["records"]]).to_dict()
    md = markdown_summary([r])
    assert "| 0/6 ok | n/a | n/a | n/a | n/a | 0 | 100.0% (6 connect_error) | ❌ FAIL (SLA) |" in md
    page = render_html([r], plots=plots.render_plots([r]) if plots.plots_available()[0] else False)
    assert "100.0% (6 connect_error)" in page
    if plots.plots_available()[0]:
        assert "<img" not in page and "no successful measured request to draw" in page
