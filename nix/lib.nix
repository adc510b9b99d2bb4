# What a flake written for deploy-rs needs from roost, in the same shape:
# `roost.lib.${system}.activate.{nixos,custom,home-manager,noop}` and
# `roost.lib.${system}.deployChecks`, so switching is a matter of replacing `deploy-rs` by
# `roost` in a few lines. (Flakes that keep deploy-rs's own `lib.activate.*` work unchanged too:
# the agent runs their `deploy-rs-activate` script.)
{ pkgs }:

let
  inherit (pkgs) lib;
  checkDeploy = import ./check-deploy.nix;

  # `base` plus a `deploy-rs-activate` script running `activate` (shell text; `$PROFILE` is
  # the profile's link). A functor, so deploy-rs-style overrides such as
  # `(activate.custom // { dryActivate = …; })` still apply: roost runs the main script only,
  # and says what to switch to with `roost.activation` instead (e.g. goal = "boot").
  custom = {
    __functor =
      _: base: activate:
      pkgs.symlinkJoin {
        name = "activatable-${base.name}";
        paths = [
          base
          (pkgs.writeTextFile {
            name = "${base.name}-deploy-rs-activate";
            destination = "/deploy-rs-activate";
            executable = true;
            text = ''
              #!${pkgs.runtimeShell}
              set -euo pipefail
              ${activate}
            '';
          })
        ];
      };
  };
in
{
  inherit checkDeploy;

  activate = {
    inherit custom;

    # A NixOS system, activated by the agent with `bin/switch-to-configuration switch` (or the
    # goal in `roost.activation`): the system's own toplevel needs no wrapper.
    nixos = base: base.config.system.build.toplevel;

    # A Home Manager configuration (`homeManagerConfiguration`), run as the profile's `user`.
    home-manager = base: custom base.activationPackage or base ''"$PROFILE/activate"'';

    # A plain profile (packages, dotfiles) where only the link changes.
    noop = base: custom base ":";
  };

  # `checks` for a flake's `deploy` output, like deploy-rs's: `deploy-schema` fails with every
  # problem `checkDeploy` finds (nothing is built for it); `deploy-activate` builds every
  # profile and checks that what `roost.activation` names is there.
  deployChecks = deploy: {
    deploy-schema =
      let
        problems = map builtins.unsafeDiscardStringContext (checkDeploy deploy);
      in
      pkgs.runCommand "roost-deploy-schema"
        {
          problems = lib.concatMapStrings (p: "  - ${p}\n") problems;
          passAsFile = [ "problems" ];
        }
        (
          if problems == [ ] then
            "touch $out"
          else
            ''
              echo "the flake's deploy output has problems:" >&2
              cat "$problemsPath" >&2
              exit 1
            ''
        );

    deploy-activate =
      let
        pick = levels: key: lib.findFirst (v: v != null) null (map (l: (l.roost or { }).${key} or null) levels);
        profiles = lib.concatLists (
          lib.mapAttrsToList (
            nodeName: node:
            lib.mapAttrsToList (profileName: profile: {
              where = "${nodeName}.${profileName}";
              path = profile.path;
              activation = pick [
                profile
                node
                deploy
              ] "activation";
            }) node.profiles
          ) deploy.nodes
        );
        need =
          p:
          let
            kind = p.activation.kind or null;
          in
          if kind == "nixos" then
            [ "bin/switch-to-configuration" ]
          else if kind == "deploy-rs" then
            [ "deploy-rs-activate" ]
          else if kind == "command" && (p.activation.argv or [ ]) != [ ] then
            [ (builtins.head p.activation.argv) ]
          else
            [ ];
        checkOne =
          p:
          lib.concatMapStrings (entry: ''
            if [ ! -x ${lib.escapeShellArg "${p.path}/${entry}"} ]; then
              echo ${lib.escapeShellArg "${p.where}: roost.activation needs ${entry} in ${p.path}, which has none"} >&2
              failed=1
            fi
          '') (need p);
      in
      pkgs.runCommand "roost-deploy-activate" { } ''
        failed=0
        ${lib.concatMapStrings checkOne profiles}
        [ "$failed" = 0 ]
        touch $out
      '';
  };
}
