"""A plain HTTP app for pod tests (standard library only): answers every request with a JSON
echo of its method, path and headers, and prints one JSON line per request to stdout, so the test
can count what reached the app. Usage: echo_app.py HOST PORT"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    def handle_one(self):
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        print(json.dumps(seen), flush=True)
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = handle_one

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Echo)
    print("listening", flush=True)
    server.serve_forever()
