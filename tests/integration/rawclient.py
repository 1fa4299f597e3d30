"""A deliberately minimal websocket-over-TLS client for hostile-input tests:
it lets a test send frames no well-behaved client would."""
import base64
import os
import socket
import ssl
import struct
import subprocess


class Identity:
    """An Ed25519 key and self-signed certificate made with openssl."""

    def __init__(self, directory, name):
        self.key = os.path.join(directory, f"{name}.key.pem")
        self.cert = os.path.join(directory, f"{name}.cert.pem")
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", self.key], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "req", "-new", "-x509", "-key", self.key, "-subj", f"/CN={name}",
                        "-days", "2", "-out", self.cert], check=True, capture_output=True)
        der = subprocess.run(["openssl", "pkey", "-in", self.key, "-pubout", "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self.public = "ed25519:" + base64.b64encode(der[-32:]).decode()


def tls_context(identity=None, max_version=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test trusts its own loopback controller
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = max_version
    if identity is not None:
        ctx.load_cert_chain(identity.cert, identity.key)
    return ctx


class WsConn:
    def __init__(self, port, identity, path="/v1/agent", timeout=10):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = tls_context(identity).wrap_socket(raw, server_hostname="muster")
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during upgrade")
            head += chunk
        self.status_line = head.split(b"\r\n")[0].decode()
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def send_frame(self, payload, opcode=0x1, declared_len=None):
        if isinstance(payload, str):
            payload = payload.encode()
        n = len(payload) if declared_len is None else declared_len
        hdr = bytes([0x80 | opcode])
        if n < 126:
            hdr += bytes([0x80 | n])
        elif n < 65536:
            hdr += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            hdr += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        if payload:  # XOR as one big integer: fast enough for floods
            key = (mask * (len(payload) // 4 + 1))[:len(payload)]
            body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
                len(payload), "big")
        else:
            body = b""
        self.sock.sendall(hdr + mask + body)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self):
        """Returns (opcode, payload bytes)."""
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._need(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._need(8))[0]
        return b0 & 0x0F, self._need(n)

    def recv_until_close(self, limit=20):
        """Collects text frames until a close frame; returns (texts, close_reason)."""
        texts = []
        for _ in range(limit):
            op, data = self.recv_frame()
            if op == 0x1:
                texts.append(data.decode())
            elif op == 0x8:
                return texts, data[2:].decode(errors="replace")
        return texts, None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
