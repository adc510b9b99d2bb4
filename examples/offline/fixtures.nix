# Fixture derivations: a fake NixOS system and a plain user profile, built by /bin/sh.
{ system }:
{
  # A "NixOS system" with bin/switch-to-configuration and bin/health. The activation script
  # appends "<goal> <its own store path>" to $ROOST_FIXTURE_LOG (or /tmp/roost-fixture.log),
  # so tests can see exactly which system was activated, and how often. With `kernel`, the
  # system links `kernel` to a store path of that name (equal versions share it); with
  # `systemd`, its `switch-inhibitors` names that systemd, as NixOS 26.05 does.
  fakeSystem = { node, generation, behaviour ? "ok", blobKiB ? 0, kernel ? null, systemd ? null }:
    let
      kernelPath = if kernel == null then "" else derivation {
        name = "linux-${kernel}";
        inherit system;
        builder = "/bin/sh";
        args = [ "-c" "echo ${kernel} > $out" ];
      };
      inhibitors = if systemd == null then "" else builtins.toJSON { inherit systemd; };
    in
    derivation {
      name = "nixos-system-${node}-g${toString generation}";
      inherit system;
      builder = "/bin/sh";
      PATH = "/usr/bin:/bin";
      inherit behaviour kernelPath inhibitors;
      switch = ./switch-to-configuration.sh;
      health = ./health.sh;
      args = [
        "-c"
        ''
          set -e
          mkdir -p $out/bin
          sed -e "s|@out@|$out|g" -e "s|@behaviour@|$behaviour|g" $switch > $out/bin/switch-to-configuration
          sed -e "s|@behaviour@|$behaviour|g" $health > $out/bin/health
          chmod +x $out/bin/switch-to-configuration $out/bin/health
          echo ${toString generation} > $out/generation
          if [ ${toString blobKiB} -gt 0 ]; then head -c ${toString blobKiB}K /dev/urandom > $out/blob; fi
          if [ -n "$kernelPath" ]; then ln -s $kernelPath $out/kernel; fi
          if [ -n "$inhibitors" ]; then printf '%s' "$inhibitors" > $out/switch-inhibitors; fi
        ''
      ];
    };

  # A Home Manager-like user profile: just files, activated by the profile link alone.
  userProfile = { node, generation }:
    derivation {
      name = "home-${node}-g${toString generation}";
      inherit system;
      builder = "/bin/sh";
      PATH = "/usr/bin:/bin";
      args = [ "-c" "mkdir -p $out/share && echo '${node} generation ${toString generation}' > $out/share/motd" ];
    };
}
