"""Why the app calls llama.cpp from one thread only: the cost of calling it from several.

Streams the same greedy answer from the embedded model (2 threads) three ways, in one process
each (``--mode``), and prints tokens/s, CPU ms per token and the process's thread count:

  direct   every answer from the main thread (what raw llama-cpp-python benchmarks do);
  one      every answer on one worker thread, whatever thread asks (what ``space.chat.Generator`` does);
  many     each token from a pool of 8 worker threads, after one answer from the main thread
           (what Gradio does when it steps a streaming handler in any free worker thread).

    .venv/bin/python bench/llama_threads.py                 # all three modes, each in a fresh process
    .venv/bin/python bench/llama_threads.py --mode many     # one mode in this process
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Write a short story about a lighthouse keeper."


def run_mode(mode: str, reps: int, threads: int) -> None:
    import llama_cpp

    from space.model import embedded_model_path

    llm = llama_cpp.Llama(model_path=str(embedded_model_path()), n_ctx=2048, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    messages = [{"role": "user", "content": PROMPT}]

    def answer(step) -> int:
        llm.reset()
        chunks = llm.create_chat_completion(messages, stream=True, temperature=0, seed=0, max_tokens=128)
        n = 0
        while True:
            try:
                step(chunks)
            except StopIteration:
                return n
            n += 1

    pool = ThreadPoolExecutor(1 if mode == "one" else 8)
    if mode == "many":
        answer(next)  # one answer from the main thread first, as the app's warm-up or tests might
    for rep in range(1, reps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "direct":
            n = answer(next)
        elif mode == "one":
            n = pool.submit(answer, next).result()
        else:
            n = answer(lambda chunks: pool.submit(next, chunks).result())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"{mode:<7} {rep:>3} {n / wall:>8.1f} {cpu / n * 1000:>11.2f} {len(os.listdir('/proc/self/task')):>8}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("direct", "one", "many"), help="one mode in this process (default: all, each in a fresh one)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.mode:
        run_mode(args.mode, args.reps, args.threads)
        return 0
    print(f"{'mode':<7} {'rep':>3} {'tok/s':>8} {'CPU ms/tok':>11} {'threads':>8}", flush=True)
    for mode in ("direct", "one", "many"):
        subprocess.run([sys.executable, __file__, "--mode", mode, "--reps", str(args.reps),
                        "--threads", str(args.threads)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
