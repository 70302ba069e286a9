"""Errors of a training run that end it with a message saying why and what to do."""


class TrainingError(RuntimeError):
  """A run that cannot go on (config, inputs, resume mismatch); exit status 2 from the CLI."""


class NonFiniteError(TrainingError):
  """Too many consecutive steps had a non-finite loss or gradient (optimizer.max_consecutive_skips)."""
