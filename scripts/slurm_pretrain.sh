#!/usr/bin/env bash
# Pre-training as a SLURM job that survives time limits and preemption:
#   sbatch scripts/slurm_pretrain.sh --output_dir runs/mim_b --model MIM_vit_base_patch16 [run_pretrain.py flags]
# Every attempt runs the same command and resumes from --output_dir/checkpoint-last.pth (--auto_resume).
# - Time limit: SLURM warns this script with SIGUSR1 180 s before it (--signal=B:USR1@180); the script passes it
#   to the training processes, which write checkpoint-last.pth at the next optimizer step and exit with status 75,
#   and then requeues the job (scontrol requeue). Raise the 180 s if a step plus a checkpoint write takes longer.
# - Preemption: SLURM sends SIGTERM to every process of the job; the training stops the same way, and SLURM
#   requeues the job itself (--requeue). torchrun gives its workers 30 s from the signal before it kills them.
# The run goes through record.sh, one log per attempt in ${RECORD_DIR:-logs}/. Processes per node: NPROC (default:
# the GPUs SLURM gave the job); more than one node (--nodes N): one torchrun per node through srun.
#SBATCH --job-name=localmim
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -u
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
python=python3
[[ -x .venv/bin/python ]] && python=.venv/bin/python
nproc=${NPROC:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}
nnodes=${SLURM_NNODES:-1}
# torchrun passes these signals on to its workers (SIGUSR1 is not among its defaults: it would kill torchrun)
launch=("$python" -m torch.distributed.run --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
        --nproc_per_node="$nproc")
if (( nnodes > 1 )); then
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  launch=(srun --kill-on-bad-exit=1 "${launch[@]}" --nnodes="$nnodes" --rdzv_backend=c10d
          --rdzv_endpoint="$head:${MASTER_PORT:-29500}" --rdzv_id="$SLURM_JOB_ID")
fi

warned=0
pass_on() {  # $1: the signal; with srun, every process of the job step gets it (the training's vote needs one)
  if (( nnodes > 1 )); then
    scancel --signal="$1" "$SLURM_JOB_ID.0"
  else
    kill -"$1" "$child" 2>/dev/null
  fi
}
trap 'warned=1; pass_on USR1' USR1
trap 'pass_on TERM' TERM

bash record.sh "${launch[@]}" run_pretrain.py "$@" &
child=$!
while kill -0 "$child" 2>/dev/null; do
  wait "$child"  # returns early when a signal arrives
done
wait "$child"
status=$?
if (( warned )) && [[ -n "${SLURM_JOB_ID:-}" ]]; then
  echo "slurm_pretrain.sh: time-limit warning: requeueing job $SLURM_JOB_ID (the next attempt resumes)"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
