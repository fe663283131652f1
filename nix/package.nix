# mk-upgrade: the upgrade agent's binaries (mk-upgrade, mk-agentd, mk-demo-kv).
#
#   pkgs.callPackage ./package.nix { }
#
# Needs a nixpkgs whose rustc is at least 1.88: the workspace is edition 2024 and uses
# let-chains (rust-version in Cargo.toml says 1.85, which is the edition's minimum, not
# the code's).
{
  lib,
  rustPlatform,
}:

let
  root = ../.;
  workspace = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "mk-upgrade";
  inherit (workspace.workspace.package) version;

  # Only what cargo needs to build the workspace: every member must be present for the
  # workspace to load, even the ones not built here (tests/). The fuzz crate is excluded
  # from the workspace and may hold a large corpus.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.difference (lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../kho-proto
      ../state-serializers
      ../rollback
      ../upgrade-agent
      ../demo-kv
      ../test-support
      ../tests
    ]) ../kho-proto/fuzz;
  };

  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [
    "--package"
    "upgrade-agent"
    "--package"
    "mk-demo-kv"
    "--bin"
    "mk-upgrade"
    "--bin"
    "mk-agentd"
    "--bin"
    "mk-demo-kv"
  ];

  # The test suites need root (cgroup v2 freezing), real cgroups, spawned supervisor
  # processes and, for tests/vm, QEMU and kernel images: none of that exists in the build
  # sandbox. They run in CI and on hosts (tests/run-all.sh), not here.
  doCheck = false;

  meta = {
    description = "Zero-downtime Linux kernel upgrades: live workload handover across kernels with journaled rollback";
    license = lib.licenses.asl20;
    platforms = [ "x86_64-linux" ];
    mainProgram = "mk-upgrade";
  };
}
