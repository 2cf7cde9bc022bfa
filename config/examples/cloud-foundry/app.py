"""A small web application that reads SuccessFactors through the sidecar.

It listens on $PORT and answers ``GET /`` with the first users, fetched from
``$SF_BASE_URL`` (the sidecar on loopback) with the standard library: no
certificate, no key, no token in the application. ``GET /health`` is the
platform's health check.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SF_BASE_URL = os.environ.get("SF_BASE_URL", "http://127.0.0.1:8081").rstrip("/")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path == "/health":
            self.answer(200, {"status": "ok"})
        elif self.path == "/":
            self.users()
        else:
            self.answer(404, {"error": "not found"})

    def users(self) -> None:
        url = f"{SF_BASE_URL}/odata/v2/User?$top=5&$format=json"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310
                results = json.load(response)["d"]["results"]
        except urllib.error.HTTPError as exc:
            # The sidecar's own errors are JSON with a code and a hint; pass them on.
            self.answer(exc.code, {"error": exc.read().decode("utf-8", "replace")})
            return
        except OSError as exc:
            self.answer(502, {"error": f"sidecar not reachable: {exc}"})
            return
        names = [f"{u['firstName']} {u['lastName']}" for u in results]
        self.answer(200, {"users": names})

    def answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
