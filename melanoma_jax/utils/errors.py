"""The one exception type for bad user input: main.py prints it as one line and exits non-zero."""


class InputError(ValueError):
  """Bad input (file, column, value, config): the message names the file or field and what is wrong."""
