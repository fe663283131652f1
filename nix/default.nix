# Without flakes:
#
#   nix-build nix -A mk-upgrade                      # the package
#   imports = [ /path/to/mk-upgrade/nix/module.nix ]; # in a NixOS configuration
#
# `pkgs` defaults to the <nixpkgs> channel; it needs rustc >= 1.88 (see package.nix).
{
  pkgs ? import <nixpkgs> { },
}:
{
  mk-upgrade = pkgs.callPackage ./package.nix { };
  module = ./module.nix;
}
