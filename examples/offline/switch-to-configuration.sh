#!/bin/sh
# Fake switch-to-configuration of roost's fixture fleet.
export PATH=/usr/bin:/bin
log="${ROOST_FIXTURE_LOG:-/tmp/roost-fixture.log}"
echo "$1 @out@" >> "$log"
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
