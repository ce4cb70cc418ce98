"""Stand-in for ``python -m sglang.launch_server`` (tests only; see ../_standin.py).

Flags are a subset of SGLang's ServerArgs (python/sglang/srt/server_args.py,
documented at https://docs.sglang.io/advanced_features/server_arguments.html):
argparse with its default prefix matching, so ``--tp 2`` works as in SGLang's
documentation, and an unknown flag exits 2 with "unrecognized arguments".
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _standin  # noqa: E402

PROG = "launch_server.py"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG)
    p.add_argument("--model-path", "--model", dest="model_path", required=True)
    p.add_argument("--tokenizer-path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--context-length", type=int)
    p.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    p.add_argument("--quantization")
    p.add_argument("--kv-cache-dtype")
    p.add_argument("--served-model-name")
    p.add_argument("--api-key")
    p.add_argument("--log-level")
    p.add_argument("--config")
    # Memory and scheduling
    p.add_argument("--mem-fraction-static", type=float)
    p.add_argument("--max-running-requests", type=int)
    p.add_argument("--max-total-tokens", type=int)
    p.add_argument("--chunked-prefill-size", type=int)
    p.add_argument("--max-prefill-tokens", type=int)
    p.add_argument("--schedule-policy", choices=["lpm", "random", "fcfs", "dfs-weight", "lof", "priority"])
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--stream-interval", type=int)
    # Parallelism
    p.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    p.add_argument("--pp-size", "--pipeline-parallel-size", dest="pp_size", type=int, default=1)
    p.add_argument("--dp-size", "--data-parallel-size", dest="dp_size", type=int, default=1)
    p.add_argument("--ep-size", "--expert-parallel-size", "--ep", dest="ep_size", type=int, default=1)
    p.add_argument("--enable-dp-attention", action="store_true")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--dist-init-addr")
    # Kernels
    p.add_argument("--attention-backend")
    p.add_argument("--cuda-graph-max-bs", type=int)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--random-seed", type=int)
    p.add_argument("--enable-metrics", action="store_true")
    p.add_argument("--watchdog-timeout", type=float)
    return p


def main() -> None:
    _standin.record_argv(PROG)
    args = parser().parse_args()
    if args.enable_dp_attention and args.dp_size != args.tp_size:
        sys.stderr.write("AssertionError: with --enable-dp-attention the dp size should equal the tp size\n")
        sys.exit(1)
    _standin.serve(PROG, args.host, args.port, args.model_path, vars(args))


if __name__ == "__main__":
    main()
