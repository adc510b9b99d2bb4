#!/bin/sh
# Health check of roost's fixture fleet: fails when the system is built "unhealthy".
export PATH=/usr/bin:/bin
case "@behaviour@" in
  unhealthy) echo "fixture: service is down" >&2; exit 1 ;;
  *) exit 0 ;;
esac
