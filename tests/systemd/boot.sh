#!/bin/bash
# PID 1 of fresh namespaces (see tests/test_systemd.py): fence the host off, then become systemd.
#   boot.sh SCRATCH CONSOLE UNITS WHEELHOUSE
# Everything mounted here lives in this mount namespace only (/ is made private first), and
# disappears with it.
set -euo pipefail
scratch=$1 console=$2 units=$3 wheelhouse=$4

mount --make-rprivate /
mount -t tmpfs -o mode=700 tmpfs "$scratch"

# /etc, /var, /opt and /usr/local: overlays on a tmpfs, so the service user, StateDirectory= and
# the install never reach the host
for dir in etc var opt usr/local; do
    mkdir -p "$scratch/$dir/upper" "$scratch/$dir/work"
    mount -t overlay overlay -o "lowerdir=/$dir,upperdir=$scratch/$dir/upper,workdir=$scratch/$dir/work" "/$dir"
done
mount -t tmpfs -o mode=755 tmpfs /run

# a private /dev whose console is the test's pty (PID 1 reopens /dev/console)
mkdir -p "$scratch/dev"
mount -t tmpfs -o mode=755 tmpfs "$scratch/dev"
for node in null zero full random urandom tty; do
    touch "$scratch/dev/$node"
    mount --bind "/dev/$node" "$scratch/dev/$node"
done
touch "$scratch/dev/console"
mount --bind "$console" "$scratch/dev/console"
mkdir -p "$scratch/dev/pts" "$scratch/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$scratch/dev/pts"
ln -s pts/ptmx "$scratch/dev/ptmx"
mount -t tmpfs -o mode=1777 tmpfs "$scratch/dev/shm"
mount --move "$scratch/dev" /dev

# cgroup2 of this cgroup namespace only; the rest of /sys, /proc/sys and sysrq read-only
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -o remount,bind,ro /sys
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
if [ -e /proc/sysrq-trigger ]; then
    mount --bind /proc/sysrq-trigger /proc/sysrq-trigger
    mount -o remount,bind,ro /proc/sysrq-trigger
fi

# procd where the README installs it, from wheels built outside (no network in here), on PATH,
# and its service user, as the README says
/usr/bin/python3 -m venv /opt/procd
/opt/procd/bin/pip install -q --no-index --find-links "$wheelhouse" procd
ln -s /opt/procd/bin/procd /usr/local/bin/procd
useradd --system --home-dir /var/lib/procd --no-create-home --shell /usr/sbin/nologin procd

# only the test's units; a system.conf drop-in for a manager with no journald
mkdir -p /run/systemd/system /etc/systemd/system.conf.d
cp "$units"/* /run/systemd/system/
printf '[Manager]\nDefaultLimitCORE=0\nDefaultStandardOutput=tty\nDefaultStandardError=tty\n' \
    > /etc/systemd/system.conf.d/procd-test.conf
[ -s /etc/machine-id ] || systemd-machine-id-setup --print >/dev/null 2>&1 || true
# last, now that the wheels and units have been read from the host's /tmp: a private /tmp, where
# PrivateTmp= makes its directories
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname procd-test

export SYSTEMD_UNIT_PATH=/run/systemd/system SYSTEMD_GENERATOR_PATH= SYSTEMD_ENVIRONMENT_GENERATOR_PATH=
exec env container=procd-test /lib/systemd/systemd --system --unit=procd-test.target
