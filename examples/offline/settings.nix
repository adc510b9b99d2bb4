# The knob of the fixture fleet. Tests and the demo rewrite this file to make new versions.
{
  # The Nix system the fixtures are built for (the demo writes the machine's own).
  system = "x86_64-linux";
  # Bump for a new version of every profile.
  generation = 1;
  # Per node: "ok" (default), "fail" (activation exits 1), "units-failed" (exits 4),
  # "hang" (activation never returns), "slow" (activation takes 2 s), "unhealthy" (activation
  # works, health check fails), "isolate" (activation cuts the node's network).
  behaviour = { };
  # Per node: KiB of random data in the system closure (for download tests).
  blobKiB = { };
  # Per node: URLs that must answer 2xx for the deploy to be confirmed.
  httpChecks = { };
  # Per node: the public key (`NAME:BASE64`) its reports must be signed with (roost.nodeKey).
  nodeKeys = { };
  # Per node: the kernel version its system links (`kernel`), and the systemd its
  # switch-inhibitors name (`systemd`; a change makes a live switch refused).
  kernel = { };
  systemd = { };
  # Per node: its roost.reboot policy, and its roost.rebootWindow.
  reboot = { };
  rebootWindow = { };
}
