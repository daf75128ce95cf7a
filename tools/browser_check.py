#!/usr/bin/env python3
"""Load built pages in headless Chromium and fail unless MathJax typeset them and their images loaded.

Usage: python tools/browser_check.py [--html _build/html] [--screenshot out.png] [--search WORD] PAGE [PAGE ...]
(PAGE relative to the html folder, e.g. book/intro.html).

``--search WORD`` also runs the site's search for WORD (search.html?q=WORD, over the same http server, which is
how readers should serve the site: from file:// browsers block the snippets' requests) and fails unless it
lists results and shows a text snippet under them.

The pages are served from 127.0.0.1 by a throw-away HTTP server; a small wrapper page loads each one in a
same-origin iframe, waits for MathJax, and writes what it found (number of typeset equations, raw `$$`
left in the text, images that failed) into its own DOM, which Chromium prints with --dump-dom.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

WRAPPER = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="page" src="/{page}" style="width:1200px;height:900px"></iframe>
<script>
const frame = document.getElementById('page');
frame.addEventListener('load', async () => {{
  const w = frame.contentWindow, d = frame.contentDocument;
  try {{ if (w.MathJax && w.MathJax.startup) await w.MathJax.startup.promise; }} catch (e) {{}}
  const imgs = Array.from(d.images).filter(i => i.offsetParent !== null || i.closest('.cell_output'));
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  const text = d.body.innerText;
  document.getElementById('result').textContent = JSON.stringify({{
    mathjax: !!(w.MathJax && w.MathJax.version), mjx: d.querySelectorAll('mjx-container').length,
    raw_dollars: (text.match(/\\$\\$/g) || []).length, images: imgs.length, broken: broken,
    output_images: d.querySelectorAll('.cell_output img').length }});
}});
</script></body></html>"""


SEARCH_WRAPPER = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="page" src="/search.html?q={query}" style="width:1200px;height:900px"></iframe>
<script>
// Sphinx's search loads searchindex.js, then fills ul.search with one li per page and fetches each page to
// put a snippet (p.context) under it; poll until the snippets are in (or time runs out).
const frame = document.getElementById('page');
frame.addEventListener('load', () => {{
  let tries = 0;
  const poll = () => {{
    const d = frame.contentDocument, items = d.querySelectorAll('ul.search li');
    const snippets = Array.from(d.querySelectorAll('ul.search li p.context')).filter(p => p.textContent.trim());
    if ((items.length && snippets.length) || ++tries > 80) {{
      document.getElementById('result').textContent = JSON.stringify({{
        results: items.length, snippets: snippets.length,
        first: items.length ? items[0].querySelector('a').getAttribute('href') : null }});
    }} else setTimeout(poll, 100);
  }};
  poll();
}});
</script></body></html>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("browser check: Chromium not found (apt-get install chromium)")


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--virtual-time-budget=10000"]


def serve(root: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the CI log readable
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def check_page(browser: str, base: str, wrapper: str, page: str, profile: str) -> dict:
    out = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", f"{base}/{wrapper}"],
                         capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="result">(.*?)</pre>', out.stdout, re.S)
    if not match or match.group(1) == "pending":
        raise SystemExit(f"browser check: {page}: the wrapper page did not report (stderr tail: {out.stderr[-500:]})")
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="+")
    parser.add_argument("--html", type=Path, default=Path("_build/html"))
    parser.add_argument("--screenshot", type=Path, help="also save a PNG screenshot of the first page")
    parser.add_argument("--search", metavar="WORD", help="also run the site search for WORD; fail without "
                                                         "results with snippets")
    args = parser.parse_args(argv)
    browser, root = chromium(), args.html.resolve()
    server = serve(root)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    failures = 0
    with tempfile.TemporaryDirectory() as profile:
        for page in args.pages:
            wrapper = root / "_browser_check.html"
            wrapper.write_text(WRAPPER.format(page=page))
            try:
                r = check_page(browser, base, wrapper.name, page, profile)
            finally:
                wrapper.unlink()
            ok = r["mathjax"] and r["mjx"] > 0 and r["raw_dollars"] == 0 and not r["broken"]
            failures += not ok
            print(f"browser check: {page}: {'OK' if ok else 'FAILED'} {json.dumps(r)}")
        if args.search:
            wrapper = root / "_browser_check.html"
            wrapper.write_text(SEARCH_WRAPPER.format(query=args.search))
            try:
                r = check_page(browser, base, wrapper.name, f"search.html?q={args.search}", profile)
            finally:
                wrapper.unlink()
            ok = r["results"] > 0 and r["snippets"] > 0
            failures += not ok
            print(f"browser check: search for {args.search!r} over http: {'OK' if ok else 'FAILED'} {json.dumps(r)}")
        if args.screenshot:
            subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1600",
                            f"--screenshot={args.screenshot.resolve()}", f"{base}/{args.pages[0]}"],
                           capture_output=True, timeout=120)
            print(f"browser check: screenshot of {args.pages[0]} in {args.screenshot}")
    server.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
