"""`det-backend drift`: does an OpenAI-compatible endpoint give the same request the same bits
(tokens and logprobs) while other requests share its batches?

Each prompt is sent --repeats times at each --concurrency level (requests of different prompts
interleaved; --background adds random requests in flight), and all of a prompt's responses are
compared with its most common one: distinct outputs, identical rate, first divergence (token
index) and the largest |logprob difference| before the tokens part ways. Failed requests and
timeouts are counted, never dropped.

Exit code: 0 when every prompt of the target gave exactly one output and no request failed;
1 on drift or failed requests; 2 on a usage error or an unreachable server; 130 when
interrupted. The JSON report (--json) is written in every case that measured something,
so the command can gate CI.

Examples:
  # a server that is already running (vLLM or any OpenAI-compatible one)
  det-backend drift --base-url http://127.0.0.1:8000/v1
  # start vLLM with our backend, measure, stop it; compare with a default vLLM on port 8001
  det-backend drift --serve Qwen/Qwen3-8B --serve-args "--attention-backend CUSTOM" \\
      --baseline http://127.0.0.1:8001/v1 --json drift.json --png drift.png
  # chat API, own prompts, seeded sampling
  det-backend drift --base-url URL --api chat --prompts mine.jsonl --temperature 0.8 --seed 7
  # the same as `det-backend drift ...`
  python -m det_backend.drift --base-url URL

Prompts (JSONL, one request per line; default: the bundled det_backend/prompts/default.jsonl):
  {"prompt": "text"}   {"prompt": [token ids]}   {"messages": [{"role": "user", "content": "..."}]}
A text prompt sent to --api chat becomes one user message. Token-id prompts go only to
completions and "messages" only to chat; the others are skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import __version__

API_PATHS = {"completions": "/completions", "chat": "/chat/completions"}
# Which prompt kinds each API can take.
API_PROMPT_KINDS = {"completions": ("text", "token_ids"), "chat": ("text", "messages")}
MESSAGES_PER_KIND = 3
PROBE_TIMEOUT_S = 10.0
EXIT_OK, EXIT_DRIFT, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class SetupError(Exception):
    """Usage errors and unreachable servers: exit code 2, one message, no traceback."""


class RequestError(Exception):
    """A request that gave no comparable output. `kind`: http (4xx/5xx), timeout, connection,
    non_json, no_choices, no_logprobs (asked for but absent), malformed (other wrong shapes)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True, eq=False)
class Prompt:
    index: int  # position among the prompts used; also the seed offset
    line: int  # line of the JSONL file, so reports point at it
    kind: str  # "text" | "token_ids" | "messages"
    payload: Any  # str | list[int] | list[dict]

    def preview(self, width: int = 22) -> str:
        if self.kind == "token_ids":
            return f"[{len(self.payload)} token ids]"
        text = self.payload if self.kind == "text" else str(self.payload[-1]["content"])
        return _shorten(text, width)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def parse_prompt_line(raw: str, where: str) -> tuple[str, Any]:
    """(kind, payload) of one JSONL line; SetupError naming `where` when it is not a prompt."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SetupError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
        raise SetupError(f'{where}: expected an object with either "prompt" or "messages"')
    if "messages" in obj:
        messages = obj["messages"]
        if not (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        ):
            raise SetupError(
                f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects'
            )
        return "messages", messages
    prompt = obj["prompt"]
    if isinstance(prompt, str) and prompt:
        return "text", prompt
    # type() rather than isinstance: JSON true/false would pass as ints.
    if isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt):
        return "token_ids", prompt
    raise SetupError(
        f'{where}: "prompt" must be a non-empty string or a non-empty list of token ids (ints >= 0)'
    )


def load_prompts(
    path: str | None, api: str, limit: int | None
) -> tuple[list[Prompt], list[dict], str]:
    """The prompts usable with `api` (first `limit`), the skipped ones, and the source name."""
    if path is None:
        source = "det_backend/prompts/default.jsonl"
        text = resources.files("det_backend.prompts").joinpath("default.jsonl").read_text()
    else:
        source = path
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise SetupError(f"cannot read prompts file {path}: {e.strerror}") from None
    prompts: list[Prompt] = []
    skipped: list[dict] = []
    # Every line is checked, also past `limit`: a broken file fails whole, not half-way.
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        kind, payload = parse_prompt_line(raw, f"{source} line {number}")
        if kind in API_PROMPT_KINDS[api]:
            prompts.append(Prompt(len(prompts), number, kind, payload))
        else:
            skipped.append({"line": number, "kind": kind})
    prompts = prompts[:limit] if limit else prompts
    if not prompts:
        raise SetupError(f"{source}: no prompts usable with --api {api}")
    return prompts, skipped, source


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class Settings:
    api: str
    max_tokens: int
    temperature: float
    seed: int | None
    logprobs: int
    token_ids: bool
    timeout: float
    repeats: int
    concurrency: tuple[int, ...]
    background: int
    abort_after: int
    api_key: str | None = field(default=None, repr=False)
    # More request fields, sent as they are: top_k, top_p, min_p, penalties, logit_bias.
    sampling: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        config = asdict(self)
        config["api_key"] = "set" if self.api_key else None  # never the key itself
        return config


@dataclass(frozen=True)
class Target:
    role: str  # "target" (judged by the exit code) or "baseline" (for comparison)
    base_url: str
    model: str


def request_body(settings: Settings, model: str, prompt: Prompt) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        **settings.sampling,
    }
    if settings.seed is not None:
        # Per prompt, the same in every repeat: a deterministic server must then repeat itself.
        body["seed"] = settings.seed + prompt.index
    if settings.token_ids:
        # vLLM extension: tokens come back as "token_id:123", so equal ids compare equal even
        # where two ids decode to the same string.
        body["return_tokens_as_token_ids"] = True
    if settings.api == "chat":
        messages = prompt.payload
        if prompt.kind == "text":
            messages = [{"role": "user", "content": prompt.payload}]
        body.update(messages=messages, logprobs=True, top_logprobs=settings.logprobs)
    else:
        body.update(prompt=prompt.payload, logprobs=settings.logprobs)
    return body


def http_json(url: str, body: dict | None, timeout: float, api_key: str | None) -> Any:
    """GET (body None) or POST JSON and parse the reply; RequestError says what went wrong."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            raw = reply.read()
    # Order matters: HTTPError is a URLError, and both are OSErrors, as is TimeoutError.
    except urllib.error.HTTPError as e:
        raise RequestError("http", f"HTTP {e.code}: {_error_detail(e)}") from None
    except TimeoutError:
        raise RequestError("timeout", f"no reply within {timeout:g} s") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise RequestError("timeout", f"no reply within {timeout:g} s") from None
        raise RequestError("connection", str(e.reason)) from None
    except (http.client.HTTPException, OSError) as e:
        raise RequestError("connection", f"{type(e).__name__}: {e}") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("non_json", f"reply is not JSON: {raw[:120]!r}") from None


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        return " ".join(error.read()[:300].decode(errors="replace").split())
    except OSError:
        return error.reason


@dataclass(frozen=True)
class Output:
    """One response, normalised over both APIs."""

    text: str
    tokens: tuple[str, ...]
    logprobs: tuple[float | None, ...]
    top: tuple[tuple[tuple[str, float], ...], ...]  # per step: (token, logprob), sorted

    def step(self, i: int) -> tuple:
        return self.tokens[i], self.logprobs[i], self.top[i]

    @property
    def key(self) -> str:
        # repr is exact for floats (it round-trips) and treats NaN and -0.0 as values.
        return repr((self.text, self.tokens, self.logprobs, self.top))


def _first_choice(reply: Any) -> dict:
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        raise RequestError("no_choices", f"reply has no choices: {json.dumps(reply)[:120]}")
    return choices[0]


def _sorted_pairs(pairs: Any) -> tuple[tuple[str, float], ...]:
    # Top-k order is presentation, not numerics: sort so that only values can differ.
    return tuple(sorted(((str(t), lp) for t, lp in pairs), key=repr))


def parse_completion(reply: Any) -> Output:
    choice = _first_choice(reply)
    logprobs = choice.get("logprobs")
    if not logprobs or logprobs.get("tokens") is None or logprobs.get("token_logprobs") is None:
        raise RequestError("no_logprobs", "choices[0].logprobs missing (logprobs unsupported?)")
    tokens, values = logprobs["tokens"], logprobs["token_logprobs"]
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    if not len(tokens) == len(values) == len(tops):
        raise RequestError(
            "malformed", "logprobs.tokens/token_logprobs/top_logprobs lengths differ"
        )
    top = tuple(_sorted_pairs((d or {}).items()) for d in tops)
    return Output(str(choice.get("text") or ""), tuple(map(str, tokens)), tuple(values), top)


def parse_chat(reply: Any) -> Output:
    choice = _first_choice(reply)
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if content is None:
        raise RequestError("no_logprobs", "choices[0].logprobs.content missing")
    tokens = tuple(str(step["token"]) for step in content)
    values = tuple(step["logprob"] for step in content)
    top = tuple(
        _sorted_pairs((t["token"], t["logprob"]) for t in step.get("top_logprobs") or [])
        for step in content
    )
    return Output(str((choice.get("message") or {}).get("content") or ""), tokens, values, top)


PARSERS = {"completions": parse_completion, "chat": parse_chat}


@dataclass
class Response:
    prompt: int
    concurrency: int
    repeat: int
    output: Output | None = None
    error: str | None = None  # the kind, when the request failed
    message: str = ""
    fingerprint: str | None = None
    model: str | None = None


def send_prompt(
    target: Target, settings: Settings, prompt: Prompt, level: int, repeat: int
) -> Response:
    response = Response(prompt.index, level, repeat)
    body = request_body(settings, target.model, prompt)
    try:
        reply = http_json(
            target.base_url + API_PATHS[settings.api], body, settings.timeout, settings.api_key
        )
        try:
            response.output = PARSERS[settings.api](reply)
        except (KeyError, TypeError, AttributeError) as e:
            # Any JSON can come back from an arbitrary server; a wrong shape is its error.
            raise RequestError(
                "malformed", f"unexpected reply shape ({type(e).__name__}: {e})"
            ) from None
        response.fingerprint = reply.get("system_fingerprint")
        response.model = reply.get("model")
    except RequestError as e:
        response.error, response.message = e.kind, e.message
    return response


def resolve_model(base_url: str, model: str | None, api_key: str | None) -> str:
    """`model`, or the first id the server lists; SetupError when the server can't be reached."""
    try:
        reply = http_json(base_url + "/models", None, PROBE_TIMEOUT_S, api_key)
    except RequestError as e:
        if e.kind in ("connection", "timeout"):
            raise SetupError(f"cannot reach {base_url}: {e.message}") from None
        if model:
            return model  # reachable; not every OpenAI-compatible server lists its models
        raise SetupError(
            f"GET {base_url}/models failed ({e.message}); pass --model, "
            "and check that the URL ends in /v1"
        ) from None
    if model:
        return model
    try:
        return str(reply["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise SetupError(f"GET {base_url}/models lists no model; pass --model") from None


# ---------------------------------------------------------------------------------------------
# Measuring

BACKGROUND_WORDS = (
    "river stone quiet number garden signal paper orange window market seven future "
    "engine cloud letter winter system bright music table"
).split()


class BackgroundLoad:
    """`settings.background` threads sending random requests until stopped, so that measured
    requests share batches with others of varying length: the case where batch-variant
    kernels change results. Their failures are counted but do not judge the endpoint."""

    def __init__(self, target: Target, settings: Settings, stats: dict) -> None:
        self.target, self.settings, self.stats = target, settings, stats
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._loop, args=(worker,), daemon=True)
            for worker in range(settings.background)
        ]

    def __enter__(self) -> BackgroundLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.stop.set()
        if exc_type is None:  # on Ctrl-C leave the daemon threads; they die with the process
            for thread in self.threads:
                thread.join()

    def _body(self, rng: random.Random) -> dict:
        text = " ".join(rng.choices(BACKGROUND_WORDS, k=rng.randint(4, 400)))
        body: dict[str, Any] = {
            "model": self.target.model,
            "max_tokens": rng.randint(1, 2 * self.settings.max_tokens),
            "temperature": self.settings.temperature,
        }
        if self.settings.api == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        return body

    def _loop(self, worker: int) -> None:
        rng = random.Random(worker)  # the same load pattern every run
        url = self.target.base_url + API_PATHS[self.settings.api]
        while not self.stop.is_set():
            try:
                http_json(url, self._body(rng), self.settings.timeout, self.settings.api_key)
                failure = None
            except RequestError as e:
                failure = f"{e.kind}: {e.message}"
            with self.lock:
                self.stats["sent"] += 1
                if failure:
                    self.stats["failed"] += 1
                    if len(self.stats["messages"]) < MESSAGES_PER_KIND:
                        self.stats["messages"].append(failure)


@dataclass
class Run:
    target: Target
    responses: list[Response] = field(default_factory=list)
    interrupted: bool = False
    stopped: str | None = None  # why the run stopped before the end, when it did
    background: dict = field(default_factory=lambda: {"sent": 0, "failed": 0, "messages": []})


def measure(target: Target, prompts: list[Prompt], settings: Settings) -> Run:
    """Every prompt, --repeats times, at every concurrency level; Ctrl-C keeps what was done."""
    run = Run(target)
    total = len(prompts) * settings.repeats * len(settings.concurrency)
    bar = tqdm(total=total, desc=target.role, unit="req", file=sys.stderr, disable=None)
    try:
        for level in settings.concurrency:
            with BackgroundLoad(target, settings, run.background):
                _measure_level(run, prompts, settings, level, bar)
            if run.stopped:
                break
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        bar.close()
    return run


def _measure_level(
    run: Run, prompts: list[Prompt], settings: Settings, level: int, bar: tqdm
) -> None:
    # Repeat-major order interleaves the prompts, so each batch mixes different requests.
    tasks = [(prompt, repeat) for repeat in range(settings.repeats) for prompt in prompts]
    pool = ThreadPoolExecutor(max_workers=level)
    futures = [pool.submit(send_prompt, run.target, settings, p, level, r) for p, r in tasks]
    recorded: set[Future] = set()
    failures_in_a_row = 0
    try:
        for future in as_completed(futures):
            response = future.result()
            recorded.add(future)
            _record(run, response, bar)
            failures_in_a_row = failures_in_a_row + 1 if response.error else 0
            if settings.abort_after and failures_in_a_row >= settings.abort_after:
                run.stopped = (
                    f"{failures_in_a_row} requests in a row failed "
                    f"(--abort-after); last: {response.error}: {response.message}"
                )
                break
    except BaseException:
        # Ctrl-C: drop queued requests and don't wait for those in flight.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True, cancel_futures=True)
    # After an abort, requests that were already in flight still count: they were sent.
    for future in futures:
        if future not in recorded and not future.cancelled():
            _record(run, future.result(), bar)


def _record(run: Run, response: Response, bar: tqdm) -> None:
    run.responses.append(response)
    bar.update(1)
    if response.error:
        bar.set_postfix(failed=sum(r.error is not None for r in run.responses), refresh=False)


# ---------------------------------------------------------------------------------------------
# Comparing


def first_divergence(ref: Output, other: Output) -> int | None:
    """First token index where `other` differs from `ref` in token, logprob or top logprobs;
    None when identical. Equal steps of different lengths diverge at the shorter length."""
    for i in range(min(len(ref.tokens), len(other.tokens))):
        if repr(ref.step(i)) != repr(other.step(i)):
            return i
    if len(ref.tokens) != len(other.tokens) or ref.text != other.text:
        return min(len(ref.tokens), len(other.tokens))
    return None


def max_abs_dlogprob(ref: Output, other: Output) -> float | None:
    """Largest |logprob difference| of the sampled token over the steps where both still have
    the same tokens; after the tokens part ways the contexts differ and logprobs are not
    comparable. None when there is no such step (the first tokens differ, or no tokens)."""
    diffs = []
    for token_a, token_b, a, b in zip(
        ref.tokens, other.tokens, ref.logprobs, other.logprobs, strict=False
    ):
        if token_a != token_b:
            break
        if a is not None and b is not None:
            # repr first: -inf == -inf must give 0, not inf - inf = nan.
            diffs.append(0.0 if repr(a) == repr(b) else abs(a - b))
    return max(diffs) if diffs else None


def compare_responses(responses: list[Response]) -> dict:
    """Distinct outputs among `responses` (all successful) against the most common one."""
    if not responses:
        return {
            "distinct_outputs": 0,
            "identical": 0,
            "identical_rate": None,
            "first_divergence": None,
            "max_abs_dlogprob": None,
            "variants": [],
        }
    # Counter keeps first-seen order, and most_common() is stable: ties go to the earliest.
    counts = Counter(r.output.key for r in responses)
    first_seen = {}
    levels: dict[str, Counter] = {}
    for r in responses:
        first_seen.setdefault(r.output.key, r.output)
        levels.setdefault(r.output.key, Counter())[r.concurrency] += 1
    ref_key, ref_count = counts.most_common(1)[0]
    ref = first_seen[ref_key]
    variants = [
        {
            "count": count,
            "most_common": key == ref_key,
            "text": first_seen[key].text,
            "first_divergence": first_divergence(ref, first_seen[key]),
            "max_abs_dlogprob": max_abs_dlogprob(ref, first_seen[key]),
            "by_concurrency": {str(c): n for c, n in sorted(levels[key].items())},
        }
        for key, count in counts.items()
    ]
    divergences = [v["first_divergence"] for v in variants if v["first_divergence"] is not None]
    dlogprobs = [v["max_abs_dlogprob"] for v in variants if v["max_abs_dlogprob"] is not None]
    return {
        "distinct_outputs": len(counts),
        "identical": ref_count,
        "identical_rate": ref_count / len(responses),
        "first_divergence": min(divergences, default=None),
        "max_abs_dlogprob": max(dlogprobs, default=None),
        "variants": variants,
    }


def summarize_prompt(prompt: Prompt, responses: list[Response]) -> dict:
    ok = [r for r in responses if r.output is not None]
    failed = Counter(r.error for r in responses if r.error)
    timeouts = failed.pop("timeout", 0)
    stats = compare_responses(ok)
    return {
        "index": prompt.index,
        "line": prompt.line,
        "kind": prompt.kind,
        "preview": prompt.preview(60),
        "requests": len(responses),
        "ok": len(ok),
        "errors": sum(failed.values()),
        "error_kinds": dict(failed),
        "timeouts": timeouts,
        **stats,
        "deterministic": stats["distinct_outputs"] == 1 and not failed and not timeouts,
    }


def summarize(run: Run, prompts: list[Prompt], settings: Settings) -> dict:
    """One endpoint's report: per prompt, overall, fingerprints, errors."""
    order = {level: i for i, level in enumerate(settings.concurrency)}
    # Compare in plan order (level, repeat), not completion order, so ties break the same way.
    responses = sorted(run.responses, key=lambda r: (order[r.concurrency], r.repeat))
    per_prompt = [
        summarize_prompt(p, [r for r in responses if r.prompt == p.index]) for p in prompts
    ]
    error_kinds = Counter(r.error for r in run.responses if r.error)
    fingerprints = Counter((r.fingerprint, r.model) for r in run.responses if r.output)
    return {
        "role": run.target.role,
        "base_url": run.target.base_url,
        "model": run.target.model,
        "interrupted": run.interrupted,
        "stopped": run.stopped,
        "overall": _overall(run, per_prompt, error_kinds, settings),
        "per_prompt": per_prompt,
        "fingerprints": [
            {"system_fingerprint": fp, "model": model, "responses": n}
            for (fp, model), n in fingerprints.most_common()
        ],
        "errors": {"counts": dict(error_kinds), "messages": _error_messages(run, prompts)},
        "background": run.background,
    }


def _overall(run: Run, per_prompt: list[dict], error_kinds: Counter, settings: Settings) -> dict:
    complete = not run.interrupted and not run.stopped
    ok = sum(p["ok"] for p in per_prompt)
    timeouts = error_kinds.get("timeout", 0)
    divergences = [p["first_divergence"] for p in per_prompt if p["first_divergence"] is not None]
    dlogprobs = [p["max_abs_dlogprob"] for p in per_prompt if p["max_abs_dlogprob"] is not None]
    return {
        "prompts": len(per_prompt),
        "prompts_one_output": sum(p["distinct_outputs"] == 1 for p in per_prompt),
        "prompts_drifting": sum(p["distinct_outputs"] > 1 for p in per_prompt),
        "distinct_outputs_max": max(p["distinct_outputs"] for p in per_prompt),
        "requests_planned": len(per_prompt) * settings.repeats * len(settings.concurrency),
        "requests": len(run.responses),
        "ok": ok,
        "errors": sum(error_kinds.values()) - timeouts,
        "timeouts": timeouts,
        "identical_rate": sum(p["identical"] for p in per_prompt) / ok if ok else None,
        "first_divergence": min(divergences, default=None),
        "max_abs_dlogprob": max(dlogprobs, default=None),
        "complete": complete,
        "deterministic": complete and all(p["deterministic"] for p in per_prompt),
    }


def _error_messages(run: Run, prompts: list[Prompt]) -> dict[str, list[str]]:
    """The first few messages of each kind, in the order they came."""
    messages: dict[str, list[str]] = {}
    for r in run.responses:
        if r.error and len(messages.setdefault(r.error, [])) < MESSAGES_PER_KIND:
            where = (
                f"prompt {r.prompt} (line {prompts[r.prompt].line}), concurrency {r.concurrency}"
            )
            messages[r.error].append(f"{where}: {r.message}")
    return messages


def exit_code(endpoints: list[dict]) -> int:
    """Judged on the target only; a baseline (say, default vLLM) is expected to drift."""
    target = endpoints[0]
    if target["interrupted"]:
        return EXIT_INTERRUPTED
    return EXIT_OK if target["overall"]["deterministic"] else EXIT_DRIFT


# ---------------------------------------------------------------------------------------------
# Reporting

COLUMNS = (("distinct", 9), ("identical", 10), ("1st div", 8), ("max|dlp|", 10), ("err/t.o", 9))
LABEL_WIDTH = 27


def _cells(
    distinct: int, rate: float | None, div: int | None, dlp: float | None, errors: str
) -> str:
    values = (
        str(distinct),
        "-" if rate is None else f"{100 * rate:.1f}%",
        "-" if div is None else str(div),
        "-" if dlp is None else f"{dlp:.3g}",
        errors,
    )
    return "".join(f"{v:>{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True))


def format_table(report: dict) -> str:
    endpoints = report["endpoints"]
    group = sum(w for _, w in COLUMNS)
    lines = [f"[{e['role']}] {e['base_url']}  model {e['model']}" for e in endpoints]
    c = report["config"]
    lines.append(
        f"{c['api']} API, {len(report['prompts'])} prompts x {c['repeats']} repeats x "
        f"concurrency {','.join(map(str, c['concurrency']))}, background {c['background']}, "
        f"temperature {c['temperature']:g}, max_tokens {c['max_tokens']}"
    )
    lines.append(" " * LABEL_WIDTH + "".join(f"{e['role']:>{group}}" for e in endpoints))
    header = f"{'#':>3} {'prompt':<{LABEL_WIDTH - 4}}" + "".join(
        f"{name:>{w}}" for name, w in COLUMNS
    ) * len(endpoints)
    lines += [header, "-" * len(header)]
    for i, prompt in enumerate(report["prompts"]):
        row = f"{i:>3} {_fit(prompt['preview'], LABEL_WIDTH - 5)} "
        for e in endpoints:
            p = e["per_prompt"][i]
            row += _cells(
                p["distinct_outputs"],
                p["identical_rate"],
                p["first_divergence"],
                p["max_abs_dlogprob"],
                f"{p['errors']}/{p['timeouts']}",
            )
        lines.append(row)
    lines.append("-" * len(header))
    row = f"{'overall':<{LABEL_WIDTH}}"
    for e in endpoints:
        o = e["overall"]
        row += _cells(
            o["distinct_outputs_max"],
            o["identical_rate"],
            o["first_divergence"],
            o["max_abs_dlogprob"],
            f"{o['errors']}/{o['timeouts']}",
        )
    lines.append(row)
    for e in endpoints:
        lines += _endpoint_notes(e)
    return "\n".join(lines)


def _fit(text: str, width: int) -> str:
    """`text` cut (with ...) and padded to `width` terminal columns; CJK characters take two."""

    def columns(ch: str) -> int:
        return 2 if unicodedata.east_asian_width(ch) in "WF" else 1

    if sum(map(columns, text)) > width:
        cut, used = "", 0
        for ch in text:
            if used + columns(ch) > width - 3:
                break
            cut, used = cut + ch, used + columns(ch)
        text = cut + "..."
    return text + " " * (width - sum(map(columns, text)))


def _verdict(e: dict) -> str:
    o = e["overall"]
    if o["deterministic"]:
        return "deterministic"
    if o["prompts_drifting"]:
        return "DRIFT"
    if o["errors"] or o["timeouts"]:
        return "FAILED REQUESTS"
    return "INCOMPLETE"


def _endpoint_notes(e: dict) -> list[str]:
    o = e["overall"]
    lines = [
        f"[{e['role']}] {_verdict(e)}: {o['prompts_one_output']}/{o['prompts']} prompts gave one "
        f"output; {o['ok']}/{o['requests_planned']} requests answered, {o['errors']} failed, "
        f"{o['timeouts']} timed out"
    ]
    fingerprints = ", ".join(
        f"{f['system_fingerprint']} (model {f['model']}) x{f['responses']}"
        for f in e["fingerprints"]
    )
    lines.append(f"  fingerprints: {fingerprints or '-'}")
    if len(e["fingerprints"]) > 1:
        lines.append("  the deployment changed during the run (more than one fingerprint/model)")
    for kind, messages in e["errors"]["messages"].items():
        lines += [f"  {kind} ({e['errors']['counts'][kind]}): {m}" for m in messages]
    background = e["background"]
    if background["sent"]:
        lines.append(f"  background: {background['sent']} requests, {background['failed']} failed")
    if e["stopped"]:
        lines.append(f"  stopped early: {e['stopped']}")
    if e["interrupted"]:
        lines.append("  interrupted: results are partial")
    return lines


def write_png(report: dict, path: str) -> bool:
    """Identical rate per prompt, one bar per endpoint; False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    endpoints = report["endpoints"]
    n = len(report["prompts"])
    figure = Figure(figsize=(max(6.0, 0.5 * n + 2), 4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    width = 0.8 / len(endpoints)
    for j, e in enumerate(endpoints):
        rates = [p["identical_rate"] or 0.0 for p in e["per_prompt"]]
        xs = [i + (j - (len(endpoints) - 1) / 2) * width for i in range(n)]
        ax.bar(xs, rates, width, label=f"{e['role']}: {e['base_url']}")
    ax.set_xticks(range(n))
    ax.set_xlabel("prompt")
    ax.set_ylabel("identical rate")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"det-backend drift: {report['config']['api']} API, {report['started']}")
    ax.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def build_report(
    argv: list[str],
    started: str,
    settings: Settings,
    prompts: list[Prompt],
    source: str,
    skipped: list[dict],
    endpoints: list[dict],
) -> dict:
    return {
        "tool": "det-backend drift",
        "version": __version__,
        "command": _redacted(argv),
        "started": started,
        "finished": _now(),
        "config": {**settings.to_json(), "prompts_source": source},
        "prompts": [
            {"index": p.index, "line": p.line, "kind": p.kind, "preview": p.preview(60)}
            for p in prompts
        ],
        "skipped_prompts": skipped,
        "endpoints": endpoints,
        "exit_code": exit_code(endpoints),
    }


def _redacted(argv: list[str]) -> list[str]:
    """argv without the value of --api-key: reports get shared, keys must not be."""
    out = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "--api-key":
            arg = "***"
        elif arg.startswith("--api-key="):
            arg = "--api-key=***"
        out.append(arg)
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Starting vLLM


@dataclass
class Served:
    base_url: str
    process: subprocess.Popen
    log_path: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_vllm(model: str, port: int, extra_args: list[str], timeout: float) -> Iterator[Served]:
    """`vllm serve MODEL` in its own process group, until healthy; stopped on every exit path."""
    port = port or _free_port()
    # 127.0.0.1 so the server under test is not exposed; a --host in extra_args comes later
    # on the command line and wins.
    command = ["vllm", "serve", model, "--host", "127.0.0.1", "--port", str(port), *extra_args]
    log = tempfile.NamedTemporaryFile("w", prefix="det-backend-vllm-", suffix=".log", delete=False)
    print(f"starting: {shlex.join(command)}  (log: {log.name})", file=sys.stderr)
    try:
        # Own session: Ctrl-C reaches only us, and we stop the whole group (API server and
        # engine processes) in order.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    except FileNotFoundError:
        log.close()
        raise SetupError("--serve: `vllm` is not on PATH") from None
    try:
        _wait_healthy(process, f"http://127.0.0.1:{port}/health", timeout, log.name)
        yield Served(f"http://127.0.0.1:{port}/v1", process, log.name)
    finally:
        _stop(process)
        log.close()


def _wait_healthy(process: subprocess.Popen, url: str, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SetupError(
                f"--serve: vllm exited with code {process.returncode} before it was healthy; "
                f"last lines of {log_path}:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except (OSError, http.client.HTTPException):
            pass  # not listening yet
        time.sleep(0.25)
    raise SetupError(
        f"--serve: {url} not healthy after {timeout:g} s (--serve-timeout); "
        f"last lines of {log_path}:\n{_tail(log_path)}"
    )


def _tail(path: str, lines: int = 20) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    # The group id is the child's pid (start_new_session): only processes we started.
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8,64, got {text!r}") from None
    if any(level < 1 for level in levels) or len(set(levels)) != len(levels):
        raise argparse.ArgumentTypeError(f"levels must be distinct and >= 1, got {text!r}")
    return levels


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_argument_group("target")
    one = where.add_mutually_exclusive_group(required=True)
    one.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    one.add_argument("--serve", metavar="MODEL", help="start `vllm serve MODEL`, measure, stop it")
    where.add_argument(
        "--serve-args",
        default="",
        help='extra `vllm serve` arguments in one string; one flag alone needs "=": '
        '--serve-args="--enforce-eager"',
    )
    where.add_argument("--port", type=int, default=0, help="port for --serve (default: a free one)")
    where.add_argument("--serve-timeout", type=float, default=900.0, help="seconds to healthy")
    where.add_argument("--model", help="model name (default: the first id from GET /models)")
    where.add_argument("--api", choices=sorted(API_PATHS), default="completions")
    where.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY"
    )
    where.add_argument("--baseline", metavar="URL", help="also measure this endpoint, side by side")
    where.add_argument("--baseline-model", help="model at --baseline (default: its first id)")

    what = parser.add_argument_group("requests")
    what.add_argument("--prompts", metavar="FILE", help="JSONL prompts (default: bundled set)")
    what.add_argument("-n", "--num-prompts", type=_positive_int, help="use the first N prompts")
    what.add_argument("--repeats", type=_positive_int, default=5)
    what.add_argument("--concurrency", type=_levels, default=(1, 8, 64), help="default 1,8,64")
    what.add_argument("--background", type=_non_negative_int, default=0, help="random requests")
    what.add_argument("--temperature", type=float, default=0.0)
    what.add_argument("--seed", type=int, help="per-request seed = SEED + prompt index")
    what.add_argument("--max-tokens", type=_positive_int, default=64)
    what.add_argument("--logprobs", type=_non_negative_int, default=1, help="top-k logprobs")
    what.add_argument("--no-token-ids", action="store_true", help="no return_tokens_as_token_ids")
    what.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    what.add_argument(
        "--abort-after",
        type=_non_negative_int,
        default=20,
        help="stop after this many failed requests in a row (0: never); default 20",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the report as JSON")
    out.add_argument("--png", metavar="FILE", help="bar chart of the identical rate per prompt")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors argparse can't see; parser.error exits with code 2."""
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.temperature > 0 and args.seed is None:
        parser.error("--temperature > 0 needs --seed: unseeded sampling differs by design")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    for name in ("base_url", "baseline"):
        url = getattr(args, name)
        if url and not url.startswith(("http://", "https://")):
            parser.error(f"--{name.replace('_', '-')} must start with http:// or https://")
    for name in ("json", "png"):
        path = getattr(args, name)
        if path and not Path(path).resolve().parent.is_dir():
            parser.error(f"--{name}: folder of {path} does not exist")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        api=args.api,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        logprobs=args.logprobs,
        token_ids=not args.no_token_ids,
        timeout=args.timeout,
        repeats=args.repeats,
        concurrency=args.concurrency,
        background=args.background,
        abort_after=args.abort_after,
        api_key=args.api_key,
    )


def _measure_all(args: argparse.Namespace, settings: Settings, prompts: list[Prompt]) -> list[Run]:
    """Runs of the target, then the baseline (one at a time: they may share a GPU)."""
    with contextlib.ExitStack() as stack:
        base_url = args.base_url
        if args.serve:
            served = stack.enter_context(
                serve_vllm(args.serve, args.port, shlex.split(args.serve_args), args.serve_timeout)
            )
            base_url = served.base_url
        base_url = base_url.rstrip("/")
        targets = [Target("target", base_url, resolve_model(base_url, args.model, args.api_key))]
        if args.baseline:
            url = args.baseline.rstrip("/")
            model = resolve_model(url, args.baseline_model, args.api_key)
            targets.append(Target("baseline", url, model))
        runs = []
        for target in targets:
            runs.append(measure(target, prompts, settings))
            if runs[-1].interrupted:
                break
    return runs


def main(argv: list[str] | None = None, prog: str = "python -m det_backend.drift") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        _check_args(parser, args)
    except SystemExit as e:  # argparse: 2 on a usage error, 0 after --help
        return int(e.code or 0)
    started = _now()
    settings = _settings(args)
    try:
        prompts, skipped, source = load_prompts(args.prompts, args.api, args.num_prompts)
        if skipped:
            print(
                f"note: {len(skipped)} prompts of {source} can't go to the {args.api} API "
                f"(lines {', '.join(str(s['line']) for s in skipped)}); skipped",
                file=sys.stderr,
            )
        runs = _measure_all(args, settings, prompts)
    except SetupError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before anything was measured: nothing to report
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    endpoints = [summarize(run, prompts, settings) for run in runs]
    report = build_report(argv, started, settings, prompts, source, skipped, endpoints)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.png and not write_png(report, args.png):
        print("matplotlib is not installed: --png skipped", file=sys.stderr)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
