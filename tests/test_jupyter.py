"""The README's way in works: `jupyter lab` starts, serves every chapter notebook, and a kernel it starts
runs `import common`. The server runs headless on a free local port and is stopped at the end."""

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("[0-9][0-9]_*/*.ipynb"))

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    port, token = _free_port(), secrets.token_hex(16)
    runtime = tmp_path_factory.mktemp("jupyter-runtime")
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={ROOT}",
        "--ServerApp.port_retries=0",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI and containers run as root; a learner does not
        cmd.append("--allow-root")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "JUPYTER_NO_CONFIG": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(
                "jupyter lab did not start:\n" + proc.stdout.read().decode(errors="replace")[-3000:]
            )
        time.sleep(0.5)
    yield base, token
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read()


def test_jupyter_lab_serves_the_lab_page_and_every_chapter_notebook(lab):
    base, token = lab
    assert len(NOTEBOOKS) >= 6
    status, page = _get(f"{base}/lab?token={token}")
    assert status == 200 and b"JupyterLab" in page
    for nb in NOTEBOOKS:
        status, body = _get(f"{base}/api/contents/{nb}?token={token}")
        model = json.loads(body)
        assert status == 200 and model["type"] == "notebook", nb
        assert any(c["cell_type"] == "code" for c in model["content"]["cells"]), nb


async def _execute(ws_url: str, code: str, timeout: float = 120.0) -> tuple[str, str]:
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(ws_url)
    msg_id = uuid.uuid4().hex
    ws.write_message(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "msg_type": "execute_request",
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "channel": "shell",
                "buffers": [],
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
            }
        )
    )
    out, status = "", None
    deadline = time.monotonic() + timeout
    while status is None or not out:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        raw = await asyncio.wait_for(ws.read_message(), remaining)
        if raw is None:
            break
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["header"]["msg_type"]
        if kind == "stream":
            out += msg["content"]["text"]
        elif kind == "error":
            out += "\n".join(msg["content"]["traceback"])
        elif kind == "execute_reply":
            status = msg["content"]["status"]
            if status != "ok":
                break
    ws.close()
    return status, out


def test_a_kernel_started_by_jupyter_lab_imports_common(lab):
    base, token = lab
    req = urllib.request.Request(
        f"{base}/api/kernels?token={token}",
        method="POST",
        data=json.dumps({"name": "python3"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        kernel = json.loads(r.read())
    try:
        ws_url = f"{base.replace('http', 'ws')}/api/kernels/{kernel['id']}/channels?token={token}"
        code = "import common.viz, common.unet\nprint('common from', common.__file__)"
        status, out = asyncio.run(_execute(ws_url, code))
        assert status == "ok", out
        assert "common from" in out and str(ROOT / "common") in out, out
    finally:
        req = urllib.request.Request(f"{base}/api/kernels/{kernel['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()
