"""synthesize: a teacher model continues the first tokens of each corpus document (the
distillation recipe's synthetic text), sharded, resumable and filtered; see docs/synthesize.md."""
