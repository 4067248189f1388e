#!/usr/bin/env python3
"""Checks a DOM dumped by headless Chromium from the Trellis dashboard.

usage: dashboard_dom.py DOM.html EDGE=TRANSPORT...
  EDGE is `source->destination` (e.g. `legacy.shop->frontend.shop`), TRANSPORT one of
  mtls, plaintext, refused. Every listed edge must be drawn exactly once in the graph with that
  transport and a success rate in its label, and listed in the table with the same transport;
  a `refused` edge's label must say so. Exits 1 with one line per problem.
"""
import sys
from html.parser import HTMLParser


class Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.graph = {}   # edge -> [(transport, label text)]
        self.rows = {}    # edge -> [(transport, success cell text)]
        self.stack = []   # open elements: (tag, attrs)
        self.text_into = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.stack.append((tag, a))
        cls = a.get("class", "").split()
        if tag == "g" and "edge" in cls and "data-edge" in a:
            self.graph.setdefault(a["data-edge"], []).append([a.get("data-transport"), ""])
        if tag == "tr" and "edge-row" in cls:
            self.rows.setdefault(a["data-edge"], []).append([a.get("data-transport"), ""])
        if tag == "text" and "edge-label" in cls:
            self.text_into = ("graph", self._enclosing("g"))
        if tag == "td" and "success" in cls:
            self.text_into = ("rows", self._enclosing("tr"))

    def _enclosing(self, tag):
        for t, a in reversed(self.stack):
            if t == tag and "data-edge" in a:
                return a["data-edge"]
        return None

    def handle_endtag(self, tag):
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break
        if tag in ("text", "td"):
            self.text_into = None

    def handle_data(self, data):
        if self.text_into and self.text_into[1]:
            where, edge = self.text_into
            getattr(self, where)[edge][-1][1] += data


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    dom = Dom()
    with open(sys.argv[1], encoding="utf-8") as f:
        dom.feed(f.read())
    problems = []
    for arg in sys.argv[2:]:
        edge, want = arg.rsplit("=", 1)
        drawn = dom.graph.get(edge, [])
        rows = dom.rows.get(edge, [])
        if len(drawn) != 1:
            problems.append(f"{edge}: drawn {len(drawn)} times in the graph, want 1")
            continue
        transport, label = drawn[0]
        if transport != want:
            problems.append(f"{edge}: graph marks it {transport}, want {want} (label {label!r})")
        if "%" not in label:
            problems.append(f"{edge}: no success rate in its label {label!r}")
        if want == "refused" and "refused" not in label:
            problems.append(f"{edge}: label does not say refused: {label!r}")
        if want == "mtls" and "mTLS" not in label:
            problems.append(f"{edge}: label does not say mTLS: {label!r}")
        if len(rows) != 1 or rows[0][0] != want or "%" not in rows[0][1]:
            problems.append(f"{edge}: table rows {rows}, want one {want} row with a success rate")
        else:
            print(f"ok {edge}: {want}, {label.strip()}")
    for p in problems:
        print("FAIL " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
