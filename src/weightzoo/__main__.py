"""`python -m weightzoo ...`, which torchrun launches: `torchrun --nproc-per-node 2 -m weightzoo train ... --ddp`."""

from weightzoo.cli import run

if __name__ == "__main__":
    run()
