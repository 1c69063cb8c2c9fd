"""The wire between rank 0 and its tensor-parallel workers: message framing and sockets whose
every wait is bounded. Shared by both ends (``workers.py``: rank 0; ``tp_worker.py``: a worker)."""

from __future__ import annotations

import pickle
import socket
import struct

# Start-up connections whose handshake is still running; more are refused at once.
MAX_PENDING_HANDSHAKES = 16


def send_message(conn, obj) -> None:
    # Plain pickle (tensors copied as bytes): multiprocessing's pickler would pass tensor storage
    # through file descriptors, which needs multiprocessing-managed processes.
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def receive_message(conn):
    return pickle.loads(conn.recv_bytes())


def bound_socket_waits(sock: socket.socket, seconds: float) -> None:
    """Every single read or write on ``sock`` fails (``OSError``) after ``seconds`` without progress,
    so a peer that stops in the middle of a message cannot hold rank 0 (``poll`` alone only bounds
    the wait for a message's first byte)."""
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class listening_socket:
    """A listening TCP socket on ``address`` (host, port), closed on exit."""

    def __init__(self, address):
        host, port = address
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(sockaddr)
        self.sock.listen(MAX_PENDING_HANDSHAKES)
        self.sock.settimeout(0.1)  # accept() returns now and then, so deadlines are checked

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc) -> bool:
        self.sock.close()
        return False
