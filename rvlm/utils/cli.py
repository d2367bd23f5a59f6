"""The command-line contract of rvlm's tools (evaluate, predict, sweep).

Each tool parses its own flags into its own FlagValues, so that importing it (the trainer
imports rvlm.evaluate; studies import rvlm.sweep) defines nothing global, and a mistake
in the input prints one line "PROG: error: ..." and exits with status 2.
"""
import sys

from absl import flags


def run_own_flags(argv, *, prog, define_flags, run, errors):
  """Parses `argv` (program name first) into fresh FlagValues and returns `run(fv)`.

  `errors` are the tool's input-mistake exceptions (the first one also reports stray
  arguments); flag errors count as such too.
  """
  fv = flags.FlagValues()
  define_flags(fv)
  try:
    rest = fv(argv)
    if len(rest) > 1:
      raise errors[0](f"unexpected arguments: {' '.join(rest[1:])}")
    return run(fv)
  except (*errors, flags.Error) as e:
    print(f"{prog}: error: " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(2)


def program_name_only(argv):
  """app.run's flags_parser: the global absl flags get only the program name, so that
  the whole command line reaches the tool's own FlagValues."""
  flags.FLAGS(argv[:1])
  return argv
