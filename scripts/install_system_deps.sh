#!/usr/bin/env bash
# Install the system packages the test suite needs for a real local SLURM cluster,
# OpenMPI/PMIx and the ssh/pdsh multi-host tests (Debian 12 / bookworm, run as root).
#
# Idempotent and quiet: when every needed binary/library is already present it does not
# touch apt at all. A package that apt cannot provide, or that is still missing after the install,
# is an error naming it (exit 1): the tests that need it would otherwise fail later, less clearly.
#
#   sudo scripts/install_system_deps.sh          # or as root in CI
#   PTFT_APT_UPDATE=0 scripts/install_system_deps.sh   # skip `apt-get update`
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

log() { echo "[install_system_deps] $*" >&2; }

# package -> a file that proves it is installed
declare -A PROBE=(
  [slurmctld]=/usr/sbin/slurmctld
  [slurmd]=/usr/sbin/slurmd
  [slurm-client]=/usr/bin/sbatch
  [slurm-wlm]=/usr/bin/sinfo
  [munge]=/usr/sbin/munged
  [openmpi-bin]=/usr/bin/mpirun
  [libopenmpi-dev]=/usr/bin/mpicc
  [libpmix2]=/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so.2
  [iproute2]=/usr/sbin/ip
  [openssh-server]=/usr/sbin/sshd
  [pdsh]=/usr/bin/pdsh
)
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev libpmix2 iproute2 openssh-server pdsh)

present() {  # $1 = package: its probe file exists (or, without a probe, dpkg says installed)
  local probe=${PROBE[$1]:-}
  if [[ -z $probe ]]; then
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"
    return
  fi
  if [[ $1 == libpmix2 ]]; then
    # the library path depends on the architecture; fall back to dpkg
    compgen -G "/usr/lib/*/pmix2/lib/libpmix.so.2" >/dev/null && return 0
    dpkg-query -W -f='${Status}' libpmix2 2>/dev/null | grep -q "ok installed"
    return
  fi
  [[ -e $probe ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
  present "$p" || missing+=("$p")
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    log "missing packages: ${missing[*]}; run this script as root" && exit 1
  fi
  aptlog=$(mktemp)
  trap 'rm -f "$aptlog"' EXIT
  quiet() {  # run quietly; show the output only when the command fails
    "$@" >"$aptlog" 2>&1 || { cat "$aptlog" >&2; log "FAILED: $*"; exit 1; }
  }
  if [[ ${PTFT_APT_UPDATE:-1} != 0 ]]; then
    log "apt-get update"
    quiet apt-get update -qq
  fi
  unavailable=()
  for p in "${missing[@]}"; do
    apt-cache show "$p" >/dev/null 2>&1 || unavailable+=("$p")
  done
  if ((${#unavailable[@]})); then
    log "ERROR: apt cannot provide: ${unavailable[*]} (needed by the SLURM/MPI/multi-host tests);" \
      "add a source that has them (Debian 12: main) or install them by hand"
    exit 1
  fi
  log "installing: ${missing[*]}"
  start=$SECONDS
  quiet apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}"
  log "installed in $((SECONDS - start)) s"
  still=()
  for p in "${missing[@]}"; do
    present "$p" || still+=("$p")
  done
  if ((${#still[@]})); then
    log "ERROR: still missing after apt-get install: ${still[*]}"
    exit 1
  fi
fi

# System munge key (the test cluster uses its own private key; this is for a normal munged):
# generated once, owned by the munge user, mode 0400.
if [[ $(id -u) -ne 0 ]]; then
  :  # not root: nothing to fix up (the test cluster needs root anyway)
elif getent passwd munge >/dev/null; then
  key=/etc/munge/munge.key
  if [[ ! -s $key ]]; then
    log "generating $key"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$key" --force >/dev/null 2>&1 || dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    else
      dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    fi
  fi
  chown munge:munge "$key"
  chmod 0400 "$key"
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge 2>/dev/null || true
else
  log "WARNING: no 'munge' user; munge is not installed"
fi

exit 0
