#!/usr/bin/env python3
"""Sidecar benchmark: a client proxy and a server proxy with mTLS between them, in front of a
small upstream, against the direct path, an nginx pair and an HAProxy pair doing the same TLS
hop (TLS 1.3, ECDSA P-256, client certificates verified). Everything runs on loopback on this
machine in one run, so the ratios compare like with like.

  load:       hack/bench-load.rs (fixed rate with coordinated-omission correction, the wrk2
              model: latency counted from when each request was due), HTTP/1.1 keep-alive,
              1 KiB responses, CONNS connections
  saturation: the same generator closed-loop (--rate 0), same connections
  per proxy:  CPU seconds per 1000 requests (utime+stime from /proc/<pid>/stat, all processes
              of the proxy), idle RSS (VmRSS before load), peak RSS (VmHWM after the
              fixed-rate run)
  reloads:    20 kubelet-style config swaps on the client sidecar during its fixed-rate run;
              file change -> revision visible on /config; failed requests counted by the generator

Not run by CI. Usage: hack/bench-proxy.sh (builds the release binary, then runs this).
Environment: RATE (1000), CONNS (16), DURATION (20), SAT_DURATION (10) seconds, OUT (hack/out),
PAIRS (comma-separated subset of trellis,nginx,haproxy; default all; the direct path always runs
as the baseline, and the ratio lines need all three).

--tracing: also runs the trellis pair with span export at 1 % and at 100 % sampling (after the
tracing-off run, same load), exporting over OTLP/HTTP to a sink collector in this script that
answers every export 200 (its CPU is not the proxies'), and reports the CPU per 1000 requests of
each against tracing off (issue #15's cost target: +5 % at most at 1 %).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY = os.environ.get("TRELLIS_PROXY", os.path.join(ROOT, "target/release/trellis-proxy"))
RATE = int(os.environ.get("RATE", "1000"))
CONNS = int(os.environ.get("CONNS", "16"))
DURATION = os.environ.get("DURATION", "20")
SAT_DURATION = os.environ.get("SAT_DURATION", "10")
OUT = os.environ.get("OUT", os.path.join(ROOT, "hack/out"))
LOAD = os.environ.get("TRELLIS_LOAD", os.path.join(ROOT, "target/release/examples/bench-load"))
TICK = os.sysconf("SC_CLK_TCK")
PAIRS = [p for p in os.environ.get("PAIRS", "trellis,nginx,haproxy").split(",") if p]
TRACING = "--tracing" in sys.argv[1:]
OTLP_SINK = 18318
# Sampling percent of each tracing scenario (the plain "trellis" run is tracing off).
TRACED = {"trellis-trace1": 1.0, "trellis-trace100": 100.0}

UPSTREAM = 18080
PORTS = {
    "trellis": (15101, 15206),  # client outbound, server inbound
    "nginx": (16101, 16206),
    "haproxy": (17101, 17206),
}
TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/bench/sa/client"
SERVER_ID = f"spiffe://{TD}/ns/bench/sa/server"

procs = []


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def spawn(args, **kw):
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def cleanup():
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()


def wait_port(port, timeout=10.0):
    import socket

    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def http_get(url, host=None, timeout=2.0):
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


# ---------------------------------------------------------------- certificates (openssl CLI)


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
        ext = os.path.join(d, f"{name}.ext")
        with open(ext, "w") as f:
            # The SPIFFE ID is the only URI SAN (what the mesh checks); the DNS name is for nginx
            # and HAProxy, which verify a host name.
            f.write(f"subjectAltName=URI:{sid},DNS:{name}.bench\n"
                    "keyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{name}.crt")
        with open(os.path.join(d, f"{name}.both.pem"), "w") as f:
            f.write(open(os.path.join(d, f"{name}.crt")).read())
            f.write(open(os.path.join(d, f"{name}.key")).read())


# ---------------------------------------------------------------- the systems under test


def nginx_upstream(d):
    conf = os.path.join(d, "upstream.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1; daemon off; pid {d}/upstream.pid; error_log /dev/null;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{UPSTREAM};
    location / {{ default_type text/plain; return 200 "{"x" * 1024}"; }} }} }}
""")
    return spawn(["nginx", "-c", conf, "-p", d])


def otlp_sink():
    """An OTLP/HTTP collector that takes every export (an empty protobuf
    ExportTraceServiceResponse is zero bytes) and counts the bytes it received."""
    import http.server
    import threading

    class Sink(http.server.BaseHTTPRequestHandler):
        received = 0

        def do_POST(self):
            n = int(self.headers.get("content-length", "0"))
            Sink.received += len(self.rfile.read(n))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", OTLP_SINK), Sink)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, Sink


def trellis_pair(d, sampling=None):
    out_port, in_port = PORTS["trellis"]
    mesh = {"trustDomain": TD, "detectTimeoutMs": 100}
    if sampling is not None:
        mesh["telemetry"] = {"tracing": {
            "samplingPercent": sampling,
            "collector": f"http://127.0.0.1:{OTLP_SINK}/v1/traces"}}
    base = {"version": 1, "namespace": "bench",
            "mesh": mesh,
            "inbound": [{"source": "mesh-default", "mtls": "Strict"}]}
    client_cfg = dict(base, revision="r0", outbound=[{
        "name": "bench", "namespace": "bench",
        "ports": [{"port": 80, "protocol": "Http1",
                   "endpoints": [{"address": f"127.0.0.1:{in_port}"}]}],
        "identities": [SERVER_ID]}])
    server_cfg = dict(base, revision="s0", outbound=[])
    dirs = {}
    for role, cfg in (("client", client_cfg), ("server", server_cfg)):
        # One directory per run: the tracing runs start fresh pairs beside the first.
        suffix = "" if sampling is None else f"-trace{sampling:g}"
        pd = os.path.join(d, f"trellis-{role}{suffix}")
        os.makedirs(pd)
        shutil.copy(os.path.join(d, "ca.pem"), pd)
        kubelet_write(pd, 0, json.dumps(cfg))
        dirs[role] = (pd, cfg)
    # --local-mode: no iptables here, the load generator calls the client's outbound port
    # directly and it routes by Host (outside local mode such a connection is closed).
    common = ["--log-format", "text", "--log-level", "warn", "--local-mode"]
    s = spawn([PROXY, "--dir", dirs["server"][0], "--cert-file", f"{d}/server.crt",
               "--key-file", f"{d}/server.key", "--inbound-addr", f"127.0.0.1:{in_port}",
               "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:15221",
               "--inbound-target", f"127.0.0.1:{UPSTREAM}", *common])
    c = spawn([PROXY, "--dir", dirs["client"][0], "--cert-file", f"{d}/client.crt",
               "--key-file", f"{d}/client.key", "--outbound-addr", f"127.0.0.1:{out_port}",
               "--inbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:15121", *common])
    for port in (15221, 15121):
        end = time.time() + 10
        while True:
            try:
                if http_get(f"http://127.0.0.1:{port}/ready")[0] == 200:
                    break
            except Exception:
                pass
            if time.time() > end:
                raise SystemExit(f"trellis proxy on admin {port} not ready")
            time.sleep(0.05)
    return [c], [s], dirs["client"]


def kubelet_write(d, gen, text):
    ts = os.path.join(d, f"..gen_{gen}")
    os.makedirs(ts)
    with open(os.path.join(ts, "config.json"), "w") as f:
        f.write(text)
    with open(os.path.join(ts, "labels"), "w") as f:
        f.write('app="bench"\n')
    tmp = os.path.join(d, "..data_tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.basename(ts), tmp)
    os.rename(tmp, os.path.join(d, "..data"))
    for name in ("config.json", "labels"):
        link = os.path.join(d, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..data", name), link)


def nginx_pair(d):
    out_port, in_port = PORTS["nginx"]
    files = {}
    files["client"] = f"""
worker_processes 2; daemon off; pid {d}/nginx-client.pid; error_log /dev/null;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream server_side {{ server 127.0.0.1:{in_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{out_port};
    location / {{ proxy_pass https://server_side; proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_certificate {d}/client.crt; proxy_ssl_certificate_key {d}/client.key;
      proxy_ssl_trusted_certificate {d}/ca.pem; proxy_ssl_verify on;
      proxy_ssl_name server.bench; proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; }} }} }}
"""
    files["server"] = f"""
worker_processes 2; daemon off; pid {d}/nginx-server.pid; error_log /dev/null;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream app {{ server 127.0.0.1:{UPSTREAM}; keepalive 64; }}
  server {{ listen 127.0.0.1:{in_port} ssl;
    ssl_certificate {d}/server.crt; ssl_certificate_key {d}/server.key;
    ssl_client_certificate {d}/ca.pem; ssl_verify_client on; ssl_protocols TLSv1.3;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
"""
    ps = {}
    for role, text in files.items():
        conf = os.path.join(d, f"nginx-{role}.conf")
        with open(conf, "w") as f:
            f.write(text)
        ps[role] = spawn(["nginx", "-c", conf, "-p", d])
    wait_port(in_port)
    wait_port(out_port)
    return [ps["client"]], [ps["server"]], None


def haproxy_pair(d):
    out_port, in_port = PORTS["haproxy"]
    g = "global\n  nbthread 2\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\n"
    dflt = "defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n"
    files = {
        "client": g + dflt + f"""
frontend fe
  bind 127.0.0.1:{out_port}
  default_backend be
backend be
  server s1 127.0.0.1:{in_port} ssl crt {d}/client.both.pem ca-file {d}/ca.pem verify required verifyhost server.bench
""",
        "server": g + dflt + f"""
frontend fe
  bind 127.0.0.1:{in_port} ssl crt {d}/server.both.pem ca-file {d}/ca.pem verify required
  default_backend be
backend be
  server app 127.0.0.1:{UPSTREAM}
""",
    }
    ps = {}
    for role, text in files.items():
        conf = os.path.join(d, f"haproxy-{role}.cfg")
        with open(conf, "w") as f:
            f.write(text)
        ps[role] = spawn(["haproxy", "-db", "-f", conf])
    wait_port(in_port)
    wait_port(out_port)
    return [ps["client"]], [ps["server"]], None


# ---------------------------------------------------------------- measurement


def tree(pid):
    """The process and its descendants (nginx workers)."""
    out = [pid]
    try:
        kids = sh("pgrep", "-P", str(pid)).split()
    except subprocess.CalledProcessError:
        kids = []
    for k in kids:
        out += tree(int(k))
    return out


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICK


def status_kib(pids, key):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


def load(url, host, rate, duration=DURATION):
    return json.loads(sh(LOAD, "--url", url, "--host", host, "--rate", str(rate),
                         "--conns", str(CONNS), "--duration", str(duration)))


def reloader(client_dir, stop, results):
    """Swaps the client sidecar's config (new revision each time) and times until /config
    shows it."""
    import threading  # noqa: F401

    pd, cfg = client_dir
    for i in range(1, 21):
        if stop.is_set():
            break
        time.sleep(0.5)
        rev = f"r{i}"
        t0 = time.perf_counter()
        kubelet_write(pd, i, json.dumps(dict(cfg, revision=rev)))
        while True:
            _, body = http_get("http://127.0.0.1:15121/config")
            if json.loads(body)["revision"] == rev:
                results.append((time.perf_counter() - t0) * 1000)
                break
            if time.perf_counter() - t0 > 5:
                results.append(float("inf"))
                break
            time.sleep(0.002)


def scenario(name, start, d):
    import threading

    print(f"== {name}", file=sys.stderr)
    clients, servers, client_dir = start(d) if start else ([], [], None)
    time.sleep(0.5)
    pair = "trellis" if name in TRACED else name
    port = PORTS[pair][0] if pair in PORTS else UPSTREAM
    url = f"http://127.0.0.1:{port}/"
    host = "bench.bench" if pair == "trellis" else "localhost"
    # Warm up (connections, TLS sessions), then measure from a clean CPU baseline.
    load(url, host, RATE, duration=2)
    groups = {"client": [tree(p.pid) for p in clients], "server": [tree(p.pid) for p in servers]}
    flat = {k: [x for t in v for x in t] for k, v in groups.items()}
    idle_rss = {k: status_kib(v, "VmRSS") for k, v in flat.items() if v}
    cpu0 = {k: cpu_seconds(v) for k, v in flat.items() if v}
    reloads = []
    stop = threading.Event()
    th = None
    if client_dir:
        th = threading.Thread(target=reloader, args=(client_dir, stop, reloads))
        th.start()
    fixed = load(url, host, RATE)
    stop.set()
    if th:
        th.join()
    cpu1 = {k: cpu_seconds(v) for k, v in flat.items() if v}
    peak = {k: status_kib(v, "VmHWM") for k, v in flat.items() if v}
    reqs = fixed["requests"]
    sat = load(url, host, 0, duration=SAT_DURATION)["rps"]
    res = {
        "name": name,
        "latency_ms": {p: fixed[f"{p}_ms"] for p in ("p50", "p90", "p99", "p999")},
        "max_ms": fixed["max_ms"],
        "requests": reqs,
        "errors": fixed["errors"],
        "non2xx": fixed["non2xx"],
        "achieved_rps": fixed["rps"],
        "cpu_per_1k": {k: (cpu1[k] - cpu0[k]) / (reqs / 1000) for k in cpu1} if reqs else {},
        "idle_rss_kib": idle_rss,
        "peak_rss_kib": peak,
        "saturation_rps": sat,
        "reload_ms": reloads,
    }
    for p in clients + servers:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    return res


def main():
    for tool in ("nginx", "haproxy", "openssl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} missing: apt-get install nginx haproxy openssl")
    if not os.path.exists(LOAD):
        raise SystemExit(f"{LOAD} missing: cargo build --release -p trellis-proxy --example bench-load")
    if not os.path.exists(PROXY):
        raise SystemExit(f"{PROXY} missing: cargo build --release -p trellis-proxy")
    os.makedirs(OUT, exist_ok=True)
    d = tempfile.mkdtemp(prefix="trellis-bench-")
    try:
        certs(d)
        nginx_upstream(d)
        wait_port(UPSTREAM)
        results = [scenario("direct", None, d)]
        starts = {"trellis": trellis_pair, "nginx": nginx_pair, "haproxy": haproxy_pair}
        for name in PAIRS:
            results.append(scenario(name, starts[name], d))
        if TRACING and "trellis" in PAIRS:
            srv, sink = otlp_sink()
            for name, pct in TRACED.items():
                results.append(scenario(name, lambda d, pct=pct: trellis_pair(d, pct), d))
                results[-1]["otlp_bytes"] = sink.received
            srv.shutdown()
    finally:
        cleanup()
        shutil.rmtree(d, ignore_errors=True)
    with open(os.path.join(OUT, "bench-proxy.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = render(results)
    with open(os.path.join(OUT, "bench-proxy.md"), "w") as f:
        f.write(table)
    print(table)


def render(results):
    direct = results[0]
    pcts = ["p50", "p90", "p99"]
    lines = [
        f"# Sidecar benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, loopback)",
        "",
        f"Fixed rate {RATE} req/s (hack/bench-load.rs, coordinated-omission corrected), {CONNS} "
        f"connections, HTTP/1.1 keep-alive, 1 KiB responses, {DURATION} s; saturation: same "
        f"generator closed-loop, {CONNS} connections, {SAT_DURATION} s. Pairs do the same TLS 1.3 "
        f"hop with client certificates (ECDSA P-256). Machine load from other work is not "
        f"controlled: compare ratios within this run.",
        "",
        "Direct path latency (ms): " + ", ".join(
            f"{p} {direct['latency_ms'][p]:.3f}" for p in pcts) + f", max {direct['max_ms']:.3f}",
        "",
        "| pair | added p50 ms | added p90 ms | added p99 ms | added max ms | errors | "
        "CPU s/1k req (client, server) | idle RSS MiB (client, server) | peak RSS MiB "
        "(client, server) | saturation req/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        added = [r["latency_ms"][p] - direct["latency_ms"][p] for p in pcts]
        added.append(r["max_ms"] - direct["max_ms"])
        if r["name"] == "direct":
            cpu = idle = peak = "-"
        else:
            cpu = f"{r['cpu_per_1k']['client']:.4f}, {r['cpu_per_1k']['server']:.4f}"
            idle = f"{r['idle_rss_kib']['client'] / 1024:.1f}, {r['idle_rss_kib']['server'] / 1024:.1f}"
            peak = f"{r['peak_rss_kib']['client'] / 1024:.1f}, {r['peak_rss_kib']['server'] / 1024:.1f}"
        lines.append(
            f"| {r['name']} | " + " | ".join(f"{a:.3f}" for a in added)
            + f" | {r['errors'] + r['non2xx']} | {cpu} | {idle} | {peak} | {r['saturation_rps']:.0f} |")
    t = next((r for r in results if r["name"] == "trellis"), None)
    lines.append("")
    if t is None:
        return "\n".join(lines)
    for other in ("nginx", "haproxy"):
        o = next((r for r in results if r["name"] == other), None)
        if o is None:
            continue
        ours = t["latency_ms"]["p99"] - direct["latency_ms"]["p99"]
        theirs = o["latency_ms"]["p99"] - direct["latency_ms"]["p99"]
        ratio = ours / theirs if theirs > 0 else float("nan")
        lines.append(f"- added p99 trellis/{other}: {ratio:.2f} (target <= 1.0); saturation "
                     f"trellis/{other}: {t['saturation_rps'] / o['saturation_rps']:.2f} (target >= 1.0)")
    for name, pct in TRACED.items():
        r = next((r for r in results if r["name"] == name), None)
        if r is None or not t["cpu_per_1k"]:
            continue
        rise = {k: (r["cpu_per_1k"][k] / t["cpu_per_1k"][k] - 1) * 100 for k in ("client", "server")}
        lines.append(
            f"- tracing at {pct:g} % vs off, CPU per 1000 requests: client {rise['client']:+.1f} %, "
            f"server {rise['server']:+.1f} % (issue #15 target at 1 %: <= +5 %); "
            f"errors {r['errors'] + r['non2xx']}; OTLP bytes at the sink so far {r['otlp_bytes']}")
    rl = sorted(x for x in t["reload_ms"])
    if rl:
        lines.append(
            f"- config reload (file swap -> applied on /config), {len(rl)} reloads under the "
            f"fixed-rate load: median {rl[len(rl) // 2]:.1f} ms, max {rl[-1]:.1f} ms; failed "
            f"requests during the run: {t['errors'] + t['non2xx']}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        cleanup()
        sys.exit(130)
