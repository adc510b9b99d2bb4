# roost's packages, built from Cargo.lock. `bin` selects one binary's package.
{ lib, rustPlatform, bin ? null }:

rustPlatform.buildRustPackage {
  pname = if bin == null then "roost" else bin;
  version = "0.1.0";

  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let base = baseNameOf path; in
      !(type == "directory" && (base == "target" || base == "examples" || base == "nixos-module"));
  };

  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = lib.optionals (bin != null) [ "-p" bin "--bin" bin ];

  # The tests need root, namespaces and a writable Nix store: `checks.tests` runs the ones
  # that work in the build sandbox; the rest say SKIP.
  doCheck = false;

  meta = {
    description = "Pull-based deployment for NixOS fleets: signed manifests, rollback, reports";
    license = with lib.licenses; [ mit asl20 ];
    platforms = lib.platforms.linux;
  } // lib.optionalAttrs (bin != null) { mainProgram = bin; };
}
