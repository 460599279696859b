"""One `sortedchat train` run on the tiny model, in process: its options and the call."""

from __future__ import annotations

import os


def options(tiny_dir, data, out, **kw):
    from sortedchat.training.recipe import resolve_options

    base = dict(model=str(tiny_dir), data=str(data), out=str(out), exits=[2, 4, 6], max_steps=4, batch_size=2,
                lr=1e-2, warmup_steps=0, log_interval=1, device="cpu", max_length=64)
    base.update(kw)
    return resolve_options(base)


def run(opts, callback=None):
    from rich.console import Console

    from sortedchat.training.trainer import train

    return train(opts, Console(file=open(os.devnull, "w")), callback)
