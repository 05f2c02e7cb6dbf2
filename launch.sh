#!/usr/bin/env bash
# One launcher front for ptft: the same program line from a laptop debug run to a many-node job.
#
#   ./launch.sh [MODE] [options] -- PROGRAM [ARGS...]
#
# Run ./launch.sh --help for the modes and options. PROGRAM `ptft` runs as
# `<venv python> -m ptft_dist.cli`, so remote ranks do not depend on PATH; `python`/`python3`
# become the venv's python too. Arguments pass through bash arrays untouched (spaces, quotes).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODES=(auto debug deepspeed accelerate torchrun srun mpirun)

usage() {
  cat <<'EOF'
usage: ./launch.sh [MODE] [options] -- PROGRAM [ARGS...]

MODE (default auto):
  debug       one process, no launcher
  deepspeed   the deepspeed launcher (local, or --hostfile over pdsh / --launcher openmpi|slurm)
  accelerate  accelerate launch (--multi_gpu for N > 1 processes; --cpu for one CPU process)
  torchrun    torchrun (--standalone on one node, else --nnodes/--rdzv_*)
  srun        srun inside a SLURM allocation: one task per GPU (or --ntasks / --ntasks-per-node)
  mpirun      OpenMPI mpirun (ranks found through mpi4py)
  auto        srun inside an allocation (SLURM_JOB_ID set), else deepspeed when > 1 GPU, else debug

options (all modes):
  --nproc N              processes per node (deepspeed --num_gpus, torchrun --nproc_per_node,
                         srun --ntasks-per-node), or in all (accelerate --num_processes, mpirun -np)
  --dry-run              print the command (shell-quoted) instead of running it
  --launcher-arg ARG     pass ARG to the launcher itself (repeatable)
  -h, --help             this text
deepspeed:   --hostfile F  --num_nodes N  --num_gpus N  --include S  --exclude S
             --launcher pdsh|openmpi|slurm  --launcher_args S  --master_addr A  --master_port P
             --ssh_port P  --oversubscribe (openmpi)
             (deepspeed's openmpi runner adds --mca btl_tcp_if_include eth0 unless --launcher_args names
             an interface; multi-host runs write .deepspeed_env in the working directory first)
torchrun:    --nproc_per_node N  --nnodes N|MIN:MAX  --node_rank R  --rdzv_backend B  --rdzv_endpoint H:P
             --rdzv_id ID  --master_addr A  --master_port P  --max_restarts N
accelerate:  --num_processes N  --num_machines N  --machine_rank R  --main_process_ip A
             --main_process_port P  --cpu  --multi_gpu  --mixed_precision no|fp16|bf16  --config_file F
srun:        --ntasks N  --ntasks-per-node N  --nodes N  --mpi TYPE
mpirun:      -np N  --hostfile F  --oversubscribe
Option names take '-' or '_' alike, and --opt VALUE or --opt=VALUE.

PROGRAM: `ptft ...` (-> <python> -m ptft_dist.cli ...), `python [-u] -m MODULE ...`,
`python SCRIPT.py ...`, `SCRIPT.py ...`, or any executable.
Hostfiles hold `HOST slots=N` lines (# comments and blank lines allowed).
Environment: PTFT_PYTHON (interpreter), PTFT_NUM_GPUS (GPU count instead of nvidia-smi -L),
PTFT_MASTER_PORT / PTFT_MASTER_ADDR (see ptft_dist/dist/discover.py).
EOF
}

die_usage() {
  echo "launch.sh: error: $*" >&2
  usage >&2
  exit 2
}
die() {
  echo "launch.sh: error: $*" >&2
  exit 2
}
note() { echo "launch.sh: $*" >&2; }

# ------------------------------------------------------------------ interpreter and devices
if [[ -n ${PTFT_PYTHON:-} ]]; then
  PY=$PTFT_PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then
  PY=$REPO/.venv/bin/python
elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
  PY=$VIRTUAL_ENV/bin/python
else
  PY=$(command -v python3 || command -v python || echo python3)
fi

gpu_count() {
  if [[ -n ${PTFT_NUM_GPUS:-} ]]; then
    echo "$PTFT_NUM_GPUS"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# the helpers in ptft_dist/dist/ that launch.sh shares with the ranks (one implementation each)
DIST=("$PY" "$REPO/ptft_dist/dist/__main__.py")

slurm_gpus_per_node() {  # GPUs per node of the current allocation, or empty (none, or 0)
  "${DIST[@]}" --gpus-per-node || die "cannot read the GPU count of the SLURM allocation"
}

# ------------------------------------------------------------------ arguments
MODE=auto
if (($#)) && [[ $1 != -* ]]; then
  MODE=$1
  shift
  valid=0
  for m in "${MODES[@]}"; do [[ $m == "$MODE" ]] && valid=1; done
  ((valid)) || die_usage "unknown mode '$MODE' (one of: ${MODES[*]})"
fi

declare -A OPT=()          # canonical option name (with '-') -> value
DRY_RUN=0
LAUNCHER_ARGS=()
PROG=()
SAW_SEP=0
# options that take a value / flags, by canonical name
VALUE_OPTS=" nproc launcher-arg hostfile num-nodes num-gpus include exclude launcher launcher-args master-addr"
VALUE_OPTS+=" master-port ssh-port nproc-per-node nnodes node-rank rdzv-backend rdzv-endpoint rdzv-id max-restarts"
VALUE_OPTS+=" num-processes num-machines machine-rank main-process-ip main-process-port mixed-precision config-file"
VALUE_OPTS+=" ntasks ntasks-per-node nodes mpi np "
FLAG_OPTS=" dry-run oversubscribe cpu multi-gpu help "

while (($#)); do
  arg=$1
  shift
  if [[ $arg == -- ]]; then
    SAW_SEP=1
    PROG=("$@")
    break
  fi
  case $arg in
    -h | --help) usage; exit 0 ;;
    -np) name=np; val_given=0 ;;
    --*=*) name=${arg%%=*}; name=${name#--}; name=${name//_/-}; val=${arg#*=}; val_given=1 ;;
    --*) name=${arg#--}; name=${name//_/-}; val_given=0 ;;
    *) die_usage "unexpected argument '$arg' (the program goes after --)" ;;
  esac
  if [[ $VALUE_OPTS == *" $name "* ]]; then
    if ((!val_given)); then
      if (($# == 0)) || [[ $1 == -- ]]; then die_usage "option $arg needs a value"; fi
      val=$1
      shift
    fi
    if [[ $name == launcher-arg ]]; then
      LAUNCHER_ARGS+=("$val")
    else
      [[ -z ${OPT[$name]+x} ]] || die_usage "option --$name given twice ('${OPT[$name]}', then '$val')"
      OPT[$name]=$val
    fi
  elif [[ $FLAG_OPTS == *" $name "* ]]; then
    ((val_given)) && die_usage "option --$name takes no value"
    if [[ $name == dry-run ]]; then DRY_RUN=1; else OPT[$name]=1; fi
  else
    die_usage "unknown option '$arg'"
  fi
done

((SAW_SEP)) || die_usage "missing '--' before the program"
((${#PROG[@]})) || die_usage "no program after '--'"

for name in nproc num-nodes num-gpus nproc-per-node node-rank max-restarts num-processes num-machines machine-rank \
  ntasks ntasks-per-node nodes np master-port ssh-port main-process-port; do
  if [[ -n ${OPT[$name]+x} && ! ${OPT[$name]} =~ ^[0-9]+$ ]]; then
    die_usage "--$name wants a non-negative integer, got '${OPT[$name]}'"
  fi
done
# counts of processes, nodes and tasks start at 1; ports are 1-65535; a rank is below its count
for name in nproc num-nodes num-gpus nproc-per-node num-processes num-machines ntasks ntasks-per-node nodes np; do
  if [[ -n ${OPT[$name]+x} ]] && ((10#${OPT[$name]} < 1)); then
    die_usage "--$name must be at least 1, got ${OPT[$name]}"
  fi
done
for name in master-port ssh-port main-process-port; do
  if [[ -n ${OPT[$name]+x} ]] && ((${#OPT[$name]} > 5 || 10#${OPT[$name]} < 1 || 10#${OPT[$name]} > 65535)); then
    die_usage "--$name must be a port number (1-65535), got ${OPT[$name]}"
  fi
done
for pair in node-rank:nnodes machine-rank:num-machines; do
  rank=${pair%%:*} count=${pair#*:}
  if [[ -n ${OPT[$rank]+x} && ${OPT[$count]:-1} =~ ^[0-9]+$ ]] && ((10#${OPT[$rank]} >= 10#${OPT[$count]:-1})); then
    die_usage "--$rank ${OPT[$rank]} is not below --$count ${OPT[$count]:-1}"
  fi
done
if [[ -n ${OPT[mixed-precision]+x} && ! ${OPT[mixed-precision]} =~ ^(no|fp16|bf16)$ ]]; then
  die_usage "--mixed-precision must be no, fp16 or bf16 (got '${OPT[mixed-precision]}')"
fi
if [[ -n ${OPT[config-file]+x} && ! -f ${OPT[config-file]} ]]; then
  die "--config-file ${OPT[config-file]} does not exist"
fi

# ------------------------------------------------------------------ auto
if [[ $MODE == auto ]]; then
  if [[ -n ${SLURM_JOB_ID:-} && -z ${SLURM_STEP_ID:-} ]]; then
    MODE=srun
    note "auto: inside SLURM job $SLURM_JOB_ID -> srun"
  elif [[ -n ${SLURM_STEP_ID:-} ]]; then
    MODE=debug
    note "auto: already inside SLURM step $SLURM_JOB_ID.$SLURM_STEP_ID -> debug"
  else
    ngpu=$(gpu_count)
    if ((ngpu > 1)); then
      MODE=deepspeed
      note "auto: $ngpu GPUs -> deepspeed"
    else
      MODE=debug
      note "auto: ${ngpu} GPU(s) -> debug"
    fi
  fi
fi

# which options each mode accepts (dry-run and launcher-arg are universal)
declare -A ALLOWED=(
  [debug]=" nproc "
  [deepspeed]=" nproc hostfile num-nodes num-gpus include exclude launcher launcher-args master-addr master-port ssh-port oversubscribe "
  [torchrun]=" nproc nproc-per-node nnodes node-rank rdzv-backend rdzv-endpoint rdzv-id master-addr master-port max-restarts "
  [accelerate]=" nproc num-processes num-machines machine-rank main-process-ip main-process-port mixed-precision config-file cpu multi-gpu "
  [srun]=" nproc ntasks ntasks-per-node nodes mpi "
  [mpirun]=" nproc np hostfile oversubscribe "
)
for name in "${!OPT[@]}"; do
  [[ ${ALLOWED[$MODE]} == *" $name "* ]] || die_usage "option --$name is not valid for mode $MODE"
done
opt() { [[ -n ${OPT[$1]+x} ]]; }

# ------------------------------------------------------------------ hostfile
HOSTS=()
check_hostfile() {  # validate $1 (HOST slots=N lines); fills HOSTS
  local file=$1 line n=0 host
  [[ -f $file && -r $file ]] || die "hostfile '$file' does not exist or is not readable"
  declare -A seen=()
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    line=${line%%#*}
    [[ $line =~ ^[[:space:]]*$ ]] && continue
    if [[ ! $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]]; then
      die "hostfile '$file' line $n: '${line}' is not 'HOST slots=N'"
    fi
    host=${BASH_REMATCH[1]}
    [[ -z ${seen[$host]+x} ]] || die "hostfile '$file' line $n: host '$host' listed twice"
    seen[$host]=1
    HOSTS+=("$host")
  done <"$file"
  ((${#HOSTS[@]})) || die "hostfile '$file' lists no hosts"
}

# ------------------------------------------------------------------ program
KIND=executable   # module | script | executable
INTERP=$PY
MODULE=""
SCRIPT=""
ARGS=()
EXEC=()
python_program() {  # $1 interpreter, rest its arguments
  INTERP=$1
  shift
  local rest=("$@")
  if [[ ${rest[0]:-} == -u ]]; then rest=("${rest[@]:1}"); fi
  if [[ ${rest[0]:-} == -m && ${#rest[@]} -ge 2 ]]; then
    KIND=module; MODULE=${rest[1]}; ARGS=("${rest[@]:2}")
  elif ((${#rest[@]})) && [[ ${rest[0]} != -* ]]; then
    KIND=script; SCRIPT=${rest[0]}; ARGS=("${rest[@]:1}")
  else
    KIND=executable; EXEC=("$INTERP" "$@")
  fi
}
case ${PROG[0]} in
  ptft) KIND=module; MODULE=ptft_dist.cli; ARGS=("${PROG[@]:1}") ;;
  python | python3 | python3.[0-9]*) python_program "$PY" "${PROG[@]:1}" ;;
  */python | */python3 | */python3.[0-9]*) python_program "${PROG[@]}" ;;
  *.py) KIND=script; SCRIPT=${PROG[0]}; ARGS=("${PROG[@]:1}") ;;
  *) KIND=executable; EXEC=("${PROG[@]}") ;;
esac

direct_program() {  # $1 = 1 for unbuffered python: fills P
  local u=()
  [[ ${1:-0} == 1 ]] && u=(-u)
  case $KIND in
    module) P=("$INTERP" "${u[@]}" -m "$MODULE" "${ARGS[@]}") ;;
    script) P=("$INTERP" "${u[@]}" "$SCRIPT" "${ARGS[@]}") ;;
    executable) P=("${EXEC[@]}") ;;
  esac
}
full_argv() {  # the program as one argv list for the --exec-b64 shim: fills P
  case $KIND in
    module) P=(-m "$MODULE" "${ARGS[@]}") ;;
    script) P=("$SCRIPT" "${ARGS[@]}") ;;
    executable) P=("${EXEC[@]}") ;;
  esac
}
shim_program() {  # the program through `python ptft_dist/dist/__main__.py --exec-b64 ...`: fills P
  full_argv
  local b64
  b64=$("${DIST[@]}" --encode-argv "${P[@]}") || die "cannot encode the program line"
  P=("$REPO/ptft_dist/dist/__main__.py" --exec-b64 "$b64")
}
shell_safe() {  # true when every program word passes a remote shell unquoted
  full_argv
  local a
  for a in "${P[@]}"; do
    [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]*$ ]] || return 1
  done
}

# ------------------------------------------------------------------ commands
CMD=()
PRE=()   # a command to run first (writing .deepspeed_env), shown on stderr in --dry-run
nproc=${OPT[nproc]:-}
P=()

case $MODE in
  debug)
    [[ -z $nproc || $nproc == 1 ]] || die_usage "debug runs one process (got --nproc $nproc)"
    direct_program 0
    CMD=("${P[@]}")
    ;;

  deepspeed)
    CMD=("$PY" -m deepspeed.launcher.runner)
    ds_launcher=${OPT[launcher]:-pdsh}
    case $ds_launcher in pdsh | openmpi | slurm) ;; *) die_usage "--launcher must be pdsh, openmpi or slurm (got '$ds_launcher')" ;; esac
    opt nproc && opt num-gpus && die_usage "give --nproc or --num_gpus, not both"
    ngpus=${OPT[num-gpus]:-$nproc}
    hostfile=${OPT[hostfile]:-}
    if [[ -z $hostfile && $ds_launcher == slurm ]]; then
      [[ -n ${SLURM_JOB_ID:-} ]] || die "deepspeed --launcher slurm needs --hostfile or a SLURM allocation (SLURM_JOB_ID)"
      slots=${ngpus:-${SLURM_NTASKS_PER_NODE:-$(slurm_gpus_per_node)}}
      slots=${slots:-1}
      hostfile=${TMPDIR:-/tmp}/ptft-hostfile-$SLURM_JOB_ID
      nodes=$("${DIST[@]}" --hostnames "${SLURM_JOB_NODELIST:-}") || die "cannot expand SLURM_JOB_NODELIST"
      gen_hostfile=""
      for h in $nodes; do gen_hostfile+="$h slots=$slots"$'\n'; done
      if ((DRY_RUN)); then
        note "would write $hostfile:"$'\n'"$gen_hostfile"
        mapfile -t HOSTS <<<"$nodes"
      else
        printf '%s' "$gen_hostfile" >"$hostfile"
      fi
    fi
    if [[ -n $hostfile ]]; then
      ((${#HOSTS[@]})) || check_hostfile "$hostfile"
      CMD+=(--hostfile "$hostfile")
    elif [[ $ds_launcher == openmpi ]]; then
      die "deepspeed --launcher openmpi needs --hostfile (HOST slots=N lines)"
    fi
    if [[ $ds_launcher != pdsh ]]; then
      for o in num-nodes include exclude; do
        [[ $ds_launcher == openmpi ]] && opt $o && die_usage "deepspeed --launcher openmpi does not support --${o//-/_}: use the hostfile"
      done
      [[ $ds_launcher == openmpi && -n $ngpus ]] && die_usage "deepspeed --launcher openmpi does not support --num_gpus/--nproc: use the hostfile slots"
    fi
    opt num-nodes && CMD+=(--num_nodes "${OPT[num-nodes]}")
    [[ -n $ngpus ]] && CMD+=(--num_gpus "$ngpus")
    opt include && CMD+=(--include "${OPT[include]}")
    opt exclude && CMD+=(--exclude "${OPT[exclude]}")
    multi=0
    if [[ $ds_launcher != pdsh ]]; then
      multi=1
      CMD+=(--launcher "$ds_launcher" --force_multi --no_ssh_check)
      # these runners start ranks that find their master themselves (mpi4py / SLURM): DeepSpeed
      # only needs some address so it does not ssh to the first host to ask for one.
      opt master-addr || OPT[master-addr]=${HOSTS[0]}
    elif ((${#HOSTS[@]} > 1)); then
      multi=1
    fi
    opt master-addr && CMD+=(--master_addr "${OPT[master-addr]}")
    opt master-port && CMD+=(--master_port "${OPT[master-port]}")
    opt ssh-port && CMD+=(--ssh_port "${OPT[ssh-port]}")
    largs=()
    if [[ $ds_launcher == openmpi ]]; then
      [[ $(id -u) == 0 ]] && largs+=(--allow-run-as-root)
      opt oversubscribe && largs+=(--oversubscribe)
    elif opt oversubscribe; then
      die_usage "--oversubscribe applies to deepspeed --launcher openmpi (or mode mpirun)"
    fi
    opt launcher-args && largs+=("${OPT[launcher-args]}")
    ((${#largs[@]})) && CMD+=(--launcher_args "${largs[*]}")
    CMD+=("${LAUNCHER_ARGS[@]}" --no_local_rank)
    if [[ $ds_launcher == slurm ]] || { ((multi)) && [[ $ds_launcher == pdsh ]] && ! shell_safe; }; then
      # deepspeed's slurm runner always runs `python -u SCRIPT` (no -m, no --no_python), and pdsh
      # hands arguments to a remote shell: the shim carries any program line intact.
      [[ $ds_launcher == pdsh ]] && note "program arguments need quoting over pdsh: passing them base64-encoded"
      shim_program
      CMD+=("${P[@]}")
    else
      case $KIND in
        module) CMD+=(--module "$MODULE" "${ARGS[@]}") ;;
        script) CMD+=("$SCRIPT" "${ARGS[@]}") ;;
        executable) CMD+=(--no_python "${EXEC[@]}") ;;
      esac
    fi
    if ((multi)); then
      PRE=("${DIST[@]}" --write-deepspeed-env .deepspeed_env)
    fi
    ;;

  accelerate)
    opt nproc && opt num-processes && die_usage "give --nproc or --num_processes, not both"
    opt cpu && opt multi-gpu && die_usage "give --cpu or --multi_gpu, not both"
    n=${OPT[num-processes]:-$nproc}
    ngpu=$(gpu_count)
    if [[ -z $n ]]; then n=$((ngpu > 0 ? ngpu : 1)); fi
    CMD=()
    hw=()
    if opt multi-gpu; then
      hw=(--multi_gpu)
    elif ((n > 1)); then
      # accelerate's --cpu path starts ONE process whatever --num_processes says; its --multi_gpu
      # path is torchrun, which on a CPU-only host gives gloo DDP.
      hw=(--multi_gpu)
      if opt cpu || ((ngpu == 0)); then
        CMD=(env ACCELERATE_USE_CPU=true)
      fi
    elif opt cpu || ((ngpu == 0)); then
      hw=(--cpu)
    fi
    CMD+=("$PY" -m accelerate.commands.launch "${hw[@]}" --num_processes "$n")
    CMD+=(--num_machines "${OPT[num-machines]:-1}")
    opt machine-rank && CMD+=(--machine_rank "${OPT[machine-rank]}")
    opt main-process-ip && CMD+=(--main_process_ip "${OPT[main-process-ip]}")
    opt main-process-port && CMD+=(--main_process_port "${OPT[main-process-port]}")
    CMD+=(--mixed_precision "${OPT[mixed-precision]:-no}" --dynamo_backend no)
    opt config-file && CMD+=(--config_file "${OPT[config-file]}")
    CMD+=("${LAUNCHER_ARGS[@]}")
    case $KIND in
      module) CMD+=(-m "$MODULE" "${ARGS[@]}") ;;
      script) CMD+=("$SCRIPT" "${ARGS[@]}") ;;
      executable) CMD+=(--no_python "${EXEC[@]}") ;;
    esac
    ;;

  torchrun)
    opt nproc && opt nproc-per-node && die_usage "give --nproc or --nproc_per_node, not both"
    n=${OPT[nproc-per-node]:-$nproc}
    if [[ -z $n ]]; then
      ngpu=$(gpu_count)
      n=$((ngpu > 0 ? ngpu : 1))
    fi
    CMD=("$PY" -m torch.distributed.run)
    nnodes=${OPT[nnodes]:-1}
    if [[ $nnodes == 1 ]] && ! opt rdzv-endpoint && ! opt master-addr; then
      CMD+=(--standalone)
    else
      CMD+=(--nnodes "$nnodes")
      opt node-rank && CMD+=(--node_rank "${OPT[node-rank]}")
      opt rdzv-backend && CMD+=(--rdzv_backend "${OPT[rdzv-backend]}")
      opt rdzv-endpoint && ! opt rdzv-backend && CMD+=(--rdzv_backend c10d)
      opt rdzv-endpoint && CMD+=(--rdzv_endpoint "${OPT[rdzv-endpoint]}")
      opt rdzv-id && CMD+=(--rdzv_id "${OPT[rdzv-id]}")
      opt master-addr && CMD+=(--master_addr "${OPT[master-addr]}")
      opt master-port && CMD+=(--master_port "${OPT[master-port]}")
    fi
    if opt master-port && [[ ${CMD[*]} != *--master_port* ]]; then
      die_usage "--master_port needs --master_addr or --nnodes > 1 (one node runs --standalone)"
    fi
    CMD+=(--nproc_per_node "$n")
    opt max-restarts && CMD+=(--max_restarts "${OPT[max-restarts]}")
    CMD+=("${LAUNCHER_ARGS[@]}")
    case $KIND in
      module) CMD+=(-m "$MODULE" "${ARGS[@]}") ;;
      script) CMD+=("$SCRIPT" "${ARGS[@]}") ;;
      executable) CMD+=(--no-python "${EXEC[@]}") ;;
    esac
    ;;

  srun)
    [[ -n ${SLURM_JOB_ID:-} ]] || die "mode srun runs inside a SLURM allocation (sbatch/salloc): SLURM_JOB_ID is not set"
    opt nproc && opt ntasks-per-node && die_usage "give --nproc or --ntasks-per-node, not both"
    CMD=(srun --kill-on-bad-exit=1)
    opt nodes && CMD+=(--nodes "${OPT[nodes]}")
    opt ntasks && CMD+=(--ntasks "${OPT[ntasks]}")
    tpn=${OPT[ntasks-per-node]:-$nproc}
    if [[ -z $tpn ]] && ! opt ntasks; then
      tpn=$(slurm_gpus_per_node)   # one task per GPU
      if [[ -z $tpn && -z ${SLURM_NTASKS_PER_NODE:-} ]]; then
        g=$(gpu_count)
        if ((g > 0)); then tpn=$g; fi
      fi
    fi
    if [[ -n $tpn ]]; then CMD+=(--ntasks-per-node "$tpn"); fi
    opt mpi && CMD+=(--mpi "${OPT[mpi]}")
    CMD+=("${LAUNCHER_ARGS[@]}")
    direct_program 1
    CMD+=("${P[@]}")
    ;;

  mpirun)
    opt nproc && opt np && die_usage "give --nproc or -np, not both"
    CMD=(mpirun)
    n=${OPT[np]:-$nproc}
    [[ -n $n ]] && CMD+=(-np "$n")
    if opt hostfile; then
      check_hostfile "${OPT[hostfile]}"
      CMD+=(--hostfile "${OPT[hostfile]}")
    fi
    [[ $(id -u) == 0 ]] && CMD+=(--allow-run-as-root)
    opt oversubscribe && CMD+=(--oversubscribe)
    if opt hostfile; then
      # remote ranks get only what -x forwards: the same allow-list as .deepspeed_env (one list,
      # ptft_dist/dist/launcher_env.py), with this venv first on PATH and this checkout on PYTHONPATH
      while IFS= read -r -d '' kv; do
        CMD+=(-x "$kv")
      done < <("${DIST[@]}" --forward-env)
    fi
    CMD+=("${LAUNCHER_ARGS[@]}")
    direct_program 1
    CMD+=("${P[@]}")
    ;;
esac

quoted() {
  local out="" a
  for a in "$@"; do out+="$(printf '%q' "$a") "; done
  printf '%s\n' "${out% }"
}

if ((DRY_RUN)); then
  if ((${#PRE[@]})); then note "would first run: $(quoted "${PRE[@]}")"; fi
  quoted "${CMD[@]}"
  exit 0
fi

# `python -m ptft_dist.cli` must import this checkout whatever the working directory (ranks inherit it)
case ":${PYTHONPATH:-}:" in
  *":$REPO:"*) ;;
  *) export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" ;;
esac

# Rank variables left in this shell (e.g. exported where sbatch ran) would reach every rank that
# srun/mpirun/deepspeed starts and contradict what those launchers say: drop them.
if [[ $MODE == srun || $MODE == mpirun || $MODE == deepspeed ]]; then
  for v in RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE NODE_RANK GROUP_RANK CROSS_RANK CROSS_SIZE LOCAL_SIZE PTFT_LAUNCHER; do
    if [[ -n ${!v+x} ]]; then
      note "unsetting $v=${!v} (the $MODE launcher assigns ranks)"
      unset "$v"
    fi
  done
fi
if ((${#PRE[@]})); then
  "${PRE[@]}" || die "could not write .deepspeed_env"
fi
exec "${CMD[@]}"
