# roost's flake library: activation helpers for deploy-rs-shaped flakes, and a validator for
# `deploy` plus the `roost.*` keys.
{ lib }:

let
  knownKeys = [ "nodeKey" "system" "healthChecks" "activation" "wave" ];
  activationKinds = [ "nixos" "deploy-rs" "command" "none" ];
  checkKinds = [ "command" "http" ];
  genericKeys = [ "user" "profilePath" "autoRollback" "magicRollback" "activationTimeout" "confirmTimeout" "roost"
    "sshUser" "sshOpts" "sudo" "fastConnection" "remoteBuild" "interactiveSudo" "tempPath" "hostname" "profiles" "profilesOrder" "path" ];

  checkRoost = where: r:
    (map (k: "${where}: unknown key roost.${k} (known: ${lib.concatStringsSep ", " knownKeys})")
      (builtins.filter (k: !(builtins.elem k knownKeys)) (builtins.attrNames r)))
    ++ lib.optional (r ? activation && !(builtins.elem (r.activation.kind or "") activationKinds))
      "${where}: roost.activation.kind must be one of ${lib.concatStringsSep ", " activationKinds}"
    ++ lib.optional (r ? activation && (r.activation.kind or "") == "command" && !(r.activation ? argv))
      "${where}: roost.activation of kind command needs argv"
    ++ lib.concatMap (c: lib.optional (!(builtins.elem (c.kind or "") checkKinds))
      "${where}: roost.healthChecks entries need kind = \"command\" or \"http\"") (r.healthChecks or [ ])
    ++ lib.optional (r ? wave && !(builtins.isInt r.wave)) "${where}: roost.wave must be an integer";

  checkLevel = where: a:
    (if a ? roost then checkRoost where a.roost else [ ])
    ++ map (k: "${where}: unknown setting `${k}`") (builtins.filter (k: !(builtins.elem k genericKeys) && k != "nodes") (builtins.attrNames a));

  checkProfile = node: name: p:
    let where = "deploy.nodes.${node}.profiles.${name}"; in
    lib.optional (!(p ? path)) "${where}: has no `path`"
    ++ checkLevel where (removeAttrs p [ "path" ]);

  checkNode = name: n:
    let where = "deploy.nodes.${name}"; in
    lib.optional (!(n ? profiles) || n.profiles == { }) "${where}: has no profiles"
    ++ lib.concatLists (lib.mapAttrsToList (checkProfile name) (n.profiles or { }))
    ++ map (p: "${where}: profilesOrder names `${p}`, which is not a profile")
      (builtins.filter (p: !((n.profiles or { }) ? ${p})) (n.profilesOrder or [ ]))
    ++ checkLevel where (removeAttrs n [ "profiles" "profilesOrder" ]);
in
{
  /* Problems with a flake's `deploy` output, as messages; [ ] when it is fine. */
  validate = deploy:
    lib.optional (!(deploy ? nodes)) "deploy: has no `nodes`"
    ++ checkLevel "deploy" deploy
    ++ lib.concatLists (lib.mapAttrsToList checkNode (deploy.nodes or { }));

  /* Per system: activation helpers (deploy-rs's `lib.activate.*` in effect) and checks. */
  forPkgs = pkgs: rec {
    activate = {
      /* A NixOS configuration's toplevel: roost sees bin/switch-to-configuration. */
      nixos = nixosConfiguration: nixosConfiguration.config.system.build.toplevel;

      /* Any package with an activation script: a profile whose `deploy-rs-activate` runs
         `activate` with $PROFILE set, like deploy-rs's `lib.activate.custom`. */
      custom = base: activate:
        pkgs.runCommand "${base.name or "profile"}-activatable" { } ''
          mkdir -p $out
          for f in ${base}/*; do ln -s "$f" $out/; done
          cat > $out/deploy-rs-activate <<'ROOST_EOF'
          #!${pkgs.runtimeShell}
          set -eu
          ${activate}
          ROOST_EOF
          chmod +x $out/deploy-rs-activate
        '';

      /* A profile that only changes its link (Home Manager-style packages). */
      noop = base: base;
    };

    /* A check derivation that fails with every problem of `deploy`, like deploy-rs's
       `deployChecks`: `checks = roost.lib.${system}.deployChecks self.deploy;` */
    deployChecks = deploy:
      let problems = (import ./lib.nix { inherit lib; }).validate deploy; in
      pkgs.runCommand "roost-deploy-checks" { } (
        if problems == [ ] then "touch $out"
        else "echo ${lib.escapeShellArg (lib.concatStringsSep "\n" problems)} >&2; exit 1"
      );
  };
}
