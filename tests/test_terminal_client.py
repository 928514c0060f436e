"""`nanoclaw chat`, the terminal client, against a stand-in for the host's terminal
socket (`data/cli.sock`): a reply frame that comes again under the same id (an attempt
whose result the host did not store, sent again) is printed once."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

from conftest import ROOT, clean_env, wait_for


def test_a_reply_that_comes_twice_is_printed_once(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(data / "cli.sock"))
    server.listen(1)
    got: list[dict] = []

    def host() -> None:  # the terminal channel's side: read the subscribe, reply
        conn, _ = server.accept()
        got.append(json.loads(conn.makefile().readline()))
        for rid, text in (("r1", "the answer"), ("r1", "the answer"), ("r2", "and the end")):
            conn.sendall((json.dumps({"type": "reply", "id": rid, "chat": "local",
                                      "text": text}) + "\n").encode())
        threading.Event().wait(30)  # keep the connection open until the client quits
    threading.Thread(target=host, daemon=True).start()
    proc = subprocess.Popen([sys.executable, "-m", "nanoclaw", "chat"], cwd=ROOT,
                            env=clean_env(NANOCLAW_DATA_DIR=str(data),
                                          NANOCLAW_LOGS_DIR=str(tmp_path / "logs")),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: "and the end" in "".join(out), 30, what="the last reply printed")
    finally:
        proc.communicate(input="", timeout=30)  # Ctrl-D
        server.close()
    text = "".join(out)
    assert got == [{"type": "subscribe", "chat": "local"}]
    assert text.count("the answer") == 1, text
