#!/usr/bin/env bash
# Run a command and keep a log of the run:
#   bash record.sh [VAR=value ...] command [args ...]
# The leading VAR=value words are exported for the command. The log, in ${RECORD_DIR:-logs}/, holds the
# command line, the variables, git commit and uncommitted diff, host, GPUs, library versions, start, end,
# duration, exit status and all output. Exits with the command's status. Termination signals (TERM, INT, HUP,
# USR1, USR2: a scheduler's preemption or time-limit warning) are passed on to the command, and the log goes on
# until the command ends.
set -u
vars=()
while [[ $# -gt 0 && "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
  vars+=("$1")
  export "$1"
  shift
done
if [[ $# -eq 0 ]]; then
  echo "usage: bash record.sh [VAR=value ...] command [args ...]" >&2
  exit 2
fi

# Name the log after the command's --output_dir, so runs of one experiment sort together.
name=$(basename "$1")
prev=
for arg in "$@"; do
  [[ "$prev" == --output_dir ]] && name=$(basename "$arg")
  [[ "$arg" == --output_dir=* ]] && name=$(basename "${arg#*=}")
  prev=$arg
done
dir=${RECORD_DIR:-logs}
mkdir -p "$dir" || exit 2
log="$dir/$(date +%Y%m%d-%H%M%S)_${name//[^A-Za-z0-9._-]/_}.log"

python=python3
[[ -x .venv/bin/python ]] && python=.venv/bin/python
[[ "$(basename "$1")" == python* ]] && python=$1
# What the log keeps of a token (in a URL, an Authorization header, a variable named *TOKEN*, *SECRET*, *KEY* or
# *PASSWORD*) is <redacted>, as util/redact.py writes arguments.
redact() {
  sed -E -e 's#(://)[^/@[:space:]]+@#\1<redacted>@#g' \
    -e 's#([?&][^=&\#[:space:]]+=)[^&\#[:space:]]+#\1<redacted>#g' \
    -e 's#((authorization|private-token|x-api-key|cookie)(\\?[[:space:]])*:(\\?[[:space:]])*((bearer|basic|token)(\\?[[:space:]])+)?)[^[:space:]\\"]+#\1<redacted>#Ig' \
    -e 's#\bhf_[A-Za-z0-9]{16,}#<redacted>#g' \
    -e 's#(^|[[:space:]])([A-Za-z_]*(TOKEN|SECRET|KEY|PASSWORD)[A-Za-z0-9_]*=)[^[:space:]]+#\1\2<redacted>#Ig'
}
start=$(date +%s)
{
  echo "== record.sh"
  echo "command:   $(printf '%q ' "$@" | redact)"
  echo "variables: $(echo "${vars[*]:-(none)}" | redact)"
  echo "cwd:       $PWD"
  echo "host:      $(hostname)"
  echo "git:       $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
  echo "gpus:      $(nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null | paste -sd ';' | grep . || echo none)"
  echo "versions:  $("$python" -c 'import sys, torch, torchvision, timm; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo unknown)"
  echo "start:     $(date -Is)"
  echo "== uncommitted diff"
  git diff HEAD 2>/dev/null
  echo "== output"
} > "$log"

status=130  # stays so if the run is interrupted before the command returns
footer() {
  local end
  end=$(date +%s)
  {
    echo "== end"
    echo "end:       $(date -Is)"
    echo "duration:  $((end - start)) s"
    echo "exit:      $status"
  } >> "$log"
}
trap footer EXIT
echo "record.sh: logging to $log" >&2
forwarded="TERM INT HUP USR1 USR2"
# tee ignores them, so that the command's last lines (its checkpoint on a signal) still reach the log
exec 3> >(trap '' $forwarded; exec tee -a "$log")
tee_pid=$!
"$@" >&3 2>&1 3>&- &
child=$!
for sig in $forwarded; do
  trap "kill -$sig $child 2>/dev/null" "$sig"
done
while kill -0 "$child" 2>/dev/null; do
  wait "$child"  # returns early when a signal is passed on
done
wait "$child"
status=$?
exec 3>&-
wait "$tee_pid" 2>/dev/null || while kill -0 "$tee_pid" 2>/dev/null; do sleep 0.1; done
exit "$status"
