"""Process-wide settings a benchmark changes for its run and restores afterwards: log levels, warning
filters and progress bars (`quiet`), and torch's intra-op thread count (`torch_threads`)."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` (0: left as they are) for the block."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet():
    """No transformers/PEFT warnings, progress bars or INFO logs (ours included) for the block."""
    from transformers.utils import logging as hf_logging

    loggers = {name: logging.getLogger(name) for name in ("transformers", "peft", "server", "adapters")}
    levels = {name: lg.level for name, lg in loggers.items()}
    hf_verbosity, hf_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers.values():
            lg.setLevel(logging.ERROR)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(hf_verbosity)
            if hf_bars:
                hf_logging.enable_progress_bar()
            for name, lg in loggers.items():
                lg.setLevel(levels[name])
