# shellcheck shell=bash
# Helpers shared by the slurm/*.sbatch templates (sourced, never run). Each template finds the
# checkout itself (see ptft_find_repo in the templates), then sources this file from it.
#
#   ptft_event FILE WORDS...   append "<UTC time> job=<id> restart=<n> host=<node> WORDS" to FILE
#   ptft_record DIR            write what a run needs to be reproduced into DIR:
#                                env.txt        the environment (values of secret-looking names redacted)
#                                git.txt        revision, branch, `git status --short` of PTFT_REPO
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
  if git -C "$PTFT_REPO" rev-parse --git-dir >/dev/null 2>&1; then
    {
      echo "repo: $PTFT_REPO"
      echo "revision: $(git -C "$PTFT_REPO" rev-parse HEAD 2>/dev/null)"
      echo "describe: $(git -C "$PTFT_REPO" describe --always --dirty 2>/dev/null)"
      echo "branch: $(git -C "$PTFT_REPO" rev-parse --abbrev-ref HEAD 2>/dev/null)"
      echo "status:"
      git -C "$PTFT_REPO" status --short 2>/dev/null | sed 's/^/  /'
    } >"$dir/git.txt"
    git -C "$PTFT_REPO" diff HEAD >"$dir/git.diff" 2>/dev/null || true
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
