# One of roost's programs, built from the workspace with the versions pinned in Cargo.lock.
# `crate` is `roost-agent` or `roost-coordinator`. Neither links a C library (rustls, and a
# bundled SQLite in the coordinator), and neither is wrapped with Nix: the agent uses the
# machine's own Nix (the NixOS module puts `nix.package` on its path), publish the user's.
{
  lib,
  rustPlatform,
  crate,
  # Run the workspace's tests in the build (the flake's `checks.tests`); tests that need Nix,
  # root or namespaces skip themselves, loudly, in the sandbox (where `CI` is not set).
  withTests ? false,
  # nixpkgs' `lib` folder for the NixOS-module and example-fleet evaluations
  # (`ROOST_NIXPKGS_LIB`, as `.ci/run` sets it); the flake passes `${nixpkgs}/lib`.
  nixpkgsLib ? null,
}:

let
  workspace = lib.importTOML ../Cargo.toml;
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../common
      ../agent
      ../coordinator
      ../tests
      ../preflight
      ../examples/offline
    ]
    # What the tests read besides the crates: the modules, the Nix helpers, the examples.
    ++ lib.optionals withTests [
      ../nixos-module
      ../nix
      ../examples
    ];
  };
in
rustPlatform.buildRustPackage {
  pname = crate + lib.optionalString withTests "-tests";
  inherit (workspace.workspace.package) version;
  inherit src;
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [
    "--package"
    crate
  ];
  doCheck = withTests;
  cargoTestFlags = [ "--workspace" ];
  env = lib.optionalAttrs (nixpkgsLib != null) { ROOST_NIXPKGS_LIB = nixpkgsLib; };

  meta = {
    description =
      {
        roost-agent = "roost's node agent: pulls signed manifests and deploys them with rollback";
        roost-coordinator = "roost's coordinator: publishes signed manifests from a flake and serves them to a fleet";
      }
      .${crate};
    homepage = workspace.workspace.package.repository;
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = crate;
    platforms = lib.platforms.linux;
  };
}
