"""Errors that end a run: main.py prints each as one line and exits with the type's code."""


class RunError(Exception):
  """A run cannot go on; the message says what is wrong and where. Subclasses set the exit code."""
  exit_code = 1


class InputError(RunError, ValueError):
  """Bad input (file, column, value, config): the message names the file or field and what is wrong."""
  exit_code = 1


class NonFiniteLossError(RunError, RuntimeError):
  """The loss or the predictions became NaN or inf; the last good checkpoint is kept."""
  exit_code = 3
