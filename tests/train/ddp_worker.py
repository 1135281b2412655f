"""One rank of a multi-process test session: `python ddp_worker.py JOBS.json RANK WORLD OUT_DIR`.

The test starts WORLD of these with torchrun's environment contract (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT; the port is set per job) and each runs the same jobs in order, so one start-up of torch serves
several runs. A job is {"port": P, "args": [...]} -- `ctrpipe ARGS` through the real CLI -- with
"rank_args": {"1": [...]} replacing a rank's arguments, or {"port": P, "replicas": true}: two copies of a small
model, one bit changed on rank 1, through `Distributed.check_replicas`. Writes OUT_DIR/rank{R}.json: per job
its exit code and output.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def replicas_job() -> tuple[int, str]:
    import torch

    from ctrpipe.errors import TrainingError
    from ctrpipe.train.distributed import Distributed, rank_info

    info = rank_info()
    assert info is not None
    group = Distributed(info, torch.device("cpu"), timeout_s=30)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        group.check_replicas(model)                  # equal copies pass
        if info.rank == 1:
            with torch.no_grad():                   # the smallest change a float can take
                w = model[1].weight
                w[0, 2] = torch.nextafter(w[0, 2], torch.tensor(1.0))
        try:
            group.check_replicas(model)
        except TrainingError as exc:
            return 1, exc.render()
        return 0, "no difference found"
    finally:
        group.close()


def main() -> None:
    jobs_path, rank, world, out_dir = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    from typer.testing import CliRunner

    from ctrpipe.cli import app

    results = []
    for job in json.loads(jobs_path.read_text()):
        os.environ["MASTER_PORT"] = str(job["port"])
        if job.get("replicas"):
            code, output = replicas_job()
        else:
            args = job.get("rank_args", {}).get(str(rank), job["args"])
            res = CliRunner().invoke(app, args)
            code, output = res.exit_code, res.output + (repr(res.exception) if res.exit_code > 0 else "")
        results.append({"exit_code": code, "output": output})
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
