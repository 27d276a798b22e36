"""Parallelism applied to a plain model from outside: the layout of a job's ranks (layout.py,
torch-free) as one DeviceMesh (mesh.py); tensor + sequence parallel (tensor_parallel.py), pipeline
stages (pipeline.py), data parallel (data_parallel.py) and activation recompute (recompute.py)."""
