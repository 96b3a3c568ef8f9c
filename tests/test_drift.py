"""`det-backend drift` against a fake OpenAI-compatible server on 127.0.0.1 (CPU, no vLLM server).

The fake answers in vLLM's reply shapes. Its reply is a pure function of the prompt unless a
constructor option makes it drift (at a known token, by a known logprob) or fail, so every
number the harness reports can be checked exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from det_backend import drift

DRIFT_POS = 3  # the drifting reply's logprob changes at this token...
DRIFT_DELTA = 0.25  # ...by this much (exact in binary floating point)...
DRIFT_TOKEN_POS = DRIFT_POS + 2  # ...and its token changes here
REPLY_TOKENS = 8
SMALL_RUN = ["--repeats", "2", "--concurrency", "1,4", "--max-tokens", "8"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 64 concurrent connects must not overflow the listen backlog


class FakeOpenAI:
    """GET /v1/models, GET /health, POST /v1/completions and /v1/chat/completions.

    drift_prompt/drift_after: replies to that prompt after its drift_after-th request differ
        (logprob at DRIFT_POS by DRIFT_DELTA, token at DRIFT_TOKEN_POS).
    faults: {n: kind} for the n-th POST (1-based, arrival order); kinds http500, non_json,
        no_logprobs, no_choices, slow (answers after slow_s).
    fail_after: every POST after this many answers HTTP 500.
    new_fingerprint_after: system_fingerprint changes to "fp-2" after this many POSTs.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        model: str = "fake-model",
        drift_prompt: str | None = None,
        drift_after: int = 0,
        faults: dict[int, str] | None = None,
        fail_after: int | None = None,
        new_fingerprint_after: int | None = None,
        slow_s: float = 1.0,
    ) -> None:
        self.model, self.drift_prompt, self.drift_after = model, drift_prompt, drift_after
        self.faults, self.fail_after, self.slow_s = faults or {}, fail_after, slow_s
        self.new_fingerprint_after = new_fingerprint_after
        self.received: list[tuple[str, dict]] = []  # (path, body) of every POST
        self.lock = threading.Lock()
        self.per_prompt: dict[str, int] = {}
        self.httpd = _Server(("127.0.0.1", port), self._handler_class())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> FakeOpenAI:
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def measured(self) -> list[dict]:
        """Bodies of the measured requests (background ones ask for no logprobs)."""
        return [body for _, body in self.received if body.get("logprobs") is not None]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"data": [{"id": fake.model}]}))
                elif self.path == "/health":
                    self._send(200, "")
                else:
                    self._send(404, "not found")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, text = fake.answer(self.path, body)
                self._send(status, text)

            def _send(self, status: int, text: str) -> None:
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out first (the `slow` fault)

        return Handler

    def answer(self, path: str, body: dict) -> tuple[int, str]:
        chat = path == "/v1/chat/completions"
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        key = json.dumps(prompt)
        with self.lock:
            self.received.append((path, body))
            number = len(self.received)
            self.per_prompt[key] = self.per_prompt.get(key, 0) + 1
            drifted = prompt == self.drift_prompt and self.per_prompt[key] > self.drift_after
        fault = self.faults.get(number)
        if fault == "slow":
            time.sleep(self.slow_s)
        if fault == "http500" or (self.fail_after is not None and number > self.fail_after):
            return 500, '{"error": "internal server error"}'
        if fault == "non_json":
            return 200, "<html>bad gateway</html>"
        if fault == "no_choices":
            return 200, json.dumps({"object": "error"})
        fingerprint = "fp-1"
        if self.new_fingerprint_after is not None and number > self.new_fingerprint_after:
            fingerprint = "fp-2"
        ids, logprobs = self._reply(key, body["max_tokens"], drifted)
        as_ids = body.get("return_tokens_as_token_ids")
        tokens = [f"token_id:{i}" if as_ids else f" t{i}" for i in ids]
        text = "".join(f" t{i}" for i in ids)
        with_logprobs = fault != "no_logprobs" and bool(body.get("logprobs"))
        if chat:
            choice = {"message": {"role": "assistant", "content": text}}
            if with_logprobs:
                steps = [
                    {"token": t, "logprob": lp, "top_logprobs": self._top(t, lp, chat=True)}
                    for t, lp in zip(tokens, logprobs, strict=True)
                ]
                choice["logprobs"] = {"content": steps}
        else:
            choice = {"text": text, "logprobs": None}
            if with_logprobs:
                choice["logprobs"] = {
                    "text_offset": list(range(len(tokens))),
                    "tokens": tokens,
                    "token_logprobs": logprobs,
                    "top_logprobs": [
                        self._top(t, lp) for t, lp in zip(tokens, logprobs, strict=True)
                    ],
                }
        reply = {
            "model": self.model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "finish_reason": "length", **choice}],
        }
        return 200, json.dumps(reply)

    @staticmethod
    def _reply(key: str, max_tokens: int, drifted: bool) -> tuple[list[int], list[float]]:
        seed = zlib.crc32(key.encode())
        ids = [(seed + 97 * i) % 5000 for i in range(min(max_tokens, REPLY_TOKENS))]
        logprobs = [-0.5 - 0.125 * i for i in range(len(ids))]
        if drifted:
            logprobs[DRIFT_POS] += DRIFT_DELTA
            ids[DRIFT_TOKEN_POS] += 1
        return ids, logprobs

    @staticmethod
    def _top(token: str, logprob: float, chat: bool = False):
        pairs = [(token, logprob), ("token_id:99999", logprob - 1.0)]
        if chat:
            return [{"token": t, "logprob": lp} for t, lp in pairs]
        return dict(pairs)


@pytest.fixture
def fake_server():
    servers: list[FakeOpenAI] = []

    def start(**options) -> FakeOpenAI:
        servers.append(FakeOpenAI(**options).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def prompts_file(tmp_path: Path) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    return str(path)


def run_drift(argv: list[str], tmp_path: Path) -> tuple[int, dict | None]:
    out = tmp_path / "report.json"
    code = drift.main([*argv, "--json", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_identical_replies_exit_0(fake_server, prompts_file, tmp_path, capsys):
    server = fake_server()
    argv = ["--base-url", server.base_url, "--prompts", prompts_file, *SMALL_RUN]
    code, report = run_drift([*argv, "--background", "2"], tmp_path)
    assert code == 0
    (target,) = report["endpoints"]
    assert target["model"] == "fake-model"  # from GET /models
    overall = target["overall"]
    assert overall["identical_rate"] == 1.0
    assert (overall["requests"], overall["ok"], overall["errors"], overall["timeouts"]) == (
        12,
        12,
        0,
        0,
    )
    for p in target["per_prompt"]:
        assert (p["distinct_outputs"], p["first_divergence"], p["max_abs_dlogprob"]) == (1, None, 0)
    assert target["fingerprints"] == [
        {"system_fingerprint": "fp-1", "model": "fake-model", "responses": 12}
    ]
    assert len(server.measured()) == 12
    assert target["background"]["sent"] == len(server.received) - 12 > 0
    assert "overall" in capsys.readouterr().out


def test_drift_exits_1_at_the_known_position(fake_server, prompts_file, tmp_path, capsys):
    # p1 is sent 3 repeats x 2 levels = 6 times; the last 2 replies drift.
    server = fake_server(drift_prompt="p1", drift_after=4, new_fingerprint_after=10)
    argv = ["--base-url", server.base_url, "--prompts", prompts_file, *SMALL_RUN]
    code, report = run_drift([*argv, "--repeats", "3"], tmp_path)
    assert code == 1
    target = report["endpoints"][0]
    steady, drifting, _ = target["per_prompt"]
    assert steady["distinct_outputs"] == 1
    assert drifting["distinct_outputs"] == 2
    assert drifting["identical_rate"] == pytest.approx(4 / 6)
    assert drifting["first_divergence"] == DRIFT_POS
    assert drifting["max_abs_dlogprob"] == DRIFT_DELTA
    assert target["overall"]["prompts_drifting"] == 1
    assert target["overall"]["first_divergence"] == DRIFT_POS
    # The deployment "changed" mid-run: both fingerprints are reported.
    assert {f["system_fingerprint"] for f in target["fingerprints"]} == {"fp-1", "fp-2"}
    assert "deployment changed" in capsys.readouterr().out


def test_failures_counted_by_kind_and_json_written(fake_server, prompts_file, tmp_path):
    faults = {2: "http500", 4: "non_json", 6: "no_logprobs", 8: "no_choices", 10: "slow"}
    server = fake_server(faults=faults, slow_s=1.0)
    argv = ["--base-url", server.base_url, "--prompts", prompts_file, *SMALL_RUN]
    code, report = run_drift([*argv, "--timeout", "0.3"], tmp_path)
    assert code == 1
    target = report["endpoints"][0]
    assert target["errors"]["counts"] == {
        "http": 1,
        "non_json": 1,
        "no_logprobs": 1,
        "no_choices": 1,
        "timeout": 1,
    }
    overall = target["overall"]
    assert (overall["ok"], overall["errors"], overall["timeouts"]) == (7, 4, 1)
    assert overall["identical_rate"] == 1.0  # what did come back is identical
    assert not overall["deterministic"]
    assert "HTTP 500" in target["errors"]["messages"]["http"][0]
    per_prompt = target["per_prompt"]
    assert sum(p["errors"] for p in per_prompt) == 4
    assert sum(p["timeouts"] for p in per_prompt) == 1


def test_failures_in_a_row_stop_the_run_and_keep_partial_json(fake_server, prompts_file, tmp_path):
    server = fake_server(fail_after=3)
    argv = ["--base-url", server.base_url, "--prompts", prompts_file, "--repeats", "5"]
    code, report = run_drift([*argv, "--concurrency", "1", "--abort-after", "4"], tmp_path)
    assert code == 1
    target = report["endpoints"][0]
    assert "4 requests in a row failed" in target["stopped"]
    assert target["overall"]["ok"] == 3
    assert 7 <= target["overall"]["requests"] < target["overall"]["requests_planned"] == 15
    assert not target["overall"]["complete"]


def test_ctrl_c_keeps_partial_json(fake_server, prompts_file, tmp_path, monkeypatch):
    server = fake_server()
    calls = []
    send = drift.send_prompt

    def interrupted_on_third_call(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return send(*args)

    monkeypatch.setattr(drift, "send_prompt", interrupted_on_third_call)
    argv = ["--base-url", server.base_url, "--prompts", prompts_file, "--concurrency", "1"]
    code, report = run_drift(argv, tmp_path)
    assert code == drift.EXIT_INTERRUPTED
    target = report["endpoints"][0]
    assert target["interrupted"]
    assert target["overall"]["ok"] == 2


def test_unreachable_server_exits_2_with_one_message(prompts_file, tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, report = run_drift(["--base-url", f"http://127.0.0.1:{port}/v1"], tmp_path)
    err = capsys.readouterr().err
    assert code == 2
    assert report is None
    assert f"cannot reach http://127.0.0.1:{port}/v1" in err
    assert "Traceback" not in err


def test_baseline_reported_side_by_side(fake_server, prompts_file, tmp_path, capsys):
    ours = fake_server()
    default = fake_server(drift_prompt="p0", drift_after=1)
    png = tmp_path / "drift.png"
    argv = ["--base-url", ours.base_url, "--baseline", default.base_url, "--prompts", prompts_file]
    code, report = run_drift([*argv, *SMALL_RUN, "--png", str(png)], tmp_path)
    assert code == 0  # the exit code judges the target; the baseline is for comparison
    target, baseline = report["endpoints"]
    assert (target["role"], baseline["role"]) == ("target", "baseline")
    assert baseline["base_url"] == default.base_url
    assert target["overall"]["prompts_drifting"] == 0
    assert baseline["overall"]["prompts_drifting"] == 1
    assert len(default.measured()) == 12
    out = capsys.readouterr().out
    assert "[target] deterministic" in out
    assert "[baseline] DRIFT" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"prompt": "fine"}', '{"prompt": '], "line 2: not valid JSON"),
        (['{"prompt": 3}'], 'line 1: "prompt" must be'),
        (['{"text": "x"}'], 'line 1: expected an object with either "prompt" or "messages"'),
    ],
)
def test_bad_prompts_jsonl_names_the_line(lines, expected, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = drift.main(["--base-url", "http://127.0.0.1:9/v1", "--prompts", str(path)])
    assert code == 2
    assert f"{path} {expected}" in capsys.readouterr().err


def test_chat_api(fake_server, tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    lines = [
        {"prompt": "plain text"},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
            ]
        },
        {"prompt": [101, 102, 103]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    server = fake_server()
    argv = ["--base-url", server.base_url, "--api", "chat", "--prompts", str(path), *SMALL_RUN]
    code, report = run_drift([*argv, "--logprobs", "2"], tmp_path)
    assert code == 0
    assert report["skipped_prompts"] == [{"line": 3, "kind": "token_ids"}]
    assert "skipped" in capsys.readouterr().err
    assert {path for path, _ in server.received} == {"/v1/chat/completions"}
    bodies = server.measured()
    assert len(bodies) == 2 * 2 * 2
    assert all(b["logprobs"] is True and b["top_logprobs"] == 2 for b in bodies)
    assert {json.dumps(b["messages"]) for b in bodies} == {
        json.dumps([{"role": "user", "content": "plain text"}]),
        json.dumps(lines[1]["messages"]),
    }
    assert report["endpoints"][0]["overall"]["identical_rate"] == 1.0


def test_seeded_sampling_sends_seed_and_temperature(fake_server, prompts_file, tmp_path):
    server = fake_server()
    argv = ["--base-url", server.base_url, "--prompts", prompts_file, *SMALL_RUN]
    code, _ = run_drift([*argv, "--temperature", "0.7", "--seed", "11"], tmp_path)
    assert code == 0
    bodies = server.measured()
    assert len(bodies) == 12
    for body in bodies:
        index = int(body["prompt"][1:])  # "p<index>"
        assert body["temperature"] == 0.7
        assert body["seed"] == 11 + index  # the same in every repeat
        assert body["logprobs"] == 1
        assert body["return_tokens_as_token_ids"] is True


def test_png_skipped_with_a_note_without_matplotlib(
    fake_server, prompts_file, tmp_path, monkeypatch, capsys
):
    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    server = fake_server()
    png = tmp_path / "drift.png"
    argv = ["--base-url", server.base_url, "--prompts", prompts_file, "--repeats", "1"]
    assert drift.main([*argv, "--png", str(png)]) == 0
    assert "matplotlib is not installed: --png skipped" in capsys.readouterr().err
    assert not png.exists()


def test_sampling_without_seed_is_a_usage_error(prompts_file, capsys):
    code = drift.main(["--base-url", "http://127.0.0.1:9/v1", "--temperature", "0.5"])
    assert code == 2
    assert "--temperature > 0 needs --seed" in capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).with_name("det-backend")
    command = str(script) if script.exists() else shutil.which("det-backend")
    assert command, "console script det-backend not installed (pip install -e .)"
    result = subprocess.run(
        [command, "drift", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--base-url" in result.stdout and "det-backend drift" in result.stdout


FAKE_VLLM = """\
#!{python}
import json, os, sys
sys.path.insert(0, {tests!r})
args = sys.argv[1:]
with open({record!r}, "w") as f:
    json.dump({{"argv": args, "pid": os.getpid()}}, f)
if {fail!r}:
    print("RuntimeError: no CUDA GPU found", flush=True)
    sys.exit(1)
from test_drift import FakeOpenAI
FakeOpenAI(port=int(args[args.index("--port") + 1]), model=args[1]).httpd.serve_forever()
"""


def install_fake_vllm(tmp_path: Path, monkeypatch, fail: bool) -> Path:
    """A `vllm` executable first on PATH that serves FakeOpenAI; returns its record file."""
    bin_dir, record = tmp_path / "bin", tmp_path / "vllm.json"
    bin_dir.mkdir()
    script = bin_dir / "vllm"
    tests = str(Path(__file__).parent)
    script.write_text(
        FAKE_VLLM.format(python=sys.executable, tests=tests, record=str(record), fail=fail)
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


def test_serve_starts_vllm_and_stops_it(prompts_file, tmp_path, monkeypatch):
    record = install_fake_vllm(tmp_path, monkeypatch, fail=False)
    argv = ["--serve", "tiny-model", "--serve-args", "--attention-backend CUSTOM"]
    argv += ["--prompts", prompts_file, "--repeats", "1", "--concurrency", "1"]
    code, report = run_drift(argv, tmp_path)
    assert code == 0
    assert report["endpoints"][0]["model"] == "tiny-model"
    started = json.loads(record.read_text())
    assert started["argv"][:4] == ["serve", "tiny-model", "--host", "127.0.0.1"]
    assert started["argv"][-2:] == ["--attention-backend", "CUSTOM"]
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(started["pid"], 0)


def test_serve_failure_shows_the_log(prompts_file, tmp_path, monkeypatch, capsys):
    install_fake_vllm(tmp_path, monkeypatch, fail=True)
    code = drift.main(["--serve", "tiny-model", "--prompts", prompts_file])
    err = capsys.readouterr().err
    assert code == 2
    assert "vllm exited with code 1" in err and "no CUDA GPU found" in err


def test_first_divergence_of_a_shorter_output():
    def output(tokens: list[str]) -> drift.Output:
        n = len(tokens)
        return drift.Output("".join(tokens), tuple(tokens), (-1.0,) * n, ((),) * n)

    full, prefix = output(["a", "b", "c"]), output(["a", "b"])
    assert drift.first_divergence(full, prefix) == 2
    assert drift.first_divergence(full, full) is None
    assert drift.max_abs_dlogprob(full, prefix) == 0.0
    assert drift.max_abs_dlogprob(full, output(["x", "b", "c"])) is None
