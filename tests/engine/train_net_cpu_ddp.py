"""tools/train_net.py with a test-only seam, so that it trains CPU models in several processes:
Detectron2's DefaultTrainer gives DistributedDataParallel the GPU index as device_ids, which DDP
refuses for a CPU model; here each training process builds DDP without them. Everything else is
the tool's own code. Run as ``python -m tests.engine.train_net_cpu_ddp ARGS``, ARGS as the tool's.
"""
import functools

from detectron2.engine import defaults

from tests.common import load_tool

train_net = load_tool("train_net")


def main_with_cpu_ddp(args):
    """`train_net.main` in a process whose DefaultTrainer builds DDP without device_ids."""
    defaults.create_ddp_model = functools.partial(defaults.create_ddp_model, device_ids=None)
    return train_net.main(args)


if __name__ == "__main__":
    train_net.invoke_main(main_with_cpu_ddp)
