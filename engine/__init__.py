"""lmforge's training engine: every stage's real work, runnable alone as `python -m engine <stage>`.

This package never imports prefect, mlflow or submitit: it must run on a bare GPU node.
"""

__version__ = "0.1.0"
