"""User-facing errors: their message says which file, line or field is wrong, so the CLI prints it
without a traceback. Anything else is a bug and keeps its traceback."""


class LmforgeError(Exception):
    """Base of errors caused by the user's input rather than by lmforge."""


class SpecError(LmforgeError, ValueError):
    """A spec that cannot be used."""


class InputError(LmforgeError, ValueError):
    """An input file (corpus, dataset, tokenizer, checkpoint) that cannot be used."""


class Preempted(Exception):
    """The job was asked to stop (SIGTERM/SIGUSR2: preemption or time limit) and saved a
    checkpoint; running the same command again resumes from it."""

    exit_code = 75  # EX_TEMPFAIL: try again
