"""A third-party HTTP/1.1 application for sidecar/tests/conformance.rs: Python's standard
library server (no packages), so what reaches it is what a real application behind the
sidecar would parse. `app.py [HOST PORT]` (default 127.0.0.1 and a free port); prints
READY <port> once it listens.

Routes (the test asserts on what the client sees end to end):
  /echo       JSON: method, path, request version, headers (as received, in order, bytes as
              latin-1), body length and a checksum of the body (chunked or Content-Length).
  /head       Content-Length: 1234 and 1234 bytes (HEAD: the head only).
  /status/N   status N, no body (204, 304; with ?cl a 304 carries Content-Length: 1234) or a
              short one.
  /cookies    three Set-Cookie headers.
  /chunked    a chunked response in five chunks.
  /trickle    five chunks 300 ms apart, no length (server-sent events).
  /big?n=N    N bytes with Content-Length, written in 64 KiB pieces.
  /upload     reads the body (chunked or Content-Length) and answers its length and checksum.
  /truncate   announces 100000 bytes, sends 1000 and closes the connection.
  /truncate-chunked  one chunk, then closes without the last chunk.
  /trailers   a chunked body with an `X-Checksum: 42` trailer.
  /te-and-cl  a response framed both ways: Content-Length: 5 and an 11-byte chunked body.
  /sleep?ms=N answers after N ms.
  /ws         WebSocket (RFC 6455): says "hello" first, echoes text and binary messages,
              answers pings, and answers a close with the same code before closing.
"""
import base64
import hashlib
import json
import struct
import socketserver
import sys
import time
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlparse, parse_qs


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            total, crc = 0, 0
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    # Trailers until the empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return total, crc
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 16))
                    left -= len(data)
                    total += len(data)
                    crc = zlib.crc32(data, crc)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length", "0") or "0")
        total, crc = 0, 0
        while total < n:
            data = self.rfile.read(min(n - total, 1 << 16))
            if not data:
                break
            total += len(data)
            crc = zlib.crc32(data, crc)
        return total, crc

    def send_json(self, value, status=200):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def route(self):
        url = urlparse(self.path)
        q = parse_qs(url.query)
        p = url.path
        if p == "/echo":
            n, crc = self.read_body()
            headers = [[k, v.encode("latin-1", "surrogateescape").decode("latin-1")]
                       for k, v in self.headers.raw_items()]
            self.send_json({
                "method": self.command, "path": self.path, "version": self.request_version,
                "headers": headers, "bodyLen": n, "crc": crc,
            })
        elif p == "/head":
            self.read_body()
            self.send_response(200)
            self.send_header("Content-Length", "1234")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"h" * 1234)
        elif p.startswith("/status/"):
            self.read_body()
            code = int(p.rsplit("/", 1)[1])
            self.send_response(code)
            if code in (204, 304):
                self.send_header("ETag", '"v1"')
                if "cl" in q:
                    # The length of the representation the 304 stands for (RFC 9110 8.6).
                    self.send_header("Content-Length", "1234")
                self.end_headers()
            else:
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
        elif p == "/cookies":
            self.read_body()
            self.send_response(200)
            for c in ("a=1", "b=2; Path=/", "c=3; HttpOnly"):
                self.send_header("Set-Cookie", c)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif p == "/chunked":
            self.read_body()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                self.chunk(b"part-%d;" % i)
            self.wfile.write(b"0\r\n\r\n")
        elif p == "/trickle":
            self.read_body()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                self.chunk(b"data: %d\n\n" % i)
                time.sleep(0.3)
            self.wfile.write(b"0\r\n\r\n")
        elif p == "/big":
            self.read_body()
            n = int(q["n"][0])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            piece = bytes(range(256)) * 256
            left = n
            while left:
                k = min(left, len(piece))
                self.wfile.write(piece[:k])
                left -= k
        elif p == "/upload":
            n, crc = self.read_body()
            self.send_json({"bodyLen": n, "crc": crc})
        elif p == "/truncate":
            self.read_body()
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"t" * 1000)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
        elif p == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self.websocket()
        elif p == "/truncate-chunked":
            self.read_body()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.chunk(b"t" * 1000)
            self.close_connection = True
            self.connection.shutdown(2)
        elif p == "/te-and-cl":
            self.read_body()
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.chunk(b"hello world")
            self.wfile.write(b"0\r\n\r\n")
        elif p == "/trailers":
            self.read_body()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum")
            self.end_headers()
            self.chunk(b"body")
            self.wfile.write(b"0\r\nX-Checksum: 42\r\n\r\n")
        elif p == "/sleep":
            self.read_body()
            time.sleep(int(q["ms"][0]) / 1000)
            self.send_json({"slept": True})
        else:
            self.read_body()
            self.send_json({"error": "no route"}, 404)

    def ws_send(self, opcode, payload):
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([n])
        elif n < 65536:
            head += bytes([126]) + struct.pack("!H", n)
        else:
            head += bytes([127]) + struct.pack("!Q", n)
        self.wfile.write(head + payload)
        self.wfile.flush()

    def ws_recv(self):
        b0, b1 = self.rfile.read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.rfile.read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.rfile.read(8))[0]
        mask = self.rfile.read(4) if b1 & 0x80 else b"\0\0\0\0"
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(self.rfile.read(n)))
        return b0 & 0x0F, data

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.ws_send(1, b"hello")
        while True:
            opcode, data = self.ws_recv()
            if opcode in (1, 2):
                self.ws_send(opcode, data)
            elif opcode == 9:
                self.ws_send(10, data)
            elif opcode == 8:
                self.ws_send(8, data[:2])
                break
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = route


class Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    # Address and port from the command line (the netns test binds the pod's port on every
    # address); by default a free port on loopback.
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    srv = Server((host, port), Handler)
    print("READY", srv.server_address[1], flush=True)
    # Ends with the test: its stdin closes when the test drops the process.
    import threading
    threading.Thread(target=lambda: (sys.stdin.read(), srv.shutdown()), daemon=True).start()
    srv.serve_forever()
