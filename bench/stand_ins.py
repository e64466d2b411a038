"""The Supermemory and GitHub stand-ins in a process of their own, for the wrk benchmarks.

`python -m bench.stand_ins KEY_PEM SUPERMEMORY_PORT GITHUB_PORT`: GitHub's stand-in serves the
public half of the given P-256 key, so that the benchmark can sign its pool of alerts beforehand;
in their own process the stand-ins' CPU time is measured apart from the service's and wrk's.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.sandbox import GitHubSandbox, SupermemorySandbox, seeded_keys


async def serve(key_pem: bytes, supermemory_port: int, github_port: int) -> None:
    private_key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    apps = [(SupermemorySandbox(seeded_keys(6)).app(), supermemory_port)]
    apps.append((GitHubSandbox(private_key=private_key).app(), github_port))
    servers = [
        uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        )
        for app, port in apps
    ]
    await asyncio.gather(*(server.serve() for server in servers))


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]).read_bytes(), int(sys.argv[2]), int(sys.argv[3])))
