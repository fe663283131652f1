# Without flakes:
#
#   nix-build nix -A mk-upgrade                               # the package
#   imports = [ (import /path/to/mk-upgrade/nix { }).module ]; # in a NixOS configuration
#
# `pkgs` defaults to the <nixpkgs> channel; it needs rustc >= 1.88 (see package.nix).
# `module` is nix/module.nix with the overlay that provides pkgs.mk-upgrade (the module's
# package option is mkPackageOption pkgs "mk-upgrade"); `overlay` alone is there too.
{
  pkgs ? import <nixpkgs> { },
}:
let
  overlay = final: _prev: { mk-upgrade = final.callPackage ./package.nix { }; };
in
{
  mk-upgrade = pkgs.callPackage ./package.nix { };
  inherit overlay;
  module = {
    imports = [ ./module.nix ];
    nixpkgs.overlays = [ overlay ];
  };
}
