#!/usr/bin/env bash
# Issue 6 (b): run the `.test` workflow through a single-node SLURM cluster started on this
# machine (Debian slurm-wlm + munge, loopback only), with profiles/slurm unchanged.
# Needs root (daemons, /etc). Usage: tests/slurm/run_workflow_on_slurm.sh [RESULTS_DIR]
# The machine has no GPU, so the node advertises one `gpu` gres backed by /dev/null: the
# profile's gres requests stay as they are and are schedulable; jobs run on the CPU (device=auto). Job status comes from squeue
# (no accounting daemon here), so the script passes --slurm-status-command squeue.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RESULTS=${1:-/tmp/cascade-slurm/results}
export DEBIAN_FRONTEND=noninteractive
command -v slurmctld >/dev/null && command -v munged >/dev/null || apt-get install -y -qq slurm-wlm munge >/dev/null

# munge: one key, daemon as the munge user
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

# slurm: controller and node on this host, no cgroups, no accounting
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=cascade
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=86400
GresTypes=gpu
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
echo "NodeName=${HOST} Name=gpu File=/dev/null" > /etc/slurm/gres.conf
pkill -x slurmd || true
pkill -x slurmctld || true
sleep 1
slurmctld
slurmd
scontrol update nodename="${HOST}" state=resume 2>/dev/null || true
for _ in $(seq 60); do sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 1; done
sinfo

cd "$ROOT"
start=$(date +%s)
snakemake --profile profiles/slurm --configfile .test/config.yaml --config "results=${RESULTS}" \
  --slurm-status-command squeue --slurm-logdir "$(dirname "$RESULTS")/slurm_logs" \
  --default-resources mem_mb=4000 runtime=60 cpus_per_task=1
echo "workflow through SLURM finished in $(( $(date +%s) - start )) s"
python - "$RESULTS" <<'PY'
import json, sys
from pathlib import Path
import mlflow
results = Path(sys.argv[1])
info = json.loads((results / "mlflow/parent.json").read_text())
mlflow.set_tracking_uri(info["tracking_uri"])
runs = mlflow.search_runs(experiment_ids=[info["experiment_id"]], output_format="list")
children = [r for r in runs if "cascade_sd.job" in r.data.tags]
print(f"{len(children)} child runs, statuses: {sorted({r.info.status for r in children})}")
print((results / "figures/results_table.md").read_text())
PY
sacct_ok=$(squeue -h --states=all -o "%i %T" | awk '{print $2}' | sort | uniq -c)
echo "SLURM jobs by state:"; echo "$sacct_ok"
