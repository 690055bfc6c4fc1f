"""Two real gloo processes with half batches against one process on the full batch."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from method.resa import resa_loss
from src.distributed import gather, gather_uneven, with_cpu_backend

B, V, D, FEAT, TAU = 4, 3, 8, 6, 0.4


def make_batch(seed=0):
    """Full-batch (N = 2B) inputs shared by both runs."""
    g = torch.Generator().manual_seed(seed)
    z = [F.normalize(torch.randn(2 * B, D, generator=g), dim=1) for _ in range(V)]
    zm = [F.normalize(torch.randn(2 * B, D, generator=g), dim=1) for _ in range(2)]
    h = F.normalize(torch.randn(2 * B, FEAT, generator=g), dim=1)
    hm = F.normalize(torch.randn(2 * B, FEAT, generator=g), dim=1)
    return z, zm, h, hm


def loss_and_grads(z, zm, h, hm):
    z = [t.clone().requires_grad_() for t in z]
    loss = resa_loss(z, zm, h, hm, TAU)
    loss.backward()
    return loss.detach(), [t.grad for t in z]


def worker(rank, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2,
                            rank=rank)
    try:
        z, zm, h, hm = make_batch()
        local = slice(rank * B, (rank + 1) * B)
        # each process holds its half; the momentum tensors are gathered as in ReSA.forward
        gathered_zm = [gather(t[local].contiguous()) for t in zm]
        gathered_hm = gather(hm[local].contiguous())
        loss, grads = loss_and_grads([t[local] for t in z], gathered_zm, h[local], gathered_hm)
        ragged = gather_uneven(torch.arange(3 if rank == 0 else 1) + 10 * rank)
        # plain lists: tensors would travel as shared memory that dies with this process
        queue.put((rank, loss.item(), [g.tolist() for g in grads], ragged.tolist()))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_gloo_ranks(target):
    """{rank: what the rest of its queue item holds} of `target(rank, port, queue)` run on
    two spawned processes of one gloo group; each must put (rank, ...) once and exit 0."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = {r: rest for r, *rest in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_two_gloo_processes_match_one_process():
    results = on_two_gloo_ranks(worker)

    full_loss, full_grads = loss_and_grads(*make_batch())
    # the loss of the full batch is the mean of the per-process losses (as DDP averages)
    mean_loss = (results[0][0] + results[1][0]) / 2
    assert abs(mean_loss - full_loss.item()) < 1e-6
    # per-process gradients, averaged by DDP (divided by W = 2), are the full-batch rows
    for v in range(V):
        stitched = torch.tensor(results[0][1][v] + results[1][1][v]) / 2
        assert torch.allclose(stitched, full_grads[v], atol=1e-6)
    # uneven gathers keep rank order and drop the padding
    assert results[0][2] == [0, 1, 2, 10] == results[1][2]


def test_every_process_group_has_a_cpu_backend():
    """NCCL gets gloo beside it for CPU tensors; a group that has one keeps it."""
    assert with_cpu_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert with_cpu_backend("cuda:gloo") == "cpu:gloo,cuda:gloo"  # the tests' NCCL stand-in
    assert with_cpu_backend("gloo") == "gloo"
    assert with_cpu_backend("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"
