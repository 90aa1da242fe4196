"""A non-Node worker: serves HTTP on the inherited fd 3, reports READY=1."""
import http.server
import json
import os
import socket
import socketserver

assert os.environ.get("LISTEN_PID") == str(os.getpid()), "LISTEN_PID must be our pid"
sock = socket.socket(fileno=3)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({
            "instance": os.environ.get("NODE_APP_INSTANCE"),
            "pid": os.getpid(),
            "listen_pid": os.environ.get("LISTEN_PID"),
            "via": "python",
        }).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.TCPServer):
    def server_bind(self):
        pass

    def server_activate(self):
        pass


srv = Server(sock.getsockname(), Handler, bind_and_activate=False)
srv.socket = sock
n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
n.sendto(b"STATUS=warming up", os.environ["NOTIFY_SOCKET"])
n.sendto(b"READY=1\nSTATUS=serving", os.environ["NOTIFY_SOCKET"])
srv.serve_forever()
