"""torchrun process info: rank/world from the environment, barrier and rank-0 broadcast (no-ops alone)."""
import os
from datetime import timedelta

import torch

from libs.errors import UserError


def rank_device(name, local_rank: int) -> torch.device:
    """The device of this process: `name` ("cuda", "cuda:2", "cpu"; None: cuda when available, else cpu). A cuda
    device without an index becomes cuda:<local_rank>: LOCAL_RANK numbers the processes of one node, as its GPUs
    are numbered; RANK numbers them over all nodes and only decides who writes. An explicit index is kept."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


class Distributed:
    """Rank/world from torchrun's env; barrier and rank-0 broadcast over gloo (no-ops for one process)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world > 1 and not torch.distributed.is_initialized():
            # gloo only coordinates (barrier, small objects): no tensors cross processes, also on GPUs
            torch.distributed.init_process_group("gloo", timeout=timedelta(hours=2))
            self.owns_group = True

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (RANK, over all nodes): the one process that writes shared files (logs, merges);
        the other ranks write only files of their own (their samples, their token chunks)."""
        return self.rank == 0

    def device(self, name=None) -> torch.device:
        """This process's device (`rank_device` with LOCAL_RANK), made the current cuda device when it is one."""
        device = rank_device(name, self.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def barrier(self):
        """Waits for every rank."""
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, check, *args, **kwargs):
        """Runs `check(*args, **kwargs)` on rank 0 only and gives its verdict to every rank: its return value, or
        its UserError raised on every rank (the other ranks' copy is marked `reported_elsewhere`, so one line is
        printed). For checks that touch shared files (probing an output folder), which ranks must not race on."""
        return verdict_on_main(check, self.is_main, self.broadcast, *args, **kwargs)

    def close(self):
        """Tears the process group down if this object created it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def verdict_on_main(check, is_main: bool, broadcast, *args, **kwargs):
    """`Distributed.on_main` for any process group: `broadcast(obj)` returns the main process's `obj` on every
    process (e.g. accelerate's broadcast_object_list); `check`'s return value must pickle."""
    verdict = None
    if is_main:
        try:
            verdict = ("ok", check(*args, **kwargs))
        except UserError as e:
            verdict = ("error", e)
    verdict = broadcast(verdict)
    if verdict[0] == "error":
        error = verdict[1]
        if not is_main:
            error.reported_elsewhere = True
        raise error
    return verdict[1]
