# NixOS module: services.mk-upgrade (docs/nixos.md).
#
# * installs mk-upgrade, mk-agentd, mk-demo-kv and points MK_STATE_DIR / MK_PLATFORM at the
#   configured state directory and platform;
# * declares the trusted release keys and the workload file (docs/workloads.md), the
#   workload file validated by mk-upgrade itself at build time (system.checks);
# * mk-agentd.service: start-up recovery of an interrupted upgrade, before the workloads;
# * mk-agentd-serve.service: the LUO host agent (on LUO hosts);
# * kernelSupport.enable: a KHO/LUO-capable kernel (config options + `liveupdate=on`);
# * liveUpgradeOnSwitch: `nixos-rebuild switch` to a generation with another kernel
#   schedules a live upgrade to it (nix/live-upgrade.sh), which runs once the switch has
#   finished and reports through the journal and `mk-upgrade history`.
#
# No `with lib;`: every name is bound lexically, so `nix-instantiate --parse` reports an
# undefined variable.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.services.mk-upgrade;
  inherit (lib)
    mkOption
    mkEnableOption
    mkPackageOption
    mkIf
    mkMerge
    mkDefault
    types
    literalExpression
    escapeShellArg
    ;

  tomlFormat = pkgs.formats.toml { };

  hexKey = "[0-9a-fA-F]{64}";
  isHexKey = k: builtins.isString k && builtins.match hexKey k != null;
  inStore = p: lib.hasPrefix "${builtins.storeDir}/" "${p}";

  # A trusted key: the public key itself (64 hex digits, what `mk-upgrade keys generate`
  # writes to NAME.pub), or a path to such a .pub file in the configuration (copied to the
  # store).
  keyType = types.either (types.strMatching hexKey) types.path;

  keyListToAttrs =
    keys:
    lib.listToAttrs (
      lib.imap0 (
        i: k:
        lib.nameValuePair (
          if isHexKey k then
            "key-${toString i}"
          else
            "${toString i}-${lib.removeSuffix ".pub" (baseNameOf (toString k))}"
        ) k
      ) keys
    );

  # STATE_DIR/trusted-keys: a store directory of NAME.pub, every one a regular file (mk-upgrade
  # opens key files with O_NOFOLLOW and refuses links, docs/signing.md). The module owns the
  # directory: a key removed from the configuration stops being trusted at the next switch.
  trustedKeysDir = pkgs.runCommand "mk-upgrade-trusted-keys" { } (
    ''
      mkdir "$out"
    ''
    + lib.concatStrings (
      lib.mapAttrsToList (
        name: key:
        let
          dest = "\"$out\"/${escapeShellArg "${name}.pub"}";
        in
        if isHexKey key then
          "printf '%s\\n' ${escapeShellArg key} > ${dest}\n"
        else
          "cp --dereference --no-preserve=all ${escapeShellArg "${key}"} ${dest}\n"
      ) cfg.trustedKeys
    )
    + ''
      chmod 0444 "$out"/*.pub
      chmod 0555 "$out"
    ''
  );

  workloadModule =
    { name, ... }:
    {
      # Every other key of the workload file (env, cpu_max, memory_max, transfer, integrity,
      # memfd, listen, health, mode, ...) is accepted here and checked by mk-upgrade itself
      # at build time (`mk-upgrade workloads check`, in system.checks), which rejects
      # unknown keys such as a misspelt `helth` (docs/workloads.md).
      freeformType = tomlFormat.type;
      options = {
        name = mkOption {
          type = types.strMatching "[A-Za-z0-9._-]{1,63}";
          default = name;
          defaultText = literalExpression "<the attribute name>";
          description = "Workload name (it becomes a cgroup and LUO session name).";
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

  # The list form (each entry with its `name`) as the attribute set it stands for. A name
  # given twice is kept twice under distinct keys, so that the assertion below names it.
  workloadListToAttrs =
    ws:
    lib.listToAttrs (
      lib.imap0 (
        i: w:
        let
          n = w.name or (throw "services.mk-upgrade.workloads: list entry ${toString i} has no name");
          first = lib.findFirst (x: (x.name or null) == n) null ws;
        in
        lib.nameValuePair (if first == w then n else "${n}#${toString i}") w
      ) ws
    );

  workloadList = lib.attrValues cfg.workloads;

  workloadNames = map (w: w.name) workloadList;
  duplicateNames = lib.unique (
    lib.filter (n: lib.count (m: m == n) workloadNames > 1) workloadNames
  );

  workloadsFile = tomlFormat.generate "mk-upgrade-workloads.toml" {
    workload = map (w: lib.filterAttrs (n: v: n != "_module" && v != null) w) workloadList;
  };

  # Build-time validation of the generated file by the mk-upgrade that will read it.
  workloadsCheck =
    pkgs.runCommand "mk-upgrade-workloads-check" { nativeBuildInputs = [ cfg.package ]; }
      ''
        mk-upgrade workloads check ${workloadsFile}
        touch "$out"
      '';

  kernelImage = "${config.boot.kernelPackages.kernel}/${config.system.boot.loader.kernelFile}";

  # Carried by every generation (its /etc), read by nix/live-upgrade.sh from the generation
  # being switched to: the signature belongs to that generation's kernel image and to no
  # other, so `switch --rollback` and older generations use their own.
  liveUpgradeManifest = pkgs.writeText "mk-upgrade-live-upgrade.json" (
    builtins.toJSON {
      kernel = kernelImage;
      signature = if cfg.signatureFile == null then null else "${cfg.signatureFile}";
      inherit (cfg) insecureAllowUnsigned extraApplyArgs;
    }
  );

  liveScript = pkgs.writeShellScript "mk-upgrade-live" ''
    export PATH=${
      lib.makeBinPath [
        cfg.package
        pkgs.coreutils
        pkgs.jq
        pkgs.util-linux
      ]
    }
    export MK_STATE_DIR=${escapeShellArg cfg.stateDir}
    # This wrapper's own path: a request names it, so that the generation that scheduled an
    # upgrade runs it even when the previous generation's unit was started.
    export MK_LIVE_WRAPPER="$0"
    exec ${pkgs.bash}/bin/bash ${./live-upgrade.sh} "$@"
  '';

  # Runs the LUO host agent: luo as the platform, or a LUO kernel asked for, or live
  # upgrades on switch (which always use luo).
  luoHost = cfg.platform == "luo" || cfg.kernelSupport.enable || cfg.liveUpgradeOnSwitch;

  # Hardening shared by the units that run no workload (mk-agentd-serve's children are the
  # workloads, which inherit its sandbox: it gets only what no workload should miss).
  commonHardening = {
    UMask = "0077";
    ProtectHome = "read-only";
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectClock = true;
    ProtectHostname = true;
    LockPersonality = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
  };
  mkDefaults = lib.mapAttrs (_: mkDefault);
in
{
  options.services.mk-upgrade = {
    enable = mkEnableOption "mk-upgrade, zero-downtime kernel upgrades";

    package = mkPackageOption pkgs "mk-upgrade" {
      extraDescription = ''
        It must provide bin/mk-upgrade, bin/mk-agentd and bin/mk-demo-kv. The flake's
        nixosModules.default and nix/default.nix's module add pkgs.mk-upgrade through the
        overlay (overlays.default).
      '';
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
        "multikernel"
      ];
      default = "auto";
      description = ''
        Platform of interactive `mk-upgrade` commands (MK_PLATFORM): `luo` (mainline
        /dev/liveupdate + kexec), `emulated` (the multikernel EMULATION: no real kernel
        boots), `multikernel` (the multikernel patch set's interface), or `auto` (luo when
        /dev/liveupdate exists, else emulated). mk-agentd always uses `auto`. The on-switch
        upgrade always uses `luo`.
      '';
    };

    trustedKeys = mkOption {
      type = types.coercedTo (types.listOf keyType) keyListToAttrs (types.attrsOf keyType);
      default = { };
      example = literalExpression ''
        {
          release = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";
          ci = ./keys/ci.pub;
        }
      '';
      description = ''
        Release-signing public keys trusted for kernel images, written as regular files to
        a store directory that STATE_DIR/trusted-keys links to: the key itself (64 hex
        digits) or a .pub file in the configuration (a path such as ./keys/ci.pub, copied
        to the store; a path outside the store is refused at evaluation). A list is accepted
        too (names key-N, or N-BASENAME for paths). When non-empty, the module owns
        STATE_DIR/trusted-keys: keys put there by hand are no longer seen. Empty: the
        directory is left alone.
      '';
    };

    workloads = mkOption {
      type = types.coercedTo (types.listOf (types.attrsOf types.anything)) workloadListToAttrs (
        types.attrsOf (types.submodule workloadModule)
      );
      default = { };
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
        The workloads mk-upgrade manages, by name (the attribute name is the workload's
        `name` unless set), rendered to STATE_DIR/workloads.toml (the format of
        docs/workloads.md, one `[[workload]]` per entry, ordered by attribute name) and
        validated at build time by `mk-upgrade workloads check`. Definitions of one
        workload in several modules merge like any submodule. A list of entries with a
        `name` is accepted too (converted to the attribute set). Names must be unique.
        Empty: STATE_DIR/workloads.toml is left alone.
      '';
    };

    workloadUnits = mkOption {
      type = types.listOf utils.systemdUtils.lib.unitNameType;
      default = [ ];
      example = [ "kv-store.service" ];
      description = ''
        systemd units (full names, with their suffix) that must start only after start-up
        recovery and the host agent: mk-agentd.service and mk-agentd-serve.service are
        ordered Before= them and are pulled in by them.
      '';
    };

    liveUpgradeOnSwitch = mkOption {
      type = types.bool;
      default = false;
      description = ''
        When `nixos-rebuild switch` activates a generation whose kernel differs from the
        booted one, upgrade to it live (`mk-upgrade apply --platform luo` with the
        generation's kernel, initrd and command line) once the switch has finished, instead
        of leaving it for the next reboot. The switch itself returns at once, saying that
        the upgrade is scheduled; the outcome is in the journal of
        mk-upgrade-live.service, in `mk-upgrade history` and in
        STATE_DIR/nixos-switch/last-apply.json. On failure the running kernel keeps every
        workload, the new kernel takes effect at the next reboot, and the same kernel is not
        tried again on later switches until the kernel, initrd, kernel parameters,
        signature or apply options change. `nixos-rebuild test` never live-upgrades.
        Needs signatureFile (or insecureAllowUnsigned).
      '';
    };

    signatureFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = literalExpression "./sigs/host-kernel.sig";
      description = ''
        Signature (`mk-upgrade sign`) of this configuration's kernel image
        (boot.kernelPackages.kernel + "/bzImage"), as a path in the configuration: it is
        copied to the store and becomes part of the generation, next to the kernel it
        signs, so every generation (and `nixos-rebuild switch --rollback`) uses its own. A
        path outside the store (a string such as "/var/lib/...") is refused at
        evaluation. The signing key never belongs on the host.
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
        {
          assertion = cfg.signatureFile == null || inStore cfg.signatureFile;
          message = "services.mk-upgrade.signatureFile = \"${toString cfg.signatureFile}\" is outside the store, so it is not part of the generation and would not follow its kernel (nor reach a --target-host): give a path in the configuration, e.g. signatureFile = ./sigs/host-kernel.sig;";
        }
        {
          assertion = duplicateNames == [ ];
          message = "services.mk-upgrade.workloads: workload names must be unique; repeated: ${lib.concatStringsSep ", " duplicateNames}.";
        }
      ]
      ++ lib.mapAttrsToList (name: key: {
        assertion = isHexKey key || inStore key;
        message = "services.mk-upgrade.trustedKeys.${name} = \"${toString key}\" is a path outside the store: give the key itself (64 hex digits) or a .pub file in the configuration (./keys/${name}.pub).";
      }) cfg.trustedKeys;
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
        "d /run/mk-upgrade 0700 root root -"
      ]
      ++ lib.optional (cfg.trustedKeys != { }) "L+ ${cfg.stateDir}/trusted-keys - - - - ${trustedKeysDir}"
      ++ lib.optional (cfg.workloads != { }) "L+ ${cfg.stateDir}/workloads.toml - - - - ${workloadsFile}";

      system.checks = lib.optional (cfg.workloads != { }) workloadsCheck;

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
        environment.MK_STATE_DIR = cfg.stateDir;
        serviceConfig = mkDefaults (
          commonHardening
          // {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = "${cfg.package}/bin/mk-agentd --state-dir ${escapeShellArg cfg.stateDir}";
          }
        );
      };
    }

    (mkIf luoHost {
      # The kernel options the luo platform needs, checked against a kernel the user brings
      # (kernelSupport.enable adds them).
      system.requiredKernelConfig = map config.lib.kernelConfig.isYes [
        "KEXEC_FILE"
        "RELOCATABLE"
        "KEXEC_HANDOVER"
        "LIVEUPDATE"
        "LIVEUPDATE_MEMFD"
      ];

      # The host agent of a LUO kernel: owns /dev/liveupdate, runs the declared workloads as
      # its children, preserves them and kexecs on `mk-upgrade apply --platform luo`, and
      # in the next kernel restores them from their LUO sessions (docs/kernel.md). Its way
      # back is the booted generation's kernel, initrd (with boot.initrd.secrets) and
      # command line.
      systemd.services.mk-agentd-serve = {
        description = "mk-upgrade host agent (LUO)";
        wantedBy = [ "multi-user.target" ] ++ cfg.workloadUnits;
        after = [ "mk-agentd.service" ];
        requires = [ "mk-agentd.service" ];
        before = cfg.workloadUnits;
        # Its children are the workloads: never restart it behind their back on a switch.
        restartIfChanged = false;
        stopIfChanged = false;
        environment.MK_STATE_DIR = cfg.stateDir;
        serviceConfig = mkDefaults {
          # READY=1 once its control socket is bound and the workloads run (restored after a
          # kexec), so Before= the workload units and After= it mean "serving".
          Type = "notify";
          ExecStartPre = "${liveScript} booted-initrd";
          ExecStart = "${cfg.package}/bin/mk-agentd serve --state-dir ${escapeShellArg cfg.stateDir} --workloads ${escapeShellArg "${cfg.stateDir}/workloads.toml"} --kernel-image /run/booted-system/kernel --initrd /run/mk-upgrade/booted-initrd";
          Restart = "on-failure";
          # The workloads inherit this sandbox: only what none of them should need.
          ProtectKernelModules = true;
          LockPersonality = true;
        };
      };
    })

    (mkIf cfg.liveUpgradeOnSwitch {
      # On switch (NIXOS_ACTION=switch), a kernel that differs from the booted one leaves a
      # request in /run/mk-upgrade; nothing else runs during the switch. Never fails the
      # activation: a problem is reported, and the new kernel waits for the next reboot.
      system.activationScripts.mk-upgrade-live = {
        supportsDryActivation = true;
        text = ''
          ${liveScript} schedule "$systemConfig" || echo "mk-upgrade: the live upgrade could not be scheduled (above); the new kernel takes effect at the next reboot" >&2
        '';
      };

      environment.etc."mk-upgrade/live-upgrade.json".source = liveUpgradeManifest;

      # The request starts the upgrade, which waits for switch-to-configuration's lock.
      systemd.paths.mk-upgrade-live = {
        description = "mk-upgrade: a live upgrade was scheduled by a switch";
        wantedBy = [ "multi-user.target" ];
        pathConfig = {
          PathExists = "/run/mk-upgrade/live-upgrade.request";
          Unit = "mk-upgrade-live.service";
        };
      };

      systemd.services.mk-upgrade-live = {
        description = "mk-upgrade: live upgrade to the kernel of the switched-to generation";
        # Pulled in by nothing but the path unit (or by hand), so a failed upgrade is not
        # started again by a switch that restarts multi-user.target.
        after = [
          "mk-agentd.service"
          "mk-agentd-serve.service"
        ]
        ++ cfg.workloadUnits;
        wants = [ "mk-agentd-serve.service" ];
        # A switch must not stop or restart an upgrade in flight.
        restartIfChanged = false;
        stopIfChanged = false;
        serviceConfig = mkDefaults (
          commonHardening
          // {
            Type = "oneshot";
            ExecStart = "${liveScript} run";
            TimeoutStartSec = "1h";
            PrivateTmp = true;
            ProtectSystem = "strict";
            # "-": /run/nixos exists once a switch ran (switch-to-configuration makes it).
            ReadWritePaths = [
              cfg.stateDir
              "/run/mk-upgrade"
              "-/run/nixos"
            ];
            NoNewPrivileges = true;
            ProtectControlGroups = true;
            RestrictNamespaces = true;
            CapabilityBoundingSet = [
              "CAP_DAC_OVERRIDE"
              "CAP_DAC_READ_SEARCH"
            ];
          }
        );
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
