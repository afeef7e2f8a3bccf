"""What an operator does on a Debian 12 with the deb installed: helpers for the system tests."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sysharness import Container

ISSUER = "https://dev.cloudflareaccess.com"
AUDIENCE = "system-test"
KEYS = "/etc/authd/dev"

# What an operator adds to nginx: the http snippet once, a server with a protected
# location, and (for the test) an upstream that echoes the identity headers it receives.
NGINX_HTTP = "include /etc/nginx/authd/authd-http.conf;\n"
NGINX_SITE = """\
server {
    listen 127.0.0.1:8080;
    include /etc/nginx/authd/authd-server.conf;

    location /app/ {
        set $authd_policy app;
        include /etc/nginx/authd/authd-location.conf;
        proxy_pass http://127.0.0.1:8081;
    }
}

server {
    listen 127.0.0.1:8081;
    location / {
        default_type text/plain;
        return 200 "@ECHO@\\n";
    }
}
""".replace(
    "@ECHO@",
    "email=$http_x_authd_email user=$http_x_authd_user policy=$http_x_authd_policy "
    "cf=$http_cf_access_authenticated_user_email",
)

# A key server for jwks_url tests: serves a file after a delay (seconds).
KEY_SERVER = """\
import http.server, pathlib, sys, time
port, delay, path = int(sys.argv[1]), float(sys.argv[2]), pathlib.Path(sys.argv[3])

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(delay)
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def config(
    *,
    jwks: str = f'jwks_file = "{KEYS}/jwks.json"',
    policy: str = 'allow_email_domains = ["example.com"]',
    top: str = "",
) -> str:
    return f"""\
# edited by the operator
listen = "unix:/run/authd/authd.sock"
{top}

[[issuers]]
name = "dev"
issuer = "{ISSUER}"
{jwks}

[policies.app]
audience = ["{AUDIENCE}"]
{policy}
"""


def install_deb(c: Container, deb_path: str) -> None:
    c.run(f"apt-get install -y {shlex.quote(deb_path)}", timeout=300)


def setup_operator(c: Container) -> None:
    """Dev keys, a configuration with an issuer and a policy, and nginx including the snippets."""
    c.run(
        f"authd dev keygen {KEYS} && chgrp -R authd {KEYS} && chmod 0750 {KEYS} "
        f"&& chmod 0640 {KEYS}/jwks.json"
    )
    write_config(c, config())
    c.write("/etc/nginx/conf.d/authd.conf", NGINX_HTTP)
    c.write("/etc/nginx/sites-enabled/authd-test", NGINX_SITE)
    c.run("nginx -t && systemctl reload nginx")


def write_config(c: Container, text: str) -> None:
    """Rewrite /etc/authd/authd.toml in place (its owner and mode stay)."""
    c.run("cat > /etc/authd/authd.toml", input_text=text)


def mint(c: Container, email: str = "alice@example.com", *extra: str) -> str:
    args = " ".join(shlex.quote(a) for a in extra)
    return c.out(
        f"authd dev mint --key {KEYS}/private.pem --iss {ISSUER} --aud {AUDIENCE} "
        f"--email {shlex.quote(email)} {args}"
    )


@dataclass(frozen=True)
class Response:
    status: int
    headers: str
    body: str


def get(c: Container, path: str = "/app/", *headers: str) -> Response:
    """A request to the protected server in the container, through nginx."""
    flags = " ".join(f"-H {shlex.quote(h)}" for h in headers)
    out = c.run(f"curl -sS -i --max-time 15 {flags} http://127.0.0.1:8080{path}").stdout
    head, _, body = out.partition("\n\n")
    return Response(int(head.split()[1]), head, body)


def get_token(c: Container, token: str, *headers: str) -> Response:
    return get(c, "/app/", f"Cf-Access-Jwt-Assertion: {token}", *headers)


def authd_socket_get(c: Container, path: str) -> Response:
    """A request straight to authd's socket (what nginx's upstream is)."""
    out = c.run(
        f"curl -sS -i --max-time 15 --unix-socket /run/authd/authd.sock http://authd{path}"
    ).stdout
    head, _, body = out.partition("\n\n")
    return Response(int(head.split()[1]), head, body)


def journal_events(c: Container, since_cursor: str | None = None) -> list[dict[str, object]]:
    """authd's JSON lines from the journal, as an operator reads them (-o cat)."""
    after = f"--after-cursor={shlex.quote(since_cursor)}" if since_cursor else ""
    lines = c.out(f"journalctl -u authd.service -o cat --no-pager {after}").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def journal_cursor(c: Container) -> str:
    out = c.out("journalctl -u authd.service -n 0 --show-cursor --no-pager", check=False)
    match = re.search(r"-- cursor: (\S+)", out)
    return match.group(1) if match else ""


def main_pid(c: Container) -> int:
    return int(c.show("authd.service", "MainPID"))


def exposure(c: Container, unit: str = "authd.service") -> float:
    """systemd-analyze's overall exposure score of the loaded unit."""
    out = c.run(f"systemd-analyze security --no-pager {unit}", check=False).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, f"no score in systemd-analyze's output:\n{out}"
    return float(match.group(1))


# An HTTPS key server (certificate from a test CA) and a CONNECT proxy that logs each
# tunnel and sends it to that server whatever the host: a key endpoint "on the internet"
# behind a corporate proxy, inside a container without a network.
TLS_KEY_SERVER = """\
import http.server, pathlib, ssl, sys
port, cert, key, path = int(sys.argv[1]), sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""

CONNECT_PROXY = """\
import socket, socketserver, sys, threading
port, upstream, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def pipe(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        b.close()

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        request = self.rfile.readline().decode()
        while self.rfile.readline() not in (b"\\r\\n", b""):
            pass
        with open(log, "a") as f:
            f.write(request)
        upstream_socket = socket.create_connection(("127.0.0.1", upstream))
        self.wfile.write(b"HTTP/1.1 200 Connection established\\r\\n\\r\\n")
        threading.Thread(target=pipe, args=(upstream_socket, self.connection)).start()
        pipe(self.connection, upstream_socket)

socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def make_test_ca(c: Container, host: str) -> None:
    """A CA in the container's system store, and a server certificate for host from it."""
    c.run(
        "set -e; mkdir -p /root/tls && cd /root/tls; "
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj '/CN=authd test CA' "
        "-keyout ca.key -out ca.crt 2>/dev/null; "
        f"openssl req -newkey rsa:2048 -nodes -subj '/CN={host}' -keyout server.key "
        "-out server.csr 2>/dev/null; "
        f"printf 'subjectAltName=DNS:{host}\\n' > san.ext; "
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
        "-extfile san.ext -out server.crt 2>/dev/null; "
        "cp ca.crt /usr/local/share/ca-certificates/authd-test-ca.crt; "
        "update-ca-certificates >/dev/null"
    )
