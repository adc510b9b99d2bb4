# Fixture derivations: a fake NixOS system and a plain user profile, built by /bin/sh.
{ system }:
{
  # A "NixOS system" with bin/switch-to-configuration and bin/health. The activation script
  # appends "<goal> <its own store path>" to $ROOST_FIXTURE_LOG (or /tmp/roost-fixture.log),
  # so tests can see exactly which system was activated, and how often.
  fakeSystem = { node, generation, behaviour ? "ok", blobKiB ? 0 }:
    derivation {
      name = "nixos-system-${node}-g${toString generation}";
      inherit system;
      builder = "/bin/sh";
      PATH = "/usr/bin:/bin";
      inherit behaviour;
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
