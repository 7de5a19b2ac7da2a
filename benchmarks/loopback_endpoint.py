"""A loopback OpenAI-style ``/v1/completions`` endpoint with injected latency and faults.

Run as its own process (``python benchmarks/loopback_endpoint.py --port N``) so that it measures,
or exercises, a client rather than sharing its interpreter. Every answer is a well-formed
completion after ``--latency`` seconds, except the faults:

* ``--fault-rate F``: each request, drawn with ``--seed``, is answered at once with 429
  (``Retry-After: 1``) or 503 (no ``Retry-After``), half each;
* ``--script KINDS``: a comma list cycled over requests in arrival order, each kind one of
  ``ok``, ``429``, ``503``, ``500``, ``slow`` (answered after ``--slow-seconds``) or ``malformed``
  (200 without ``choices``), for tests that need an exact fault count.

``GET /stats`` reports ``{"received", "faulted"}``. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random

FAULT_KINDS = ("ok", "429", "503", "500", "slow", "malformed")


def build_app(latency: float, fault_rate: float, seed: int, script: list[str], slow_seconds: float):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    rng = random.Random(seed)
    kinds = itertools.cycle(script) if script else None
    stats = {"received": 0, "faulted": 0}

    def error(status: int, headers: dict[str, str] | None = None) -> JSONResponse:
        stats["faulted"] += 1
        body = {"error": {"message": f"injected {status}", "type": "server_error", "code": None}}
        return JSONResponse(body, status_code=status, headers=headers)

    async def completions(request: Request) -> JSONResponse:
        payload = await request.json()
        stats["received"] += 1
        if kinds is not None:
            kind = next(kinds)
        else:
            kind = rng.choice(("429", "503")) if rng.random() < fault_rate else "ok"
        if kind == "429":
            return error(429, {"Retry-After": "1"})
        if kind in ("503", "500"):
            return error(int(kind))
        await asyncio.sleep(slow_seconds if kind == "slow" else latency)
        if kind == "malformed":
            stats["faulted"] += 1
            return JSONResponse({"id": "cmpl-loopback", "object": "text_completion"})
        prompt = payload.get("prompt", "")
        text = prompt if isinstance(prompt, str) else ""
        tokens = list(text)
        return JSONResponse({
            "id": "cmpl-loopback",
            "object": "text_completion",
            "model": payload.get("model", ""),
            "choices": [{
                "index": 0,
                "text": text,
                "finish_reason": "length",
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": [None] + [-1.0] * (len(tokens) - 1) if tokens else [],
                    "top_logprobs": [None] + [{t: -1.0} for t in tokens[1:]] if tokens else [],
                    "text_offset": list(range(len(tokens))),
                },
            }],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)},
        })

    async def report(request: Request) -> JSONResponse:
        return JSONResponse(stats)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/stats", report),
        Route("/health", health),
    ])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--script", default="", help=f"comma list of {', '.join(FAULT_KINDS)}, cycled")
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    args = parser.parse_args()
    script = [k for k in args.script.split(",") if k]
    unknown = set(script) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    app = build_app(args.latency, args.fault_rate, args.seed, script, args.slow_seconds)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
