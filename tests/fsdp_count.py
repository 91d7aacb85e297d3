"""Two CPU processes (gloo) shard a model with FSDP2 ``fully_shard``; each rank counts its parameters.

Run as a subprocess by test_real_scripts.py: writes ``rank{r}.txt`` = "total embedding local" to OUT.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalewatch.accounting import count_parameters


def run(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 7))
    fully_shard(model[1], mesh=mesh)
    fully_shard(model, mesh=mesh)
    counted = count_parameters(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    Path(out, f"rank{rank}.txt").write_text(f"{counted.total} {counted.embedding} {local}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(run, args=(sys.argv[1], free_port), nprocs=2)
