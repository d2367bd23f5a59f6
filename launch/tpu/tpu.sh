#!/usr/bin/env bash
# Cloud TPU pods through queued resources: create, setup, run, logs, status, stop, delete.
#
#   launch/tpu/tpu.sh SUBCOMMAND --name=NAME --zone=ZONE [flags] [-- EXTRA]
#
# Subcommands (each one or a few gcloud commands; --dry_run prints them, one per line,
# shell-quoted, exactly as they would run, and runs nothing):
#   create  gcloud compute tpus queued-resources create NAME --node-id=NAME ...
#           needs --accelerator; EXTRA goes to gcloud (e.g. --network=..., --data-disk=...)
#   status  gcloud compute tpus queued-resources describe NAME (state: WAITING_FOR_RESOURCES,
#           PROVISIONING, ACTIVE, SUSPENDED, FAILED, ...; run setup once it is ACTIVE)
#   setup   installs rvlm on every host (--worker=all) into ~/rvlm: by default this
#           checkout's committed HEAD (a `git archive` tarball copied with `tpu-vm scp`),
#           or --repo=GIT_URL cloned on each host; then a virtualenv ~/rvlm-venv (Python
#           >= 3.11, which jax needs: the image's python3 if new enough, else python3.11,
#           apt-installed if missing) and `pip install -e . "jax[tpu]"` in it
#   run     one rvlm.main process per host (--worker=all), detached with nohup so that ssh
#           returns while training goes on; it logs to ~/rvlm_NAME.log on each host and
#           records its pid in ~/rvlm_NAME.pid (a second `run` refuses while one is alive).
#           needs --config and --workdir; EXTRA goes to rvlm.main (--config.x.y=...)
#   logs    tail -F of the log of worker 0 (--worker=N for another host)
#   stop    SIGTERM to the training process on every host (rvlm saves a checkpoint, then
#           exits); waits up to 5 minutes for them to exit
#   delete  gcloud compute tpus queued-resources delete NAME --force (the TPU VMs go too)
#
# Flags (--flag=value; flags a subcommand does not use are ignored, so one set of flags
# serves every subcommand):
#   --name=NAME          queued resource id and TPU node id (lowercase letters, digits, '-')
#   --zone=ZONE          e.g. us-central2-b (required)
#   --project=PROJECT    optional; gcloud's default project otherwise
#   --accelerator=TYPE   e.g. v4-32, v5litepod-16, v5p-64, v6e-16 (create; run uses it to
#                        warn about a local --workdir on a multi-host slice)
#   --runtime=VERSION    TPU software version; default by family: v6e -> v2-alpha-tpuv6e,
#                        v5p -> v2-alpha-tpuv5, v5e/v5litepod -> v2-alpha-tpuv5-lite,
#                        v2/v3/v4 -> tpu-ubuntu2204-base
#   --spot | --reserved  optional capacity kind for create (not both)
#   --repo=DIR_OR_URL    setup: a local git checkout (default: the one holding this script)
#                        or a git URL cloned on each host (--ref=BRANCH_OR_TAG optional)
#   --python=PYTHON      setup: the interpreter the hosts' virtualenv is made from
#                        (default: python3 if >= 3.11, else python3.11)
#   --config=FILE[:ARG]  run: config path relative to the repository root
#   --workdir=DIR        run: checkpoints, metrics, results. Use gs://BUCKET/...: every host
#                        writes the same checkpoint (orbax), and it outlives the TPU VMs
#   --worker=N           logs: which host's log (default 0)
#   --dry_run            print the commands, run nothing
#
# Preemption (spot capacity, maintenance): `status` shows SUSPENDED or FAILED; then
# `delete`, `create`, `setup`, and the same `run` command again: rvlm.main restores the
# latest checkpoint in WORKDIR/checkpoints and continues from there.
set -euo pipefail

PROG=launch/tpu/tpu.sh
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SUBCOMMANDS="create setup run logs status stop delete"
REMOTE_DIR="rvlm"  # under the home directory of each host
# shellcheck disable=SC2088  # expanded by the shell on each host
VENV="~/rvlm-venv"  # the hosts' Python environment, made by setup

# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"
usage() { usage_from_header "${BASH_SOURCE[0]}"; }

runtime_for() {  # default TPU software version of an accelerator type
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

hosts_for() {  # number of TPU VM hosts of a slice, or nothing if unknown
  local family=${1%-*} n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || return 0
  case "$family" in
    v2 | v3 | v4 | v5p) echo $(((n + 7) / 8)) ;;  # the number counts TensorCores, 8 per host
    v5litepod | v5e | v6e) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;  # chips
  esac
}

# ---- arguments ---------------------------------------------------------------------
if [[ $# == 0 ]]; then
  usage >&2
  exit 2
fi
case "$1" in
  -h | --help | help) usage; exit 0 ;;
esac
CMD=$1
shift
[[ " $SUBCOMMANDS " == *" $CMD "* ]] || die "unknown subcommand '$CMD'; choose one of: $SUBCOMMANDS"

NAME="" ZONE="" PROJECT="" ACCELERATOR="" RUNTIME="" SPOT=0 RESERVED=0 REPO="" REF=""
PYTHON="" CONFIG="" WORKDIR="" WORKER="" DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  case "$arg" in
    --) EXTRA=("$@"); break ;;
    --name=*) NAME=${arg#*=} ;;
    --zone=*) ZONE=${arg#*=} ;;
    --project=*) PROJECT=${arg#*=} ;;
    --accelerator=*) ACCELERATOR=${arg#*=} ;;
    --runtime=*) RUNTIME=${arg#*=} ;;
    --spot) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --repo=*) REPO=${arg#*=} ;;
    --ref=*) REF=${arg#*=} ;;
    --python=*) PYTHON=${arg#*=} ;;
    --config=*) CONFIG=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --worker=*) WORKER=${arg#*=} ;;
    --dry_run | --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --name | --zone | --project | --accelerator | --runtime | --repo | --ref | --python | \
      --config | --workdir | --worker)
      die "$arg needs a value: $arg=VALUE" ;;
    *) die "$CMD: unknown argument '$arg' (arguments for rvlm.main or gcloud go after '--')" ;;
  esac
done

[[ -n $NAME ]] || die "$CMD needs --name=NAME (the queued resource and TPU node id)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name=$NAME: use lowercase letters, digits and '-', starting with a letter"
[[ -n $ZONE ]] || die "$CMD needs --zone=ZONE (e.g. us-central2-b)"
if ((${#EXTRA[@]})) && [[ $CMD != run && $CMD != create ]]; then
  die "$CMD takes no arguments after '--' (only run, for rvlm.main, and create, for gcloud)"
fi
if [[ -n $WORKER && $CMD != logs ]]; then
  die "--worker applies to logs only ($CMD always acts on every host)"
fi

GCLOUD_SCOPE=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_SCOPE+=(--project="$PROJECT")
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_SCOPE[@]}")
# shellcheck disable=SC2088  # the ~ is expanded by the shell on each host
LOG="~/rvlm_$NAME.log" PIDFILE="~/rvlm_$NAME.pid"
# On each host: whether a pid is a live rvlm.main (not a zombie, nor a pid reused after a
# reboot left a stale pid file behind). -ww: the whole command line, which ps would
# otherwise cut to $COLUMNS characters when that is set.
# shellcheck disable=SC2016  # expanded on the host
ALIVE='alive() { case "$(ps -ww -o args= -p "$1" 2>/dev/null)" in *rvlm.main*) return 0 ;; esac; return 1; }'

# ---- subcommands -------------------------------------------------------------------
case "$CMD" in
  create)
    [[ -n $ACCELERATOR ]] || die "create needs --accelerator=TYPE (e.g. v4-32, v5litepod-16)"
    ((SPOT + RESERVED < 2)) || die "create: --spot and --reserved exclude each other"
    if [[ -z $RUNTIME ]]; then
      RUNTIME=$(runtime_for "$ACCELERATOR") ||
        die "create: no default TPU software version for '$ACCELERATOR'; pass --runtime=VERSION"
    fi
    args=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME"
      "${GCLOUD_SCOPE[@]}" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME")
    ((SPOT == 0)) || args+=(--spot)
    ((RESERVED == 0)) || args+=(--reserved)
    run_cmd "${args[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
    ;;

  status)
    run_cmd gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_SCOPE[@]}"
    ;;

  setup)
    if [[ -n $PYTHON ]]; then
      pick="py=$(quote "$PYTHON")"
    else
      pick="if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null;"
      pick+=" then py=python3; else py=python3.11; fi"
    fi
    # python -m venv needs the distribution's PYTHON-venv package: installed when missing.
    venv="{ \"\$py\" -m venv $VENV || { sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive"
    venv+=" apt-get install -y -q \"\$py\" \"\$py-venv\" && \"\$py\" -m venv --clear $VENV; }; }"
    install="$VENV/bin/python -m pip install -q -U pip"
    install+=" && $VENV/bin/python -m pip install -e . \"jax[tpu]\""
    if [[ -z $REPO || -d $REPO ]]; then
      [[ -z $REF ]] || die "setup: --ref applies to a git URL in --repo; a local checkout ships its HEAD"
      repo=${REPO:-$ROOT}
      git -C "$repo" rev-parse --git-dir > /dev/null 2>&1 ||
        die "setup: $repo is not a git checkout; pass --repo=GIT_URL"
      repo=$(cd "$repo" && git rev-parse --show-toplevel)
      if [[ -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
        warn "setup ships the committed HEAD of $repo; its uncommitted changes stay here"
      fi
      tarball="${TMPDIR:-/tmp}/rvlm-$NAME.tar.gz"
      run_cmd git -C "$repo" archive --format=tar.gz --output="$tarball" HEAD
      run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$NAME:rvlm.tar.gz" \
        "${GCLOUD_SCOPE[@]}" --worker=all
      remote="$pick; rm -rf ~/$REMOTE_DIR $VENV && mkdir -p ~/$REMOTE_DIR"
      remote+=" && tar -xzf ~/rvlm.tar.gz -C ~/$REMOTE_DIR && rm ~/rvlm.tar.gz"
      remote+=" && cd ~/$REMOTE_DIR && $venv && $install"
      run_cmd "${SSH[@]}" --worker=all --command="$remote"
      run_cmd rm -f "$tarball"
    else
      clone="git clone --depth=1"
      [[ -z $REF ]] || clone+=" --branch=$(quote "$REF")"
      remote="$pick; rm -rf ~/$REMOTE_DIR $VENV && $clone $(quote "$REPO") ~/$REMOTE_DIR"
      remote+=" && cd ~/$REMOTE_DIR && $venv && $install"
      run_cmd "${SSH[@]}" --worker=all --command="$remote"
    fi
    ;;

  run)
    [[ -n $CONFIG ]] || die "run needs --config=FILE (relative to the repository root)"
    [[ -n $WORKDIR ]] || die "run needs --workdir=DIR (gs://BUCKET/... recommended)"
    config_file=${CONFIG%%:*}
    if [[ $config_file == "$ROOT"/* ]]; then  # the hosts hold the checkout under ~/rvlm
      CONFIG="${CONFIG#"$ROOT"/}"
      config_file=${CONFIG%%:*}
    fi
    if [[ $config_file == /* ]]; then
      warn "--config=$CONFIG is an absolute path: it must exist on every host"
    elif [[ -z $REPO && ! -f $ROOT/$config_file ]]; then
      warn "--config: $config_file is not in $ROOT, so setup does not ship it"
    fi
    if [[ $WORKDIR != gs://* ]]; then
      hosts=$(hosts_for "$ACCELERATOR")
      if [[ -z $hosts ]]; then
        warn "--workdir=$WORKDIR is not a gs:// path: on a multi-host slice every host needs" \
          "the same checkpoint directory (pass --accelerator to check the host count)"
      elif ((hosts > 1)); then
        warn "--workdir=$WORKDIR is not a gs:// path, but $ACCELERATOR has $hosts hosts:" \
          "each would write its own local directory and the checkpoint would not be shared"
      fi
    fi
    train=(-m rvlm.main --distributed=on --config="$CONFIG" --workdir="$WORKDIR"
      ${EXTRA[@]+"${EXTRA[@]}"})
    remote="$ALIVE; cd ~/$REMOTE_DIR || exit 1; p=\$(cat $PIDFILE 2>/dev/null)"
    remote+="; if alive \"\$p\"; then echo \"rvlm: \$(hostname): already running (pid \$p);"
    remote+=" stop it first\" >&2; exit 1; fi"
    remote+="; nohup $VENV/bin/python $(join_quoted "${train[@]}") >> $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE"
    remote+="; echo \"rvlm: \$(hostname): started pid \$(cat $PIDFILE), log $LOG\""
    run_cmd "${SSH[@]}" --worker=all --command="$remote"
    ;;

  logs)
    WORKER=${WORKER:-0}
    [[ $WORKER =~ ^[0-9]+$ ]] || die "logs: --worker=$WORKER must be a host index (0, 1, ...)"
    run_cmd "${SSH[@]}" --worker="$WORKER" --command="tail -n 200 -F $LOG"
    ;;

  stop)
    remote="$ALIVE; p=\$(cat $PIDFILE 2>/dev/null)"
    remote+="; if ! alive \"\$p\"; then echo \"rvlm: \$(hostname): not running\"; exit 0; fi"
    remote+="; kill -TERM \"\$p\"; echo \"rvlm: \$(hostname): SIGTERM sent to pid \$p\""
    remote+="; for i in \$(seq 300); do alive \"\$p\" || break; sleep 1; done"
    remote+="; if alive \"\$p\"; then echo \"rvlm: \$(hostname): pid \$p still running after"
    remote+=" 300 s\" >&2; exit 1; fi; echo \"rvlm: \$(hostname): stopped\""
    run_cmd "${SSH[@]}" --worker=all --command="$remote"
    ;;

  delete)
    run_cmd gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_SCOPE[@]}" --force
    ;;
esac
