"""crab-cloud stand-in: GET /health answers only the build's git hash, like the real service."""

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GIT = os.environ.get("CRAB_CLOUD_GIT") or Path("/app/GIT").read_text(encoding="ascii").strip()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?")[0] == "/health":
            body = json.dumps({"git": GIT}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        else:
            body = b'{"error": "not found"}'
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("crab-cloud: " + (fmt % args) + "\n")


def main():
    # "" binds every interface of the container; the compose file publishes the port on 127.0.0.1 only.
    server = ThreadingHTTPServer((os.environ.get("BIND", ""), int(os.environ.get("PORT", "8080"))), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    main()
