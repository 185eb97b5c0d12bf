"""Load a checkpoint into a model sharded over processes: each rank reads only its own rows.

Run: torchrun --standalone --nproc-per-node 2 examples/sharded_torchrun.py
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import weightport


def main() -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    folder = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder)
    path = os.path.join(folder[0], "lstm.safetensors")
    if dist.get_rank() == 0:  # a checkpoint to load: any file weightport reads, in any layout
        weightport.save(torch.nn.LSTM(256, 256, num_layers=2), path)
    dist.barrier()

    with torch.device("meta"):
        model = torch.nn.LSTM(256, 256, num_layers=2)  # no memory, no init
    fully_shard(model, mesh=mesh)  # every parameter a DTensor placed Shard(0)
    with weightport.open_source(path) as source:
        weightport.load(model, source)  # a collective: each rank reads only its own rows
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        line = f"rank {dist.get_rank()}: read {source.bytes_read / total:.2f} of the checkpoint\n"
        sys.stdout.write(line)  # one write, so the ranks' lines never interleave on a shared pipe
        sys.stdout.flush()


dist.init_process_group("gloo")  # on GPUs: torch.cuda.set_device(local_rank), then "nccl" and a "cuda" mesh
try:
    main()  # the model and mesh are freed when it returns, before the group is torn down
    dist.barrier()  # every rank done before any tears down
finally:
    dist.destroy_process_group()
