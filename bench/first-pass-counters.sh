#!/bin/bash
# Where a first pass's time goes: one `livemig demo` from the build in DIR (an idle 1 GiB guest
# of CONTENT), with perf stat system-wide (minor/major faults, syscalls, context switches, CPU)
# and the kernel's CPU ticks (/proc/stat) from the first round's start to the channels' end.
# Prints one JSON line. Run it on a quiet machine: every process counts. Ticks that do not add
# up to the wall time (2 CPUs x 100 Hz) were spent where this kernel does not see them: in the
# hypervisor of a host that is itself a VM (bench/RESULTS.md, "bench/holes").
#   bench/first-pass-counters.sh DIR [random|zero|...]   (root, perf)
dir=$1; content=${2:-random}; tr=/tmp/ctr-$$.trace; rm -f $tr
cd $dir
LIVEMIG_TRACE=$tr timeout 300 node dist/src/cli/main.js demo --content $content --rate 0 --json > /tmp/ctr-$$.json 2>/dev/null &
for i in $(seq 3000); do grep -q "round begins" $tr 2>/dev/null && break; sleep 0.005; done
head -1 /proc/stat > /tmp/ctr-stat0-$$
perf stat -a -x, -e minor-faults,major-faults,raw_syscalls:sys_enter,context-switches,cpu-clock -o /tmp/ctr-all-$$.txt & p1=$!
for i in $(seq 6000); do grep -q "channels end" $tr 2>/dev/null && break; sleep 0.005; done
kill -INT $p1; wait $p1 2>/dev/null; head -1 /proc/stat > /tmp/ctr-stat1-$$; wait
python3 - $$ <<'PY'
import json,sys
p=sys.argv[1]
r=json.load(open(f'/tmp/ctr-{p}.json'))
out={'first_pass_ms':r['per_round'][0]['duration_ms'],'total_ms':r['total_ms'],'wire_mib':round(r['wire_bytes']/2**20,1),'verified':r['verified'] and r['guest_verified']['bad']==0}
for line in open(f'/tmp/ctr-all-{p}.txt'):
  f=line.strip().split(',')
  if len(f)>3 and f[0] and f[0][0].isdigit(): out[f[2]]=float(f[0])
a=[int(x) for x in open(f'/tmp/ctr-stat0-{p}').read().split()[1:]]; b=[int(x) for x in open(f'/tmp/ctr-stat1-{p}').read().split()[1:]]
d=[y-x for x,y in zip(a,b)]
out['cpu_ticks']={'user':d[0],'system':d[2],'idle':d[3],'softirq':d[6],'steal':d[7]}
print(json.dumps(out))
PY
