"""End-to-end: app.py served on the CPU, driven by a real headless Chromium (Debian's, through playwright).

Needs /usr/bin/chromium and the playwright package (.ci/browser-deps.sh installs both). It does not skip
when they are missing: it fails and says how to install them.

This module also retakes the README's screenshot for any checkpoint:
    python tests/test_app_browser.py --checkpoint DIR [--out docs/demo.png] [--class-name "golden retriever"]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN_C2I = REPO / "tests" / "golden" / "c2i_ckpt"
CHROMIUM = "/usr/bin/chromium"
# The machine has no internet: without these Chromium stalls on network lookups (updates, sync, QUIC probes).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}
APP_START_TIMEOUT_S = 90
GENERATE_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(checkpoint: str | Path, *extra_args: str, device: str = "cpu"):
    """Start `python app.py` on a free port in a subprocess; yield its URL; stop it on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--checkpoint", str(checkpoint),
                                 "--device", device, "--port", str(port), *extra_args],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

        def log_tail() -> str:
            log.seek(0)
            return log.read()[-4000:]

        try:
            deadline = time.monotonic() + APP_START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"app.py exited with code {proc.returncode} before serving:\n{log_tail()}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"app.py did not serve {url} within {APP_START_TIMEOUT_S} s:\n{log_tail()}")
                time.sleep(0.25)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def chromium_page():
    """A fresh page in headless Debian Chromium (playwright must not download its own browsers)."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run .ci/browser-deps.sh (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


def generate_in_page(page, url: str, class_name: str | None = None, prompt: str | None = None,
                     steps: str = "2", num_images: int | None = None) -> str:
    """Open the demo, pick a class (typed into the searchable dropdown) or type a prompt, set the steps,
    press Generate and wait for the gallery. Returns the line that reports the time taken."""
    page.goto(url)
    page.wait_for_selector("#pf-generate", timeout=30_000)
    if class_name is not None:
        box = page.locator("#pf-class input")  # role "listbox" before gradio 6.19, "combobox" after
        box.click()
        box.press("Control+a")  # replace the default class; the list filters on key presses, not on fill()
        box.press_sequentially(class_name)
        page.get_by_role("option", name=class_name).first.click()
    if prompt is not None:
        page.locator("#pf-prompt textarea").fill(prompt)
    page.locator("#pf-steps textarea").fill(steps)
    if num_images is not None:
        page.locator("#pf-num-images input[type=number]").fill(str(num_images))
        page.locator("#pf-num-images input[type=number]").press("Enter")
    page.locator("#pf-generate").click()
    page.wait_for_function("() => [...document.querySelectorAll('#pf-gallery img')]"
                           ".some(img => img.complete && img.naturalWidth > 0)", timeout=GENERATE_TIMEOUT_S * 1000)
    page.wait_for_function("() => (document.querySelector('#pf-info')?.innerText || '').includes('generated')",
                           timeout=10_000)
    return page.locator("#pf-info").inner_text()


def take_screenshot(checkpoint: str | Path, out: str | Path, class_name: str | None = None,
                    prompt: str | None = None, steps: str = "2", num_images: int = 4, device: str = "cpu") -> str:
    """Serve `checkpoint`, generate once in Chromium and save a full-page PNG of the demo to `out`."""
    with running_app(checkpoint, device=device) as url, chromium_page() as page:
        info = generate_in_page(page, url, class_name=class_name, prompt=prompt, steps=steps, num_images=num_images)
        page.mouse.move(0, 0)  # no hover highlight in the picture
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
    return info


def test_pick_class_generate_in_chromium():
    start = time.monotonic()
    with running_app(GOLDEN_C2I) as url, chromium_page() as page:
        info = generate_in_page(page, url, class_name="281: tabby, tabby cat", steps="2", num_images=2)
        images = page.locator("#pf-gallery img").evaluate_all(
            "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).map(i => i.naturalWidth)")
    # The class picked in the browser reached the server, and the gallery shows the images at full size.
    assert info.startswith("tabby, tabby cat: generated 2 images (32×32)"), info
    assert "steps 2/2/2/2" in info, info
    assert len(images) >= 2 and all(w == 32 for w in images), images
    assert time.monotonic() - start < 60, f"browser test took {time.monotonic() - start:.1f} s"


def main() -> None:
    p = argparse.ArgumentParser(description="Take the demo screenshot (docs/demo.png) for a checkpoint")
    p.add_argument("--checkpoint", default=str(GOLDEN_C2I))
    p.add_argument("--out", default=str(REPO / "docs" / "demo.png"))
    p.add_argument("--class-name", default=None, help="class to pick, as shown in the dropdown (class-to-image)")
    p.add_argument("--prompt", default=None, help="prompt to type (text-to-image)")
    p.add_argument("--steps", default="2", help="steps per stage, e.g. 30 or 10,10,20,30")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    info = take_screenshot(args.checkpoint, args.out, class_name=args.class_name, prompt=args.prompt,
                           steps=args.steps, num_images=args.num_images, device=args.device)
    print(f"{args.out}: {info}")


if __name__ == "__main__":
    main()
