"""The HTML report: its parts parsed, plots present, and the page rendered in a headless browser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import slimfx
from slimfx.cli import main
from slimfx.report.html import compile_html, report_html
from tests.digits import calibration, split, trained_cnn

pytest.importorskip("matplotlib")
INPUT = torch.zeros(1, 1, 8, 8)


class Page(HTMLParser):
    """What the tests look for: element ids, table rows per table, svg count, scripts, headers."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.rows: dict[str, int] = {}
        self.headers: dict[str, list[str]] = {}
        self.svgs = self.scripts = 0
        self._table: str | None = None
        self._in_th = self._in_tbody = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids.add(str(attributes["id"]))
        if tag == "table":
            self._table = str(attributes.get("id") or f"table-{len(self.rows)}")
            self.rows[self._table], self.headers[self._table] = 0, []
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody and self._table is not None:
            self.rows[self._table] += 1
        elif tag == "th":
            self._in_th = True
        elif tag == "svg":
            self.svgs += 1
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_tbody = False
        elif tag == "th":
            self._in_th = False

    def handle_data(self, data: str) -> None:
        if self._in_th and self._table is not None:
            self.headers[self._table].append(data)


@pytest.fixture(scope="module")
def compiled() -> slimfx.CompileResult:
    return slimfx.compile(
        trained_cnn(),
        INPUT,
        "prune-channels:ratio=0.5,fold-bn",
        runtime="onnxruntime",
        eval_data=[split()["test"]],
        latency_repeats=2,
        layer_timing=2,
    )


def test_compile_page_has_every_part(compiled: slimfx.CompileResult) -> None:
    page = Page(compile_html(compiled.report))
    assert {"nodes", "nodes-before", "runtimes", "plot-runtimes", "plot-before-after", "plot-share"} <= page.ids
    assert page.rows["nodes"] == len(compiled.report.after.nodes)
    assert page.rows["nodes-before"] == len(compiled.report.before.nodes)
    assert page.rows["runtimes"] == 2  # the original in onnxruntime, the compiled model in onnxruntime
    assert "accuracy" in page.headers["runtimes"] and "measured ms" in page.headers["nodes"]
    assert page.svgs >= 3 and page.scripts == 1


def test_timed_report_carries_latency_per_node(compiled: slimfx.CompileResult) -> None:
    report = compiled.report.before
    assert report.timing is not None and "node by node" in report.timing
    timed = [row for row in report.nodes if row.latency_ms is not None]
    assert len(timed) == len(report.nodes) and all(row.latency_ms >= 0 for row in timed)
    assert report.latency_ms == pytest.approx(sum(row.latency_ms for row in timed))
    data = report.to_dict()
    assert data["totals"]["latency_ms"] == report.latency_ms and data["nodes"][1]["latency_ms"] is not None


def test_a_quantized_graph_has_no_eager_layer_times() -> None:
    result = slimfx.compile(trained_cnn(), INPUT, "fold-bn,quantize", calib_data=calibration(), layer_timing=2)
    assert result.report.before.timing is not None
    assert result.report.after.timing is None  # its eager time would be a float simulation


def test_early_exit_page_plots_the_exits() -> None:
    x_test = split()["test"][0]
    result = slimfx.compile(trained_cnn(), x_test[:2], "add-exits:exits=2", calib_data=calibration())
    assert "plot-exits" in Page(compile_html(result.report)).ids


def test_report_page_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = slimfx.analyze(trained_cnn(), INPUT, layer_timing=2)
    page = Page(report_html(report))
    assert "plot-share" in page.ids and page.rows["nodes"] == len(report.nodes)
    out = tmp_path / "r.html"
    code = main(["report", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--html", str(out), "--top", "3"])
    assert code == 0 and out.is_file() and "share of time" in out.read_text()


def test_missing_matplotlib_is_one_line_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    out = tmp_path / "r.html"
    code = main(["report", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--html", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and '.[plot]"' in err and not out.exists()


def test_page_renders_in_headless_chromium(compiled: slimfx.CompileResult, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("SLIMFX_REQUIRE_BROWSER"):
            pytest.fail("CI needs chromium for this test (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed")
    page = tmp_path / "page.html"
    page.write_text(compile_html(compiled.report))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1400"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    body = dom.stdout[dom.stdout.index("<body") :].split(">", 1)[0]
    assert 'data-ready="yes"' in body and "data-script-error" not in body, body
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50  # text, tables and plots, not a blank page
