#!/usr/bin/env python3
"""Share of a perf profile's samples whose call chain passes through some code, by pattern.

Reads `perf script` output (a profile recorded with call graphs, e.g. by hack/bench-ab.py with
PERF=client) on stdin and prints, per pattern, how many samples have a matching frame anywhere
in their stack (inlined frames included), so "the tracing code" counts everything it calls:
the OpenTelemetry SDK, the exporter's HTTP client, the allocator calls made on its behalf.

    perf script -i hack/out/perf-B-client.data | hack/perf-share.py

A share from n samples carries a Poisson uncertainty of about sqrt(n) samples.
"""
import collections
import re
import sys

# hyper-util's legacy client is the OTLP/HTTP exporter's: the proxy's own upstreams are its mTLS
# pool (traffic/plain.rs, the other user, serves tests and benchmarks only). Its connection task
# runs on its own, outside any opentelemetry frame.
PATTERNS = {
    "tracing code (all below)": r"trellis_proxy::spans|opentelemetry|prost::|tonic::"
                                r"|hyper_util::client::legacy",
    "sampling decision (begin, context)": r"spans::Tracing::begin|spans::Tracer::begin"
                                          r"|spans::context",
    "span built and queued (finish)": r"spans::Active|span_data|span_events",
    "export task": r"spans::export",
    "OTLP exporter and HTTP client": r"opentelemetry_otlp|opentelemetry_http"
                                     r"|hyper_util::client::legacy",
}


def main():
    pats = {k: re.compile(v) for k, v in PATTERNS.items()}
    n = 0
    hits = collections.Counter()
    stack = []

    def flush():
        nonlocal n
        if stack:
            n += 1
            s = "".join(stack)
            for k, p in pats.items():
                if p.search(s):
                    hits[k] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            stack = []
        elif line[0] in " \t":
            stack.append(line)
        else:
            stack = []
    flush()
    print(f"samples {n}")
    for k in pats:
        print(f"  {k:38s} {hits[k]:6d} {100 * hits[k] / max(n, 1):6.2f} %")


if __name__ == "__main__":
    main()
