#!/bin/sh
# Fake switch-to-configuration of roost's fixture fleet.
export PATH=/usr/bin:/bin
log="${ROOST_FIXTURE_LOG:-/tmp/roost-fixture.log}"
# NixOS 26.05's pre-switch check, for these one-key files: a live switch to a system whose
# switch-inhibitors differ from the running one's is refused (exit 1); boot is not checked.
if [ "$1" != boot ] && [ "${NIXOS_NO_CHECK:-}" != 1 ] \
   && [ -f /run/current-system/switch-inhibitors ] && [ -f @out@/switch-inhibitors ] \
   && ! cmp -s /run/current-system/switch-inhibitors @out@/switch-inhibitors; then
  echo "$1-refused @out@" >> "$log"
  echo "There are changes to critical components of the system" >&2
  echo "Pre-switch checks failed" >&2
  exit 1
fi
echo "$1 @out@" >> "$log"
# A live switch makes the new system the running one, where there is a /run/current-system.
if [ "$1" != boot ] && [ -L /run/current-system ]; then ln -sfn @out@ /run/current-system; fi
case "@behaviour@" in
  fail) echo "fixture: activation of @out@ fails on purpose" >&2; exit 1 ;;
  units-failed) echo "fixture: some units failed to start" >&2; exit 4 ;;
  hang) echo "fixture: activation hangs" >&2; sleep 1000 & wait; exit 0 ;;
  slow) sleep 2; exit 0 ;;
  isolate)
    # Take the node off the network, as a bad firewall or network config would.
    for dev in /sys/class/net/*; do
      name=$(basename "$dev")
      [ "$name" = lo ] || /sbin/ip link set "$name" down 2>/dev/null || /usr/sbin/ip link set "$name" down
    done
    exit 0 ;;
  *) exit 0 ;;
esac
