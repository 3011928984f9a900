"""What find_unused_parameters=True costs per iteration at the transformers Trainer's DDP site, on CPU with gloo.

The Trainer hands its decision to accelerate as `DistributedDataParallelKwargs` and accelerate's
`Accelerator.prepare_model` builds DDP from it (transformers 4.57 `trainer.py:2194-2209`, accelerate 1.16
`accelerator.py:2031-2032`). This script does the same for both values on 2 gloo ranks: one BERT built from a config
(no download), two DDP objects of identical copies (True: what the Trainer passes for a PreTrainedModel without
gradient checkpointing; False: `TrainingArguments(ddp_find_unused_parameters=False)`), trained in alternating rounds
(forward, backward, optimizer step, zero_grad). Prints the median iteration time of each, the difference (the
unused-parameter search after each forward, the all-reduce of the used-parameter map, buckets never rebuilt), the
ratio, and on torch 2.1+ the median time of DDP's `_post_forward` alone (the search).

    python benchmarks/ddp_trainer_search.py [--rounds 12] [--iterations 8] [--layers 4] [--hidden 256]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time


def worker(rank, opts, port, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from transformers import BertConfig, BertForSequenceClassification
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=opts.hidden, num_hidden_layers=opts.layers,
                        num_attention_heads=4, intermediate_size=4 * opts.hidden, max_position_embeddings=128)
    base = BertForSequenceClassification(config)
    variants = {}
    for find_unused in (True, False):
        accelerator = Accelerator(cpu=True)
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=find_unused)  # as the Trainer
        model = accelerator.prepare_model(copy.deepcopy(base))
        variants[find_unused] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    post_forward = []
    split = hasattr(type(variants[True][0]), "_post_forward")
    if split:  # time DDP's _post_forward (the search) on the True object only
        ddp = variants[True][0]
        original = type(ddp)._post_forward

        def timed(output):
            start = time.perf_counter()
            result = original(ddp, output)
            post_forward.append(time.perf_counter() - start)
            return result
        ddp._post_forward = timed
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 1000, (opts.batch, opts.seq), generator=g)
    labels = torch.randint(0, 2, (opts.batch,), generator=g)
    times = {True: [], False: []}
    for round_index in range(opts.rounds + 1):  # round 0 warms up (bucket rebuild, allocator)
        order = (True, False) if round_index % 2 == 0 else (False, True)
        for find_unused in order:
            model, optimizer = variants[find_unused]
            for _ in range(opts.iterations):
                dist.barrier()
                start = time.perf_counter()
                model(input_ids=ids, labels=labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if round_index:
                    times[find_unused].append(time.perf_counter() - start)
    if rank == 0:
        queue.put((times, post_forward[opts.iterations:], torch.__version__,
                   sum(p.numel() for p in base.parameters())))
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    opts = parser.parse_args()
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(worker, args=(opts, port, queue), nprocs=2, join=True, start_method="spawn")
    times, post_forward, version, params = queue.get()
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"torch {version}, 2 gloo ranks on CPU (1 thread each), BERT {opts.layers}x{opts.hidden} "
          f"({params / 1e6:.1f}M "
          f"parameters), batch {opts.batch}x{opts.seq}, {opts.rounds} alternating rounds x {opts.iterations} "
          "iterations per variant")
    print(f"  find_unused_parameters=True  (Trainer default)  median {on * 1e3:8.2f} ms/iteration")
    print(f"  find_unused_parameters=False (the knob)         median {off * 1e3:8.2f} ms/iteration")
    print(f"  difference {(on - off) * 1e3:+.2f} ms/iteration; ratio True/False {on / off:.3f}")
    if post_forward:
        search = statistics.median(post_forward)
        print(f"  DDP _post_forward with True (the unused-parameter search) median {search * 1e3:.3f} ms "
              f"({100 * search / on:.2f}% of the iteration)")


if __name__ == "__main__":
    main()
