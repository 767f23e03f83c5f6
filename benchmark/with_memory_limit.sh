#!/usr/bin/env bash
# Run a command inside a memory cgroup, so that it sees a smaller machine than this one.
#
#     benchmark/with_memory_limit.sh 4G -- python -m flexgen_dist.run ...
#
# The limit counts the page cache too (cgroup v1 memory.limit_in_bytes, cgroup v2 memory.max):
# a file read twice under a limit smaller than the file comes from the disk both times, which
# is what makes "weights offloaded to disk" honest on a machine with plenty of RAM. Writing a
# cgroup needs root. Where no memory cgroup can be made, the command runs without a limit and a
# warning says so. LIMIT takes K/M/G/T suffixes (powers of 1024) or "none".
#
# After the command ends, one line on stderr gives the limit, the cgroup's peak usage and the
# number of out-of-memory kills; with MEMLIMIT_REPORT=FILE the same goes to FILE as JSON.
# The exit status is the command's (137 when the kernel killed it for memory).
set -uo pipefail

usage() { echo "usage: $0 LIMIT -- COMMAND [ARGS...]   (LIMIT like 512M, 4G, or none)" >&2; exit 2; }
[[ $# -ge 3 && $2 == "--" ]] || usage
limit_arg=$1
shift 2

to_bytes() {
    local v=${1^^} n unit
    [[ $v =~ ^([0-9]+(\.[0-9]+)?)([KMGT]?)I?B?$ ]] || return 1
    n=${BASH_REMATCH[1]}; unit=${BASH_REMATCH[3]}
    awk -v n="$n" -v u="$unit" 'BEGIN { p = index("KMGT", u); printf "%.0f\n", n * (p ? 1024 ^ p : 1) }'
}

report() {  # enforced limit peak oom_kills rc
    local msg
    if [[ $1 == 1 ]]; then
        msg=$(awk -v l="$2" -v p="$3" -v k="$4" \
            'BEGIN { printf "limit %.2f GiB, peak %.2f GiB (page cache included), out-of-memory kills %d", l / 2^30, p / 2^30, k }')
        echo "with_memory_limit: $msg" >&2
    fi
    if [[ -n ${MEMLIMIT_REPORT:-} ]]; then
        printf '{"limit_bytes": %s, "enforced": %s, "peak_bytes": %s, "oom_kills": %s, "rc": %s}\n' \
            "${2:-null}" "$([[ $1 == 1 ]] && echo true || echo false)" "${3:-null}" "${4:-0}" "$5" > "$MEMLIMIT_REPORT"
    fi
}

if [[ ${limit_arg,,} == none ]]; then
    "$@"; rc=$?; report 0 "" "" 0 $rc; exit $rc
fi
limit=$(to_bytes "$limit_arg") || { echo "error: bad memory limit '$limit_arg' (use e.g. 512M, 4G or none)" >&2; exit 2; }

# Find a memory cgroup we may create children in: cgroup v1's memory hierarchy, else cgroup v2
# with the memory controller. The new group nests under our own so accounting stays inside it.
root=${FLEXGEN_CGROUP_ROOT:-/sys/fs/cgroup}
group="" version=""
if [[ -d $root/memory ]]; then
    own=$(awk -F: '$2 == "memory" { print $3 }' /proc/self/cgroup)
    group=$root/memory${own%/}/flexgen-limit-$$; version=1
elif [[ -f $root/cgroup.controllers ]] && grep -qw memory "$root/cgroup.controllers"; then
    own=$(awk -F: '$1 == "0" { print $3 }' /proc/self/cgroup)
    group=$root${own%/}/flexgen-limit-$$; version=2
fi
if [[ -z $group ]] || ! mkdir "$group" 2>/dev/null; then
    echo "warning: no writable memory cgroup under $root (needs root and the cgroup memory controller);" \
         "running WITHOUT a memory limit, so disk-offload numbers may come from the page cache" >&2
    "$@"; rc=$?; report 0 "" "" 0 $rc; exit $rc
fi
cleanup() { rmdir "$group" 2>/dev/null || true; }
trap cleanup EXIT
trap 'kill -TERM "$child" 2>/dev/null' INT TERM

if [[ $version == 1 ]]; then
    echo "$limit" > "$group/memory.limit_in_bytes"
    # with swap, memsw makes the limit cover swapped pages as well
    [[ -f $group/memory.memsw.limit_in_bytes ]] && { echo "$limit" > "$group/memory.memsw.limit_in_bytes"; } 2>/dev/null
    set_limit_ok=$(cat "$group/memory.limit_in_bytes")
else
    echo "$limit" > "$group/memory.max"; { echo 0 > "$group/memory.swap.max"; } 2>/dev/null
    set_limit_ok=$(cat "$group/memory.max")
fi
# The kernel rounds the limit to whole pages; anything else means the write did not take.
(( set_limit_ok <= limit && set_limit_ok > limit - 4096 * 16 )) ||
    { echo "error: could not set a memory limit of $limit bytes in $group" >&2; exit 1; }

# The child joins the group before exec, so the command and everything it starts are inside it.
( echo "$BASHPID" > "$group/cgroup.procs" && exec "$@" ) &
child=$!
wait "$child" 2>/dev/null; rc=$?  # (quiet: the report below says what happened)

if [[ $version == 1 ]]; then
    peak=$(cat "$group/memory.max_usage_in_bytes")
    kills=$(awk '$1 == "oom_kill" { print $2 }' "$group/memory.oom_control")
else
    peak=$(cat "$group/memory.peak" 2>/dev/null || echo 0)
    kills=$(awk '$1 == "oom_kill" { print $2 }' "$group/memory.events")
fi
report 1 "$limit" "$peak" "${kills:-0}" $rc
[[ ${kills:-0} -gt 0 ]] && echo "with_memory_limit: the command was killed for exceeding $limit_arg" >&2
exit $rc
