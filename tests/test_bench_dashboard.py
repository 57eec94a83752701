"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium driven by the playwright package; no
browser download): it lists the runs and draws dense-vs-compressed charts of a finished real run, offline.

Uses the service and the finished run of test_bench_server.py (shared session fixtures: one export, one run).
Set A3_BENCH_SCREENSHOTS=DIR to keep the screenshots.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if os.environ.get("A3_SERVE_SKIP_CHROMIUM") == "1":
    pytest.skip("A3_SERVE_SKIP_CHROMIUM=1: dashboard browser test skipped on purpose", allow_module_level=True)
# no silent skip otherwise: scripts/setup.sh installs Debian's chromium and the playwright package (test extra)
from playwright import sync_api  # noqa: E402

from test_bench_server import TOKEN, bench_models, bench_server, finished_run  # noqa: E402,F401  (shared fixtures)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
# the metrics the page charts, in its groups (dashboard.py GROUPS)
CHARTED = {"output_tokens_per_s", "total_tokens_per_s", "requests_per_s", "ttft_ms_median", "tpot_ms_median",
           "itl_ms_median", "elapsed_s", "peak_rss_bytes", "kv_cache_tokens", "max_concurrency", "weight_bytes",
           "kv_bytes_per_token", "peak_gpu_bytes", "perplexity", "running_saturated_mean", "running_max",
           "saturated_output_tokens_per_s", "preemptions"}
DENSE_RGB, COMPRESSED_RGB = (0x8C, 0x8C, 0x8C), (0x1F, 0x77, 0xB4)

READ_CHARTS = """els => els.map(e => ({
  metric: e.dataset.metric, dense: +e.dataset.dense, compressed: +e.dataset.compressed, ratio: +e.dataset.ratio,
  group: e.parentElement.dataset.group, title: e.querySelector('text.title').textContent,
  ratioText: (e.querySelector('text.ratio') || {}).textContent || '',
  bars: [...e.querySelectorAll('rect.bar')].map(b => ({model: b.dataset.model, value: +b.dataset.value,
        height: b.getBBox().height, width: b.getBBox().width})),
  box: (r => ({w: r.width, h: r.height}))(e.getBoundingClientRect())}))"""


def _pixels_near(img, rgb, tol=12) -> int:
    import numpy as np

    px = np.asarray(img.convert("RGB"), dtype=np.int16)
    return int((np.abs(px - np.array(rgb, dtype=np.int16)) <= tol).all(axis=-1).sum())


# bench_server and finished_run are the shared fixtures imported from test_bench_server, hence F811
def test_dashboard_draws_the_charts_of_a_finished_run(bench_server, finished_run, tmp_path):  # noqa: F811
    from PIL import Image

    run, res = finished_run, finished_run["results"]
    url = bench_server.url
    external, errors = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)

            def only_local(route):  # the page must not need anything from outside (no CDN: the machine is offline)
                if route.request.url.startswith(url):
                    route.continue_()
                else:
                    external.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(f"{url}/")  # no token yet: the page says how to get in
            assert "needs its token" in page.content()
            page.goto(f"{url}/?token={TOKEN}")  # sets the cookie, redirects to /
            errors.clear()  # the 401 above is logged by the browser; from here on nothing may fail
            page.goto(f"{url}/#run={run['id']}")
            page.wait_for_selector(f'#charts[data-state="drawn"][data-run="{run["id"]}"]', timeout=60_000)
            charts = page.eval_on_selector_all("svg.chart", READ_CHARTS)
            rows = page.eval_on_selector_all("#runs tbody tr", "rs => rs.map(r => ({id: r.dataset.run, "
                                             "status: r.dataset.status, text: r.innerText}))")
            table = page.eval_on_selector_all("#metrics-table tbody tr", "rs => rs.map(r => r.dataset.metric)")
            chart_png = tmp_path / "charts.png"
            page.locator("#charts").screenshot(path=str(chart_png))
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    if os.environ.get("A3_BENCH_SCREENSHOTS"):
        keep = Path(os.environ["A3_BENCH_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("charts.png", "dashboard.png"):
            shutil.copy(tmp_path / name, keep / name)
    assert not errors, errors
    assert not external, external

    # the run list: the finished run (and the crashed one, with its reason, when this service ran it)
    by_id = {r["id"]: r for r in rows}
    assert by_id[run["id"]]["status"] == "succeeded"
    crash = getattr(bench_server, "runs", {}).get("crash")
    if crash in by_id:
        assert by_id[crash]["status"] == "failed" and "SafetensorError" in by_id[crash]["text"]

    # one chart per charted metric both models measured, carrying the report's numbers
    d, c = res["models"]["dense"]["median"], res["models"]["compressed"]["median"]
    expected = {k for k in CHARTED if k in d and k in c}
    assert {"output_tokens_per_s", "kv_cache_tokens", "peak_rss_bytes", "elapsed_s"} <= expected
    drawn = {ch["metric"]: ch for ch in charts}
    assert set(drawn) == expected, (set(drawn), expected)
    assert {ch["group"] for ch in charts} >= {"throughput", "latency", "memory"}
    for key, ch in drawn.items():
        assert ch["dense"] == pytest.approx(d[key], rel=1e-9) and ch["compressed"] == pytest.approx(c[key], rel=1e-9)
        assert ch["ratio"] == pytest.approx(res["ratios"][key], rel=1e-9)
        assert f"{res['ratios'][key]:.2f}x" in ch["ratioText"]
        assert ch["box"]["w"] > 100 and ch["box"]["h"] > 100
        bars = {b["model"]: b for b in ch["bars"]}
        assert set(bars) == {"dense", "compressed"}
        for name, value in (("dense", d[key]), ("compressed", c[key])):
            assert bars[name]["height"] > 0 and bars[name]["width"] > 0 and bars[name]["value"] == pytest.approx(value)
        if min(bars["dense"]["height"], bars["compressed"]["height"]) > 3:  # heights are to scale
            assert bars["compressed"]["height"] / bars["dense"]["height"] == pytest.approx(c[key] / d[key], rel=0.03)
    assert set(table) == {m["key"] for m in res["metrics"]}

    # and they are really painted: the screenshot of the chart area holds both bar colours in quantity
    img = Image.open(chart_png).convert("RGB")
    w, h = img.size
    assert w > 400 and h > 300
    assert _pixels_near(img, DENSE_RGB) > 2000 and _pixels_near(img, COMPRESSED_RGB) > 2000
    background = _pixels_near(img, (255, 255, 255), tol=3) + _pixels_near(img, (0xF7, 0xF8, 0xFA), tol=3)
    assert background < 0.95 * w * h
