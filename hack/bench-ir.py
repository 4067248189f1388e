#!/usr/bin/env python3
"""Instructions per request of each proxy of the Trellis, nginx and HAProxy pairs, counted by
valgrind's callgrind: the one comparison with the baselines that machine noise cannot move.
Not run by CI.

hack/bench-proxy.py judges CPU time, which is what issue #14's targets are stated in, but on
these shared machines its ratio to nginx moves by more than 10 % between two runs of the same
binaries (2026-11-30, a quiet machine, 7 rounds each: client sidecar 0.957x, then 1.145x).
Callgrind counts the instructions each proxy runs in user space (its own code, the TLS
library, libc), the same count for the same work whatever else the machine does. It does not
count the kernel's share (syscalls, TCP: see hack/bench-syscalls.py, which splits user from
system time and counts syscalls and context switches per request for the same pairs) nor
cycles lost to cache misses, so it is a floor under CPU time, not CPU time.

Each pair is built as hack/bench-proxy.py builds it (the same configurations, certificates,
TLS 1.3 ECDSA P-256 hop with client certificates, nginx upstream, oha as the load generator),
with both of its proxies under callgrind; the upstream and the load generator run natively.
After a warm-up that opens the connections (handshakes are not counted), each proxy's
instruction count is read (callgrind_control) before and after a fixed-rate run, and divided
by the requests answered. The rate is low (RATE, default 200 req/s) because a proxy under
callgrind runs some 50 times slower: at 1000 req/s requests would queue inside it and be
handled in batches, which the native proxy does not see.

Usage: hack/bench-ir.py [--pairs trellis,nginx,haproxy] [--proxy-bin PATH]
Environment: RATE (200), CONNS (16, as hack/bench-proxy.py), DURATION (10 s), ROUNDS (2: the
count repeats to within a fraction of a percent; a second round shows that it does), IR_OUT
(unset; a directory: each proxy's profile of the counted run alone is kept there as
callgrind.<pair>-<role>.out.1, for callgrind_annotate; the .out file beside it, written when
the proxy exits, holds the rest: start-up, handshakes, warm-up), OHA (default: where
hack/bench-proxy.sh installs it), TRELLIS_PROXY (default: the release build; run
hack/bench-proxy.sh --quick once for both). Ports from 26100 (its own, so it can run beside
the other benchmarks). Needs valgrind, nginx and haproxy.
"""
import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "bench_proxy", os.path.join(ROOT, "hack/bench-proxy.py"))
bp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bp)
bp.UPSTREAM = 26080
# oha where hack/bench-proxy.sh installs it, unless OHA says otherwise.
_cached_oha = os.path.join(
    os.environ.get("TRELLIS_CACHE", os.path.expanduser("~/.cache/trellis")), "oha-1.16.0/bin/oha")
if "OHA" not in os.environ and os.path.exists(_cached_oha):
    bp.OHA = _cached_oha
bp.READY_TIMEOUT = 180.0

RATE = int(os.environ.get("RATE", "200"))
CONNS = int(os.environ.get("CONNS", "16"))
DURATION = int(os.environ.get("DURATION", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
IR_OUT = os.environ.get("IR_OUT", "")

# The proxies of the pair being started, by the binary bench-proxy.py spawns: each gets
# callgrind in front of it. The upstream nginx is started before any pair and stays native.
UNDER = {"tag": None}
_spawn = bp.spawn


def spawn(args, env=None, log=None):
    tag = UNDER["tag"]
    if tag is None:
        return _spawn(args, env=env, log=log)
    # Which proxy of the pair, from what bench-proxy.py names its files (`client.crt`, the
    # `trellis-client-*` directory, `nginx-client.conf`, `haproxy-client.cfg`): the pairs do
    # not all start their proxies in the same order.
    role = "client" if any("client" in os.path.basename(a) for a in args) else "server"
    out = os.path.join(IR_OUT, f"callgrind.{tag}-{role}.out") if IR_OUT else "/dev/null"
    # nginx's worker is a forked child, which callgrind follows but callgrind_control cannot
    # reach: nginx runs as one process instead (`master_process off`, the same event loop and
    # request path as a worker, without the master that only supervises it).
    if os.path.basename(args[0]) == "nginx":
        conf = args[args.index("-c") + 1]
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write("master_process off;\n" + text)
    p = _spawn(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *args],
               env=env, log=log)
    return p


bp.spawn = spawn


def instructions(pids):
    """Instructions the processes under callgrind have run so far, every thread."""
    total = 0
    for pid in pids:
        try:
            out = bp.sh("callgrind_control", "-e", "Ir", str(pid))
        except subprocess.CalledProcessError:
            continue
        for line in out.splitlines():
            f = line.split()
            # "Th <n> <Ir>" per thread, a single-threaded process too.
            if len(f) == 3 and f[0] == "Th":
                total += int(f[2].replace(",", ""))
    return total


def start(name, d, proxy_bin):
    UNDER["tag"] = name
    try:
        if name == "trellis":
            pair = bp.trellis_pair(d, proxy_bin, (26101, 26106, 26121, 26126), "trellis", [])
        elif name == "nginx":
            pair = bp.nginx_pair(d, (26201, 26206))
        elif name == "haproxy":
            pair = bp.haproxy_pair(d, (26301, 26306))
        else:
            raise SystemExit(f"unknown pair {name}")
    finally:
        UNDER["tag"] = None
    return pair


def measure(pair):
    roles = {"client": pair.clients, "server": pair.servers}
    # Warm-up: every connection opened and its handshake done (and, under callgrind, the
    # code paths translated) before anything is counted.
    bp.oha(pair.port, pair.host, RATE, CONNS, 3)
    pids = {r: [p.pid for p in ps] for r, ps in roles.items()}
    if IR_OUT:
        # The kept profile then holds the counted run only: zeroed here, dumped after it.
        for p in (x for ps in pids.values() for x in ps):
            bp.sh("callgrind_control", "--zero", str(p))
    before = {r: instructions(p) for r, p in pids.items()}
    res = bp.oha(pair.port, pair.host, RATE, CONNS, DURATION)
    after = {r: instructions(p) for r, p in pids.items()}
    if IR_OUT:
        for p in (x for ps in pids.values() for x in ps):
            bp.sh("callgrind_control", "--dump=counted", str(p))
    n = res["responses"]
    failed = res["errors"] + res["non2xx"]
    return {r: (after[r] - before[r]) / max(n, 1) for r in roles}, n, failed, res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="trellis,nginx,haproxy")
    ap.add_argument("--proxy-bin", default=bp.PROXY)
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    if IR_OUT:
        os.makedirs(IR_OUT, exist_ok=True)
    names = a.pairs.split(",")
    d = tempfile.mkdtemp(prefix="trellis-ir-")
    results = {n: [] for n in names}
    try:
        bp.certs(d)
        bp.nginx_upstream(d)
        bp.wait_port(bp.UPSTREAM)
        print(f"{RATE} req/s over {CONNS} connections, {DURATION} s, {ROUNDS} round(s); "
              "instructions per request (thousands), proxies under callgrind", flush=True)
        for rnd in range(ROUNDS):
            for name in names:
                pair = start(name, d, a.proxy_bin)
                try:
                    per, n, failed, res = measure(pair)
                finally:
                    bp.stop(pair.all())
                results[name].append(per)
                print(f"round {rnd + 1} {name}: client {per['client'] / 1e3:.1f}k, server "
                      f"{per['server'] / 1e3:.1f}k ({n} responses, {failed} failed, "
                      f"p50 {res['p50_ms']:.2f} ms)", flush=True)
                if failed:
                    raise SystemExit(f"{name}: {failed} failed requests")
    finally:
        bp.stop(bp.procs)
        shutil.rmtree(d, ignore_errors=True)
    med = {n: {r: statistics.median(x[r] for x in results[n]) for r in ("client", "server")}
           for n in names}
    print("\nmedians, thousand instructions per request:")
    for n in names:
        print(f"- {n}: client {med[n]['client'] / 1e3:.1f}k, server {med[n]['server'] / 1e3:.1f}k")
    if "trellis" in med:
        for other in (x for x in names if x != "trellis"):
            print(f"- trellis/{other}: client "
                  f"{med['trellis']['client'] / med[other]['client']:.3f}x, server "
                  f"{med['trellis']['server'] / med[other]['server']:.3f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
