#!/usr/bin/env bash
# The Debian bookworm guest the VM tests boot, from Debian's packages. $1 is an empty output
# folder; it gets disk.raw (ext4, the whole disk), vmlinuz and initrd.img. tests/src/vm/image.rs
# names the cache folder after a hash of this file, so any change here makes a new image.
#
# Made for a fast boot under TCG: a small initrd (only the modules a virtio disk needs), no
# gettys, logind, timers or apt units, a static address on QEMU's user network.
set -euo pipefail
out=$1
root=$out/root

mmdebstrap --variant=apt --quiet \
  --include=systemd-sysv,linux-image-amd64,udev,nix-bin,procps,iproute2 \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"
    echo MODULES=list > "$1/etc/initramfs-tools/conf.d/roost-vm"
    echo COMPRESS=gzip >> "$1/etc/initramfs-tools/conf.d/roost-vm"
    mkdir -p "$1/etc/initramfs-tools"
    printf "%s\n" virtio_pci virtio_blk ext4 > "$1/etc/initramfs-tools/modules"' \
  bookworm "$root"

echo roost-vm > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 roost-vm\n' > "$root/etc/hosts"
cat > "$root/etc/fstab" <<'FSTAB'
/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1
# The host's share: the agent, the helper and this test's configuration.
roost /roost 9p trans=virtio,version=9p2000.L,ro,nofail,x-systemd.device-timeout=30s 0 0
FSTAB
mkdir -p "$root/roost" "$root/var/lib/roost" "$root/var/log/journal"

# QEMU's user network: the guest is 10.0.2.15, the host's forwards sit on 10.0.2.100. A static
# address from a oneshot unit: networkd alone took 15 s of a TCG boot.
cat > "$root/etc/systemd/system/roost-vm-net.service" <<'UNIT'
[Unit]
Description=QEMU user network (static address)
DefaultDependencies=no
BindsTo=sys-subsystem-net-devices-eth0.device
After=sys-subsystem-net-devices-eth0.device
Wants=network.target
Before=network.target network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip link set lo up
ExecStart=/sbin/ip link set eth0 up
ExecStart=/sbin/ip addr replace 10.0.2.15/24 dev eth0
ExecStart=/sbin/ip route replace default via 10.0.2.2

[Install]
WantedBy=network-online.target multi-user.target
UNIT

# The helper: runs the host's commands in the guest (hostfwd to port 7000).
cat > "$root/etc/systemd/system/roost-vm-helper.service" <<'UNIT'
[Unit]
Description=roost VM test helper
DefaultDependencies=no
RequiresMountsFor=/roost
After=local-fs.target

[Service]
ExecStart=/roost/bin/roost-vm-helper serve 7000
Restart=always
RestartSec=1s

[Install]
WantedBy=multi-user.target
UNIT

# The agent, with the unit settings the NixOS module gives the daemon (nixos-module/agent.nix),
# from the share; the test's environment file sets RUST_LOG and the like.
cat > "$root/etc/systemd/system/roost-agent.service" <<'UNIT'
[Unit]
Description=roost agent: pull-based deployments
Wants=network-online.target
After=network-online.target
RequiresMountsFor=/roost
ConditionPathExists=/roost/agent.json

[Service]
Type=notify
NotifyAccess=main
EnvironmentFile=-/roost/agent.env
ExecStart=/roost/bin/roost-agent run --config /roost/agent.json
StateDirectory=roost
StateDirectoryMode=0700
WatchdogSec=5min
TimeoutStartSec=infinity
Restart=always
RestartSec=10s
RestartPreventExitStatus=2

[Install]
WantedBy=multi-user.target
UNIT

systemctl --root="$root" enable roost-vm-net.service roost-vm-helper.service roost-agent.service
systemctl --root="$root" mask \
  getty@tty1.service serial-getty@ttyS0.service getty-static.service systemd-logind.service \
  apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
  e2scrub_reap.service fstrim.timer systemd-tmpfiles-clean.timer nix-daemon.socket \
  nix-daemon.service systemd-update-utmp.service systemd-update-utmp-runlevel.service \
  systemd-pstore.service systemd-binfmt.service keyboard-setup.service \
  systemd-firstboot.service systemd-journald-audit.socket systemd-hwdb-update.service \
  ldconfig.service man-db.timer systemd-networkd.service systemd-networkd.socket \
  systemd-networkd-wait-online.service systemd-network-generator.service \
  systemd-sysusers.service kmod-static-nodes.service modprobe@.service systemd-rfkill.socket \
  sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount dev-hugepages.mount \
  dev-mqueue.mount sys-fs-fuse-connections.mount
# The root file system is checked and mounted read-write by the kernel line.
systemctl --root="$root" mask systemd-fsck-root.service systemd-remount-fs.service
# Boot time under TCG, where every exec and module load is slow: one fixed machine id (so
# systemd does not make one at each boot and the persistent journal stays in one folder), no
# generator but the fstab one (the others cost ~0.5 s each and have nothing to do here), and
# none of the drivers udev would load for the PC's legacy devices (IDE, floppy, PS/2, speaker,
# KVM for a nested guest); the virtio ones, ext4 and 9p are what the guest uses.
echo 6f6f737476d6d5f6e6f6465000000001 > "$root/etc/machine-id"
mkdir -p "$root/etc/systemd/system-generators"
for g in "$root"/lib/systemd/system-generators/*; do
  name=$(basename "$g")
  [ "$name" = systemd-fstab-generator ] || ln -sf /dev/null "$root/etc/systemd/system-generators/$name"
done
printf 'blacklist %s\n' ata_piix ata_generic pata_acpi floppy kvm_amd kvm_intel pcspkr \
  i2c_piix4 psmouse serio_raw evdev button qemu_fw_cfg ccp > "$root/etc/modprobe.d/roost-vm.conf"
echo 'root:root' | chroot "$root" chpasswd
# No journal rate limit: the tests read every event. Persistent, so a boot after a power
# cut still shows what the agent did before it.
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=persistent\nRateLimitBurst=0\n' > "$root/etc/systemd/journald.conf.d/roost-vm.conf"
# Nix as a stock node has it: Debian's nix.conf, no experimental features; builds as root.
# Its store and database exist from the start, as on an installed node: made by the first
# Nix command instead, the database's files were new at the first power cut, which lost
# them (`/nix/var/nix/db/schema is corrupt` at every later Nix call).
chroot "$root" nix-store --init
rm -rf "$root/var/cache/apt"/* "$root/var/lib/apt/lists"/*

cp "$root"/boot/vmlinuz-* "$out/vmlinuz"
cp "$root"/boot/initrd.img-* "$out/initrd.img"
truncate -s 4G "$out/disk.raw"
mkfs.ext4 -q -F -L roost-vm -d "$root" "$out/disk.raw"
rm -rf "$root"
