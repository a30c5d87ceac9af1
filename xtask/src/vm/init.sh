#!/bin/busybox sh
# cargo xtask vm-test: the guest's /init (PID 1, busybox sh). Mounts what the tests need,
# loads the kernel modules, checks which tc attach path egress-router takes, runs each test
# executable, then powers off. Human-readable lines go to the console (ttyS0); the raw results
# go to ttyS1, which carries nothing else (no kernel messages), for the host to parse.
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /run/lock
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
# Only alerts and panics on the console from now on.
echo 1 >/proc/sys/kernel/printk
ln -sf /proc/self/fd /dev/fd
ulimit -l unlimited 2>/dev/null

. /etc/vm-test/env
export ROUTER EGRESS_ROUTER_BIN="$ROUTER" RUST_BACKTRACE=1 NO_COLOR=1
exec 3>/dev/ttyS1

say() { echo "vm-test: $KERNEL_LABEL: $*"; }
res() { echo "@@ $*" >&3; }

KREL=$(uname -r)
res "kernel $KREL"
say "booted $KREL ($(nproc) CPUs, $(sed -n 's/^MemTotal: *//p' /proc/meminfo))"

for m in $(cat /etc/vm-test/modules); do
    if out=$(insmod "/lib/modules/vm-test/$m.ko" 2>&1); then
        res "module $m ok"
    else
        res "module $m FAILED $out"
        say "insmod $m failed: $out"
    fi
done
ip link set lo up

# egress-router in init mode in a fresh network namespace holding eth0 and macvlan0, with
# --attach $1. Prints its log, then how eth0's ingress looks to bpftool and tc.
router_run() {
    unshare -n sh -c '
        ip link set lo up
        ip link add eth0 type veth peer name c0 &&
            ip link add ens0 type veth peer name lan0 &&
            ip link add macvlan0 link ens0 type macvlan mode bridge || exit 90
        for i in eth0 c0 ens0 lan0; do ip link set "$i" up; done
        ip addr add 10.128.0.5/24 dev eth0
        ip route add default via 10.128.0.1 dev eth0
        EGRESS_SOURCE=192.168.12.99/24 EGRESS_GATEWAY=192.168.12.1 \
            EGRESS_DESTINATION="80 tcp 203.0.113.25" EGRESS_ROUTER_MODE=init \
            timeout -s KILL 60 "$ROUTER" --attach "$1" --bpffs-dir "/sys/fs/bpf/vm-test-$1"
        rc=$?
        echo "== bpftool net show dev eth0"
        bpftool net show dev eth0
        echo "== bpftool link show"
        bpftool link show
        echo "== tc filter show dev eth0 ingress"
        tc filter show dev eth0 ingress
        exit $rc
    ' sh "$1" >/tmp/attach.out 2>&1
    rc=$?
    rm -rf "/sys/fs/bpf/vm-test-$1"
    res "begin attach-$1"
    cat /tmp/attach.out >&3
    echo >&3
    res "exit attach-$1 $rc"
    return $rc
}

# Which hook eth0's program sits on: the loader's own report, confirmed by the kernel's view
# (a clsact filter is listed by bpftool net / tc; a tcx link is not a tc filter).
attach_seen() {
    # The loader's one startup line names the method: attach="tcx" or attach="clsact".
    loader=$(grep -o 'attach="[a-z]*"' /tmp/attach.out | head -n 1)
    if [ "$loader" = 'attach="clsact"' ] && grep -q 'clsact/ingress' /tmp/attach.out; then
        echo clsact
    elif [ "$loader" = 'attach="tcx"' ] && ! grep -q 'clsact/ingress' /tmp/attach.out; then
        echo tcx
    else
        echo unknown
    fi
}

# One console line per libtest verdict ("test NAME ... ok"). Output of programs a test runs
# can come between "test NAME ... " and its verdict, which then stands on its own line.
verdicts() {
    awk -v k="$KERNEL_LABEL" -v b="$1" '
        function verdict(s) { return s == "ok" || s == "FAILED" || s ~ /^ignored/ }
        function say(v, t) { sub(/^ignored.*/, "ignored", v); printf "vm-test: %s: %s %s::%s\n", k, v, b, t }
        /^test .* \.\.\. / {
            rest = substr($0, 6)
            i = index(rest, " ... ")
            t = substr(rest, 1, i - 1)
            v = substr(rest, i + 5)
            if (verdict(v)) { say(v, t); pending = "" } else pending = t
            next
        }
        pending != "" && verdict($0) { say($0, pending); pending = "" }
    '
}

check() { # name, ok|FAILED, detail
    res "check $1 $2 $3"
    say "$2 check $1: $3"
}

router_run auto
rc=$?
seen=$(attach_seen)
if [ "$rc" = 0 ] && [ "$seen" = "$EXPECT_ATTACH" ]; then
    check attach-auto ok "--attach auto chose $seen on $KREL"
else
    check attach-auto FAILED "--attach auto: exit $rc, attach $seen, expected $EXPECT_ATTACH on $KREL"
fi
if [ "$EXPECT_ATTACH" = tcx ]; then
    # The older path must still work on a kernel that has the newer one.
    router_run clsact
    rc=$?
    seen=$(attach_seen)
    if [ "$rc" = 0 ] && [ "$seen" = clsact ]; then
        check attach-clsact ok "--attach clsact works on $KREL"
    else
        check attach-clsact FAILED "--attach clsact: exit $rc, attach $seen"
    fi
else
    # Without tcx, forcing it must be refused with the reason, not fail obscurely.
    router_run tcx
    rc=$?
    if [ "$rc" != 0 ] && grep -q 'no tcx' /tmp/attach.out; then
        check attach-tcx-refused ok "--attach tcx refused on $KREL: $(grep -o 'this kernel has no tcx[^;]*' /tmp/attach.out | head -n 1)"
    else
        check attach-tcx-refused FAILED "--attach tcx: exit $rc without the 'no tcx' reason"
    fi
fi

# The tests: one executable at a time, one test at a time. Whatever a test leaves running
# is killed before the next executable starts.
while read -r name path; do
    say "running $name"
    start=$(date +%s)
    # shellcheck disable=SC2086 # TEST_ARGS is a list of words
    (cd /tmp && exec timeout -s KILL "$TEST_TIMEOUT" "$path" --test-threads=1 $TEST_ARGS) >/tmp/test.out 2>&1
    rc=$?
    kill -9 -1 2>/dev/null
    secs=$(($(date +%s) - start))
    res "begin $name"
    cat /tmp/test.out >&3
    echo >&3
    res "exit $name $rc $secs"
    verdicts "$name" </tmp/test.out
    if [ "$rc" = 137 ]; then
        say "$name killed after ${secs}s (timeout $TEST_TIMEOUT s)"
    else
        say "$name exited $rc after ${secs}s"
    fi
done </etc/vm-test/tests

res "done"
say "done, powering off"
sync
poweroff -f
