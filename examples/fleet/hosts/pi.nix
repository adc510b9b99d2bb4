# A Raspberry Pi 4 booting from its SD card. It never builds: everything comes from the
# fleet's cache, and a deploy waits (deferred) until its closure is there.
{ pkgs, ... }:
{
  boot.loader.grub.enable = false;
  boot.loader.generic-extlinux-compatible.enable = true;
  boot.kernelPackages = pkgs.linuxPackages_rpi4;
  hardware.enableRedistributableFirmware = true;
  fileSystems."/" = {
    device = "/dev/disk/by-label/NIXOS_SD";
    fsType = "ext4";
  };

  services.roost.agent.buildPolicy = "substitute-only";
}
