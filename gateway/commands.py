"""Write-back: the write and call part of the one command router (`cmd/write`, `cmd/call`).

A write reaches a real machine, so every request runs the same gauntlet before anything is sent:
the token (when `commands.token_file` is set, compared in constant time), writes enabled
(`commands.write`), a request id, a known device and tag, `writable: true`, the value's type,
`allowed` and `min`/`max`; the driver then refuses what does not fit the tag exactly (an integer
overflow after reverse scaling, a float for an Int16 node) before it touches the wire. A request
id seen within `dedup_window` is answered from memory and never executed twice, also while the
first one is still running: an MQTT redelivery must not pulse a coil twice. Every request,
refused or not, becomes one `events/commands` record in the buffer, the road the rules' events
take, so the audit trail survives a broker outage and a kill -9.

This module does not know drivers: it takes the device objects through `Target`, and the app
wires them in.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import Field

from gateway import logs
from gateway.model import Record, WriteFailed, WriteRefused
from gateway.schema import Duration, SecretFile, StrictModel, read_secret

log = logs.get("gateway.commands")

COMMANDS = ("write", "call")
AUDIT_TOPIC = "events/commands"
MAX_WRITES = 100  # tags in one cmd/write
MAX_ID = 128  # characters of a request id


class CommandsConfig(StrictModel):
    write: bool = Field(False, description="allow cmd/write and cmd/call at all; off: every one is refused (and audited)")
    token_file: SecretFile | None = Field(None, description="a shared secret every write and call must carry as `token`")
    dedup_window: Duration = Field(600.0, gt=0, description="a request id seen this recently is answered from memory, never run again")
    dedup_max: int = Field(10000, ge=1, description="request ids remembered at most (the oldest go first)")


class Target(Protocol):
    """A device the router can write to: a driver with `config.tags` (WritePermission fields),
    optionally `config.methods`, and these two coroutines. Both raise WriteRefused before
    anything is sent, WriteFailed when the device did not do it."""

    config: Any

    async def write(self, tag: str, value: Any) -> Any:
        """Write `value` (engineering units); return the value read back (None with verify: false)."""

    async def call(self, method: str, args: list[Any]) -> list[Any]:
        """Call a configured method; return its output arguments."""

    # optional: `async check(tag, value)` raises the driver's WriteRefused without sending, so that
    # a several-tag write is refused whole before its first tag is written


class Refusal(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RequestMemory:
    """Request ids of the last `window` seconds and the reply each got (a future while it runs).

    Owned by the App, so a reload (a new pipeline) does not forget what was already done."""

    def __init__(self, window: float = 600.0, max_ids: int = 10000, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.max_ids = max_ids
        self.clock = clock
        self._seen: collections.OrderedDict[str, tuple[float, asyncio.Future]] = collections.OrderedDict()
        self.evicted = 0  # ids forgotten before their window ended, for want of room

    def configure(self, window: float, max_ids: int) -> None:
        self.window, self.max_ids = window, max_ids

    def get(self, request_id: str) -> asyncio.Future | None:
        self._expire()
        entry = self._seen.get(request_id)
        return entry[1] if entry else None

    def start(self, request_id: str) -> asyncio.Future:
        self._expire()
        while len(self._seen) >= self.max_ids:
            self._seen.popitem(last=False)
            self.evicted += 1
            if self.evicted == 1 or self.evicted % 1000 == 0:
                log.warning("commands.ids_evicted", evicted=self.evicted, max_ids=self.max_ids,
                            hint="more requests than commands.dedup_max within dedup_window; raise dedup_max")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._seen[request_id] = (self.clock(), future)
        return future

    def _expire(self) -> None:
        limit = self.clock() - self.window
        while self._seen:
            first = next(iter(self._seen.values()))
            if first[0] >= limit or not first[1].done():
                break
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


class CommandRouter:
    """`cmd/write` and `cmd/call` of one pipeline: its devices, its buffer road, its settings."""

    def __init__(self, cfg: CommandsConfig, targets: dict[str, Any], store: Callable[[list[Record]], None], *,
                 memory: RequestMemory | None = None, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.targets = targets
        self.store = store
        self.memory = memory if memory is not None else RequestMemory()  # (an empty one is falsy)
        self.memory.configure(cfg.dedup_window, cfg.dedup_max)
        self.clock = clock
        # read once per pipeline (a reload reads it again); bytes, for hmac.compare_digest
        self._token = read_secret(cfg.token_file).encode() if cfg.token_file is not None else None
        self.counts: collections.Counter[str] = collections.Counter()  # outcome -> requests

    def stats(self) -> dict[str, Any]:
        """For `health`: requests by outcome since this pipeline started, ids remembered."""
        return {"write_enabled": self.cfg.write, **{k: self.counts[k] for k in ("done", "refused", "failed", "duplicate")},
                "remembered_ids": len(self.memory), "evicted_ids": self.memory.evicted}

    async def handle(self, name: str, request: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """The reply to one request; every request also leaves one audit record."""
        received = self.clock()
        meta = meta or {}
        request_id = request.get("id")
        try:
            self._check_token(request)
            if not isinstance(request_id, (str, int)) or isinstance(request_id, bool) or not str(request_id) \
                    or len(str(request_id)) > MAX_ID:
                raise Refusal("bad_request", f"a {name} needs an `id`: a string or integer of 1 to {MAX_ID} "
                                             "characters, unique per request (a repeat is answered, not run again)")
        except Refusal as refusal:
            reply = self._refused(refusal)
            self._audit(name, request, meta, reply, received, "refused")
            return reply
        key = str(request_id)
        earlier = self.memory.get(key)
        if earlier is not None:  # a redelivery or a retry: the first one's answer, nothing sent
            reply = dict(await asyncio.shield(earlier))
            reply["duplicate"] = True
            self._audit(name, request, meta, reply, received, "duplicate")
            return reply
        future = self.memory.start(key)
        reply = {"ok": False, "error": "interrupted (the gateway stopped): the device may have taken it",
                 "reason": "interrupted"}
        try:
            reply = await self._execute(name, request)
        finally:  # also when cancelled: a repeat must never run it again, nor wait for ever
            future.set_result(reply)
            outcome = "done" if reply.get("ok") else ("refused" if reply.get("sent") is False else "failed")
            self._audit(name, request, meta, reply, received, outcome)
        return reply

    # ----- checks -----

    def _check_token(self, request: dict[str, Any]) -> None:
        if self._token is None:
            return
        token = request.get("token")
        if token is None:
            raise Refusal("token", "missing token: commands.token_file is set, so every write and call needs `token`")
        given = token.encode() if isinstance(token, str) else b""
        if not hmac.compare_digest(given, self._token):  # constant time: no timing hint of the secret
            raise Refusal("token", "bad token")

    def _target(self, request: dict[str, Any]) -> tuple[str, Any]:
        if not self.cfg.write:
            raise Refusal("disabled", "writes are disabled: set commands.write: true to allow cmd/write and cmd/call")
        device = request.get("device")
        if not isinstance(device, str):
            raise Refusal("bad_request", "`device` (a device name) is missing")
        target = self.targets.get(device)
        if target is None:
            raise Refusal("unknown_device", f"unknown device {device!r} (or not enabled)")
        if not hasattr(target, "write"):
            raise Refusal("not_writable", f"device {device!r} ({target.config.driver}) does not accept writes")
        return device, target

    @staticmethod
    def _check_value(device: str, tags: dict[str, Any], item: Any) -> str | None:
        """Why this one write is refused, or None; raises nothing."""
        if not isinstance(item, dict) or "tag" not in item or "value" not in item:
            return "bad_request: each write needs `tag` and `value`"
        tag = tags.get(item["tag"]) if isinstance(item["tag"], str) else None
        if tag is None:
            return f"unknown_tag: {device} has no tag {item['tag']!r}"
        if not getattr(tag, "writable", False):
            return f"not_writable: {device}.{tag.name} is not writable (writable: true in its config)"
        value = item["value"]
        if isinstance(value, float) and not math.isfinite(value) or not isinstance(value, (bool, int, float, str)):
            return f"wrong_type: {value!r} is not a value for {device}.{tag.name}"
        # true == 1 in Python; a bool is allowed only by a bool, a number only by a number
        if tag.allowed is not None and not any(value == a and isinstance(value, bool) == isinstance(a, bool)
                                               for a in tag.allowed):
            return f"not_allowed: {value!r} is not one of {tag.allowed} for {device}.{tag.name}"
        if tag.min is not None or tag.max is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"wrong_type: {device}.{tag.name} takes a number, not {value!r}"
            if tag.min is not None and value < tag.min:
                return f"out_of_bounds: {value!r} is below min {tag.min:g} of {device}.{tag.name}"
            if tag.max is not None and value > tag.max:
                return f"out_of_bounds: {value!r} is above max {tag.max:g} of {device}.{tag.name}"
        return None

    # ----- execution -----

    async def _execute(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            if name == "write":
                return await self._write(request)
            if name == "call":
                return await self._call(request)
            raise Refusal("bad_request", f"unknown command {name!r}")
        except Refusal as refusal:
            return self._refused(refusal)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a driver's bug must still get an answer and an audit record
            log.exception("commands.failed", command=name, id=request.get("id"))
            return {"ok": False, "reason": "device_error", "error": f"{type(exc).__name__}: {exc} "
                    "(the device may have taken it)"}

    async def _write(self, request: dict[str, Any]) -> dict[str, Any]:
        device, target = self._target(request)
        if "writes" in request:
            items = request["writes"]
            if not isinstance(items, list) or not 1 <= len(items) <= MAX_WRITES:
                raise Refusal("bad_request", f"`writes` must be a list of 1 to {MAX_WRITES} {{tag, value}}")
        elif "tag" in request:
            items = [{"tag": request.get("tag"), "value": request.get("value")} if "value" in request
                     else {"tag": request.get("tag")}]
        else:
            raise Refusal("bad_request", "a write needs `tag` and `value`, or `writes`: [{tag, value}, ...]")
        tags = {t.name: t for t in getattr(target.config, "tags", [])}
        problems = [self._check_value(device, tags, item) for item in items]
        results = [{"tag": item.get("tag") if isinstance(item, dict) else None,
                    "value": item.get("value") if isinstance(item, dict) else None,
                    "read_back": None, "error": None} for item in items]
        check = getattr(target, "check", None)
        if check is not None:  # the driver's own refusals (type, range) for every tag, before any is sent
            for i, item in enumerate(items):
                if problems[i] is None:
                    try:
                        await check(item["tag"], item["value"])
                    except WriteRefused as exc:
                        problems[i] = f"{exc.reason}: {exc}"
                    except WriteFailed as exc:
                        problems[i] = f"{exc.reason}: {exc}"
        first = next((p for p in problems if p is not None), None)
        if first is not None:  # one refused write refuses the request: nothing at all is sent
            for result, problem in zip(results, problems):
                result["error"] = problem.split(": ", 1)[1] if problem else "not sent: another write of the request was refused"
            reason, message = first.split(": ", 1)
            return {"ok": False, "reason": reason, "error": message, "device": device, "results": results,
                    "sent": False}
        sent = False
        for i, (item, result) in enumerate(zip(items, results)):
            try:
                result["read_back"] = await target.write(item["tag"], item["value"])
            except (WriteRefused, WriteFailed) as exc:
                result["error"] = str(exc)
                for rest in results[i + 1:]:
                    rest["error"] = "not attempted: an earlier write of the request failed"
                sent = sent or isinstance(exc, WriteFailed)
                return {"ok": False, "reason": exc.reason, "error": f"{item['tag']}: {exc}", "device": device,
                        "results": results, "sent": sent}
            sent = True
        return {"ok": True, "device": device, "results": results, "sent": True}

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        device, target = self._target(request)
        method = request.get("method")
        methods = {m.name: m for m in getattr(target.config, "methods", [])}
        if not isinstance(method, str) or method not in methods:
            known = ", ".join(methods) or "none"
            raise Refusal("unknown_method", f"unknown method {method!r} of {device} (configured: {known})")
        args = request.get("args", [])
        if not isinstance(args, list):
            raise Refusal("bad_request", "`args` must be a list")
        try:
            outputs = await target.call(method, args)
        except (WriteRefused, WriteFailed) as exc:
            return {"ok": False, "reason": exc.reason, "error": str(exc), "device": device, "method": method,
                    "sent": isinstance(exc, WriteFailed)}
        return {"ok": True, "device": device, "method": method, "outputs": outputs, "sent": True}

    @staticmethod
    def _refused(refusal: Refusal) -> dict[str, Any]:
        return {"ok": False, "reason": refusal.reason, "error": str(refusal), "sent": False}

    # ----- audit -----

    def _audit(self, name: str, request: dict[str, Any], meta: dict[str, Any], reply: dict[str, Any],
               received: float, outcome: str) -> None:
        """One `events/commands` record per request, through the buffer (never the token)."""
        self.counts[outcome] += 1
        payload: dict[str, Any] = {
            "command": name, "id": request.get("id"), "device": request.get("device"),
            "client_id": meta.get("client_id"), "outcome": outcome, "ok": bool(reply.get("ok")),
            "reason": reply.get("reason"), "error": reply.get("error"),
        }
        if name == "call":
            payload.update(method=request.get("method"), args=request.get("args"), outputs=reply.get("outputs"))
        else:
            results = reply.get("results")
            if results is None:  # refused before the tags were looked at: what was asked for
                writes = request.get("writes")
                results = ([{"tag": w.get("tag"), "value": w.get("value")} for w in writes if isinstance(w, dict)]
                           if isinstance(writes, list) else [{"tag": request.get("tag"), "value": request.get("value")}])
            payload["results"] = results
            if len(results) == 1:  # one tag: also flat, for the simple consumer
                payload.update(tag=results[0].get("tag"), value=results[0].get("value"),
                               read_back=results[0].get("read_back"))
        log.info("commands.audit", command=name, id=payload["id"], device=payload["device"], outcome=outcome,
                 reason=payload["reason"], client_id=payload["client_id"])
        try:
            self.store([Record(AUDIT_TOPIC, payload, received, kind="event")])
        except Exception:  # noqa: BLE001 - the reply still goes out; the failure is logged loudly
            log.exception("commands.audit_failed", id=payload["id"])
