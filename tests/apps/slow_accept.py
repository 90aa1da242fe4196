"""A non-Node worker that serves one connection at a time, slowly (0.2 s
each), on the inherited fd 3: it sends no heartbeat, so only the accept
queue tells the manager that connections wait for it."""
import socket
import time

sock = socket.socket(fileno=3)
while True:
    conn, _ = sock.accept()
    with conn:
        try:
            conn.recv(4096)
            time.sleep(0.2)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        except OSError:
            pass
