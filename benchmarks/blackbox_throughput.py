"""Throughput of the black-box client (evomerge.service.client) against a loopback endpoint.

The endpoint (``loopback_endpoint.py``) runs in its own process and answers every request after a
fixed 200 ms. At concurrency 32, Little's law bounds the rate at 32 / 0.2 s = 160 requests/s —
well inside what one core serves — so the achieved fraction of that bound measures the client:
its pooling, its concurrency limit and, in the second run, where 10 % of requests are answered
429 (with ``Retry-After: 1``) or 503, its retries. ``lost_requests`` counts logical requests that
never succeeded in either run.

    python benchmarks/blackbox_throughput.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.service.client import ApiClient, ApiError  # noqa: E402

LATENCY = 0.2
CONCURRENCY = 32
ENDPOINT = Path(__file__).with_name("loopback_endpoint.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_endpoint(fault_rate: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ENDPOINT), "--port", str(port), "--latency", str(LATENCY), "--fault-rate", str(fault_rate)],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the loopback endpoint did not start")


async def drive(url: str, n_requests: int) -> tuple[float, int]:
    """(requests/s over the whole batch, requests that failed for good)."""
    client = ApiClient(url, concurrency=CONCURRENCY, max_retries=8, backoff=0.1, timeout=30.0, seed=0)
    payload = {"model": "loopback", "prompt": "12+13=25", "max_tokens": 0, "echo": True, "logprobs": 1}

    async def one() -> bool:
        try:
            await client.completions(payload)
            return True
        except ApiError:
            return False

    await asyncio.gather(*(one() for _ in range(CONCURRENCY)))  # warm the connection pool
    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n_requests)))
    elapsed = time.perf_counter() - started
    await client.aclose()
    return n_requests / elapsed, results.count(False)


def measure(fault_rate: float, n_requests: int) -> tuple[float, int]:
    proc, url = start_endpoint(fault_rate)
    try:
        return asyncio.run(drive(url, n_requests))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=1600, help="requests per run (default: 10 s at the bound)")
    args = parser.parse_args()
    bound = CONCURRENCY / LATENCY
    rps, lost = measure(0.0, args.requests)
    rps_faults, lost_faults = measure(0.1, args.requests)
    result = {
        "rps": round(rps, 1),
        "bound_rps": bound,
        "efficiency": round(rps / bound, 3),
        "efficiency_with_faults": round(rps_faults / bound, 3),
        "lost_requests": lost + lost_faults,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
