"""Host cost of one all-to-all exchange on 2 GPUs (torchrun).

Three ways: TASP's (an asynchronous post on the process group's backend, then ``Work.wait``), the public
``all_to_all_single`` the same way, and an alternative (a synchronous post on a side stream joined by CUDA
events). Host time per call is measured while a long matmul keeps the GPU busy, so it is the enqueue cost
only; the wall time per call (synchronised) is measured separately. Each way runs twice, interleaved.

    torchrun --nproc-per-node 2 scripts/gpu_nccl_host_cost.py --out nccl_host.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mib", default="4,32")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default="nccl_host.json")
    a = ap.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    g = dist.group.WORLD
    be = g._get_backend(torch.device("cuda"))
    async_opts, sync_opts = dist.AllToAllOptions(), dist.AllToAllOptions()
    async_opts.asyncOp, sync_opts.asyncOp = True, False
    side = torch.cuda.Stream()
    res = {}
    for mib in (int(x) for x in a.sizes_mib.split(",")):
        send = torch.randn(mib * 2**20 // 2, device="cuda", dtype=torch.bfloat16)
        recv = torch.empty_like(send)

        def backend_async_wait(recv=recv, send=send):
            be.alltoall_base(recv, send, [], [], async_opts).wait()

        def side_stream_sync_events(recv=recv, send=send):
            ready = torch.cuda.Event()
            ready.record()
            side.wait_event(ready)
            with torch.cuda.stream(side):
                be.alltoall_base(recv, send, [], [], sync_opts)
                done = torch.cuda.Event()
                done.record()
            torch.cuda.current_stream().wait_event(done)

        def public_async_wait(recv=recv, send=send):
            dist.all_to_all_single(recv, send, async_op=True, group=g).wait()

        ways = (backend_async_wait, side_stream_sync_events, public_async_wait)
        for rep in (1, 2):
            for f in ways:
                for _ in range(20):
                    f()
                torch.cuda.synchronize()
                dist.barrier()
                x = torch.randn(8192, 8192, device="cuda")
                for _ in range(3):
                    x @ x  # keeps the GPU busy: the loop below measures enqueue time only
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    f()
                host = (time.perf_counter() - t0) / a.calls * 1e6
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    f()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / a.calls * 1e6
                res[f"{mib}MiB_{f.__name__}_{rep}"] = {"host_us": round(host, 1), "wall_us": round(wall, 1)}
                dist.barrier()
    if dist.get_rank() == 0:
        res["device"] = torch.cuda.get_device_name()
        res["torch"] = torch.__version__
        print(json.dumps(res, indent=1))
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
