"""What following a live run costs the browser: charts redrawn in place against rebuilt.

The Train page follows a running run by redrawing its five charts every second. With
``app.plot`` each chart is one element redrawn in place (Plotly.react); with Streamlit's own
``st.plotly_chart`` (what ``app.plot`` falls back to when static serving is off) every changed
chart is thrown away and built again. This script serves the app twice, the same way but for
that setting, starts a classroom run as the Train page does (lower CPU priority), opens the
Train page on it in Chromium and reads, from Chromium's own counters (``Performance.getMetrics``),
how many seconds per second the page's main thread is busy, for each in turn.

    python bench/live_page_cpu.py              # about 2 minutes; prints a table
    python bench/live_page_cpu.py --rounds 2   # each setting measured twice, in turn
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SETTINGS = {"in place (app.plot)": "true", "rebuilt (st.plotly_chart)": "false"}


def busy_per_second(runs: Path, static: str, seconds: float) -> dict[str, float]:
    """Serve the app with static serving on or off, follow a live run for ``seconds``."""
    from app_latency import start_busy_run
    from playwright.sync_api import sync_playwright

    from app import jobs
    from app.serve import CHROMIUM, CHROMIUM_ARGS, serve

    env = {"STREAMLIT_SERVER_ENABLE_STATIC_SERVING": static}
    with serve(runs, env=env) as server:
        busy = start_busy_run(runs)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                cdp = page.context.new_cdp_session(page)
                cdp.send("Performance.enable")
                page.goto(f"{server.url}/train?run={busy}")
                page.locator(".js-plotly-plot").nth(4).wait_for(timeout=120_000)
                page.wait_for_timeout(3000)  # past the first draw

                def metrics() -> dict[str, float]:
                    return {
                        m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]
                    }

                m0 = metrics()
                page.wait_for_timeout(1000 * seconds)
                m1 = metrics()
                browser.close()
        finally:
            jobs.stop(busy, runs)
    return {k: (m1[k] - m0[k]) / seconds for k in ("TaskDuration", "ScriptDuration")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds followed per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="measurements of each setting, in turn")
    args = ap.parse_args()
    got: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="lorita-live-cpu-") as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        for _ in range(args.rounds):
            for name, static in SETTINGS.items():
                got[name].append(busy_per_second(runs, static, args.seconds))
                print(f"{name}: {got[name][-1]}", file=sys.stderr, flush=True)
    base = statistics.median(r["TaskDuration"] for r in got["rebuilt (st.plotly_chart)"])
    print(
        f"The Train page following a live classroom run for {args.seconds:g} s, {args.rounds} "
        f"times per setting in turn; load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}"
        " at the end.\n"
    )
    print("| charts | main thread busy (s per s), median | of which script | against rebuilt |")
    print("|---|---:|---:|---:|")
    for name, rows in got.items():
        task = statistics.median(r["TaskDuration"] for r in rows)
        script = statistics.median(r["ScriptDuration"] for r in rows)
        print(f"| {name} | {task:.3f} | {script:.3f} | {task / base:.2f}x |")


if __name__ == "__main__":
    main()
