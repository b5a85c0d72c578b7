#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests (tests/test_slurm.py) and for trying the
# `workflow/profiles/slurm-local-test` profile by hand. Needs root and Debian/Ubuntu (apt-get); no systemd.
#
#   tests/slurm/cluster.sh start <statedir>   # install if missing, configure, start, wait for an idle node
#   tests/slurm/cluster.sh stop  <statedir>   # cancel jobs, stop exactly the daemons this script started
#   tests/slurm/cluster.sh env   <statedir>   # print `export SLURM_CONF=...` for the client commands
#
# Everything lives in <statedir>: slurm.conf, gres.conf, cgroup.conf, the munge key and socket, the controller
# state, spool, logs, and `pids` (one "name pid" line per daemon). `stop` kills only the pids listed there,
# after checking that each still runs the program it was recorded for. `start` first stops whatever an
# earlier start with the same <statedir> left running and wipes its state, so it can be re-run at will.
#
# The cluster:
#   - node `localhost` (NodeAddr 127.0.0.1; the host name does not matter), CPUs=2 (at most nproc),
#     RealMemory = 90% of MemTotal, a fake GPU `Gres=gpu:1` whose File= is a null character device created
#     with mknod in <statedir>/dev (a GRES File= must be an existing character device, or the node drains);
#   - partition `debug` (default, no time limit), select/cons_tres with CR_Core_Memory;
#   - memory limits enforced through cgroup v1 when available (ConstrainRAMSpace), else none;
#   - NO accounting daemon: `sacct` is installed but cannot answer. Snakemake's SLURM plugin must therefore
#     poll with `squeue` (`slurm-status-command: squeue`), which it only does while MinJobAge is at least
#     3x its first status-check delay; MinJobAge here is 3600 s (the test profile checks first after 5 s,
#     and the test reads the whole run's jobs back from squeue afterwards).
#   - free TCP ports are picked at start (so a cluster left by another <statedir> cannot collide).
#
# Client commands find the cluster through SLURM_CONF=<statedir>/etc/slurm.conf. Inside a job, Snakemake's
# jobstep plugin strips all SLURM_* variables (SLURM_CONF included) before its `srun`, so srun falls back to
# /etc/slurm/slurm.conf: `start` links that path to <statedir>/etc/slurm.conf when it is absent (or is a link
# left by an earlier run of this script), and `stop` removes the link again. An existing real
# /etc/slurm/slurm.conf is never touched (start fails instead).
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|env <statedir>" >&2
    exit 2
}
[ $# -eq 2 ] || usage
CMD=$1
STATE=$(realpath -m "$2")
ETC=$STATE/etc
export SLURM_CONF=$ETC/slurm.conf
SYSCONF=/etc/slurm/slurm.conf
MARK=.emotion-neurons-test-cluster
TIMEOUT=${SLURM_TEST_TIMEOUT:-60}

log() { echo "[cluster.sh] $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# ---------------------------------------------------------------------------------------------- stop
pid_alive_as() { # pid expected-comm
    [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

stop_cluster() {
    if [ -f "$STATE/pids" ]; then
        # cancel our jobs first so that no job step outlives its slurmd (the conf is ours, so is the cluster)
        local ctld
        ctld=$(awk '$1 == "slurmctld" {print $2}' "$STATE/pids")
        if [ -n "$ctld" ] && pid_alive_as "$ctld" slurmctld && command -v scancel >/dev/null &&
            [ -f "$SLURM_CONF" ]; then
            timeout 10 scancel --quiet --full --user=root >/dev/null 2>&1 || true
            for _ in $(seq 20); do
                [ -z "$(timeout 5 squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
        # stop in reverse start order: slurmd, slurmctld, munged
        local lines
        mapfile -t lines < <(tac "$STATE/pids")
        for line in "${lines[@]}"; do
            read -r name pid <<<"$line"
            [ -n "${pid:-}" ] || continue
            if pid_alive_as "$pid" "$name"; then
                kill -TERM "$pid" 2>/dev/null || true
                for _ in $(seq 50); do
                    pid_alive_as "$pid" "$name" || break
                    sleep 0.2
                done
                if pid_alive_as "$pid" "$name"; then
                    log "$name ($pid) ignored SIGTERM, killing"
                    kill -KILL "$pid" 2>/dev/null || true
                fi
            fi
        done
        rm -f "$STATE/pids"
    fi
    # the /etc/slurm/slurm.conf link, if it is ours
    if [ -L "$SYSCONF" ] && [ "$(readlink "$SYSCONF")" = "$ETC/slurm.conf" ]; then
        rm -f "$SYSCONF"
    fi
}

if [ "$CMD" = stop ]; then
    stop_cluster
    log "stopped ($STATE)"
    exit 0
fi
if [ "$CMD" = env ]; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
fi
[ "$CMD" = start ] || usage

# --------------------------------------------------------------------------------------------- start
[ "$(id -u)" -eq 0 ] || die "must run as root (daemons, munge user, mknod)"

# 1. packages (Debian: slurm 22.05 + munge). Service start-up during install is blocked by policy-rc.d.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
    ! command -v munged >/dev/null || ! command -v setpriv >/dev/null; then
    command -v apt-get >/dev/null || die "slurm is not installed and apt-get is not available"
    log "installing slurmctld slurmd slurm-client munge"
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    rc=0
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                slurmctld slurmd slurm-client munge util-linux
    } >"${TMPDIR:-/tmp}/cluster-sh-apt.log" 2>&1 || rc=$?
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || {
        tail -20 "${TMPDIR:-/tmp}/cluster-sh-apt.log" >&2
        die "apt-get install failed"
    }
fi
getent passwd munge >/dev/null || die "user munge missing (munge package broken?)"

# 2. leftovers of an earlier start with this statedir
stop_cluster
if [ -e "$SYSCONF" ] || [ -L "$SYSCONF" ]; then
    if [ -L "$SYSCONF" ]; then
        tgt=$(readlink "$SYSCONF")
        # a link to a vanished statedir or to one made by this script: replace it
        if [ ! -e "$tgt" ] || [ -e "$(dirname "$tgt")/$MARK" ]; then
            rm -f "$SYSCONF"
        fi
    fi
    [ -e "$SYSCONF" ] && die "$SYSCONF exists and was not made by this script; refusing to touch it"
fi
rm -rf "$STATE/ctld" "$STATE/spool" "$STATE/log" "$STATE/run" "$STATE/munge" "$STATE/dev" "$ETC"
mkdir -p "$STATE" "$STATE/ctld" "$STATE/spool" "$STATE/log" "$STATE/run" "$STATE/munge" "$STATE/dev" "$ETC"
chmod 755 "$STATE"
touch "$ETC/$MARK"

[ ${#STATE} -le 80 ] || die "statedir path too long for the munge socket (unix socket paths are limited): $STATE"

# 3. facts about the machine
NCPU=$(nproc)
CPUS=${SLURM_TEST_CPUS:-2}
[ "$CPUS" -le "$NCPU" ] || CPUS=$NCPU
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() { # first free port >= $1 that is not $2
    local p=$1
    while ! port_free "$p" || [ "$p" = "${2:-}" ]; do p=$((p + 1)); done
    echo "$p"
}
CTLD_PORT=$(pick_port "${SLURM_TEST_PORT:-6817}")
SLURMD_PORT=$(pick_port $((CTLD_PORT + 1)) "$CTLD_PORT")

# fake GPU: a character device (null: major 1, minor 3) with an nvidia-like name
GPU_DEV=$STATE/dev/nvidia0
mknod -m 666 "$GPU_DEV" c 1 3 2>/dev/null || GPU_DEV=/dev/null
[ -c "$GPU_DEV" ] || die "no character device for the fake GPU"

# cgroup v1 memory enforcement when the memory controller is mounted; otherwise plain process tracking
if [ "${SLURM_TEST_CGROUP:-auto}" != 0 ] && [ -d /sys/fs/cgroup/memory ] && [ -d /sys/fs/cgroup/freezer ]; then
    PROCTRACK=proctrack/cgroup
    TASKPLUGIN=task/cgroup
else
    PROCTRACK=proctrack/linuxproc
    TASKPLUGIN=task/none
fi

# 4. configuration
cat >"$ETC/slurm.conf" <<EOF
# one-node test cluster written by tests/slurm/cluster.sh; state in $STATE
ClusterName=entest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=$PROCTRACK
TaskPlugin=$TASKPLUGIN
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
# no slurmdbd: squeue is the status source, so finished jobs must stay visible long enough
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
KillWait=5
Waittime=0
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$ETC/gres.conf" <<EOF
# fake GPU: Slurm only needs File= to be an existing character device
NodeName=localhost Name=gpu File=$GPU_DEV
EOF
cat >"$ETC/cgroup.conf" <<EOF
CgroupPlugin=autodetect
ConstrainCores=no
ConstrainDevices=no
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
EOF
ln -s "$ETC/slurm.conf" "$SYSCONF" 2>/dev/null || {
    mkdir -p "$(dirname "$SYSCONF")"
    ln -s "$ETC/slurm.conf" "$SYSCONF"
}

# 5. daemons (each daemonizes and writes a pid file; the pids are recorded as soon as they are known)
: >"$STATE/pids"
wait_pidfile() { # file name
    local i pid
    for i in $(seq $((TIMEOUT * 5))); do
        if [ -s "$1" ]; then
            pid=$(tr -dc 0-9 <"$1")
            if [ -n "$pid" ] && pid_alive_as "$pid" "$2"; then
                echo "$2 $pid" >>"$STATE/pids"
                return 0
            fi
        fi
        sleep 0.2
    done
    return 1
}
dump_logs() {
    for f in "$STATE"/log/*.log "$STATE"/munge/munged.log; do
        [ -f "$f" ] && {
            echo "--- $f" >&2
            tail -15 "$f" >&2
        }
    done
}

# munge: own key, socket, pid and log in the statedir, run as user munge
chown munge:munge "$STATE/munge"
chmod 711 "$STATE/munge"
dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$STATE/munge/munge.key"
chmod 400 "$STATE/munge/munge.key"
setpriv --reuid=munge --regid=munge --init-groups \
    munged --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
    --seed-file="$STATE/munge/munged.seed" </dev/null >"$STATE/log/munged.out" 2>&1 ||
    {
        dump_logs
        die "munged failed to start"
    }
wait_pidfile "$STATE/munge/munged.pid" munged || {
    dump_logs
    die "munged did not come up"
}

# -c: cold start, no saved jobs or node states (a stale drain does not survive)
slurmctld -c -f "$SLURM_CONF" </dev/null >"$STATE/log/slurmctld.out" 2>&1 || {
    dump_logs
    die "slurmctld failed to start"
}
wait_pidfile "$STATE/run/slurmctld.pid" slurmctld || {
    dump_logs
    die "slurmctld did not come up"
}
slurmd -N localhost -f "$SLURM_CONF" </dev/null >"$STATE/log/slurmd.out" 2>&1 || {
    dump_logs
    die "slurmd failed to start"
}
wait_pidfile "$STATE/run/slurmd.pid" slurmd || {
    dump_logs
    die "slurmd did not come up"
}

# 6. wait for an idle node; resume it if it registered drained/down
state=""
for i in $(seq $((TIMEOUT * 2))); do
    state=$(timeout 5 sinfo -h -N -n localhost -o %T 2>/dev/null | head -1 || true)
    case "$state" in
    idle) break ;;
    *drain* | *down* | *fail*)
        timeout 5 scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
        ;;
    esac
    sleep 0.5
done
if [ "$state" != idle ]; then
    timeout 5 scontrol show node localhost >&2 || true
    dump_logs
    die "node not idle after ${TIMEOUT}s (state: '${state:-none}')"
fi
log "up: SLURM_CONF=$SLURM_CONF ports $CTLD_PORT/$SLURMD_PORT, $CPUS CPUs, ${MEM_MB} MB, gpu:1 -> $GPU_DEV, $PROCTRACK"
