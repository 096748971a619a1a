#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost (Debian/Ubuntu packages, no systemd needed).
#
#   scripts/slurm_cluster.sh install    # apt-get install slurmctld slurmd slurm-client munge (+ slurmdbd mariadb-server)
#   scripts/slurm_cluster.sh start      # write the configs, start the daemons, wait until the node is idle
#   scripts/slurm_cluster.sh status     # exit 0 iff the node is idle/mixed/allocated
#   scripts/slurm_cluster.sh stop       # stop the daemons, keep the configs
#   scripts/slurm_cluster.sh selftest   # srun, sbatch, 2-task srun, scontrol requeue, sacct
#
# Environment: SLURM_CLUSTER_WAIT   seconds to wait for the node to become idle (default 30)
#              SLURM_CLUSTER_ACCOUNTING=0   no slurmdbd/MariaDB: sacct then fails, so submitit
#                                           reports every job as UNKNOWN and never sees a crash
set -euo pipefail
# Debian keeps the daemons in /usr/sbin, which is not on a normal user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

readonly MARKER="# Written by dynconv scripts/slurm_cluster.sh"
readonly CONF_DIR=/etc/slurm
readonly CONF="$CONF_DIR/slurm.conf"
readonly DBD_CONF="$CONF_DIR/slurmdbd.conf"
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_PID=/run/munge/munged.pid
readonly CTLD_PID=/run/slurmctld.pid
readonly SLURMD_PID=/run/slurmd.pid
readonly DBD_PID=/run/slurmdbd.pid
# Present while MariaDB runs because we started it (stop then stops it too).
readonly MARIADB_OURS=/run/dynconv-slurm-mariadb
readonly LOG_DIR=/var/log/slurm
readonly CTLD_SPOOL=/var/spool/slurmctld
readonly SLURMD_SPOOL=/var/spool/slurmd
readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly ACCT_PACKAGES=(slurmdbd mariadb-server)
readonly ACCOUNTING="${SLURM_CLUSTER_ACCOUNTING:-1}"
readonly WAIT_S="${SLURM_CLUSTER_WAIT:-30}"
HOST="$(hostname -s)"
readonly HOST

say() { printf '[slurm_cluster] %s\n' "$*"; }
# die MESSAGE [EXIT_CODE]
die() { printf '[slurm_cluster] ERROR: %s\n' "$1" >&2; exit "${2:-1}"; }

usage() {
    sed -n '2,12s/^# \{0,1\}//p' "$0"
    exit 2
}

# Re-run the whole script as root: daemons, /etc and /run all need it.
ensure_root() {
    [[ $EUID -eq 0 ]] && return 0
    command -v sudo >/dev/null 2>&1 \
        || die "'$1' must run as root, and sudo is not available" 2
    say "not root: re-running '$1' with sudo"
    exec sudo -E bash "$0" "$1"
}

# Concurrent callers (e.g. pytest-xdist workers) must not start the daemons twice.
take_lock() {
    exec 9>/run/lock/dynconv-slurm_cluster.lock
    flock -w 300 9 || die "could not take /run/lock/dynconv-slurm_cluster.lock"
}

# have BINARY...: all are on PATH.
have() {
    local b
    for b in "$@"; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
}

have_binaries() {
    have slurmctld slurmd sinfo munged
}

have_acct_binaries() {
    have slurmdbd sacctmgr mariadbd mysqladmin
}

accounting_on() {
    [[ "$ACCOUNTING" != 0 ]] && have_acct_binaries
}

installed() {
    have_binaries && { [[ "$ACCOUNTING" == 0 ]] || have_acct_binaries; }
}

# ---------------------------------------------------------------- install

# apt_install PACKAGE...: apt-get update only when the plain install fails.
apt_install() {
    local apt=(apt-get install -y --no-install-recommends "$@")
    say "installing $*"
    "${apt[@]}" && return 0
    say "install failed; retrying after apt-get update"
    apt-get update || return 1
    "${apt[@]}"
}

cmd_install() {
    if installed; then
        say "already installed: $(slurmd -V)"
        return 0
    fi
    ensure_root install
    take_lock
    export DEBIAN_FRONTEND=noninteractive
    if ! have_binaries; then
        apt_install "${PACKAGES[@]}" || die "apt-get install ${PACKAGES[*]} failed" 3
        have_binaries || die "packages installed but slurmctld/slurmd/sinfo/munged not on PATH" 3
    fi
    if [[ "$ACCOUNTING" != 0 ]] && ! have_acct_binaries; then
        # The cluster works without accounting; only sacct (and so submitit's job states) suffers.
        apt_install "${ACCT_PACKAGES[@]}" \
            || say "WARNING: could not install ${ACCT_PACKAGES[*]}; the cluster will run without sacct"
    fi
    say "installed: $(slurmd -V)$(accounting_on && echo ', with slurmdbd accounting')"
}

# ---------------------------------------------------------------- config

mem_mb() {
    awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.8 }' /proc/meminfo
}

render_slurm_conf() {
    local cpus mem defmem
    # GNU nproc honours OMP_NUM_THREADS (set to 1 by `make test`); the node needs the real count.
    cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
    mem="$(mem_mb)"
    # Without a default, each job would be given the whole node's memory
    # and jobs could never share the node.
    defmem=$(( mem / cpus ))
    cat <<EOF
$MARKER
ClusterName=dynconv
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# A requeued job is restarted by the backfill pass (default every 30 s); keep requeue tests quick.
SchedulerParameters=bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=${defmem}
ReturnToService=2
JobRequeue=1
JobAcctGatherType=jobacct_gather/none
$(accounting_lines)
JobCompType=jobcomp/none
MailProg=/bin/true
StateSaveLocation=${CTLD_SPOOL}
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

# sacct needs slurmdbd; submitit polls sacct for every job state.
accounting_lines() {
    if accounting_on; then
        printf '%s\n' AccountingStorageType=accounting_storage/slurmdbd AccountingStorageHost=localhost
    else
        echo AccountingStorageType=accounting_storage/none
    fi
}

# slurmdbd runs as root and reaches MariaDB as its root user over the unix socket
# (Debian's default unix_socket authentication), so no password is stored anywhere.
write_slurmdbd_conf() {
    backup_foreign "$DBD_CONF"
    cat >"$DBD_CONF" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=${LOG_DIR}/slurmdbd.log
PidFile=${DBD_PID}
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    # slurmdbd refuses a config that others can read.
    chmod 0600 "$DBD_CONF"
}

write_slurm_conf() {
    backup_foreign "$CONF"
    render_slurm_conf >"$CONF"
    chmod 0644 "$CONF"
    say "wrote $CONF ($(grep -o 'CPUs=[0-9]* RealMemory=[0-9]*' "$CONF"))"
}

# Keep a config that someone else wrote; ours (with the marker) is simply replaced.
backup_foreign() {
    local f="$1"
    [[ -e "$f" ]] || return 0
    grep -qxF "$MARKER" "$f" && return 0
    local bak
    bak="$f.bak.$(date +%Y%m%d-%H%M%S)"
    cp -p "$f" "$bak"
    say "backed up existing $f to $bak"
}

prepare_dirs() {
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    # munged refuses to start unless these belong to the munge user.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
}

ensure_munge_key() {
    if [[ ! -s "$MUNGE_KEY" ]]; then
        say "creating $MUNGE_KEY"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
}

# ---------------------------------------------------------------- daemons

# pid_alive PIDFILE NAME: the pid file names a live process called NAME.
pid_alive() {
    local pidfile="$1" name="$2" pid
    [[ -r "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]
}

daemon_running() {
    local pidfile="$1" name="$2"
    pid_alive "$pidfile" "$name" || pgrep -x "$name" >/dev/null 2>&1
}

# wait_for SECONDS CMD...: poll CMD every 0.5 s.
wait_for() {
    local deadline=$(( SECONDS + $1 )); shift
    until "$@"; do
        (( SECONDS < deadline )) || return 1
        sleep 0.5
    done
}

start_munge() {
    if daemon_running "$MUNGE_PID" munged; then
        say "munged already running"
        return 0
    fi
    say "starting munged"
    # 9>&- here and below: a daemon must not inherit (and so hold forever) the lock.
    # Containers often have lax permissions on / or /run that munged rejects; --force accepts them.
    if ! runuser -u munge -- munged 2>"$LOG_DIR/munged.start.err" 9>&-; then
        say "munged refused to start ($(tr '\n' ' ' <"$LOG_DIR/munged.start.err")); retrying with --force"
        runuser -u munge -- munged --force 9>&- || die "munged failed to start (see /var/log/munge/munged.log)"
    fi
    wait_for 10 munge_works || die "munge does not work: 'munge -n | unmunge' fails"
}

munge_works() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

mariadb_up() {
    mysqladmin --silent ping >/dev/null 2>&1
}

start_mariadb() {
    if mariadb_up; then
        say "MariaDB already running"
        return 0
    fi
    say "starting MariaDB"
    /etc/init.d/mariadb start 9>&- >/dev/null || die "MariaDB failed to start (see /var/log/mysql/)"
    touch "$MARIADB_OURS"
    wait_for 30 mariadb_up || die "MariaDB does not answer 'mysqladmin ping'"
}

sacctmgr_ok() {
    timeout 10 sacctmgr -n list cluster >/dev/null 2>&1
}

start_slurmdbd() {
    if daemon_running "$DBD_PID" slurmdbd; then
        say "slurmdbd already running"
    else
        say "starting slurmdbd"
        slurmdbd 9>&- || die "slurmdbd failed to start (see $LOG_DIR/slurmdbd.log)"
    fi
    # The first start creates the database tables, which takes a few seconds.
    wait_for 60 sacctmgr_ok || die "slurmdbd does not answer sacctmgr (see $LOG_DIR/slurmdbd.log)"
    if ! timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx dynconv; then
        timeout 10 sacctmgr -i add cluster dynconv >/dev/null || die "sacctmgr add cluster dynconv failed"
    fi
}

start_slurmctld() {
    if daemon_running "$CTLD_PID" slurmctld; then
        say "slurmctld already running"
        return 0
    fi
    say "starting slurmctld"
    slurmctld 9>&- || die "slurmctld failed to start (see $LOG_DIR/slurmctld.log)"
    wait_for 15 scontrol ping >/dev/null 2>&1 \
        || die "slurmctld does not answer 'scontrol ping' (see $LOG_DIR/slurmctld.log)"
}

start_slurmd() {
    if daemon_running "$SLURMD_PID" slurmd; then
        say "slurmd already running"
        return 0
    fi
    say "starting slurmd"
    slurmd 9>&- || die "slurmd failed to start (see $LOG_DIR/slurmd.log)"
}

# Node state as sinfo prints it, e.g. idle, idle*, down, drained, mixed.
node_state() {
    sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1
}

node_usable() {
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

wait_idle() {
    local deadline=$(( SECONDS + WAIT_S )) state resumed=0
    while (( SECONDS < deadline )); do
        state="$(node_state)"
        case "$state" in
            idle|mixed|allocated|completing) return 0 ;;
            down|drained|draining|drain|fail)
                if (( ! resumed )); then
                    say "node is $state; resuming it"
                    scontrol update nodename="$HOST" state=resume || true
                    resumed=1
                fi ;;
        esac
        sleep 1
    done
    say "node state after ${WAIT_S}s: '$(node_state)'"
    scontrol show node "$HOST" 2>/dev/null | grep -E 'State|Reason' || true
    return 1
}

cluster_up() {
    daemon_running "$MUNGE_PID" munged || return 1
    if accounting_on; then
        daemon_running "$DBD_PID" slurmdbd || return 1
    fi
    daemon_running "$CTLD_PID" slurmctld && daemon_running "$SLURMD_PID" slurmd && node_usable
}

cmd_start() {
    have_binaries || die "SLURM is not installed; run: $0 install"
    if ! cluster_up; then
        ensure_root start
        take_lock
    fi
    if cluster_up; then
        say "already running; node $HOST is $(node_state)"
        cmp -s "$CONF" <(render_slurm_conf) \
            || say "note: $CONF differs from this script's; run '$0 stop' and '$0 start' to apply it"
        sinfo
        return 0
    fi
    local t0=$SECONDS
    prepare_dirs
    ensure_munge_key
    write_slurm_conf
    start_munge
    if accounting_on; then
        write_slurmdbd_conf
        start_mariadb
        start_slurmdbd
    elif [[ "$ACCOUNTING" != 0 ]]; then
        say "note: slurmdbd/MariaDB not installed, running without accounting (sacct will fail)"
    fi
    start_slurmctld
    start_slurmd
    wait_idle || die "node $HOST did not become idle within ${WAIT_S}s (logs: $LOG_DIR)"
    say "cluster up in $(( SECONDS - t0 ))s"
    sinfo
}

not_running() {
    ! pgrep -x "$1" >/dev/null 2>&1
}

# stop_daemon PIDFILE NAME
stop_daemon() {
    local pidfile="$1" name="$2"
    if pid_alive "$pidfile" "$name"; then
        kill "$(tr -dc '0-9' <"$pidfile")" 2>/dev/null || true
    fi
    if ! wait_for 10 not_running "$name"; then
        say "$name still running; pkill -x $name"
        pkill -x "$name" || true
        wait_for 5 not_running "$name" || pkill -KILL -x "$name" || true
    fi
    rm -f "$pidfile"
    say "$name stopped"
}

cmd_stop() {
    ensure_root stop
    take_lock
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    stop_daemon "$DBD_PID" slurmdbd
    stop_mariadb
    stop_daemon "$MUNGE_PID" munged
}

# Only a MariaDB that start launched: one that was already running may serve others.
stop_mariadb() {
    [[ -e "$MARIADB_OURS" ]] || return 0
    /etc/init.d/mariadb stop >/dev/null || say "WARNING: MariaDB did not stop cleanly"
    rm -f "$MARIADB_OURS"
    say "MariaDB stopped"
}

cmd_status() {
    local name pidfile ok=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        case $name in
            munged) pidfile=$MUNGE_PID ;;
            mariadbd) pidfile=/run/mysqld/mysqld.pid ;;
            slurmdbd) pidfile=$DBD_PID ;;
            slurmctld) pidfile=$CTLD_PID ;;
            slurmd) pidfile=$SLURMD_PID ;;
        esac
        if daemon_running "$pidfile" "$name"; then
            say "$name: running"
        else
            say "$name: not running"
        fi
    done
    if command -v sinfo >/dev/null 2>&1 && sinfo 2>/dev/null; then
        node_usable || ok=1
    else
        say "sinfo: no answer from slurmctld"
        ok=1
    fi
    return $ok
}

# ---------------------------------------------------------------- selftest

# job_state JOBID: PENDING, RUNNING, COMPLETED, ... (empty once the job is purged).
job_state() {
    scontrol show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'
}

job_state_is() {
    [[ "$(job_state "$1")" == "$2" ]]
}

sacct_state() {
    sacct -o JobID,State,NodeList --parsable2 -j "$1" 2>&1 | awk -F'|' -v id="$1" '$1 == id { print $2 }'
}

sacct_state_is() {
    [[ "$(sacct_state "$1")" == "$2"* ]]
}

cmd_selftest() {
    local tmp out jobid
    tmp="$(mktemp -d /tmp/slurm_selftest.XXXXXX)"
    chmod 0755 "$tmp"

    say "srun -N1 -n1 hostname"
    out="$(timeout 60 srun -N1 -n1 hostname)"
    [[ "$out" == "$(hostname)" ]] || die "srun printed '$out'"

    say "srun -n2 hostname"
    out="$(timeout 60 srun -n2 hostname | wc -l)"
    [[ "$out" -eq 2 ]] || die "srun -n2 printed $out lines, expected 2"

    say "sbatch --wait -n2 --wrap 'echo hi \$SLURM_NTASKS'"
    # shellcheck disable=SC2016  # $SLURM_NTASKS must expand inside the job
    timeout 90 sbatch --wait -n2 -o "$tmp/hi.out" --wrap 'echo hi $SLURM_NTASKS' >/dev/null
    grep -qx 'hi 2' "$tmp/hi.out" || die "unexpected batch output: $(cat "$tmp/hi.out")"

    say "scontrol requeue on a running job"
    jobid="$(sbatch --parsable -o "$tmp/sleep.out" --wrap 'echo start; sleep 300')"
    wait_for 30 job_state_is "$jobid" RUNNING || die "job $jobid never ran: $(job_state "$jobid")"
    scontrol requeue "$jobid"
    wait_for 10 job_state_is "$jobid" PENDING || die "job $jobid not PENDING after requeue: $(job_state "$jobid")"
    say "job $jobid is PENDING; waiting for it to run again"
    wait_for 60 job_state_is "$jobid" RUNNING || die "job $jobid did not restart: $(job_state "$jobid")"
    scontrol show job "$jobid" | grep -o 'Restarts=[0-9]*'
    scancel "$jobid"

    if accounting_on; then
        say "sacct -j $jobid (the query submitit makes)"
        wait_for 20 sacct_state_is "$jobid" CANCELLED \
            || die "sacct does not report job $jobid as CANCELLED: $(sacct_state "$jobid")"
    fi
    rm -rf "$tmp"
    say "selftest passed"
}

main() {
    [[ $# -eq 1 ]] || usage
    case "$1" in
        install) cmd_install ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        selftest) cmd_selftest ;;
        *) usage ;;
    esac
}

main "$@"
