"""A scripted OpenAI-compatible chat server on loopback, the tiny teacher, and settings for fast pipeline runs."""

import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dsd_model.data.grids import load_teacher
from dsd_model.data.settings import DataSettings


class ChatServer:
    """`POST /v1/chat/completions` on 127.0.0.1 at a free port, answering like a chat model would.

    Requests are classified by their first user message: `filter` (clear-subject question), `content` (grid plan)
    or `verdict` (an image to judge). Faults queued with `fault(...)` are served first, one per request in arrival
    order: ("status", code, headers), ("sleep", seconds) before a normal answer, ("reply", text), or ("truncated",
    text): a reply cut off at the token limit (`finish_reason` `length`). Once it has
    received `down_after` requests, every further request gets 503. Captions containing "glitch" always get an
    answer without JSON. Verdicts cycle through three grids: every panel consistent; one drifted panel (the next
one each cycle); only the first panel consistent.
    """

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.headers: list[dict] = []
        self.faults = deque()
        self.down_after: int | None = None
        self.in_flight = self.max_in_flight = self.verdicts = 0
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"chat": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def fault(self, *faults) -> None:
        self.faults.extend(faults)

    def count(self, kind: str | None = None) -> int:
        return sum(1 for k, _ in self.requests if kind in (None, k))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, kind: str, body: dict) -> str:
        first = _text(body["messages"][1])
        if kind == "verdict":
            panels = int(re.search(r"grid of (\d+) panels", first).group(1))
            with self.lock:
                number = self.verdicts
                self.verdicts += 1
            drifted = [set(), {number // 3 % panels}, set(range(1, panels))][number % 3]
            verdict = {
                "subject": "red plush fox",
                "panels": [
                    {
                        "description": f"the red plush fox, view {i + 1}, on a wooden table",
                        "same_subject": i not in drifted,
                        "reason": "the scarf turned green" if i in drifted else "same markings as the others",
                    }
                    for i in range(panels)
                ],
            }
            return (
                "1. The common subject is a red plush fox.\n2. Each panel shows it from another side.\n"
                f"3. Comparing details: {len(drifted)} panel(s) differ.\n```json\n{json.dumps(verdict)}\n```\n"
                "Hope this helps!"
            )
        caption = json.loads(re.search(r"Caption: (\".*\")", first).group(1))
        if "glitch" in caption:
            return "Here are some lovely ideas for your grid: a fox in a park, a fox at the beach."
        subject = re.sub(r"^(a|an|the) ", "", caption)
        if kind == "filter":
            keep = "landscape" not in caption
            return json.dumps({"clear_subject": keep, "subject": subject if keep else "", "reason": "checked"})
        panels = int(re.search(r"grid of (\d+) images", first).group(1))
        plan = {"subject": subject, "panels": [f"the {subject} in scene {i + 1}" for i in range(panels)]}
        return f"```json\n{json.dumps(plan, indent=1)}\n```"


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def _kind(body: dict) -> str:
    first = body["messages"][1]["content"]
    if not isinstance(first, str):
        return "verdict"
    return "filter" if "clear_subject" in first else "content"


class _Handler(BaseHTTPRequestHandler):
    chat: ChatServer

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.chat
        with chat.lock:
            chat.requests.append((_kind(body), body))
            number = len(chat.requests)
            chat.headers.append(dict(self.headers))
            fault = chat.faults.popleft() if chat.faults else None
            chat.in_flight += 1
            chat.max_in_flight = max(chat.max_in_flight, chat.in_flight)
        try:
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
            elif chat.down_after is not None and number > chat.down_after:
                self._send(503, {"error": {"message": "overloaded"}})
            elif fault and fault[0] == "status":
                self._send(fault[1], {"error": {"message": "scripted"}}, fault[2] if len(fault) > 2 else {})
            else:
                if fault and fault[0] == "sleep":
                    time.sleep(fault[1])
                text = fault[1] if fault and fault[0] in ("reply", "truncated") else chat.answer(_kind(body), body)
                finish_reason = "length" if fault and fault[0] == "truncated" else "stop"
                self._send(200, _completion(body["model"], text, finish_reason))
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with chat.lock:
                chat.in_flight -= 1

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _completion(model: str, text: str, finish_reason: str = "stop") -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    }


class CountingTeacher:
    """The tiny teacher, counting the grids it renders; its call number `stop_at` raises KeyboardInterrupt, as when
    a person presses Ctrl-C during a run."""

    def __init__(self, pipe, stop_at: int | None = None):
        self.pipe, self.stop_at = pipe, stop_at
        self.calls = self.rendered = 0

    def __call__(self, **kwargs):
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.calls += 1
        self.rendered += len(kwargs["prompt"])
        return self.pipe(**kwargs)


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("DSD_DATA_"):
            monkeypatch.delenv(name)


@pytest.fixture
def chat_server():
    server = ChatServer()
    yield server
    server.close()


@pytest.fixture
def make_settings(tmp_path, chat_server):
    """DataSettings for tiny, fast runs against the loopback server; keyword arguments override."""

    def make(**overrides) -> DataSettings:
        values = dict(
            work_dir=tmp_path / "work",
            llm_base_url=chat_server.url,
            llm_model="test-llm",
            vlm_model="test-vlm",
            width=64,
            height=64,
            num_inference_steps=2,
            max_sequence_length=32,
            batch_size=4,
            concurrency=2,
            max_retries=2,
            backoff_s=0.01,
            request_timeout_s=2.0,
        )
        return DataSettings(**{**values, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_teacher():
    return load_teacher(DataSettings(device="cpu"))


@pytest.fixture
def counting_teacher(tiny_teacher):
    """`counting_teacher(stop_at=None)` → a fresh `CountingTeacher` around the shared tiny teacher."""
    return lambda stop_at=None: CountingTeacher(tiny_teacher, stop_at)


@pytest.fixture
def captions_file(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(
        "a red plush fox with a blue scarf\n"
        "a ceramic owl figurine\n"
        "a wide mountain landscape at dusk\n"
        "a glitch in the matrix\n"
        "a vintage brass pocket watch\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory):
    """A tiny FluxPipeline and a tiny StableDiffusion3Pipeline, saved as local pipeline directories."""
    from teachers import tiny_flux, tiny_sd3

    root = tmp_path_factory.mktemp("teachers")
    tiny_flux().save_pretrained(root / "flux")
    tiny_sd3().save_pretrained(root / "sd3")
    return root / "flux", root / "sd3"
