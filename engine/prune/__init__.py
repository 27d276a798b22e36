"""Structured pruning (the `prune` stage): importance measured on calibration data, a plan of
what stays, the weights sliced to it. Recovery is a finetune that distils from the source."""
