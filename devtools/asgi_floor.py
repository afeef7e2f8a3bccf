"""The floor of `make bench`: uvicorn, run as authd runs it, serving an ASGI app that does nothing.

    .venv/bin/python devtools/asgi_floor.py /path/to.sock

Every request gets 200 with an empty body and one identity-sized header, at once: what is left is
uvicorn's own cost per request (HTTP parsing, the ASGI cycle, the socket), which no work authd
saves can go below. The unix socket is made as authd makes it (mode 0660).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from authd.cli import bind
from authd.config import Listen
from authd.server import UVICORN_SETTINGS

_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"cache-control", b"no-store"),
        (b"x-authd-user", b"alice@example.com"),
        (b"content-length", b"0"),
    ],
}
_BODY = {"type": "http.response.body", "body": b""}


async def app(scope: dict[str, Any], _receive: Any, send: Any) -> None:  # noqa: ANN401 -- ASGI
    if scope["type"] == "http":
        await send(_START)
        await send(_BODY)


def main() -> None:
    sock = bind(Listen(kind="unix", path=sys.argv[1]))
    settings = UVICORN_SETTINGS | {"lifespan": "off"}
    uvicorn.Server(uvicorn.Config(app, **settings)).run(sockets=[sock])


if __name__ == "__main__":
    main()
