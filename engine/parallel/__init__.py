"""Parallelism applied to a plain model from outside: process groups, data parallel (DDP or FSDP2);
tensor, sequence and pipeline parallelism plug in here."""

from typing import Literal

DataParallel = Literal["ddp", "fsdp"]  # the modes engine/parallel/data_parallel.py applies
