# The flake lives in nix/ and builds from the repository root (../): inside a git checkout
# `nix build ./nix` takes the whole repository (git+file:...?dir=nix), so ../Cargo.lock and
# the crates are part of its source. No flake.lock is committed: pin nixpkgs where you
# consume it (`inputs.mk-upgrade.inputs.nixpkgs.follows = "nixpkgs";`).
{
  description = "mk-upgrade: zero-downtime Linux kernel upgrades (package and NixOS module)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
    in
    {
      packages.${system} = {
        mk-upgrade = pkgs.callPackage ./package.nix { };
        default = self.packages.${system}.mk-upgrade;
      };

      overlays.default = final: _prev: { mk-upgrade = final.callPackage ./package.nix { }; };

      # The module's package option is mkPackageOption pkgs "mk-upgrade": this module adds
      # the overlay, so pkgs.mk-upgrade is built with the importing system's nixpkgs. Set
      # services.mk-upgrade.package to mk-upgrade.packages.x86_64-linux.default to use this
      # flake's own build instead.
      nixosModules.default = {
        imports = [ ./module.nix ];
        nixpkgs.overlays = [ self.overlays.default ];
      };
      nixosModules.mk-upgrade = self.nixosModules.default;
    };
}
