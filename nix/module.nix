# NixOS module: services.mk-upgrade (docs/nixos.md).
#
# * installs mk-upgrade, mk-agentd, mk-demo-kv and points MK_STATE_DIR / MK_PLATFORM at the
#   configured state directory and platform;
# * declares the trusted release keys and the workload file (docs/workloads.md);
# * mk-agentd.service: start-up recovery of an interrupted upgrade, before the workloads;
# * kernelSupport.enable: a KHO/LUO-capable kernel (config options + `liveupdate=on`);
# * liveUpgradeOnSwitch: when `nixos-rebuild switch` changes the kernel, upgrade to it live
#   with `mk-upgrade apply` instead of waiting for a reboot.
#
# No `with lib;`: every name is bound lexically, so `nix-instantiate --parse` reports an
# undefined variable.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.mk-upgrade;
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    mkMerge
    types
    literalExpression
    escapeShellArg
    ;

  tomlFormat = pkgs.formats.toml { };

  hexKey = "[0-9a-fA-F]{64}";
  isHexKey = k: builtins.isString k && builtins.match hexKey k != null;

  # A trusted key: the public key itself (64 hex digits, what `mk-upgrade keys generate`
  # writes to NAME.pub), or a path to such a .pub file.
  keyType = types.either (types.strMatching hexKey) types.path;

  keyListToAttrs =
    keys:
    lib.listToAttrs (
      lib.imap0 (
        i: k:
        lib.nameValuePair (
          if isHexKey k then "key-${toString i}" else "${toString i}-${lib.removeSuffix ".pub" (baseNameOf (toString k))}"
        ) k
      ) keys
    );

  # STATE_DIR/trusted-keys: a store directory of NAME.pub (the module owns it entirely, so a
  # key removed from the configuration stops being trusted at the next switch).
  trustedKeysDir = pkgs.linkFarm "mk-upgrade-trusted-keys" (
    lib.mapAttrsToList (name: key: {
      name = "${name}.pub";
      path = if isHexKey key then pkgs.writeText "${name}.pub" "${key}\n" else key;
    }) cfg.trustedKeys
  );

  workloadModule = {
    # Every other key of the workload file (env, cpu_max, memory_max, transfer, integrity,
    # memfd, listen, health) is accepted as is and checked by mk-upgrade itself, which
    # rejects unknown keys (docs/workloads.md).
    freeformType = tomlFormat.type;
    options = {
      name = mkOption {
        type = types.strMatching "[A-Za-z0-9._-]{1,63}";
        description = "Workload name (unique; it becomes a LUO session name).";
      };
      exec = mkOption {
        type = types.strMatching "/.*";
        example = literalExpression ''"''${pkgs.mk-upgrade}/bin/mk-demo-kv"'';
        description = "Absolute path of the program.";
      };
      args = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Its arguments.";
      };
    };
  };

  # `workloads` as an attribute set: the attribute name is the workload name.
  workloadAttrsToList = ws: lib.mapAttrsToList (name: w: { inherit name; } // w) ws;

  workloadsFile = tomlFormat.generate "mk-upgrade-workloads.toml" {
    workload = map (w: lib.filterAttrs (n: v: n != "_module" && v != null) w) cfg.workloads;
  };

  # The `apply` arguments that do not depend on the kernel.
  trustArgs =
    if cfg.signatureFile != null then
      [
        "--signature"
        (toString cfg.signatureFile)
      ]
    else
      lib.optional cfg.insecureAllowUnsigned "--insecure-allow-unsigned";

  switchScript = pkgs.writeShellScript "mk-upgrade-on-switch" ''
    set -u
    PATH=${
      lib.makeBinPath [
        cfg.package
        pkgs.coreutils
        pkgs.jq
      ]
    }
    state=${escapeShellArg cfg.stateDir}
    booted=$(readlink -f /run/booted-system/kernel)
    current=$(readlink -f /run/current-system/kernel)
    if [ "$booted" = "$current" ]; then
      echo "mk-upgrade: the configuration's kernel is the running one ($current): nothing to do"
      exit 0
    fi
    system=$(readlink -f /run/current-system)
    initrd=$(readlink -f /run/current-system/initrd)
    # The command line the boot loader would use for this generation.
    cmdline="init=$system/init $(cat /run/current-system/kernel-params)"
    mkdir -p "$state/nixos-switch"
    out="$state/nixos-switch/last-apply.json"
    echo "mk-upgrade: live upgrade $booted -> $current"
    rc=0
    mk-upgrade --state-dir "$state" --platform luo apply \
      --kernel "$current" --initrd "$initrd" --cmdline "$cmdline" \
      ${lib.escapeShellArgs (trustArgs ++ cfg.extraApplyArgs)} --json >"$out.tmp" || rc=$?
    mv -f "$out.tmp" "$out"
    result=$(jq -r '.result // "no report"' "$out" 2>/dev/null || echo "no report")
    err=$(jq -r '[.error // empty] + [.checks[]? | select(.ok | not) | "\(.name): \(.detail)"] | join("; ")' "$out" 2>/dev/null || true)
    case "$rc" in
      0)
        echo "mk-upgrade: upgraded live to $(jq -r '.kernel_after' "$out") (record: $out)"
        exit 0
        ;;
      14)
        echo "mk-upgrade: nothing to do: $err"
        exit 0
        ;;
    esac
    case "$rc" in
      2) name=usage ;; 3) name=io ;; 4) name=corrupt ;; 5) name=untrusted ;;
      6) name=incompatible ;; 7) name=not-a-kernel ;; 8) name=preflight-failed ;;
      9) name=busy ;; 10) name=rolled-back ;; 11) name=capture-failed ;; 12) name=platform ;;
      *) name=internal ;;
    esac
    echo "mk-upgrade: live upgrade NOT done: exit $rc ($name), result $result''${err:+: $err}" >&2
    echo "mk-upgrade: the running kernel $(uname -r) keeps every workload; the new kernel is the" >&2
    echo "mk-upgrade: default boot entry and takes effect at the next reboot (record: $out)" >&2
    exit 1
  '';
in
{
  options.services.mk-upgrade = {
    enable = mkEnableOption "mk-upgrade, zero-downtime kernel upgrades";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The mk-upgrade package (binaries mk-upgrade, mk-agentd, mk-demo-kv).";
    };

    stateDir = mkOption {
      type = types.strMatching "/.+";
      default = "/var/lib/mk-upgrade";
      description = "State directory: journal, kernel slots, node keys, trusted keys, workload file.";
    };

    platform = mkOption {
      type = types.enum [
        "auto"
        "emulated"
        "luo"
      ];
      default = "auto";
      description = ''
        Platform of interactive `mk-upgrade` commands (MK_PLATFORM): `luo` (mainline
        /dev/liveupdate + kexec), `emulated` (the multikernel EMULATION: no real kernel
        boots), or `auto` (luo when /dev/liveupdate exists, else emulated). mk-agentd always
        uses `auto`. The on-switch upgrade always uses `luo`.
      '';
    };

    trustedKeys = mkOption {
      type = types.coercedTo (types.listOf keyType) keyListToAttrs (
        types.attrsOf keyType
      );
      default = { };
      example = literalExpression ''
        {
          release = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";
          ci = ./keys/ci.pub;
        }
      '';
      description = ''
        Release-signing public keys trusted for kernel images, written to
        STATE_DIR/trusted-keys/NAME.pub: the key itself (64 hex digits) or the path of a
        .pub file (a store path, or an absolute path read on the host at run time). A list
        is accepted too (names key-N, or N-BASENAME for paths). When non-empty, the module
        owns STATE_DIR/trusted-keys (a link to a store directory): keys put there by hand
        are no longer seen. Empty: the directory is left alone.
      '';
    };

    workloads = mkOption {
      type = types.coercedTo (types.attrsOf (types.attrsOf types.anything)) workloadAttrsToList (
        types.listOf (types.submodule workloadModule)
      );
      default = [ ];
      example = literalExpression ''
        {
          kv-1 = {
            exec = "''${pkgs.mk-upgrade}/bin/mk-demo-kv";
            args = [ "--capacity" "64MiB" ];
            memfd = [ { name = "kv-data"; } ];
            listen = [ { name = "listen"; addr = "127.0.0.1:7001"; } ];
            health = { kind = "http"; addr = "127.0.0.1:7001"; };
          };
        }
      '';
      description = ''
        The workloads mk-upgrade manages, rendered to STATE_DIR/workloads.toml (the format of
        docs/workloads.md, one `[[workload]]` per entry). A list keeps its order; an
        attribute set is ordered by name, and the attribute name is the workload name. Empty:
        STATE_DIR/workloads.toml is left alone.
      '';
    };

    workloadUnits = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "kv-store.service" ];
      description = ''
        systemd units that must start only after start-up recovery (mk-agentd.service is
        ordered Before= them and is pulled in by them).
      '';
    };

    liveUpgradeOnSwitch = mkOption {
      type = types.bool;
      default = false;
      description = ''
        When `nixos-rebuild switch` activates a configuration whose kernel differs from the
        booted one, run `mk-upgrade apply --platform luo` to it (with its initrd and the
        generation's command line) instead of leaving it for the next reboot. On any
        non-zero exit the running kernel and workloads stay as they were, the unit
        mk-upgrade-switch.service fails (so the switch reports it) and the new kernel takes
        effect at the next reboot as usual. Needs signatureFile (or insecureAllowUnsigned).
      '';
    };

    signatureFile = mkOption {
      type = types.nullOr (types.either types.path types.str);
      default = null;
      example = "/var/lib/mk-upgrade/signatures/current.sig";
      description = ''
        Signature (`mk-upgrade sign`) of the configuration's kernel image, passed as
        `apply --signature`. The signing key never belongs on the host: sign the bzImage of
        the kernel derivation where it is built and ship the .sig with the configuration.
      '';
    };

    insecureAllowUnsigned = mkOption {
      type = types.bool;
      default = false;
      description = "Pass `--insecure-allow-unsigned` to the on-switch upgrade (test hosts only).";
    };

    extraApplyArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--allow-downgrade" ];
      description = "More arguments for the on-switch `mk-upgrade apply`.";
    };

    kernelSupport.enable = mkEnableOption ''
      a kernel able to hand state over with KHO/LUO: adds the kernel options KEXEC_FILE,
      RELOCATABLE, KEXEC_HANDOVER, KEXEC_HANDOVER_ENABLE_DEFAULT, LIVEUPDATE,
      LIVEUPDATE_MEMFD (kernel-patches/configs/kho-luo.config) through boot.kernelPatches,
      and `liveupdate=on` to boot.kernelParams. Needs Linux 6.19 or later; the kernel is
      rebuilt'';
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = pkgs.stdenv.hostPlatform.isx86_64;
          message = "services.mk-upgrade: only x86_64 kernels (bzImage) are supported.";
        }
        {
          assertion = cfg.liveUpgradeOnSwitch -> cfg.platform != "emulated";
          message = "services.mk-upgrade.liveUpgradeOnSwitch needs a real platform: the emulated one boots no kernel. Set platform to \"luo\" or \"auto\".";
        }
        {
          assertion = cfg.liveUpgradeOnSwitch -> (cfg.signatureFile != null || cfg.insecureAllowUnsigned);
          message = "services.mk-upgrade.liveUpgradeOnSwitch needs signatureFile (the kernel image's .sig), or insecureAllowUnsigned on test hosts.";
        }
      ];
      warnings =
        lib.optional cfg.insecureAllowUnsigned "services.mk-upgrade.insecureAllowUnsigned: kernel images are accepted without a signature"
        ++ lib.optional (
          cfg.liveUpgradeOnSwitch && !cfg.kernelSupport.enable
        ) "services.mk-upgrade.liveUpgradeOnSwitch without kernelSupport.enable: the kernel must already have KHO/LUO and boot with liveupdate=on";

      environment.systemPackages = [ cfg.package ];
      environment.variables = {
        MK_STATE_DIR = cfg.stateDir;
        MK_PLATFORM = cfg.platform;
      };

      systemd.tmpfiles.rules = [
        "d ${cfg.stateDir} 0700 root root -"
      ]
      ++ lib.optional (cfg.trustedKeys != { }) "L+ ${cfg.stateDir}/trusted-keys - - - - ${trustedKeysDir}"
      ++ lib.optional (cfg.workloads != [ ]) "L+ ${cfg.stateDir}/workloads.toml - - - - ${workloadsFile}";

      # Start-up recovery: finish or undo an upgrade that was interrupted (crash, power
      # loss, a kexec that came back), before anything uses the workloads' state.
      systemd.services.mk-agentd = {
        description = "mk-upgrade start-up recovery";
        wantedBy = [ "multi-user.target" ] ++ cfg.workloadUnits;
        after = [
          "local-fs.target"
          "systemd-tmpfiles-setup.service"
        ];
        before = cfg.workloadUnits;
        # Recovery is a boot-time duty; re-running it on every switch could race an
        # upgrade in flight (it would then exit 9, busy).
        restartIfChanged = false;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${cfg.package}/bin/mk-agentd --state-dir ${escapeShellArg cfg.stateDir}";
        };
      };
    }

    (mkIf (cfg.platform == "luo" || cfg.kernelSupport.enable) {
      # The host agent of a LUO kernel: owns /dev/liveupdate, runs the declared workloads as
      # its children, preserves them and kexecs on `mk-upgrade apply --platform luo`, and in
      # the next kernel restores them from their LUO sessions (docs/kernel.md).
      systemd.services.mk-agentd-serve = {
        description = "mk-upgrade host agent (LUO)";
        wantedBy = [ "multi-user.target" ];
        after = [ "mk-agentd.service" ];
        requires = [ "mk-agentd.service" ];
        # Its children are the workloads: never restart it behind their back on a switch.
        restartIfChanged = false;
        stopIfChanged = false;
        serviceConfig = {
          Type = "simple";
          ExecStart = "${cfg.package}/bin/mk-agentd serve --state-dir ${escapeShellArg cfg.stateDir} --workloads ${escapeShellArg "${cfg.stateDir}/workloads.toml"} --kernel-image /run/booted-system/kernel";
          Restart = "on-failure";
        };
      };
    })

    (mkIf cfg.liveUpgradeOnSwitch {
      # Restarted by switch-to-configuration whenever the kernel store path changes (the
      # trigger is part of the unit file); at boot it finds booted = current and exits 0.
      systemd.services.mk-upgrade-switch = {
        description = "mk-upgrade: live upgrade to the kernel of the activated configuration";
        wantedBy = [ "multi-user.target" ];
        after = [ "mk-agentd.service" ] ++ lib.optional (cfg.platform == "luo" || cfg.kernelSupport.enable) "mk-agentd-serve.service" ++ cfg.workloadUnits;
        requires = [ "mk-agentd.service" ];
        restartTriggers = [ config.boot.kernelPackages.kernel ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${switchScript}";
          TimeoutStartSec = "30min";
        };
      };
    })

    (mkIf cfg.kernelSupport.enable {
      assertions = [
        {
          assertion = lib.versionAtLeast config.boot.kernelPackages.kernel.version "6.19";
          message = "services.mk-upgrade.kernelSupport needs Linux 6.19 or later (LUO); boot.kernelPackages has ${config.boot.kernelPackages.kernel.version}.";
        }
      ];
      boot.kernelParams = [ "liveupdate=on" ];
      boot.kernelPatches = [
        {
          name = "mk-upgrade-kho-luo";
          patch = null;
          extraStructuredConfig = {
            KEXEC_FILE = lib.kernel.yes;
            RELOCATABLE = lib.kernel.yes;
            KEXEC_HANDOVER = lib.kernel.yes;
            KEXEC_HANDOVER_ENABLE_DEFAULT = lib.kernel.yes;
            LIVEUPDATE = lib.kernel.yes;
            LIVEUPDATE_MEMFD = lib.kernel.yes;
          };
        }
      ];
    })
  ]);
}
