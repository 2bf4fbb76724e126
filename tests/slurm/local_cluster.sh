#!/usr/bin/env bash
# A real one-machine SLURM cluster (Debian 12, SLURM 22.05) for integration tests.
#
#   bash tests/slurm/local_cluster.sh start    # install if needed, configure, start; idempotent
#   bash tests/slurm/local_cluster.sh stop     # stop what `start` started; idempotent
#   bash tests/slurm/local_cluster.sh status   # prints the sinfo line; exit 0 up, 1 down
#
# Environment (same values for start/stop/status):
#   MAE_SLURM_DIR     state dir: spool, logs, pid files                (default /tmp/mae-slurm)
#   MAE_SLURM_NODES   1: node "localhost"; 2: emulated nodes node1,node2 (default 2)
#   MAE_SLURM_CPUS    CPUs declared per node                            (default 4)
#   MAE_SLURM_MEM_MB  RealMemory declared per node, MB                  (default 16000)
#   MAE_SLURM_GPUS    fake GPUs (gres/gpu) per node: jobs may request them and see
#                     CUDA_VISIBLE_DEVICES, with no GPU behind it         (default 1; 0: none)
#
# Exit codes: 0 ok; 1 failure (`status`: down); 2 usage;
#   3 cannot run here (not root, no apt-get/dpkg, packages cannot be installed,
#     a SLURM controller this script did not start is running): tests should skip.
set -euo pipefail

DIR="${MAE_SLURM_DIR:-/tmp/mae-slurm}"
NODES="${MAE_SLURM_NODES:-2}"
CPUS="${MAE_SLURM_CPUS:-4}"
MEM_MB="${MAE_SLURM_MEM_MB:-16000}"
GPUS="${MAE_SLURM_GPUS:-1}"
CONF=/etc/slurm/slurm.conf            # where the daemons and clients read it
BACKUP=/etc/slurm/slurm.conf.mae-slurm-backup   # beside the original: survives a wiped /tmp
GRES_CONF=/etc/slurm/gres.conf
GRES_BACKUP=/etc/slurm/gres.conf.mae-slurm-backup
MARKER="# mae-local-slurm: written by tests/slurm/local_cluster.sh"
HOSTS_MARKER="# mae-local-slurm"
PKGS=(slurmctld slurmd slurm-client munge)

say() { echo "local_cluster: $*" >&2; }
die() { say "ERROR: $1"; exit "${2:-1}"; }
cant_run() { die "cannot run here: $1" 3; }

node_names() { if [[ "$NODES" == 2 ]]; then echo node1 node2; else echo localhost; fi; }

# PID runs and is named COMM (PIDs get reused). Zombies do not count: PID 1 on these
# machines reaps late, so a dead daemon lingers as <defunct> with its name.
proc_is() {  # pid comm
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ "$stat" == "$1 ($2) "* && "$stat" != "$1 ($2) Z"* ]]
}

pid_alive() {  # pidfile comm
  local pid
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && proc_is "$pid" "$2"
}

# PID files under $DIR/run are all ours: only our slurm.conf and munged command line
# point there. At least one slurmd, and every recorded one, must be alive.
daemons_alive() {
  local f n=0
  pid_alive "$DIR/run/slurmctld.pid" slurmctld || return 1
  for f in "$DIR"/run/slurmd-*.pid; do
    [[ -e "$f" ]] || continue
    pid_alive "$f" slurmd || return 1
    n=$((n + 1))
  done
  [[ $n -gt 0 ]]
}

# "NAME STATE" per node; timeout because clients retry for MessageTimeout when the
# controller is gone.
sinfo_nodes() { timeout 15 sinfo -h -N -o '%N %T' 2>/dev/null; }

cluster_up() {
  local out
  daemons_alive || return 1
  grep -qxF "$MARKER" "$CONF" 2>/dev/null || return 1
  out="$(sinfo_nodes)" && [[ -n "$out" ]] || return 1
  # Usable node states; down/drain/unknown/not_responding are not.
  ! grep -vqE ' (idle|mixed|allocated|completing)$' <<<"$out"
}

have_packages() {
  local p
  for p in "${PKGS[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == "install ok installed" ]] || return 1
  done
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null
}

install_packages() {
  have_packages && return 0
  command -v apt-get >/dev/null || cant_run "SLURM packages missing and no apt-get"
  local t0=$SECONDS
  say "installing ${PKGS[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$DIR/log/apt.log" 2>&1 \
    || cant_run "apt-get update failed (see $DIR/log/apt.log)"
  # --no-install-recommends: 6-8 packages (~10 s) instead of 43 for slurm-wlm.
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >>"$DIR/log/apt.log" 2>&1 \
    || cant_run "apt-get install ${PKGS[*]} failed (see $DIR/log/apt.log)"
  have_packages || cant_run "packages still missing after apt-get install"
  say "installed in $((SECONDS - t0)) s"
}

# Fake GPUs: gres/gpu needs a character device per GPU (regular files are refused); one
# that reads like /dev/null will do, since nothing opens it. Falls back to no GPUs.
make_fake_gpus() {
  local n i f
  [[ "$GPUS" -gt 0 ]] || return 0
  mkdir -p "$DIR/gpu"
  for n in $(node_names); do
    for ((i = 0; i < GPUS; i++)); do
      f="$DIR/gpu/$n-nvidia$i"
      [[ -c "$f" ]] && continue
      rm -f "$f"
      if ! mknod -m 0666 "$f" c 1 3 2>/dev/null; then
        say "cannot create fake GPU device files here (mknod failed): no GPUs"
        GPUS=0
        return 0
      fi
    done
  done
}

gen_gres_conf() {
  local n i
  echo "$MARKER"
  for n in $(node_names); do
    for ((i = 0; i < GPUS; i++)); do
      echo "NodeName=$n Name=gpu File=$DIR/gpu/$n-nvidia$i"
    done
  done
}

gen_slurm_conf() {
  local nodeline
  if [[ "$NODES" == 2 ]]; then
    # Several slurmd on one host: each its own name and port; %n below gives each its
    # own spool, pid and log file.
    nodeline="NodeName=node[1-2] NodeAddr=127.0.0.1 Port=[17001-17002]"
  else
    nodeline="NodeName=localhost NodeAddr=127.0.0.1"
  fi
  if [[ "$GPUS" -gt 0 ]]; then
    nodeline+=" Gres=gpu:$GPUS"
  fi
  cat <<EOF
$MARKER
# State dir $DIR; rewritten on every start, the original (if any) is restored by stop.
ClusterName=maelocal
SlurmctldHost=localhost
SlurmctldAddr=127.0.0.1
SlurmUser=root
AuthType=auth/munge
# Short credential life + frequent scheduler passes: a requeued job runs again after
# ~12 s instead of waiting ~160 s in PENDING.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
# No cgroups on these machines.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
# submitit ignores SIGTERM: its tasks die only after KillWait.
KillWait=5
# Slow answers under load otherwise end in "Socket timed out".
MessageTimeout=30
# Let the node declare more CPUs/memory than the machine has, so that jobs asking for
# --cpus-per-task/--mem like on a real cluster run (memory is not enforced: CR_CPU).
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
GresTypes=gpu
$nodeline CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

install_slurm_conf() {
  mkdir -p /etc/slurm
  # Keep a slurm.conf we did not write; stop puts it back.
  if [[ -e "$CONF" ]] && ! grep -qxF "$MARKER" "$CONF" && [[ ! -e "$BACKUP" ]]; then
    cp -p "$CONF" "$BACKUP"
    say "backed up existing $CONF to $BACKUP"
  fi
  install -m 0644 "$DIR/slurm.conf" "$CONF"
  if [[ -e "$GRES_CONF" ]] && ! grep -qxF "$MARKER" "$GRES_CONF" && [[ ! -e "$GRES_BACKUP" ]]; then
    cp -p "$GRES_CONF" "$GRES_BACKUP"
    say "backed up existing $GRES_CONF to $GRES_BACKUP"
  fi
  install -m 0644 "$DIR/gres.conf" "$GRES_CONF"
}

# Both files as this configuration wants them.
conf_current() { cmp -s "$DIR/slurm.conf" "$CONF" && cmp -s "$DIR/gres.conf" "$GRES_CONF"; }

# Emulated node names must resolve.
add_hosts_entry() {
  [[ "$NODES" == 2 ]] || return 0
  grep -qF "$HOSTS_MARKER" /etc/hosts || echo "127.0.0.1 node1 node2 $HOSTS_MARKER" >>/etc/hosts
}

remove_hosts_entry() {
  grep -qF "$HOSTS_MARKER" /etc/hosts 2>/dev/null || return 0
  local rest
  rest="$(grep -vF "$HOSTS_MARKER" /etc/hosts || true)"
  # Rewrite in place: /etc/hosts may be a bind mount that cannot be replaced.
  printf '%s\n' "$rest" >/etc/hosts
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  munge_ok && return 0   # ours from earlier, or a system one: reuse, do not record
  if [[ ! -s /etc/munge/munge.key ]]; then   # the package normally creates it
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  # No systemd: nobody creates the socket dir.
  install -d -o munge -g munge -m 0755 /run/munge
  # munged (as munge) writes pid/log/seed only into a dir it owns.
  install -d -o munge -g munge -m 0700 "$DIR/munge"
  rm -f "$DIR/munge/munged.pid"
  # 9>&-: a daemon inheriting the lock fd would hold the lock forever.
  runuser -u munge -- /usr/sbin/munged --force --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" 9>&- \
    || die "munged failed to start (see $DIR/munge/munged.log)"
  local i
  for i in $(seq 50); do munge_ok && break; sleep 0.2; done
  munge_ok || die "munge does not answer (see $DIR/munge/munged.log)"
  cp "$DIR/munge/munged.pid" "$DIR/run/munged.pid"
}

wait_pidfile() {  # pidfile comm logfile
  local i
  for i in $(seq 100); do pid_alive "$1" "$2" && return 0; sleep 0.1; done
  die "$2 did not start (see $3)"
}

start_slurm_daemons() {
  local n
  if ! pid_alive "$DIR/run/slurmctld.pid" slurmctld; then
    rm -f "$DIR/run/slurmctld.pid"
    # -c: clean job/node state, no leftovers from an earlier run. Daemonizes itself.
    slurmctld -c </dev/null >>"$DIR/log/slurmctld.out" 2>&1 9>&- \
      || die "slurmctld failed to start (see $DIR/log/slurmctld.log)"
    wait_pidfile "$DIR/run/slurmctld.pid" slurmctld "$DIR/log/slurmctld.log"
  fi
  for n in $(node_names); do
    pid_alive "$DIR/run/slurmd-$n.pid" slurmd && continue
    rm -f "$DIR/run/slurmd-$n.pid"
    mkdir -p "$DIR/slurmd/$n"
    slurmd -N "$n" </dev/null >>"$DIR/log/slurmd-$n.out" 2>&1 9>&- \
      || die "slurmd -N $n failed to start (see $DIR/log/slurmd-$n.log)"
    wait_pidfile "$DIR/run/slurmd-$n.pid" slurmd "$DIR/log/slurmd-$n.log"
  done
}

wait_idle() {
  local i out=""
  for i in $(seq 60); do
    daemons_alive || die "a SLURM daemon died during start (see $DIR/log/)"
    out="$(sinfo_nodes || true)"
    if [[ -n "$out" ]] && ! grep -vqE ' idle$' <<<"$out" \
       && [[ "$(wc -l <<<"$out")" -eq "$(node_names | wc -w)" ]]; then
      return 0
    fi
    # ReturnToService=2 should bring nodes back; nudge any left down anyway.
    if grep -qE ' (down|drained|draining)' <<<"$out"; then
      timeout 15 scontrol update NodeName=ALL State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 1
  done
  die "nodes not idle after 60 s: ${out:-no sinfo output} (see $DIR/log/)"
}

stop_pid() {  # pidfile comm
  local pid i
  if pid_alive "$1" "$2"; then
    pid="$(cat "$1")"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 150); do proc_is "$pid" "$2" || break; sleep 0.1; done
    if proc_is "$pid" "$2"; then
      say "$2 (pid $pid) still there 15 s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for i in $(seq 50); do proc_is "$pid" "$2" || break; sleep 0.1; done
    fi
    say "stopped $2 (pid $pid)"
  fi
  rm -f "$1"
}

descendants() {  # pid -> its descendants, deepest first
  local c
  for c in $(pgrep -P "$1" || true); do descendants "$c"; echo "$c"; done
}

# Job steps that outlived slurmd (controller gone, scancel failed). Ours keep our
# slurmd log open, which tells them apart from another cluster's.
kill_leftover_steps() {
  local p fd
  for p in $(pgrep -x slurmstepd || true); do
    proc_is "$p" slurmstepd || continue
    for fd in /proc/"$p"/fd/*; do
      if [[ "$(readlink "$fd" 2>/dev/null)" == "$DIR"/log/slurmd-* ]]; then
        # shellcheck disable=SC2046
        kill -KILL $(descendants "$p") "$p" 2>/dev/null || true
        say "killed leftover slurmstepd (pid $p) and its tasks"
        break
      fi
    done
  done
}

# Cancel jobs (their tasks would outlive slurmd), then slurmd(s), then slurmctld.
stop_slurm_daemons() {
  local f i jobs
  if pid_alive "$DIR/run/slurmctld.pid" slurmctld && grep -qxF "$MARKER" "$CONF" 2>/dev/null; then
    jobs="$(timeout 15 squeue -h -o %i 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
      # shellcheck disable=SC2086
      timeout 15 scancel $jobs >/dev/null 2>&1 || true
      for i in $(seq 30); do   # KillWait=5 plus margin
        [[ -z "$(timeout 15 squeue -h -o %i 2>/dev/null || true)" ]] && break
        sleep 0.5
      done
    fi
  fi
  for f in "$DIR"/run/slurmd-*.pid; do
    [[ -e "$f" ]] && stop_pid "$f" slurmd
  done
  kill_leftover_steps
  stop_pid "$DIR/run/slurmctld.pid" slurmctld
}

lock_state_dir() {
  # Serialises concurrent calls (e.g. several test workers).
  exec 9>"$DIR/lock"
  flock -w 180 9 || die "could not lock $DIR/lock within 180 s"
}

cmd_start() {
  [[ "$(id -u)" -eq 0 ]] || cant_run "must be root (installs packages, writes $CONF, starts daemons)"
  command -v dpkg-query >/dev/null || cant_run "no dpkg (not a Debian system)"
  [[ "$NODES" == 1 || "$NODES" == 2 ]] || die "MAE_SLURM_NODES must be 1 or 2" 2
  [[ "$GPUS" =~ ^[0-9]+$ ]] || die "MAE_SLURM_GPUS must be a number of GPUs per node" 2
  mkdir -p "$DIR"/{run,log,ctld,slurmd,jobs}
  lock_state_dir
  make_fake_gpus
  gen_slurm_conf >"$DIR/slurm.conf"
  gen_gres_conf >"$DIR/gres.conf"

  if cluster_up && conf_current; then
    say "already up: $(sinfo_nodes | tr '\n' ' ')"
    return 0
  fi
  local t0=$SECONDS p ours out
  install_packages
  # A controller that is not ours would fight over ports and slurm.conf.
  ours="$(cat "$DIR/run/slurmctld.pid" 2>/dev/null || true)"
  for p in $(pgrep -x slurmctld || true); do
    proc_is "$p" slurmctld || continue
    [[ "$p" == "$ours" ]] || cant_run "a slurmctld not started by this script is running (pid $p)"
  done
  # Running with another configuration (other MAE_SLURM_* values): restart from scratch.
  if ! conf_current; then
    stop_slurm_daemons
  fi
  install_slurm_conf
  add_hosts_entry
  start_munge
  local t1=$SECONDS
  start_slurm_daemons
  wait_idle
  out="$(timeout 60 srun -n 2 hostname 2>&1 9>&-)" || die "srun -n 2 hostname failed: $out"
  [[ "$(wc -l <<<"$out")" -eq 2 ]] || die "srun -n 2 hostname printed: $out"
  say "up in $((SECONDS - t1)) s (total $((SECONDS - t0)) s): $(sinfo_nodes | tr '\n' ' ')"
}

cmd_stop() {
  [[ "$(id -u)" -eq 0 ]] || cant_run "must be root"
  [[ -d "$DIR" ]] || { say "nothing to stop"; return 0; }
  lock_state_dir
  stop_slurm_daemons
  stop_pid "$DIR/run/munged.pid" munged
  # Leave /etc as found: the original slurm.conf back, or none.
  if [[ -e "$BACKUP" ]]; then
    mv -f "$BACKUP" "$CONF"
    say "restored original $CONF"
  elif grep -qxF "$MARKER" "$CONF" 2>/dev/null; then
    rm -f "$CONF"
  fi
  if [[ -e "$GRES_BACKUP" ]]; then
    mv -f "$GRES_BACKUP" "$GRES_CONF"
    say "restored original $GRES_CONF"
  elif grep -qxF "$MARKER" "$GRES_CONF" 2>/dev/null; then
    rm -f "$GRES_CONF"
  fi
  remove_hosts_entry
}

cmd_status() {
  if cluster_up; then
    echo "up: $(sinfo_nodes | tr '\n' ' ')gres: $(timeout 15 sinfo -h -o %G 2>/dev/null | sort -u | tr '\n' ' ')"
    return 0
  fi
  if daemons_alive; then
    echo "down: daemons running, nodes not usable: $(sinfo_nodes | tr '\n' ' ')"
  else
    echo "down: daemons not running (state dir $DIR)"
  fi
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status  (env: MAE_SLURM_DIR MAE_SLURM_NODES MAE_SLURM_CPUS MAE_SLURM_MEM_MB MAE_SLURM_GPUS)" >&2
     exit 2 ;;
esac
