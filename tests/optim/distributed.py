"""The model, batches, training loop and gloo set-up the 2-process (DDP / FSDP2) optimizer tests share.

Module-level functions only, so that ``mp.spawn`` workers in the test modules can use them.
"""

import contextlib
import gc
import os

import torch
import torch.distributed as dist


def model():
    """A small MLP (12 -> 32 -> 3 with LayerNorm), the same initial weights on every call."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def batches(steps, batch):
    """``steps`` (inputs, targets) classification batches of ``batch`` rows, the same on every call and rank."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 12, generator=generator), torch.randint(0, 3, (batch,), generator=generator))
            for _ in range(steps)]


def rank_shard(batches, rank, world_size):
    """This rank's equal slice of each global batch."""
    shard = len(batches[0][0]) // world_size
    return [(x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]) for x, y in batches]


def train(model, optimizer, batches, after_backward=None):
    """One cross-entropy step per batch; ``after_backward(step)``, if given, runs between backward and step."""
    for step, (inputs, targets) in enumerate(batches):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        if after_backward is not None:
            after_backward(step)
        optimizer.step()


@contextlib.contextmanager
def gloo_process_group(rank, world_size, port):
    """A CPU gloo process group on localhost (one thread per process), destroyed on exit.

    On a normal exit the ranks first collect garbage (DDP reducers and device meshes caught in reference cycles
    hold the group) and meet at a barrier, so no rank tears its connections down while the other still uses them.
    CI once saw a rank abort at the end of a K-FAC DDP test ("terminate called without an active exception"),
    about once in 20-30 runs here; that worker now also keeps its DDP wrapper and mesh in a function that returns
    before the group goes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
