#!/usr/bin/env python3
"""A small QMP client (QEMU Machine Protocol, docs/interop/qmp-spec.rst), python3 stdlib only.

usage:
  qmp.py [--timeout S] SOCKET COMMAND [JSON-ARGS]    run COMMAND, print its "return" as JSON
  qmp.py [--timeout S] SOCKET [COMMAND [JSON-ARGS]] --wait-event NAME
        run COMMAND (if given), then wait on the same connection for event NAME; print it
  qmp.py [--timeout S] SOCKET [COMMAND [JSON-ARGS]] --wait-status S1[,S2...] [--fail-status F1,...]
        run COMMAND (if given), then poll until the status is one of S1,S2...: a migration status
        (query-migrate "status", e.g. pre-switchover, completed, cancelled) or a run state
        (query-status "status", e.g. running, paused, postmigrate); all names must be of one
        kind. For migration waits, reaching failed or cancelled (unless waited for) or a
        --fail-status ends the wait with exit code 5.

--field KEY prints only that top-level field of the printed object (empty when absent; booleans
as true/false), for shell scripts.

SOCKET is a QMP unix socket path (-qmp unix:PATH,server=on,wait=off). The default timeout is
60 s (also $QMP_TIMEOUT). Exit codes: 0 success; 1 QEMU answered with an error; 2 usage;
3 cannot connect or the connection broke; 4 timeout; 5 a failure status was reached.
"""
import json
import os
import socket
import sys
import time

MIGRATION_STATES = {
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-device", "postcopy-active",
    "postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "completed", "failed",
    "colo", "pre-switchover", "device", "wait-unplug",
}
RUN_STATES = {
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
    "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
    "guest-panicked", "colo",
}


class QmpError(Exception):
    """QEMU returned {"error": ...}."""


class Timeout(Exception):
    pass


class Qmp:
    def __init__(self, path, deadline):
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self.next_id = 0
        greeting = self._read()
        if "QMP" not in greeting:
            raise ConnectionError("no QMP greeting: %r" % greeting)
        self.execute("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Timeout()
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise Timeout() from None
            if not chunk:
                raise ConnectionError("QEMU closed the QMP connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command, args=None):
        self.next_id += 1
        msg = {"execute": command, "id": self.next_id}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") == self.next_id:
                if "error" in reply:
                    err = reply["error"]
                    raise QmpError("%s: %s" % (err.get("class"), err.get("desc")))
                return reply.get("return")

    def wait_event(self, name):
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name:
                    return self.events.pop(i)
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)


def usage(msg):
    print("qmp.py: %s\n%s" % (msg, __doc__.split("\n\n")[1]), file=sys.stderr)
    sys.exit(2)


def main(argv):
    timeout = float(os.environ.get("QMP_TIMEOUT", "60"))
    wait_event = None
    wait_status = None
    fail_status = set()
    field = None
    pos = []
    it = iter(argv)
    for a in it:
        try:
            if a == "--timeout":
                timeout = float(next(it))
            elif a == "--wait-event":
                wait_event = next(it)
            elif a == "--wait-status":
                wait_status = set(next(it).split(","))
            elif a == "--field":
                field = next(it)
            elif a == "--fail-status":
                fail_status = set(next(it).split(","))
            elif a.startswith("--"):
                usage("unknown option " + a)
            else:
                pos.append(a)
        except (StopIteration, ValueError):
            usage("option %s needs a value" % a)
    if not pos or len(pos) > 3:
        usage("expected SOCKET [COMMAND [JSON-ARGS]]")
    if len(pos) == 1 and not (wait_event or wait_status):
        usage("nothing to do: give a COMMAND, --wait-event or --wait-status")
    path = pos[0]
    command = pos[1] if len(pos) > 1 else None
    args = None
    if len(pos) == 3:
        try:
            args = json.loads(pos[2])
        except ValueError as e:
            usage("JSON-ARGS is not JSON: %s" % e)
        if not isinstance(args, dict):
            usage("JSON-ARGS must be a JSON object")
    kind = None
    if wait_status:
        if wait_status <= MIGRATION_STATES:
            kind = "migrate"
        elif wait_status <= RUN_STATES:
            kind = "run"
        else:
            usage("--wait-status %s: not all migration states or all run states" % ",".join(sorted(wait_status)))

    def emit(obj):
        if field is None:
            print(json.dumps(obj))
            return
        v = obj.get(field) if isinstance(obj, dict) else None
        if v is None:
            print("")
        elif isinstance(v, bool):
            print("true" if v else "false")
        elif isinstance(v, (dict, list)):
            print(json.dumps(v))
        else:
            print(v)

    deadline = time.monotonic() + timeout
    try:
        q = Qmp(path, deadline)
    except Timeout:
        print("qmp.py: %s: timeout connecting after %gs" % (path, timeout), file=sys.stderr)
        return 4
    except (OSError, ConnectionError, ValueError) as e:
        print("qmp.py: %s: cannot connect: %s" % (path, e), file=sys.stderr)
        return 3
    what = command or (wait_event and "event " + wait_event) or "status"
    try:
        if command:
            ret = q.execute(command, args)
            if not (wait_event or wait_status):
                emit(ret)
        if wait_event:
            emit(q.wait_event(wait_event))
        if wait_status:
            what = "wait for %s" % ",".join(sorted(wait_status))
            last = None
            while True:
                if kind == "migrate":
                    ret = q.execute("query-migrate")
                    st = ret.get("status", "none")
                    failing = ({"failed", "cancelled"} | fail_status) - wait_status
                else:
                    ret = q.execute("query-status")
                    st = ret.get("status")
                    failing = fail_status - wait_status
                if st != last:
                    print("qmp.py: %s status %s" % (kind, st), file=sys.stderr)
                    last = st
                if st in wait_status:
                    emit(ret)
                    break
                if st in failing:
                    detail = ret.get("error-desc", "")
                    print("qmp.py: %s status %s while waiting for %s%s" % (
                        kind, st, ",".join(sorted(wait_status)),
                        ": " + detail if detail else ""), file=sys.stderr)
                    return 5
                if time.monotonic() + 0.05 >= deadline:
                    raise Timeout()
                time.sleep(0.05)
    except QmpError as e:
        print("qmp.py: %s: %s failed: %s" % (path, what, e), file=sys.stderr)
        return 1
    except Timeout:
        print("qmp.py: %s: %s: timeout after %gs" % (path, what, timeout), file=sys.stderr)
        return 4
    except (OSError, ConnectionError, ValueError) as e:
        print("qmp.py: %s: %s: connection error: %s" % (path, what, e), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
