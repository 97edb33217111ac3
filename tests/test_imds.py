"""IMDSv2 instance-type lookup against a tiny HTTP server on 127.0.0.1 (stops by itself)."""
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from batch_job.pricing import instance_type_from_imds


class _Imds(BaseHTTPRequestHandler):
    def do_PUT(self):
        assert self.path == "/latest/api/token"
        self._send(b"tok")

    def do_GET(self):
        ok = self.path == "/latest/meta-data/instance-type" and self.headers.get("X-aws-ec2-metadata-token") == "tok"
        self._send(b"inf2.xlarge" if ok else b"", 200 if ok else 401)

    def _send(self, body, code=200):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_token_then_instance_type():
    srv = HTTPServer(("127.0.0.1", 0), _Imds)
    t = threading.Thread(target=lambda: [srv.handle_request() for _ in range(2)], daemon=True)
    t.start()
    try:
        assert instance_type_from_imds(f"http://127.0.0.1:{srv.server_port}") == ("inf2.xlarge", "")
    finally:
        t.join(5)
        srv.server_close()


def test_unreachable_gives_reason():
    srv = HTTPServer(("127.0.0.1", 0), _Imds)
    port = srv.server_port
    srv.server_close()  # nothing listens there now
    itype, reason = instance_type_from_imds(f"http://127.0.0.1:{port}", timeout=0.5)
    assert itype == "" and "IMDS unavailable" in reason
