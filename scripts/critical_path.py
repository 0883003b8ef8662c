#!/usr/bin/env python3
"""How long a proxy holds each call on its critical path, from its own system calls.

Usage: scripts/critical_path.py PID [SECONDS]   (needs perf and the right to trace PID)

Run it while a load at concurrency 1 goes through the proxy (e.g. `dlb bench -c 1`). It
records the proxy's system calls with perf (raw_syscalls tracepoints) for SECONDS (default 1)
and prints two medians, in microseconds:

- request: from the end of the last read from the caller to the start of the write that
  sends the call on to an instance;
- response: from the end of the read of the instance's answer to the start of the write
  that passes it to the caller.

Their sum is the time the proxy adds to each call beyond the extra network hop. The caller's
connection is taken to be the descriptor written to most: every answer goes there, while the
requests are spread over the instances, so put two or more behind the proxy. Only a proxy with
one caller connection and one thread gives clean numbers. System call numbers are x86_64's.
"""

import collections
import platform
import re
import statistics
import subprocess
import sys
import tempfile

READS = {0, 19, 45, 47}  # read, readv, recvfrom, recvmsg
WRITES = {1, 20, 44, 46}  # write, writev, sendto, sendmsg
LINE = re.compile(
    r"\s*\S+\s+(\d+)/(\d+)\s+\[\d+\]\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit): NR (\d+)\s*(.*)"
)


def trace(pid: str, seconds: float) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".data") as data:
        subprocess.run(
            ["perf", "record", "-q", "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit",
             "-p", pid, "-o", data.name, "--", "sleep", str(seconds)],
            check=True, stdout=subprocess.DEVNULL,
        )
        script = subprocess.run(
            ["perf", "script", "-i", data.name, "-F", "comm,pid,tid,cpu,time,event,trace"],
            check=True, capture_output=True, text=True,
        )
    return script.stdout.splitlines()


def events(lines: list[str], pid: str) -> list[tuple[str, int, float]]:
    """(r or w, descriptor, time): reads that returned data, at their end; writes, at their start."""
    out, pending = [], {}
    for line in lines:
        m = LINE.match(line)
        if not m or m.group(1) != pid:
            continue
        tid, t, kind, nr, rest = m.group(2), float(m.group(3)), m.group(4), int(m.group(5)), m.group(6)
        if kind == "enter":
            fd = int(rest.strip("( ").split(",")[0], 16) if rest.startswith("(") else -1
            pending[tid] = (nr, fd)
            if nr in WRITES:
                out.append(("w", fd, t))
        else:
            nr_fd = pending.pop(tid, None)
            returned = rest.strip().removeprefix("=").strip()
            if nr_fd and nr_fd[0] in READS and returned not in ("0", "") and not returned.startswith("-"):
                out.append(("r", nr_fd[1], t))
    return out


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    if platform.machine() != "x86_64":
        print(f"system call numbers here are x86_64's, not {platform.machine()}'s", file=sys.stderr)
        return 2
    pid, seconds = sys.argv[1], float(sys.argv[2]) if len(sys.argv) == 3 else 1.0
    seen = events(trace(pid, seconds), pid)
    writes = collections.Counter(fd for kind, fd, _ in seen if kind == "w")
    if not writes:
        print(f"no writes by {pid} in {seconds} s: is a load running through it?", file=sys.stderr)
        return 1
    caller = writes.most_common(1)[0][0]
    request, response, last_read = [], [], None
    for kind, fd, t in seen:
        if kind == "r":
            last_read = (fd, t)
        elif last_read:
            if last_read[0] == caller and fd != caller:
                request.append((t - last_read[1]) * 1e6)
            elif last_read[0] != caller and fd == caller:
                response.append((t - last_read[1]) * 1e6)
            last_read = None
    if not request or not response:
        print("no relayed call seen", file=sys.stderr)
        return 1
    req, resp = statistics.median(request), statistics.median(response)
    print(f"calls {min(len(request), len(response))}, caller fd {caller}: "
          f"request {req:.1f} us, response {resp:.1f} us, sum {req + resp:.1f} us (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
