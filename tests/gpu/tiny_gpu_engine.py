"""A tiny but real GPU inference server, for checks on a GPU machine.

Random-weight decoder (embedding, residual MLP blocks, tied output head) in
fp16 on CUDA, greedy decoding one token per step, streamed over the OpenAI
completions API. Like real engines it reserves a large block of GPU memory up
front (its "KV cache"), so a test can see the memory taken and given back.
Needs torch with CUDA and aiohttp; nothing is downloaded.

    python tiny_gpu_engine.py --host 127.0.0.1 --port 8000 --model tiny --reserve-gib 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch
from aiohttp import web

VOCAB, HIDDEN, LAYERS = 32000, 1024, 8


class TinyModel:
    def __init__(self, reserve_gib: float, seed: int = 0) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        kw = dict(device="cuda", dtype=torch.float16, generator=g)
        self.emb = torch.randn(VOCAB, HIDDEN, **kw) * 0.02
        self.w1 = [torch.randn(HIDDEN, 4 * HIDDEN, **kw) * 0.02 for _ in range(LAYERS)]
        self.w2 = [torch.randn(4 * HIDDEN, HIDDEN, **kw) * 0.02 for _ in range(LAYERS)]
        self.kv_cache = torch.empty(int(reserve_gib * 2**30), dtype=torch.uint8, device="cuda")

    @torch.inference_mode()
    def next_token(self, ids: list[int]) -> int:
        x = self.emb[torch.tensor(ids, device="cuda") % VOCAB]
        for w1, w2 in zip(self.w1, self.w2):
            x = x + torch.nn.functional.gelu(x @ w1) @ w2
        logits = x[-1] @ self.emb.T
        return int(torch.argmax(logits).item())


def _chunk(model: str, text: str, finish: str | None) -> bytes:
    obj = {
        "id": "cmpl-tiny",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def build_app(model_name: str, reserve_gib: float) -> web.Application:
    state: dict[str, TinyModel] = {}

    async def load(app: web.Application) -> None:
        async def _load() -> None:
            state["model"] = await asyncio.to_thread(TinyModel, reserve_gib)

        app["loader"] = asyncio.create_task(_load())

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if "model" in state else 503)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model_name, "object": "model"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        if "model" not in state:
            return web.json_response({"error": {"message": "loading"}}, status=503)
        body = await request.json()
        prompt = body.get("prompt")
        ids = [int(t) for t in prompt] if isinstance(prompt, list) else [ord(c) for c in str(prompt)]
        max_tokens = int(body.get("max_tokens", 16))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        model = state["model"]
        out: list[int] = []
        context = list(ids)
        for i in range(max_tokens):  # ignore_eos: always max_tokens
            tok = model.next_token(context[-256:])
            out.append(tok)
            context.append(tok)
            await resp.write(_chunk(model_name, f" t{tok}", "length" if i == max_tokens - 1 else None))
            await asyncio.sleep(0)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
        await resp.write(
            b"data: "
            + json.dumps(
                {"id": "cmpl-tiny", "object": "text_completion", "model": model_name, "choices": [], "usage": usage}
            ).encode()
            + b"\n\n"
        )
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.on_startup.append(load)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return app


WORKER = """
import os, sys, time, torch
block = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("worker-ready", os.getpid(), os.getpgid(0), flush=True)
while True:
    time.sleep(1)
"""


def spawn_escaped_worker(gib: float) -> None:
    """A CUDA worker in its own session, as vLLM's EngineCore or MPI ranks can be:
    a signal to our process group does not reach it."""
    import subprocess
    import sys

    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(gib)], start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    print(worker.stdout.readline().strip(), flush=True)  # wait until it holds its GPU memory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="tiny-gpu")
    p.add_argument("--reserve-gib", type=float, default=4.0)
    p.add_argument(
        "--escaped-worker-gib",
        type=float,
        default=0.0,
        help="also start a setsid CUDA worker holding this much GPU memory",
    )
    a = p.parse_args()
    if a.escaped_worker_gib:
        spawn_escaped_worker(a.escaped_worker_gib)
    web.run_app(build_app(a.model, a.reserve_gib), host=a.host, port=a.port, print=None)


if __name__ == "__main__":
    main()
