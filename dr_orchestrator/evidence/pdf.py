"""HTML to PDF with the distribution's headless Chromium (Debian package ``chromium``): the reports
print exactly as they render, and nothing is downloaded at run time."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TIMEOUT_S = 120.0


class PdfError(RuntimeError):
    """No PDF could be made; one sentence."""


def find_browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise PdfError("PDF output needs headless Chromium: install the Debian package chromium (or use --format html)")


def html_to_pdf(html: str, timeout_s: float = TIMEOUT_S) -> bytes:
    browser = find_browser()
    with tempfile.TemporaryDirectory(prefix="dr-pdf-") as work:
        page, pdf = Path(work) / "report.html", Path(work) / "report.pdf"
        page.write_text(html, encoding="utf-8")
        argv = [
            browser,
            "--headless",
            "--disable-gpu",
            "--no-pdf-header-footer",
            f"--user-data-dir={work}/profile",  # never another Chromium's profile or lock
            f"--print-to-pdf={pdf}",
            page.as_uri(),
        ]
        if os.geteuid() == 0:  # Chromium refuses to run as root inside its sandbox
            argv.insert(1, "--no-sandbox")
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PdfError(f"Chromium did not print the report within {timeout_s:g}s") from None
        finally:
            _kill_group(process)
        if process.returncode != 0 or not pdf.exists():
            tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise PdfError(f"Chromium could not print the report (exit {process.returncode}): {tail[0]}")
        return pdf.read_bytes()


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Chromium's helper processes share its new process group: leave none behind."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()
