"""Training throughput: retrain.train against a plain TRL script, on the same rows, settings and threads.

Each run is a fresh worker process (this script with ``--worker``) that trains ``--steps`` steps and
reports tokens/s of the training steps only: non-padding tokens trained between the end of step
``--warmup`` and the end of the last step, over the time between the two (loading, tokenizing
and the first steps are left out). Both sides log every step and checkpoint every ``save_steps``,
as a real run does; their training arguments are the same (lr, batch, length, LoRA, seed,
precision, gradient checkpointing). Runs alternate (ours/plain, then plain/ours, ...) so machine
noise hits both alike. Other processes steal cores and slow training many times over: a run
during which they used more than 0.2 cores on average is marked ``!``, pairs keep being added
until ``--pairs`` ran undisturbed (or ``--budget`` seconds are spent), and the medians and the
verdict are taken over the undisturbed pairs. Goal: ours/plain >= 0.95.

  ours   ``retrain.train.train(run_dir, base, cfg)``: our dataset building, callbacks
         (train_log.jsonl, TensorBoard, token counting) and checkpoint handling around SFTTrainer.
  plain  the same job written inline with SFTTrainer + LoraConfig, as a user would.

CPU (default): the embedded SmolLM2-135M (materialised from its GGUF), TRL + PEFT.

``--unsloth`` (needs a CUDA GPU and requirements-gpu.txt): a Llama-3.2-1B-shaped model with random
weights (LlamaConfig with its dimensions, built here: nothing is downloaded), trained with
unsloth through retrain.train (backend "unsloth") against plain TRL + PEFT in bf16; it also
prints each side's peak GPU memory (torch.cuda.max_memory_allocated). Each side runs in its own
process, since importing unsloth patches transformers for the whole process.

    .venv/bin/python bench/train.py                       # CPU: 3 undisturbed pairs of 12 steps, 2 threads
    .venv/bin/python bench/train.py --pairs 5 --steps 20
    .venv/bin/python bench/train.py --unsloth             # CUDA: 2 pairs of 30 steps, batch 8 x 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("river stone lantern quiet harbor maple orbit copper meadow signal velvet canyon ember "
         "glacier thistle beacon saddle prism willow tundra falcon cobalt ridge juniper").split()


def write_rows(run_dir: Path, rows: int, longest: int) -> None:
    """Correction and replay rows of varied length (1..longest sentences per answer), as merge writes them."""
    from schemas.flag import ChatMessage
    from schemas.sft import RowMeta, SFTRow

    def sentence(i: int, j: int) -> str:
        return " ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for k in range(8)).capitalize() + "."

    lines: dict[str, list[str]] = {"correction": [], "replay": []}
    for i in range(rows):
        source = "correction" if i % 2 == 0 else "replay"
        answer = " ".join(sentence(i, j) for j in range(1 + (i * 5) % longest))
        row = SFTRow(
            prompt=[ChatMessage(role="system", content="You are a helpful assistant."),
                    ChatMessage(role="user", content=f"Question {i}: tell me about the {WORDS[i % len(WORDS)]}.")],
            completion=[ChatMessage(role="assistant", content=answer)],
            meta=RowMeta(source=source, key=f"row{i}"),
        )
        lines[source].append(row.model_dump_json() + "\n")
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "data" / "train.jsonl").write_text("".join(lines["correction"]))
    (run_dir / "data" / "replay.jsonl").write_text("".join(lines["replay"]))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds all processes together have used since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def step_timer():
    """A TrainerCallback noting (time, tokens so far, machine CPU, own CPU) at each step's log.

    SFTTrainer logs num_tokens (non-padding tokens trained so far) with every loss.
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float, float, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs and "loss" in logs:
                self.marks.append((time.perf_counter(), float(logs["num_tokens"]), machine_busy(), time.process_time()))

    return StepTimer()


def plain_trl(run_dir: Path, base: str, cfg, callbacks: list, bf16: bool, gradient_checkpointing: bool) -> None:
    """The baseline: the same training written directly against TRL + PEFT."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    rows = []
    for name in ("train.jsonl", "replay.jsonl"):
        with open(run_dir / "data" / name) as lines:
            rows += [json.loads(line) for line in lines]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    dataset = dataset.shuffle(seed=cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if bf16 else torch.float32)
    args = SFTConfig(
        output_dir=str(run_dir / "plain"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed,
        max_length=cfg.max_length,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        logging_steps=1,
        report_to="tensorboard",
        disable_tqdm=True,
        bf16=bf16,
        activation_checkpointing=gradient_checkpointing,
        dataloader_pin_memory=cuda,
    )
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
               callbacks=callbacks).train()


def worker(side: str, run_dir: Path, base: str, cfg_json: str, threads: int, warmup: int) -> dict:
    """Train one run in this process; returns its throughput figures."""
    if side == "unsloth":
        import unsloth  # noqa: F401  first, so that its patches apply to transformers and TRL
    import torch

    from schemas.run import TrainConfig

    cfg = TrainConfig.model_validate_json(cfg_json)
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = step_timer()
    if side == "plain":
        plain_trl(run_dir, base, cfg, [timer], bf16=cuda and torch.cuda.is_bf16_supported(), gradient_checkpointing=cuda)
    else:
        from retrain.train import train

        train(run_dir, base, cfg.model_copy(update={"backend": "unsloth" if side == "unsloth" else "trl"}),
              progress=False, threads=threads, callbacks=[timer])
    marks = timer.marks
    if len(marks) <= warmup + 1:
        raise SystemExit(f"only {len(marks)} steps logged; use more --steps than --warmup + 1")
    # From the end of step `warmup` (its tokens are not counted) to the end of the last step.
    (t0, n0, busy0, own0), (t1, n1, busy1, own1) = marks[warmup - 1], marks[-1]
    return {
        "side": side,
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "s_per_step": (t1 - t0) / (len(marks) - warmup),
        "tokens": n1 - n0,
        # Cores that other processes used meanwhile: they take cores from training and slow it many times over.
        "others_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def run_worker(side: str, run_dir: Path, base: str, cfg, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--run-dir", str(run_dir), "--base", base,
           "--config", cfg.model_dump_json(), "--threads", str(args.threads), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{side} worker failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_1b_shaped(folder: Path) -> str:
    """A Llama-3.2-1B-shaped model with random weights (bf16) and the embedded model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from retrain.base import materialise
    from space.model import embedded_model_path

    config = LlamaConfig(  # meta-llama/Llama-3.2-1B's config.json, without its rope scaling
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    # Its token ids (< 49152) all fall inside the model's 128256-row vocabulary.
    AutoTokenizer.from_pretrained(materialise(embedded_model_path(), ROOT / ".cache" / "base")).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unsloth", action="store_true", help="CUDA: unsloth vs plain TRL on a Llama-3.2-1B shape")
    parser.add_argument("--pairs", type=int, default=None,
                        help="(ours, plain) pairs to measure undisturbed by other processes (default 3; 2 with --unsloth)")
    parser.add_argument("--budget", type=float, default=900.0,
                        help="most seconds to spend adding pairs until --pairs ran undisturbed (default 900)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 12 on CPU, 30 with --unsloth)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (at least 1)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 4 on CPU, 8 with --unsloth)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default 256, 1024 with --unsloth)")
    parser.add_argument("--worker", choices=["ours", "plain", "unsloth"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first step's start is not observable")
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.run_dir), args.base, args.config, args.threads, args.warmup)))
        return

    from schemas.run import TrainConfig

    gpu = args.unsloth
    pairs = args.pairs or (2 if gpu else 3)
    steps = args.steps or (30 if gpu else 12)
    cfg = TrainConfig(
        max_steps=steps, save_steps=10, per_device_batch_size=args.batch or (8 if gpu else 4),
        max_length=args.max_length or (1024 if gpu else 256), seed=0,
    )
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        if gpu:
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("--unsloth needs a CUDA GPU (torch.cuda.is_available() is False)")
            base, sides, longest = llama_1b_shaped(tmp / "llama-1b-shaped"), ("unsloth", "plain"), 80
        else:
            from retrain.base import materialise
            from space.model import embedded_model_path

            base, sides, longest = str(materialise(embedded_model_path(), ROOT / ".cache" / "base")), ("ours", "plain"), 6
        rows = max(64, 4 * cfg.per_device_batch_size * steps)
        print(f"base {base}\n{steps} steps (timed after {args.warmup}), batch {cfg.per_device_batch_size}, "
              f"max_length {cfg.max_length}, {rows} rows, threads {args.threads}, pairs {pairs}")
        pairs_run: list[dict[str, dict]] = []
        deadline = time.monotonic() + args.budget
        while sum(map(undisturbed, pairs_run)) < pairs and (time.monotonic() < deadline or not pairs_run):
            n = len(pairs_run)
            pair: dict[str, dict] = {}
            for side in sides if n % 2 == 0 else tuple(reversed(sides)):
                run_dir = tmp / f"{side}-{n}"
                write_rows(run_dir, rows, longest)
                result = pair[side] = run_worker(side, run_dir, base, cfg, args)
                memory = f"  peak GPU {result['peak_gpu_gib']:.2f} GiB" if result["peak_gpu_gib"] is not None else ""
                mark = "!" if disturbed(result) else " "
                print(f" {mark}pair {n + 1} {side:8s} {result['tokens_per_s']:8.1f} tokens/s  "
                      f"{result['s_per_step']:.3f} s/step  others {result['others_cores']:.2f} cores{memory}",
                      flush=True)
            pairs_run.append(pair)

    clean = [pair for pair in pairs_run if undisturbed(pair)]
    summarized = clean if len(clean) >= 2 else pairs_run
    print(f"\n{len(pairs_run)} pairs ran, {len(clean)} undisturbed (other processes used under "
          f"{DISTURBED_CORES} cores during both runs: '!' marks the others)")
    if summarized is not clean:
        print("WARNING: fewer than 2 undisturbed pairs, so the medians include runs that other processes "
              "slowed down: rerun on a quieter machine")
    medians = {side: statistics.median(p[side]["tokens_per_s"] for p in summarized) for side in sides}
    for side in sides:
        peaks = [p[side]["peak_gpu_gib"] for p in summarized if p[side]["peak_gpu_gib"] is not None]
        memory = f", peak GPU memory {max(peaks):.2f} GiB" if peaks else ""
        print(f"{side:8s} median {medians[side]:8.1f} tokens/s over {len(summarized)} pairs{memory}")
    ratio = medians[sides[0]] / medians["plain"]
    goal = "" if gpu else f"  (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})"
    print(f"{sides[0]}/plain = {ratio:.3f}{goal}")


DISTURBED_CORES = 0.2


def disturbed(result: dict) -> bool:
    return result["others_cores"] > DISTURBED_CORES


def undisturbed(pair: dict[str, dict]) -> bool:
    return not any(map(disturbed, pair.values()))


if __name__ == "__main__":
    main()
