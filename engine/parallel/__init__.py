"""Parallelism applied to a plain model from outside: process groups, data parallel (DDP or FSDP2);
tensor, sequence and pipeline parallelism plug in here."""
