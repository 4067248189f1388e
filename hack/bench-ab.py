#!/usr/bin/env python3
"""A/B of two trellis-proxy binaries: CPU per 1000 requests per proxy, interleaved rounds.

For judging one change to the request path on a shared, noisy machine: two Trellis pairs (client
sidecar -> mTLS -> server sidecar -> nginx upstream, as in hack/bench-proxy.py) run side by
side, one per binary, and the same fixed-rate load (hack/bench-load.rs) goes to A, then B, then
A... Each proxy's CPU (time on CPU of all its threads, /proc/<pid>/task/*/schedstat) is read
around each run. The report is the median over rounds of B's CPU per request divided by A's, per role, so
machine-wide slowdowns that hit both alike cancel out. Not run by CI.

Usage: hack/bench-ab.py OLD_BINARY NEW_BINARY (the same binary twice, with A_ENV/B_ENV, compares
settings: A_ENV="TRELLIS_CONCURRENCY=2,X=y" is the environment of pair A only)
Environment: RATE (1000), CONNS (16), DURATION (8 s), ROUNDS (5), PORT_BASE (19100: pair A
listens from there, pair B 100 above, the nginx upstream 1520 below, the OTLP sink 218 above;
give each concurrent run its own, since a second run on the same ports would measure the first
run's proxies), PERF (unset; "client" or
"server": run `perf record` on that proxy of B during one more round after the counted ones,
PERF_DURATION seconds long (default DURATION), into hack/out/perf-B-<role>.data), STAT (unset;
"1": count syscalls and context switches per request of both proxies of A and B in their last
rounds, with `perf stat`), IR (unset; "1": run every proxy under valgrind's callgrind and report
instructions per request per role instead of CPU time: deterministic, so one or two rounds at a
low RATE (say 200) compare binaries on a machine too busy for CPU time to mean anything; it
counts work, not cache misses or syscall cost; IR_OUT=DIR keeps each proxy's profile there as
callgrind.<a|b>-<role>.out, written when the proxy exits, for callgrind_annotate), A_TRACING / B_TRACING
(unset: tracing off; a sampling percent, e.g. "1": both sidecars of that pair export spans over
OTLP/HTTP to a sink collector inside this script, which answers every export 200 and counts
them; its CPU is this script's, not the proxies'; "<percent>@dead": to a port where nothing
listens, to measure what a down collector costs), IDLE (seconds, default 0: before the loaded
rounds, each proxy's CPU over that many seconds with no requests at all, in interleaved rounds,
to tell a fixed cost per second from a cost per request), TOGETHER (unset; "1": each round
loads A and B at the same time instead of one after the other, so both meet the same
contention; STAT is not taken then).
Memory (not under IR): each proxy's idle RSS (VmRSS once ready, before any request) and peak
RSS (VmHWM after the last round), as hack/bench-proxy.py measures them.
"""
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
LOAD = os.environ.get("TRELLIS_LOAD", os.path.join(TARGET, "release/examples/bench-load"))
RATE = int(os.environ.get("RATE", "1000"))
CONNS = int(os.environ.get("CONNS", "16"))
DURATION = os.environ.get("DURATION", "8")
ROUNDS = int(os.environ.get("ROUNDS", "5"))
PERF = os.environ.get("PERF", "")
IDLE = float(os.environ.get("IDLE", "0"))
TOGETHER = os.environ.get("TOGETHER") == "1"
IR = os.environ.get("IR") == "1"
IR_OUT = os.environ.get("IR_OUT", "")
PORT_BASE = int(os.environ.get("PORT_BASE", "19100"))
OTLP_SINK = PORT_BASE + 218
OTLP_DEAD = PORT_BASE + 219
UPSTREAM = PORT_BASE - 1520
TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/bench/sa/client"
SERVER_ID = f"spiffe://{TD}/ns/bench/sa/server"

procs = []


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def spawn(args, env=None, **kw):
    if env:
        kw["env"] = dict(os.environ, **env)
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def certs(d):
    def run(*a):
        sh("openssl", *a, cwd=d)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-days", "2", "-subj", "/CN=bench-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem")
    for name, sid in (("client", CLIENT_ID), ("server", SERVER_ID)):
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.ec.key")
        run("pkcs8", "-topk8", "-nocrypt", "-in", f"{name}.ec.key", "-out", f"{name}.key")
        run("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr")
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName=URI:{sid}\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")


def upstream(d):
    conf = os.path.join(d, "upstream.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1; daemon off; pid {d}/upstream.pid; error_log /dev/null;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{UPSTREAM};
    location / {{ default_type text/plain; return 200 "{"x" * 1024}"; }} }} }}
""")
    spawn(["nginx", "-c", conf, "-p", d])


def write_config(pd, cfg):
    ts = os.path.join(pd, "..gen_0")
    os.makedirs(ts)
    with open(os.path.join(ts, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(ts, "labels"), "w") as f:
        f.write('app="bench"\n')
    os.symlink("..gen_0", os.path.join(pd, "..data"))
    for name in ("config.json", "labels"):
        os.symlink(os.path.join("..data", name), os.path.join(pd, name))


def ready(port):
    end = time.time() + (180 if IR else 15)
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.05)
    raise SystemExit(f"proxy with admin {port} not ready")


_BENCH_PROXY = None


def bench_proxy():
    """hack/bench-proxy.py as a module, loaded once: its sink collector and its CPU reading, so
    both harnesses measure the same way."""
    global _BENCH_PROXY
    if _BENCH_PROXY is None:
        spec = importlib.util.spec_from_file_location(
            "bench_proxy", os.path.join(ROOT, "hack/bench-proxy.py"))
        _BENCH_PROXY = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_BENCH_PROXY)
    return _BENCH_PROXY


def otlp_sink_class():
    """hack/bench-proxy.py's sink collector, so both harnesses measure against the same one."""
    return bench_proxy().OtlpSink


def tracing(var):
    """`(percent, collector port)` from A_TRACING / B_TRACING, or None for tracing off."""
    v = os.environ.get(var, "")
    if not v:
        return None
    pct, _, where = v.partition("@")
    return float(pct), OTLP_DEAD if where == "dead" else OTLP_SINK


def pair(d, name, binary, base_port, env=None, traced=None):
    out_port, in_port, cadmin, sadmin = base_port, base_port + 1, base_port + 2, base_port + 3
    mesh = {"trustDomain": TD, "detectTimeoutMs": 100}
    if traced:
        mesh["telemetry"] = {"tracing": {
            "samplingPercent": traced[0],
            "collector": f"http://127.0.0.1:{traced[1]}/v1/traces"}}
    base = {"version": 1, "namespace": "bench", "mesh": mesh,
            "inbound": [{"source": "mesh-default", "mtls": "Strict"}]}
    client_cfg = dict(base, revision="r0", outbound=[{
        "name": "bench", "namespace": "bench",
        "ports": [{"port": 80, "protocol": "Http1",
                   "endpoints": [{"address": f"127.0.0.1:{in_port}"}]}],
        "identities": [SERVER_ID]}])
    server_cfg = dict(base, revision="s0", outbound=[])
    dirs = {}
    for role, cfg in (("client", client_cfg), ("server", server_cfg)):
        pd = os.path.join(d, f"{name}-{role}")
        os.makedirs(pd)
        shutil.copy(os.path.join(d, "ca.pem"), pd)
        write_config(pd, cfg)
        dirs[role] = pd
    common = ["--log-format", "text", "--log-level", "warn", "--local-mode"]
    if IR:
        binary = ["valgrind", "--tool=callgrind", binary]
    else:
        binary = [binary]

    def callgrind(role):
        out = f"{IR_OUT}/callgrind.{name}-{role}.out" if IR_OUT else "/dev/null"
        return [binary[0], binary[1], f"--callgrind-out-file={out}", *binary[2:]] if IR else binary

    s = spawn([*callgrind("server"), "--dir", dirs["server"], "--cert-file", f"{d}/server.crt",
               "--key-file", f"{d}/server.key", "--inbound-addr", f"127.0.0.1:{in_port}",
               "--outbound-addr", "127.0.0.1:0", "--admin-addr", f"127.0.0.1:{sadmin}",
               "--inbound-target", f"127.0.0.1:{UPSTREAM}", *common], env)
    c = spawn([*callgrind("client"), "--dir", dirs["client"], "--cert-file", f"{d}/client.crt",
               "--key-file", f"{d}/client.key", "--outbound-addr", f"127.0.0.1:{out_port}",
               "--inbound-addr", "127.0.0.1:0", "--admin-addr", f"127.0.0.1:{cadmin}", *common], env)
    ready(sadmin)
    ready(cadmin)
    # Another run on the same ports answers `ready` too: make sure ours are the ones alive.
    for p in (s, c):
        if p.poll() is not None:
            raise SystemExit(f"{binary} exited at start (ports from {base_port} taken?)")
    return {"client": c.pid, "server": s.pid, "port": out_port}


def status_kib(pid, field):
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def instructions(pid):
    """Instructions the proxy under callgrind has run so far (every thread), in millions."""
    out = sh("callgrind_control", "-e", "Ir", str(pid))
    total = 0
    for line in out.splitlines():
        f = line.split()
        # "Th <n> <Ir>" per thread.
        if len(f) == 3 and f[0] == "Th":
            total += int(f[2].replace(",", ""))
    return total / 1e6


def cpu(pid):
    """CPU seconds of all the process's threads, in nanoseconds' resolution (schedstat's time
    on CPU, as hack/bench-proxy.py reads it). Under IR=1, millions of instructions instead."""
    if IR:
        return instructions(pid)
    return bench_proxy().cpu_seconds([pid])


STAT_EVENTS = ["raw_syscalls:sys_enter", "context-switches", "page-faults",
               "syscalls:sys_enter_writev",
               "syscalls:sys_enter_write", "syscalls:sys_enter_sendto",
               "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_read",
               "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_futex"]


def run(p, perf_role=None, stat=False, duration=DURATION, name=""):
    perf = None
    stats = []
    if stat:
        for role in ("client", "server"):
            out = tempfile.mktemp(prefix=f"perf-stat-{role}-")
            args = ["perf", "stat", "-x", ",", "-o", out, "-p", str(p[role])]
            for e in STAT_EVENTS:
                args += ["-e", e]
            stats.append((role, out, subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                                      stderr=subprocess.DEVNULL)))
        time.sleep(0.5)
    if perf_role:
        os.makedirs(os.path.join(ROOT, "hack/out"), exist_ok=True)
        perf = subprocess.Popen(
            ["perf", "record", "-F", "999", "-g", "--call-graph", "dwarf,16384", "-p",
             str(p[perf_role]), "-o", os.path.join(ROOT, f"hack/out/perf-B-{perf_role}.data")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    c0, s0 = cpu(p["client"]), cpu(p["server"])
    res = json.loads(sh(LOAD, "--url", f"http://127.0.0.1:{p['port']}/", "--host", "bench",
                        "--rate", str(RATE), "--conns", str(CONNS), "--duration", duration))
    c1, s1 = cpu(p["client"]), cpu(p["server"])
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    n = res["requests"] / 1000
    for role, out, sp in stats:
        sp.send_signal(signal.SIGINT)
        sp.wait()
        counts = {}
        for line in open(out):
            f = line.strip().split(",")
            if len(f) > 2 and f[0].replace(".", "").isdigit():
                counts[f[2].replace("syscalls:sys_enter_", "")] = int(float(f[0]))
        os.remove(out)
        print(f"  {name} {role} per request: " + ", ".join(
            f"{k} {v / res['requests']:.2f}" for k, v in counts.items()), flush=True)
    if res["errors"] or res["non2xx"]:
        print(f"  errors: {res['errors']} non2xx: {res['non2xx']}", file=sys.stderr)
    return {"client": (c1 - c0) / n, "server": (s1 - s0) / n, "p50": res["p50_ms"],
            "p99": res["p99_ms"]}


def run_together(pairs):
    """One round with A's and B's load at the same time: both pairs meet the same contention
    from the rest of the machine in the same seconds, so the B/A ratio of a round is not at the
    mercy of what a neighbour happened to compile during A's run or B's."""
    before = {n: (cpu(p["client"]), cpu(p["server"])) for n, p in pairs.items()}
    loads = {n: subprocess.Popen(
        [LOAD, "--url", f"http://127.0.0.1:{p['port']}/", "--host", "bench", "--rate",
         str(RATE), "--conns", str(CONNS), "--duration", DURATION],
        stdout=subprocess.PIPE, text=True) for n, p in pairs.items()}
    out = {n: json.loads(l.communicate()[0]) for n, l in loads.items()}
    rows = {}
    for n, p in pairs.items():
        c1, s1 = cpu(p["client"]), cpu(p["server"])
        k = out[n]["requests"] / 1000
        if out[n]["errors"] or out[n]["non2xx"]:
            print(f"  {n} errors: {out[n]['errors']} non2xx: {out[n]['non2xx']}",
                  file=sys.stderr)
        rows[n] = {"client": (c1 - before[n][0]) / k, "server": (s1 - before[n][1]) / k,
                   "p50": out[n]["p50_ms"], "p99": out[n]["p99_ms"]}
    return rows


def idle(pairs):
    """CPU milliseconds per second of each idle proxy, A and B in the same window (no load
    runs, so they share the machine alike); `ROUNDS` windows of `IDLE` seconds."""
    rows = {name: {"client": [], "server": []} for name in pairs}
    for i in range(ROUNDS):
        before = {n: {r: cpu(p[r]) for r in ("client", "server")} for n, p in pairs.items()}
        time.sleep(IDLE)
        for n, p in pairs.items():
            for r in ("client", "server"):
                rows[n][r].append((cpu(p[r]) - before[n][r]) * 1000 / IDLE)
        print(f"idle {i}: " + ", ".join(
            f"{n} {r} {rows[n][r][-1]:.3f}" for n in pairs for r in ("client", "server"))
            + " CPU ms/s", flush=True)
    for n in pairs:
        for r in ("client", "server"):
            print(f"idle {n} {r}: median {statistics.median(rows[n][r]):.3f} CPU ms/s")


def main():
    a_bin, b_bin = sys.argv[1], sys.argv[2]
    d = tempfile.mkdtemp(prefix="trellis-ab-")
    try:
        certs(d)
        upstream(d)
        def env(var):
            return dict(kv.split("=", 1) for kv in os.environ.get(var, "").split(",") if kv)

        traced = {"A": tracing("A_TRACING"), "B": tracing("B_TRACING")}
        sink = None
        if any(t and t[1] == OTLP_SINK for t in traced.values()):
            sink = otlp_sink_class()(OTLP_SINK)
        pairs = {"A": pair(d, "a", a_bin, PORT_BASE, env("A_ENV"), traced["A"]),
                 "B": pair(d, "b", b_bin, PORT_BASE + 100, env("B_ENV"), traced["B"])}
        idle_rss = {n: {r: status_kib(p[r], "VmRSS") for r in ("client", "server")}
                    for n, p in pairs.items()}
        if IDLE > 0:
            # Let start-up (config load, exporter connect) settle before idling counts.
            time.sleep(2)
            idle(pairs)
        # Warm both (TLS handshakes, pool connections) before anything counts.
        for p in pairs.values():
            sh(LOAD, "--url", f"http://127.0.0.1:{p['port']}/", "--host", "bench", "--rate",
               "200", "--conns", str(CONNS), "--duration", "1")
        rows = {"A": [], "B": []}
        for i in range(ROUNDS if TOGETHER else 0):
            r = run_together(pairs)
            for name in ("A", "B"):
                rows[name].append(r[name])
                print(f"round {i} {name}: client {r[name]['client']:.4f} server "
                      f"{r[name]['server']:.4f} CPU s/1000 req; p50 {r[name]['p50']:.3f} "
                      f"p99 {r[name]['p99']:.3f} ms", flush=True)
        for i in range(0 if TOGETHER else ROUNDS):
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                r = run(pairs[name], None, os.environ.get("STAT") == "1" and i >= ROUNDS - 2,
                        name=name)
                rows[name].append(r)
                print(f"round {i} {name}: client {r['client']:.4f} server {r['server']:.4f} "
                      f"{'M instructions' if IR else 'CPU s'}/1000 req; p50 {r['p50']:.3f} p99 {r['p99']:.3f} ms", flush=True)
        for role in ("client", "server"):
            ratios = [b[role] / a[role] for a, b in zip(rows["A"], rows["B"]) if a[role] > 0]
            print(f"{role}: A median {statistics.median(r[role] for r in rows['A']):.4f}, "
                  f"B median {statistics.median(r[role] for r in rows['B']):.4f}, "
                  f"B/A per-round ratio median {statistics.median(ratios):.3f} "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
        for k in ("p50", "p99"):
            print(f"{k}: A median {statistics.median(r[k] for r in rows['A']):.3f} ms, "
                  f"B median {statistics.median(r[k] for r in rows['B']):.3f} ms")
        if not IR:
            for n, p in pairs.items():
                print(f"RSS {n}: " + ", ".join(
                    f"{r} idle {idle_rss[n][r] / 1024:.1f} MiB peak "
                    f"{status_kib(p[r], 'VmHWM') / 1024:.1f} MiB" for r in ("client", "server")))
        if PERF:
            # A round of its own, counted nowhere: perf's sampling costs the proxy CPU too.
            run(pairs["B"], PERF, duration=os.environ.get("PERF_DURATION", DURATION))
            print(f"perf profile of B's {PERF}: hack/out/perf-B-{PERF}.data")
        if sink:
            exports, size = sink.counts()
            print(f"OTLP sink: {exports} exports over {sink.connections()} connection(s), "
                  f"{size} bytes in all")
            if exports == 0:
                print("no span reached the sink: tracing was not measured", file=sys.stderr)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
