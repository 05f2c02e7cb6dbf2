# shellcheck shell=bash
# Helpers shared by the slurm/*.sbatch templates (sourced, never run). Each template finds the
# checkout itself (see ptft_find_repo in the templates), then sources this file from it.
#
#   ptft_event FILE WORDS...   append "<UTC time> job=<id> restart=<n> host=<node> WORDS" to FILE
#   ptft_record DIR            write what a run needs to be reproduced into DIR:
#                                env.txt        the environment (values of secret-looking names redacted)
#                                git.txt        revision, branch, `git status --short` of PTFT_REPO
#                                               (read-only git: .git/index is never rewritten)
#                                git.diff       uncommitted changes (when there are any)
#                                pip-freeze.txt the interpreter's packages (`pip freeze`, else importlib.metadata)
#                                job.txt        `scontrol show job` of this job
#                                gpus.txt       `nvidia-smi -L` (when present)
#   ptft_die MESSAGE           print "ptft-slurm: error: MESSAGE" and exit 2
#
# Needs: PTFT_REPO (the checkout) and PY (its interpreter), set by the template.

ptft_die() {
  echo "ptft-slurm: error: $*" >&2
  exit 2
}

ptft_note() { echo "ptft-slurm: $*" >&2; }

ptft_event() {
  local file=$1
  shift
  printf '%s job=%s restart=%s host=%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${SLURM_JOB_ID:-none}" \
    "${SLURM_RESTART_COUNT:-0}" "${SLURMD_NODENAME:-$(hostname -s)}" "$*" >>"$file"
}

# git on the checkout without optional locks: never rewrites .git/index (see ptft_record).
ptft_git() { GIT_OPTIONAL_LOCKS=0 git --no-optional-locks -C "$PTFT_REPO" "$@"; }

ptft_record() {
  local dir=$1 name value
  mkdir -p "$dir" || ptft_die "cannot create $dir"
  {
    while IFS= read -r name; do
      if [[ $name =~ (TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|_KEY$|^KEY$|API_KEY|AUTH) ]]; then
        value="<redacted>"
      else
        value=${!name-}
      fi
      printf '%s=%q\n' "$name" "$value"
    done < <(compgen -e | LC_ALL=C sort)
  } >"$dir/env.txt"
  # Read-only git only: the checkout is shared with the user and other jobs, and `git status`,
  # `diff` and `describe --dirty` would otherwise refresh .git/index (taking index.lock) as a side effect.
  if ptft_git rev-parse --git-dir >/dev/null 2>&1; then
    local status
    status=$(ptft_git status --short 2>/dev/null)
    {
      echo "repo: $PTFT_REPO"
      echo "revision: $(ptft_git rev-parse HEAD 2>/dev/null)"
      echo "describe: $(ptft_git describe --always 2>/dev/null)${status:+-dirty}"
      echo "branch: $(ptft_git rev-parse --abbrev-ref HEAD 2>/dev/null)"
      echo "status:"
      [[ -z $status ]] || sed 's/^/  /' <<<"$status"
    } >"$dir/git.txt"
    ptft_git diff-index -p HEAD >"$dir/git.diff" 2>/dev/null || true # plumbing: `git diff` writes the index even so
    [[ -s $dir/git.diff ]] || rm -f "$dir/git.diff"
  else
    echo "repo: $PTFT_REPO (not a git checkout)" >"$dir/git.txt"
  fi
  if ! "$PY" -m pip freeze >"$dir/pip-freeze.txt" 2>/dev/null; then
    "$PY" -c 'import importlib.metadata as m
for d in sorted(m.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
    print(f"{d.metadata[\"Name\"]}=={d.version}")' >"$dir/pip-freeze.txt" 2>&1 || true
  fi
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    scontrol show job "$SLURM_JOB_ID" >"$dir/job.txt" 2>&1 || true
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L >"$dir/gpus.txt" 2>&1 || true
  fi
}

# A DeepSpeed JIT build killed midway leaves a `lock` file behind and every later run waits on it
# forever at init. Warn (never delete: another job may be building right now).
ptft_check_build_locks() {
  local dir=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions} lock
  [[ -d $dir ]] || return 0
  while IFS= read -r lock; do
    ptft_note "warning: $lock is older than 15 minutes: a DeepSpeed op build was probably killed midway;" \
      "if no job is building right now, delete it (runs otherwise hang at init)"
  done < <(find "$dir" -maxdepth 3 -name lock -mmin +15 2>/dev/null)
}

# Wait for background job PID while signal traps run; returns its exit status.
# (A trapped signal interrupts `wait` with a status > 128 while the process still runs: wait again.
# A process that exited but is not yet reaped is a zombie, which `kill -0` still finds.)
ptft_wait() {
  local pid=$1 rc=0
  while :; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  return "$rc"
}

# launch.sh reads "one task per GPU" from SLURM_GPUS_PER_NODE/SLURM_GPUS_ON_NODE; a CPU-only job
# (--gpus-per-node=0) has them at 0, which would become `srun --ntasks-per-node 0`: drop them.
ptft_drop_zero_gpu_vars() {
  local v
  for v in SLURM_GPUS_PER_NODE SLURM_GPUS_ON_NODE; do
    if [[ ${!v:-} == 0 ]]; then unset "$v"; fi
  done
}

# Preemption helpers shared by the templates (slurm/finetune.sbatch; slurm/README.md, "Preemption").
#   ptft_job_ref                     this job as scancel/scontrol/squeue name it: ARRAYID_TASK for an
#                                    array task (its own SLURM_JOB_ID may be the array's id, which
#                                    would address every task of the array), else SLURM_JOB_ID
#   ptft_forward_usr1 PID            USR1 to every task of every step of this job (not this shell);
#                                    kill -USR1 PID (srun forwards it to its tasks) as a fallback
#   ptft_step_status RC LOG OFFSET   the status to act on: with --kill-on-bad-exit the first task to
#                                    exit non-zero (124 after a save) makes srun end the others, which
#                                    srun then reports as 128+SIGTERM; its "task N: Exited with exit
#                                    code X" line in LOG (from byte OFFSET) gives the first one's own
#   ptft_requeue EVENTS NOTE         `scontrol requeue` this job (or array task) once its steps are
#                                    gone everywhere (a rerun reuses their step ids); then waits for
#                                    SLURM to end this shell. Returns 1 when the requeue failed.
ptft_job_ref() {
  if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "$SLURM_JOB_ID"
  fi
}

ptft_forward_usr1() {
  scancel --signal=USR1 "$(ptft_job_ref)" || kill -USR1 "$1" 2>/dev/null
}

ptft_step_status() {
  local rc=$1 log=$2 offset=$3 first
  if ((rc > 128)) && [[ -n $offset ]]; then
    first=$(tail -c "+$offset" "$log" |
      sed -n -E 's/^srun: error: .*tasks? [0-9,-]+: Exited with exit code ([0-9]+)$/\1/p' | head -n 1)
    if [[ -n $first && $first != 0 ]]; then
      echo "ptft-slurm: the first task to fail exited $first (srun then ended the rest): using $first" >&2
      rc=$first
    fi
  fi
  echo "$rc"
}

ptft_requeue() {
  local events=$1 note=$2 ref steps _
  ref=$(ptft_job_ref)
  steps="^(${SLURM_JOB_ID}|${ref})\.[0-9]+$"
  for _ in $(seq 60); do
    squeue -h -s -j "$ref" -o %i 2>/dev/null | grep -q -E "$steps" || break
    sleep 1
  done
  sleep "${PTFT_REQUEUE_GRACE:-3}"
  ptft_event "$events" "requeue $ref (next restart=$((${SLURM_RESTART_COUNT:-0} + 1)) $note)"
  if scontrol requeue "$ref"; then
    sleep 120  # SLURM now ends this batch step itself (TERM, then KILL): wait for that rather than race it
    exit 0
  fi
  ptft_event "$events" "requeue failed (is the job --requeue?)"
  return 1
}
