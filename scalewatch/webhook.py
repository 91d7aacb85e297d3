"""A sink that posts each alert to a chat webhook (Slack, or anything that takes ``{"text": ...}``).

Training must never wait on the network, so :meth:`WebhookSink.write` only puts payloads on a
bounded queue; a daemon thread posts them, with retries and exponential backoff. An alert that
cannot be delivered (queue full, endpoint down) is counted in ``undelivered`` and said once in the
log; the JSON-lines sink, which is independent, still has it.

The webhook URL is a secret (whoever has it can post to the channel): it is never logged, never put
in an error message or ``repr``, and never written anywhere. Only its scheme and host are shown.

Example:
    >>> import socket
    >>> from scalewatch.alerts import Alert
    >>> from scalewatch.monitor import Report
    >>> WebhookSink("ftp://hooks.example.com/T000/secret")            # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    scalewatch.config.ScaleWatchConfigError: scalewatch: the webhook URL must start with http:// or https://, \
got the scheme 'ftp'; pass ...
    >>> with socket.socket() as s:                                     # a local port nothing listens on
    ...     s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    >>> sink = WebhookSink(f"http://127.0.0.1:{port}/T000/secret", run="exp7", timeout=1.0, retries=0)
    >>> "secret" in repr(sink)                                         # only scheme and host are shown
    False
    >>> sink                                          # doctest: +ELLIPSIS
    WebhookSink(url='http://127.0.0.1:.../…', run='exp7', delivered=0, undelivered=0)
    >>> sink.write(Report(step=3, tokens=30, alerts=[Alert("nonfinite", "critical", "firing", 3, 30, "NaN loss")]))
    >>> sink.close(timeout=5.0)                                        # flush: nothing listens, so it fails
    >>> sink.delivered, sink.undelivered
    (0, 1)
"""

from __future__ import annotations

import atexit
import http.client
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from scalewatch.alerts import Alert
from scalewatch.config import ScaleWatchConfigError

log = logging.getLogger("scalewatch")

#: The environment variable read when no URL is given (keeps the secret out of code and configs).
ENV_VAR = "SCALEWATCH_WEBHOOK_URL"

#: Emoji for a firing alert, by severity; a resolved alert gets ``:white_check_mark:``.
EMOJI = {"critical": ":rotating_light:", "warning": ":warning:", "info": ":information_source:"}
RESOLVED_EMOJI = ":white_check_mark:"

#: Longest message kept in one chat line; a runaway message must not make the post fail (Slack caps text).
MAX_MESSAGE_CHARS = 1000

#: How long the interpreter may wait at exit to flush alerts when ``close()`` was never called (e.g. the
#: run crashed): the alert about the crash is the one most worth delivering, but exit must not hang.
ATEXIT_FLUSH_S = 5.0


def _tokens(n: int) -> str:
    """Token counts as people read them: ``30``, ``12,400``, ``3.1e9``."""
    if abs(n) < 100_000:
        return f"{n:,}"
    mantissa, exponent = f"{n:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links/mentions and &...; as entities: these three must be escaped, nothing else.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def alert_text(alert: Alert, run: str | None = None) -> str:
    """One chat line for an alert: emoji, severity, kind, run, step, tokens, then the message.

    Args:
        alert: the alert.
        run: the run's name to show; ``alert.run`` when None.

    Example:
        >>> alert_text(Alert("divergence", "critical", "firing", 12_400, 3_100_000_000, "loss 3x the fit"),
        ...            run="exp7")
        ':rotating_light: CRITICAL divergence — run exp7, step 12,400 (3.1e9 tokens): loss 3x the fit'
        >>> alert_text(Alert("divergence", "critical", "resolved", 12_600, 3_150_000_000, "back on track"),
        ...            run="exp7")
        ':white_check_mark: resolved divergence (was critical) — run exp7, step 12,600 (3.2e9 tokens): back on track'
    """
    kind = f"{alert.kind} ({alert.key})" if alert.key else alert.kind
    if alert.state == "resolved":
        head = f"{RESOLVED_EMOJI} resolved {kind} (was {alert.severity})"
    else:
        head = f"{EMOJI.get(alert.severity, ':grey_question:')} {alert.severity.upper()} {kind}"
    where = f"run {run if run is not None else alert.run}, step {alert.step:,} ({_tokens(alert.tokens)} tokens)"
    # One line: a message with newlines would break chat previews and grep over notification logs.
    message = " ".join(str(alert.message).split())
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 1] + "…"
    return _slack_escape(f"{head} — {where}" + (f": {message}" if message else ""))


def _redacted(parts: urllib.parse.SplitResult) -> str:
    """``scheme://host[:port]/…``: enough to tell which service, never the path or query (the secret)
    nor any ``user:password@``."""
    host = parts.hostname or "?"
    try:
        port = parts.port
    except ValueError:  # a malformed port must not make an error message raise
        port = None
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}/…"


def _failure(exc: BaseException) -> str:
    """Why a post failed, in words that cannot contain the URL (only class names and status codes)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return type(exc.reason).__name__
    return type(exc).__name__


class _Worker:
    """One background delivery thread with its own queue and stop flag.

    ``close()`` abandons a worker that is still stuck in a request; a later ``write()`` starts a fresh
    one, and the abandoned thread, when it wakes, sees its own flag and touches nothing else.
    """

    def __init__(self, max_queue: int) -> None:
        self.queue: queue.Queue[dict[str, str] | None] = queue.Queue(maxsize=max_queue)
        self.stop = threading.Event()
        self.pending = 0  # enqueued and not yet finished (delivered or given up); guarded by the sink's lock
        self.abandoned = False  # close() already counted this worker's pending alerts as undelivered
        self.thread: threading.Thread | None = None


class WebhookSink:
    """Posts each alert as ``{"text": "<one line>"}`` to an incoming-webhook URL, in the background.

    Args:
        url: the webhook URL (http or https); None reads ``SCALEWATCH_WEBHOOK_URL``.
        run: the run's name shown in messages; when left at ``"run"``, each alert's own ``run`` is shown.
        timeout: seconds for one HTTP request.
        max_queue: alerts waiting for delivery at most; more are dropped (and counted), never waited for.
        retries: further attempts after a failed one (connection errors, timeouts, HTTP 5xx and 429; other
            4xx mean the URL or payload is wrong, so they are not retried).
        backoff: seconds before the first retry; doubled before each next one.

    Attributes:
        name: ``"webhook"``.
        delivered: alerts the endpoint accepted.
        undelivered: alerts dropped on a full queue, given up after the retries, or still waiting at ``close()``.
        dropped: the part of ``undelivered`` dropped because the queue was full.

    Raises:
        ScaleWatchConfigError: no URL (neither given nor in the environment), a scheme other than http/https,
            or a non-positive timeout / max_queue, a negative retries / backoff.
    """

    name = "webhook"

    def __init__(self, url: str | None = None, run: str = "run", timeout: float = 5.0, max_queue: int = 100,
                 retries: int = 3, backoff: float = 0.5) -> None:
        if url is None:
            url = os.environ.get(ENV_VAR) or None
            if url is None:
                raise ScaleWatchConfigError(f"scalewatch: no webhook URL; pass WebhookSink(url=...) or set the "
                                            f"{ENV_VAR} environment variable")
        url = url.strip()  # a URL pasted into an env file often carries a trailing newline
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            # Name only the scheme: the rest of the URL is the secret, and errors end up in logs.
            got = f"the scheme {parts.scheme!r}" if parts.scheme else "a URL without a scheme"
            if parts.scheme.lower() in ("http", "https"):
                got = "a URL without a host"
            raise ScaleWatchConfigError(f"scalewatch: the webhook URL must start with http:// or https://, got "
                                        f"{got}; pass the full incoming-webhook URL your chat tool gave you "
                                        f"(e.g. https://hooks.slack.com/services/...)")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ScaleWatchConfigError(f"scalewatch: webhook timeout must be a positive number of seconds, "
                                        f"got {timeout!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue <= 0:
            raise ScaleWatchConfigError(f"scalewatch: webhook max_queue must be a positive int, got {max_queue!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ScaleWatchConfigError(f"scalewatch: webhook retries must be an int >= 0, got {retries!r}")
        if not (isinstance(backoff, (int, float)) and backoff >= 0):
            raise ScaleWatchConfigError(f"scalewatch: webhook backoff must be a number of seconds >= 0, "
                                        f"got {backoff!r}")
        self.__url = url  # name-mangled and never formatted anywhere: see the module docstring
        self._shown = _redacted(parts)
        self.run = run
        self.timeout = float(timeout)
        self.max_queue = max_queue
        self.retries = retries
        self.backoff = float(backoff)
        self.delivered = 0
        self.undelivered = 0
        self.dropped = 0
        # Our own opener, so that other code's global urllib opener (custom handlers) cannot see the URL;
        # proxies from the environment are still honoured, as clusters often need them.
        self._opener = urllib.request.build_opener()
        self._lock = threading.Lock()  # guards the counters, the worker and its pending count
        self._idle = threading.Condition(self._lock)  # notified when a worker's pending count drops
        self._worker: _Worker | None = None
        self._warned = False  # a failure was logged; silent until a delivery succeeds (once per burst)
        self._reported = 0  # undelivered already told by close()

    def __repr__(self) -> str:
        return (f"WebhookSink(url={self._shown!r}, run={self.run!r}, delivered={self.delivered}, "
                f"undelivered={self.undelivered})")

    # ------------------------------------------------------------------ training thread
    def write(self, report: Any) -> None:
        """Queue one chat line per alert of ``report``; never blocks and never raises for delivery problems."""
        if not report.alerts:
            return
        run = None if self.run == "run" else self.run
        warn = None
        with self._lock:
            worker = self._worker or self._start()
            for alert in report.alerts:
                try:
                    worker.queue.put_nowait({"text": alert_text(alert, run)})
                    worker.pending += 1
                except queue.Full:
                    # Waiting here would stall training behind a slow endpoint: drop it and count it.
                    self.undelivered += 1
                    self.dropped += 1
                    if not self._warned:
                        self._warned = True
                        warn = self.undelivered
        if warn is not None:
            log.warning("scalewatch: the webhook (%s) is behind: its queue of %d is full, so new alerts are "
                        "dropped (%d undelivered so far; they are in the JSON-lines file if one was set). "
                        "Said once until a delivery succeeds.", self._shown, self.max_queue, warn)

    def _start(self) -> _Worker:
        # Lazy: a run without alerts never starts a thread. Called with the lock held.
        worker = _Worker(self.max_queue)
        worker.thread = threading.Thread(target=self._run, args=(worker,), name="scalewatch-webhook", daemon=True)
        worker.thread.start()
        self._worker = worker
        # A daemon thread dies with the interpreter: if the run crashes before close(), flush briefly at exit.
        atexit.register(self._flush_at_exit)
        return worker

    def close(self, timeout: float = 10.0) -> None:
        """Wait at most ``timeout`` seconds for queued alerts to be delivered, then stop the thread.

        What is still queued or in flight then counts in ``undelivered``; if any alert was not delivered,
        that is logged once. Safe to call twice; a later ``write()`` starts a new thread.
        """
        deadline = time.monotonic() + max(0.0, float(timeout))
        with self._lock:
            worker = self._worker
            if worker is None:
                return
            while worker.pending > 0 and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            self._worker = None
            worker.stop.set()
            worker.abandoned = True  # the thread must not count what we count here
            self.undelivered += worker.pending
            new = self.undelivered - self._reported
            self._reported = self.undelivered
        atexit.unregister(self._flush_at_exit)
        try:
            worker.queue.put_nowait(None)  # wake the thread if it waits for work
        except queue.Full:
            pass  # it is busy; it checks the stop flag before the next item
        if worker.thread is not None:
            # Never past the deadline: a request stuck in the network is left to its own timeout (daemon thread).
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        if new:
            log.warning("scalewatch: %d alert(s) could not be delivered to the webhook; they are in the JSON-lines "
                        "file if one was set", new)

    def _flush_at_exit(self) -> None:
        self.close(timeout=ATEXIT_FLUSH_S)

    # ------------------------------------------------------------------ delivery thread
    def _run(self, worker: _Worker) -> None:
        while not worker.stop.is_set():
            payload = worker.queue.get()
            if payload is None or worker.stop.is_set():
                return
            try:
                ok, why = self._post(payload, worker.stop)
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything and keep counting
                ok, why = False, type(exc).__name__
            message = None
            with self._lock:
                if worker.abandoned:
                    return  # close() has counted this one already
                worker.pending -= 1
                if ok:
                    self.delivered += 1
                    if self._warned:
                        self._warned = False
                        message = ("scalewatch: the webhook (%s) works again; %d alert(s) were not delivered "
                                   "in all", (self._shown, self.undelivered), logging.INFO)
                else:
                    self.undelivered += 1
                    if not self._warned:
                        self._warned = True
                        message = ("scalewatch: the webhook (%s) is not taking alerts (%s); %d alert(s) "
                                   "undelivered so far, they are in the JSON-lines file if one was set. "
                                   "Said once until a delivery succeeds.",
                                   (self._shown, why, self.undelivered), logging.WARNING)
                self._idle.notify_all()
            if message is not None:  # log outside the lock: a slow handler must not block write()
                fmt, args, level = message
                log.log(level, fmt, *args)

    def _post(self, payload: dict[str, str], stop: threading.Event) -> tuple[bool, str]:
        """POST one payload with retries; (delivered, why not). Returns early when ``stop`` is set."""
        request = urllib.request.Request(self.__url, data=json.dumps(payload).encode("utf-8"), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "scalewatch-webhook"})
        why = ""
        for attempt in range(self.retries + 1):
            if attempt and stop.wait(self.backoff * 2 ** (attempt - 1)):
                return False, "stopped"  # close() gave up waiting: don't sleep on
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    response.read()
                return True, ""
            except urllib.error.HTTPError as exc:
                exc.close()
                why = f"HTTP {exc.code}"
                if exc.code != 429 and exc.code < 500:
                    return False, why + ", not retried: check the URL"  # the request itself is wrong
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # OSError: timeouts too
                why = _failure(exc)
        tries = self.retries + 1
        return False, f"{why} after {tries} attempt{'s' if tries > 1 else ''}"
