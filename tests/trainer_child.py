"""A training process for tests to kill: trains a run folder with retrain.train.train.

    python -m tests.trainer_child RUN_DIR BASE '{"max_steps": 8, ...}' [THREADS]

The third argument is a TrainConfig as JSON. The TrainResult is printed as JSON on the last line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from retrain.train import train
from schemas.run import TrainConfig


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO)
    run_dir, base, config = argv[:3]
    threads = int(argv[3]) if len(argv) > 3 else None
    result = train(Path(run_dir), base, TrainConfig.model_validate_json(config), progress=False, threads=threads)
    print(result.to_json().replace("\n", ""))


if __name__ == "__main__":
    main(sys.argv[1:])
