#!/usr/bin/env python3
"""Where each proxy of a pair spends a request in the kernel: syscalls by kind, context
switches (all, from perf; voluntary and involuntary, from /proc), user and system CPU per
request, for the Trellis, nginx and HAProxy pairs of hack/bench-proxy.py, at its fixed rate
(1000 req/s, 16 connections) and at saturation (32 connections, no rate limit). Not run by CI.

What hack/bench-ab.py's STAT=1 gives for two Trellis binaries, but side by side with the
baselines and under the same load generator (oha) as hack/bench-proxy.py, so a gap in CPU per
request can be split into user time, system time, and the syscalls behind the system time.

Usage: hack/bench-syscalls.py [--pairs trellis,nginx,haproxy] [--proxy-bin PATH]
Environment: RATE (1000), CONNS (16), SAT_CONNS (32), DURATION (6 s per load point), OHA,
TRELLIS_PROXY (as hack/bench-proxy.sh sets them). Ports from 25100 (its own, so it can run
beside hack/bench-proxy.py). Needs perf (linux-perf) with tracepoints readable (root).
"""
import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "bench_proxy", os.path.join(ROOT, "hack/bench-proxy.py"))
bp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bp)
# Ports of its own.
bp.UPSTREAM = 25080

EVENTS = ["raw_syscalls:sys_enter", "context-switches",
          "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait",
          "syscalls:sys_enter_read", "syscalls:sys_enter_recvfrom",
          "syscalls:sys_enter_readv", "syscalls:sys_enter_write",
          "syscalls:sys_enter_writev", "syscalls:sys_enter_sendto",
          "syscalls:sys_enter_sendmsg", "syscalls:sys_enter_recvmsg",
          "syscalls:sys_enter_epoll_ctl", "syscalls:sys_enter_futex"]
SHORT = {"raw_syscalls:sys_enter": "syscalls", "context-switches": "cs"}


def cpu_split(pids):
    """(user, system) CPU seconds of the processes (utime, stime in /proc/<pid>/stat)."""
    u = s = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        u += int(fields[11])
        s += int(fields[12])
    return u / bp.TICK, s / bp.TICK


def switches(pids):
    """(voluntary, involuntary) context switches of every thread of the processes. Involuntary
    ones are where a proxy was preempted before it went back to waiting, on loopback mostly by
    a process its own write woke on the same CPU: a switch away and one back that a proxy which
    had gone on to sleep would not pay. A thread that exits between the listing and the read
    is skipped (its switches leave the sum, so keep the proxies' thread counts steady)."""
    v = n = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    lines = f.readlines()
            except FileNotFoundError:
                continue
            for line in lines:
                if line.startswith("voluntary_ctxt_switches:"):
                    v += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    n += int(line.split()[1])
    return v, n


def point(pair, rate, conns, duration):
    """One load point: per request and role, syscalls by kind, context switches, CPU."""
    roles = {"client": [x for p in pair.clients for x in bp.tree(p.pid)],
             "server": [x for p in pair.servers for x in bp.tree(p.pid)]}
    stats = {}
    for role, pids in roles.items():
        out = tempfile.mktemp(prefix=f"perf-stat-{role}-")
        args = ["perf", "stat", "-x", ",", "-o", out, "-p", ",".join(map(str, pids))]
        for e in EVENTS:
            args += ["-e", e]
        stats[role] = (out, subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL))
    time.sleep(0.5)
    cpu0 = {r: cpu_split(p) for r, p in roles.items()}
    cs0 = {r: switches(p) for r, p in roles.items()}
    res = bp.oha(pair.port, pair.host, rate, conns, duration)
    cpu1 = {r: cpu_split(p) for r, p in roles.items()}
    cs1 = {r: switches(p) for r, p in roles.items()}
    n = res["responses"]
    rows = {}
    for role, (out, sp) in stats.items():
        sp.send_signal(signal.SIGINT)
        sp.wait()
        counts = {}
        for line in open(out):
            f = line.strip().split(",")
            if len(f) > 2 and f[0].replace(".", "").isdigit():
                name = f[2]
                name = SHORT.get(name, name.replace("syscalls:sys_enter_", ""))
                counts[name] = int(float(f[0]))
        os.remove(out)
        per = {k: v / n for k, v in counts.items() if v}
        per["user_us"] = (cpu1[role][0] - cpu0[role][0]) / n * 1e6
        per["sys_us"] = (cpu1[role][1] - cpu0[role][1]) / n * 1e6
        per["cs_vol"] = (cs1[role][0] - cs0[role][0]) / n
        per["cs_invol"] = (cs1[role][1] - cs0[role][1]) / n
        rows[role] = per
    return res, rows


def show(name, label, res, rows):
    print(f"{name} {label}: {res['rps']:.0f} req/s, p50 {res['p50_ms']:.3f} ms, "
          f"p99 {res['p99_ms']:.3f} ms, failed {res['errors'] + res['non2xx']}")
    for role, per in rows.items():
        main = ["syscalls", "cs", "cs_vol", "cs_invol", "user_us", "sys_us"]
        rest = sorted((k for k in per if k not in main), key=lambda k: -per[k])
        print(f"  {role}: " + ", ".join(f"{k} {per[k]:.2f}" for k in main if k in per)
              + " | " + ", ".join(f"{k} {per[k]:.2f}" for k in rest))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="trellis,nginx,haproxy")
    ap.add_argument("--proxy-bin", default=bp.PROXY)
    a = ap.parse_args()
    rate = int(os.environ.get("RATE", "1000"))
    conns = int(os.environ.get("CONNS", "16"))
    sat_conns = int(os.environ.get("SAT_CONNS", "32"))
    duration = int(os.environ.get("DURATION", "6"))
    d = tempfile.mkdtemp(prefix="trellis-syscalls-")
    try:
        bp.certs(d)
        bp.nginx_upstream(d)
        bp.wait_port(bp.UPSTREAM)
        starts = {
            "trellis": lambda: bp.trellis_pair(d, a.proxy_bin, (25101, 25106, 25121, 25126),
                                               "trellis", []),
            "nginx": lambda: bp.nginx_pair(d, (25201, 25206)),
            "haproxy": lambda: bp.haproxy_pair(d, (25301, 25306)),
        }
        print(f"load average {os.getloadavg()[0]:.2f}; {duration} s per point; "
              f"per request and proxy", flush=True)
        for name in a.pairs.split(","):
            pair = starts[name]()
            try:
                time.sleep(0.3)
                bp.oha(pair.port, pair.host, rate, conns, 2)
                res, rows = point(pair, rate, conns, duration)
                show(name, f"at {rate} req/s over {conns}", res, rows)
                res, rows = point(pair, 0, sat_conns, duration)
                show(name, f"saturated over {sat_conns}", res, rows)
                sys.stdout.flush()
            finally:
                bp.stop(pair.all())
    finally:
        bp.stop(bp.procs)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
