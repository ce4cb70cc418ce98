"""Write a small Mooncake-format trace with known prefix reuse: examples/traces/conversations.jsonl.

Usage: python examples/traces/generate.py [--requests N] [--seed S] [--out PATH]

Each line is one request, as in Mooncake's published traces: ``timestamp`` (ms from the
trace's start), ``input_length`` and ``output_length`` (tokens) and ``hash_ids``, one id
per 512-token block of the prompt, equal ids meaning equal blocks (and equal prefixes up
to them). The requests come from a few conversations over shared documents: each
conversation opens with one of ``--documents`` shared documents (its blocks shared by
every conversation on it) and grows by a new block or two each turn, so a turn repeats
its conversation's previous prompt. Arrivals are Poisson at ``--rate`` requests/s.
Deterministic for a seed: the file in the repository is this script's output with the
defaults (tests/test_workloads.py checks that).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

BLOCK = 512
HERE = Path(__file__).resolve().parent


def generate(
    requests: int = 48, seed: int = 0, documents: int = 2, conversations: int = 6, rate: float = 12.0
) -> list[dict[str, object]]:
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    docs = [fresh(rng.randint(2, 3)) for _ in range(documents)]
    history = [list(docs[c % documents]) for c in range(conversations)]  # each conversation's blocks so far
    out = []
    t = 0.0
    for _ in range(requests):
        c = rng.randrange(conversations)
        history[c] += fresh(rng.randint(1, 2))  # this turn's new blocks (the answer, the question)
        blocks = history[c]
        out.append(
            {
                "timestamp": round(t * 1000),
                "input_length": len(blocks) * BLOCK - rng.randrange(BLOCK // 2),  # the last block is partial
                "output_length": rng.randint(8, 24),
                "hash_ids": list(blocks),
            }
        )
        if len(blocks) > 8:  # a long conversation ends; a new one starts on its document
            history[c] = list(docs[c % documents])
        t += rng.expovariate(rate)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "conversations.jsonl")
    args = parser.parse_args()
    lines = [json.dumps(entry) for entry in generate(args.requests, args.seed)]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} requests to {args.out}")


if __name__ == "__main__":
    main()
