"""`streamlit run app.py` on a free local port, for the measurements in this folder and the
browser tests (tests/test_browser.py)."""
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@contextlib.contextmanager
def app_server(env: dict | None = None, log=None, timeout: float = 60.0):
    """Yields (process, url) once /_stcore/health answers; stops the server afterwards.

    The server's output goes to `log` (an open file) when given. RuntimeError, with the end of
    that output, if the server exits or does not answer within `timeout` seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = log if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)],
                            cwd=ROOT, env=os.environ | (env or {}), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                tail = ""
                if log is not None:
                    log.seek(0)
                    tail = ":\n" + log.read()[-3000:]
                raise RuntimeError(f"streamlit did not come up{tail}")
            time.sleep(0.3)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
