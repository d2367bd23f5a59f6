# shellcheck shell=bash
# Shared by launch/tpu/tpu.sh and launch/slurm/submit.sh (sourced; sets nothing itself).
# Callers set PROG (the name in messages) and DRY_RUN (1: print commands, run nothing).

usage_from_header() {  # the comment block at the top of a script, up to `set -euo pipefail`
  sed -n '2,/^set -euo pipefail$/p' "$1" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {  # usage errors: message and exit status 2
  echo "$PROG: $*" >&2
  echo "$PROG: see '$PROG --help'" >&2
  exit 2
}

warn() { echo "$PROG: warning: $*" >&2; }

# Shell quoting as Python's shlex.quote: safe words bare, the rest in single quotes.
quote() {
  local LC_ALL=C s=$1 safe='^[A-Za-z0-9@%+=:,./_-]+$' sq="'" q="'\"'\"'"
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ $safe ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$sq/$q}"
  fi
}

join_quoted() {  # --flag=VALUE is written --flag=QUOTED_VALUE: the same word, easier to read
  local out="" a word flag='^--[A-Za-z0-9_.-]+='
  for a in "$@"; do
    if [[ $a =~ $flag ]]; then
      word="${BASH_REMATCH[0]}$(quote "${a#"${BASH_REMATCH[0]}"}")"
    else
      word=$(quote "$a")
    fi
    out+="${out:+ }$word"
  done
  printf '%s' "$out"
}

# Runs a command, or prints it with --dry_run. Either way the command line is shown.
run_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    join_quoted "$@"
    echo
  else
    echo "+ $(join_quoted "$@")" >&2
    "$@"
  fi
}
