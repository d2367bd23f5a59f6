#!/usr/bin/env bash
# Submits launch/slurm/rvlm.sbatch: one rvlm.main process per GPU on N nodes.
#
#   launch/slurm/submit.sh --nodes=N --gpus_per_node=G [flags] \
#       --config=FILE --workdir=DIR [-- EXTRA rvlm.main flags, e.g. --config.k=v]
#
# Runs (or, with --dry_run, prints without running) one command:
#   sbatch --job-name=... --nodes=N --ntasks-per-node=G --gpus-per-task=1 ... \
#       --chdir=REPO REPO/launch/slurm/rvlm.sbatch --config=FILE --workdir=DIR EXTRA
#
# Flags (--flag=value):
#   --nodes=N            nodes (required)
#   --gpus_per_node=G    GPUs per node = processes per node (required)
#   --cpus_per_gpu=C     CPUs per process (default: the template's 8)
#   --partition=P --time=T --account=A --qos=Q   passed to sbatch when given
#   --job_name=NAME      default rvlm-<last part of the workdir>
#   --output=PATTERN     sbatch log file (default: the template's rvlm-%x-%j.out in REPO)
#   --python=PYTHON      interpreter with rvlm installed, on every node (default: python)
#   --sbatch=OPTION      any other sbatch option, repeatable: --sbatch=--constraint=a100
#   --config=FILE[:ARG]  relative to the repository root (required)
#   --workdir=DIR        shared filesystem path or gs://..., the same for every process
#                        (required); a rerun, or a requeued job, resumes from it
#   --dry_run            print the sbatch command, run nothing
#
# The job runs in this checkout (REPO, which must be on a filesystem every node sees);
# it is requeued on preemption and near its time limit (see rvlm.sbatch).
set -euo pipefail

PROG=launch/slurm/submit.sh
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"
usage() { usage_from_header "${BASH_SOURCE[0]}"; }

NODES="" GPUS="" CPUS="" PARTITION="" TIME="" ACCOUNT="" QOS="" JOB_NAME="" OUTPUT=""
PYTHON="" CONFIG="" WORKDIR="" DRY_RUN=0
SBATCH_EXTRA=() EXTRA=()
while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  case "$arg" in
    --) EXTRA=("$@"); break ;;
    --nodes=*) NODES=${arg#*=} ;;
    --gpus_per_node=*) GPUS=${arg#*=} ;;
    --cpus_per_gpu=*) CPUS=${arg#*=} ;;
    --partition=*) PARTITION=${arg#*=} ;;
    --time=*) TIME=${arg#*=} ;;
    --account=*) ACCOUNT=${arg#*=} ;;
    --qos=*) QOS=${arg#*=} ;;
    --job_name=*) JOB_NAME=${arg#*=} ;;
    --output=*) OUTPUT=${arg#*=} ;;
    --python=*) PYTHON=${arg#*=} ;;
    --sbatch=*) SBATCH_EXTRA+=("${arg#*=}") ;;
    --config=*) CONFIG=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --dry_run | --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --nodes | --gpus_per_node | --cpus_per_gpu | --partition | --time | --account | --qos | \
      --job_name | --output | --python | --sbatch | --config | --workdir)
      die "$arg needs a value: $arg=VALUE" ;;
    *) die "unknown argument '$arg' (arguments for rvlm.main go after '--')" ;;
  esac
done

positive='^[1-9][0-9]*$'
[[ -n $NODES ]] || die "give --nodes=N"
[[ $NODES =~ $positive ]] || die "--nodes=$NODES must be a positive integer"
[[ -n $GPUS ]] || die "give --gpus_per_node=G (one process per GPU)"
[[ $GPUS =~ $positive ]] || die "--gpus_per_node=$GPUS must be a positive integer"
[[ -z $CPUS || $CPUS =~ $positive ]] || die "--cpus_per_gpu=$CPUS must be a positive integer"
[[ -n $CONFIG ]] || die "give --config=FILE (relative to the repository root)"
[[ -n $WORKDIR ]] || die "give --workdir=DIR (shared by every node, or gs://...)"
if [[ $PYTHON == *,* ]]; then
  die "--python=$PYTHON: a path without commas (it travels in sbatch --export)"
fi
if [[ -z $JOB_NAME ]]; then
  JOB_NAME="rvlm-$(basename "${WORKDIR%/}")"
fi

cmd=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-task=1)
[[ -z $CPUS ]] || cmd+=(--cpus-per-task="$CPUS")
[[ -z $PARTITION ]] || cmd+=(--partition="$PARTITION")
[[ -z $TIME ]] || cmd+=(--time="$TIME")
[[ -z $ACCOUNT ]] || cmd+=(--account="$ACCOUNT")
[[ -z $QOS ]] || cmd+=(--qos="$QOS")
[[ -z $OUTPUT ]] || cmd+=(--output="$OUTPUT")
[[ -z $PYTHON ]] || cmd+=(--export="ALL,RVLM_PYTHON=$PYTHON")
cmd+=(${SBATCH_EXTRA[@]+"${SBATCH_EXTRA[@]}"})
cmd+=(--chdir="$ROOT" "$ROOT/launch/slurm/rvlm.sbatch" --config="$CONFIG" --workdir="$WORKDIR")
cmd+=(${EXTRA[@]+"${EXTRA[@]}"})
run_cmd "${cmd[@]}"
