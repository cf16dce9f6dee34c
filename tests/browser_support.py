"""A real browser for the tests: Debian's Chromium driven by Playwright, never a downloaded one.

``chromium_context`` skips the calling test, with the reason and what to do, where Playwright
or the Chromium executable is missing. Pages opened through ``offline_page`` may load only
``file://`` URLs (and the origins passed in ``allow``); every other request is aborted and
recorded, so a test can assert that none was needed. Screenshots go under
``runs/_browser/`` (``runs/`` is not committed).
"""

from __future__ import annotations

import base64
import os
from contextlib import contextmanager
from pathlib import Path
import tempfile
import time
from typing import Iterator, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "runs" / "_browser"
CHROMIUM = os.environ.get("REPHELPERS_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling home, which a closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
]


def _require_browser() -> None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the Playwright Python package is not installed: run `bash scripts/setup.sh` "
                    "(it installs the `test` extra of pyproject.toml)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's (`apt-get install -y chromium`; scripts/setup.sh "
                    "does it when run as root) or point REPHELPERS_CHROMIUM at a Chromium executable")


@contextmanager
def chromium_context(viewport: tuple[int, int] = (1280, 900)) -> Iterator[object]:
    """A headless Chromium (a fresh profile) as a Playwright ``BrowserContext``."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="rephelpers-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            yield context
        finally:
            context.close()


@contextmanager
def offline_page(context, allow: Sequence[str] = ()) -> Iterator[tuple[object, list[str], list[str]]]:
    """``(page, blocked, errors)``: a page that may load only ``file://`` URLs and ``allow``-ed prefixes.

    ``blocked`` collects every URL that was aborted, ``errors`` every uncaught page error and
    console error.
    """
    page = context.new_page()
    blocked: list[str] = []
    errors: list[str] = []
    allowed = ("file://", "data:", "blob:", "about:", *allow)

    def route(r) -> None:
        if r.request.url.startswith(allowed):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort("internetdisconnected")

    page.route("**/*", route)
    page.on("pageerror", lambda err: errors.append(f"page error: {err}"))
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    try:
        yield page, blocked, errors
    except BaseException:
        screenshot(page, f"failed_{time.strftime('%H%M%S')}")  # what the page showed when the test failed
        raise
    finally:
        page.close()


def ink_fraction(context, png: bytes) -> float:
    """The share of a screenshot's pixels that differ clearly from its most common colour.

    Decoded by Chromium itself (no imaging library needed); a blank page gives 0.
    """
    page = context.new_page()
    try:
        return float(page.evaluate(
            """async (b64) => {
                const img = new Image();
                img.src = 'data:image/png;base64,' + b64;
                await img.decode();
                const canvas = document.createElement('canvas');
                canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
                const ctx = canvas.getContext('2d');
                ctx.drawImage(img, 0, 0);
                const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
                const counts = new Map();
                for (let i = 0; i < px.length; i += 4) {
                    const key = (px[i] << 16) | (px[i + 1] << 8) | px[i + 2];
                    counts.set(key, (counts.get(key) || 0) + 1);
                }
                let bg = 0, best = -1;
                for (const [key, n] of counts) if (n > best) { best = n; bg = key; }
                const [r, g, b] = [(bg >> 16) & 255, (bg >> 8) & 255, bg & 255];
                let ink = 0;
                for (let i = 0; i < px.length; i += 4) {
                    if (Math.abs(px[i] - r) + Math.abs(px[i + 1] - g) + Math.abs(px[i + 2] - b) > 60) ink++;
                }
                return ink / (px.length / 4);
            }""",
            base64.b64encode(png).decode(),
        ))
    finally:
        page.close()


def screenshot(target, name: str) -> tuple[bytes, Path]:
    """Screenshot a page or element into ``runs/_browser/<name>.png``; return the PNG and its path."""
    path = SCREENSHOTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    png = target.screenshot(path=str(path))
    return png, path
