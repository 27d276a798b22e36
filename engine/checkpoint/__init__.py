"""The native checkpoint format, shared by every stage that reads or writes one (train, convert,
evaluate, reshard): the save protocol and its markers (store.py), the pointer to the latest
iteration, readable without torch (latest.py), and loading that never runs code (safe_load.py)."""
